//! The Discord bot (serenity 0.12): the only module that knows Discord.
//!
//! - `/cartoon photo:<attachment> [style] [output]`, the **Cartoonize** message menu command
//!   and photos sent in DM all go through one flow ([`cartoon`]): check the attachment's
//!   declared type, size and host; acknowledge at once (defer / progress message); download
//!   within the byte limit; queue ([`crate::jobs::JobQueue`]) with position updates; edit the
//!   reply with one file per face. Errors reach only the user who asked.
//! - `/preset set|show|reset`, `/styles`, `/sticker add`, `/server-settings`.
//! - `/stylepack upload|cancel|resume|publish|delete|list` ([`stylepack`]): server admins turn
//!   a .zip of cartoon faces into a style of their server ([`crate::stylepack::StylePacks`]);
//!   the training's progress is one public message, edited as it goes.
//! - Presets, jobs, guild settings and style packs live in SQLite or PostgreSQL
//!   ([`crate::store::Store`]). On start, jobs left unfinished by a previous run are marked
//!   `interrupted` and their users told; a style pack that was training resumes.
//!
//! Gateway intents: `DIRECT_MESSAGES` only (interactions need none; in DMs with the bot,
//! message content and attachments come without the privileged MESSAGE_CONTENT intent).

mod cartoon;
mod commands;
pub mod config;
pub mod download;
mod handler;
mod reply;
mod responder;
mod settings;
mod stylepack;
mod texts;

use std::fmt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serenity::all::{ClientBuilder, GatewayIntents, HttpBuilder, ShardManager};
use tokio::task::JoinHandle;

pub use cartoon::{CartoonRequest, Delivery, Overrides, Resolved};
pub use config::BotConfig;
pub use reply::ReplyTarget;
pub use responder::respond;

use crate::jobs::{JetStreamQueue, JobQueue, RenderQueue, Renderer, StyleCatalog, StyleInfo};
use crate::store::{JobRecord, Store};
use crate::stylepack::{GatewayPacks, PackIntake, PackSetup, RunEvents, StylePacks};
use download::Downloader;

/// Log filter directives for `main` to add to its `EnvFilter` (after `RUST_LOG`, so that they
/// win): the websocket library dumps whole frames at TRACE, and the gateway IDENTIFY frame
/// carries the bot token.
pub const LOG_DIRECTIVES: [&str; 2] = ["tungstenite=info", "tokio_tungstenite=info"];

/// The bot token. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// The token with surrounding whitespace (such as a file's trailing newline) removed.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into().trim().to_string())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The token from `DISCORD_TOKEN`, else from `bot.token_file`.
pub fn load_token(config: &BotConfig) -> Result<Token> {
    token_from(
        std::env::var("DISCORD_TOKEN").ok(),
        config.token_file.as_deref(),
    )
}

/// `load_token` with the environment value passed in.
pub fn token_from(env: Option<String>, file: Option<&Path>) -> Result<Token> {
    if let Some(token) = env.filter(|t| !t.trim().is_empty()) {
        return Ok(Token::new(token));
    }
    let Some(path) = file else {
        bail!("no bot token: set DISCORD_TOKEN, or bot.token_file to a file holding it");
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the bot token file {}", path.display()))?;
    let token = Token::new(text);
    if token.0.is_empty() {
        bail!("the bot token file {} is empty", path.display());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    file = %path.display(),
                    "the bot token file is readable by other users; chmod 600 it"
                );
            }
        }
    }
    Ok(token)
}

/// Keep the latest stickers (for `/sticker add`) of at most this many users, at most this
/// many each, for at most this long (in SQLite, about 100 KB a sticker).
const RECENT_USERS: usize = 256;
const RECENT_STICKERS: usize = 8;
pub(crate) const RECENT_TTL: Duration = Duration::from_secs(30 * 60);

/// Remembers the stickers of a user's latest result, for `/sticker add`.
async fn remember_stickers(store: &Store, user: u64, guild_id: u64, stickers: &[Vec<u8>]) {
    let stickers = &stickers[..stickers.len().min(RECENT_STICKERS)];
    if let Err(e) = store
        .remember_stickers(user, guild_id, stickers, RECENT_TTL, RECENT_USERS)
        .await
    {
        tracing::warn!(user, error = %format!("{e:#}"), "remembering stickers failed");
    }
}

/// Where the bot learns which styles exist.
pub(crate) enum StyleSource {
    /// The renderer in this process.
    Renderer(Arc<dyn Renderer>),
    /// The catalog the workers publish on the broker.
    Workers(StyleCatalog),
}

impl StyleSource {
    pub fn styles(&self) -> Vec<StyleInfo> {
        match self {
            Self::Renderer(renderer) => renderer.styles(),
            Self::Workers(catalog) => catalog.styles(),
        }
    }
}

/// What a bot process does with requests.
// Made once per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    /// The whole bot (`serve`, `--role all`): the in-process queue on `renderer`, and style
    /// packs when set up.
    InProcess {
        /// Renders on this process's worker threads.
        renderer: Arc<dyn Renderer>,
        /// Style packs; `None`: `/stylepack` says they are not enabled.
        stylepacks: Option<PackSetup>,
    },
    /// A gateway (`--role gateway`): jobs are queued on the broker for the workers, and the
    /// replies handed to the responders (`--role responder`). Loads no models.
    Gateway {
        /// The broker's render queue (and the responders' hand-offs).
        queue: JetStreamQueue,
        /// The styles the workers render.
        catalog: StyleCatalog,
        /// The shards this process connects; `None`: the only one.
        shards: Option<ShardRange>,
        /// Style-pack uploads queued for the trainers; `None`: `/stylepack` says they are
        /// not enabled.
        stylepacks: Option<GatewayPacks>,
    },
}

/// Shards `start..end` of `total`: one gateway process's part of the bot's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardRange {
    /// The first shard.
    pub start: u32,
    /// One past the last shard.
    pub end: u32,
    /// The bot's shards in all.
    pub total: u32,
}

impl std::str::FromStr for ShardRange {
    type Err = String;

    /// `START..END/TOTAL`, e.g. `0..2/4` (shards 0 and 1 of 4).
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}`: expected START..END/TOTAL, e.g. 0..2/4");
        let (range, total) = text.split_once('/').ok_or_else(bad)?;
        let (start, end) = range.split_once("..").ok_or_else(bad)?;
        let number = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
        let shards = Self {
            start: number(start)?,
            end: number(end)?,
            total: number(total)?,
        };
        if shards.start >= shards.end || shards.end > shards.total {
            return Err(format!(
                "`{text}`: the range must be non-empty and within 0..{}",
                shards.total
            ));
        }
        Ok(shards)
    }
}

/// What the handlers share.
pub(crate) struct BotState {
    pub config: BotConfig,
    pub store: Store,
    pub queue: RenderQueue,
    pub styles: StyleSource,
    /// On a gateway, where replies are handed over; `None`: answered here.
    pub responders: Option<JetStreamQueue>,
    pub downloader: Downloader,
    /// Jobs a previous run left unfinished, to tell their users once connected.
    pub interrupted: Mutex<Vec<JobRecord>>,
    /// `None` when style packs are not set up (or trained elsewhere: a gateway).
    pub stylepacks: Option<StylePacks>,
    /// On a gateway, where style-pack uploads are queued for the trainers.
    pub pack_intake: Option<PackIntake>,
    /// The training run resumed at start, to follow once connected.
    pub resumed_run: Mutex<Option<RunEvents>>,
    /// Set once the commands are registered (not again on reconnects).
    pub commands_registered: AtomicBool,
}

impl BotState {
    /// Least time between two progress edits of a message.
    pub fn progress_interval(&self) -> Duration {
        Duration::from_millis(self.config.progress_interval_ms)
    }
}

/// The REST client: Discord's, or the configured proxy (tests' fake Discord).
fn http_builder(config: &BotConfig, token: &Token) -> HttpBuilder {
    let http = HttpBuilder::new(token.expose());
    match &config.api_proxy {
        Some(proxy) => http.proxy(proxy.clone()).ratelimiter_disabled(true),
        None => http,
    }
}

/// A started bot.
pub struct RunningBot {
    shard_manager: Arc<ShardManager>,
    client: JoinHandle<serenity::Result<()>>,
    state: Arc<BotState>,
}

impl RunningBot {
    /// The bot's database (jobs, presets, guild settings).
    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// Waits until the gateway connection ends for good (an error, or a shutdown).
    pub async fn wait(&mut self) -> Result<()> {
        match (&mut self.client).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e).context("the Discord connection failed"),
            Err(e) => Err(e).context("the Discord client task failed"),
        }
    }

    /// Disconnects, stops the queue (waiting jobs are dropped; their rows stay `queued` or
    /// `running` and the next start reports them), stops a training at its next step (the
    /// next start resumes it) and closes the database.
    pub async fn shutdown(self) {
        self.shard_manager.shutdown_all().await;
        self.client.abort();
        let _ = self.client.await;
        if let RenderQueue::InProcess(queue) = &self.state.queue {
            queue.shutdown();
        }
        if let Some(packs) = &self.state.stylepacks {
            packs.shutdown().await;
        }
        self.state.store.close().await;
    }
}

/// Opens the database, starts the queue, resumes a style pack's training and connects to
/// Discord. Without `stylepacks`, `/stylepack` says they are not enabled.
pub async fn start(
    config: BotConfig,
    token: Token,
    renderer: Arc<dyn Renderer>,
    stylepacks: Option<PackSetup>,
) -> Result<RunningBot> {
    start_backend(
        config,
        token,
        Backend::InProcess {
            renderer,
            stylepacks,
        },
    )
    .await
}

/// Opens the database and connects to Discord as `backend` says. In-process: starts the
/// queue, reports jobs a previous run left unfinished and resumes a style pack's training. A
/// gateway's unfinished jobs live on in the broker, and it has no style packs yet.
pub async fn start_backend(
    config: BotConfig,
    token: Token,
    backend: Backend,
) -> Result<RunningBot> {
    let store = Store::connect(&config.database).await?;
    let (queue, styles, responders, stylepacks, pack_intake, shards) = match backend {
        Backend::InProcess {
            renderer,
            stylepacks,
        } => (
            RenderQueue::InProcess(JobQueue::new(Arc::clone(&renderer), config.queue_config())),
            StyleSource::Renderer(renderer),
            None,
            stylepacks.map(|setup| StylePacks::new(setup, store.clone())),
            None,
            None,
        ),
        Backend::Gateway {
            queue,
            catalog,
            shards,
            stylepacks,
        } => (
            RenderQueue::JetStream(queue.clone()),
            StyleSource::Workers(catalog),
            Some(queue),
            None,
            stylepacks.map(|setup| PackIntake::new(setup, store.clone())),
            shards,
        ),
    };
    let interrupted = match &queue {
        RenderQueue::InProcess(_) => store.interrupt_unfinished().await?,
        RenderQueue::JetStream(_) => Vec::new(),
    };
    for job in &interrupted {
        tracing::warn!(
            job = job.id,
            user = job.user_id,
            source = %job.source,
            was = %job.status,
            "job interrupted by a restart"
        );
    }
    let resumed_run = match &stylepacks {
        Some(packs) => packs.resume_unfinished().await.unwrap_or_else(|e| {
            tracing::error!(error = %format!("{e:#}"), "resuming a style pack's training failed");
            None
        }),
        None => None,
    };
    let downloader = Downloader::new(
        &config.allowed_cdn_hosts,
        config.max_photo_bytes,
        Duration::from_secs(config.download_timeout_secs),
    )?;
    let http = http_builder(&config, &token);
    // The gateway with shard 0 registers the commands; the others leave them be.
    let registers_commands = shards.is_none_or(|s| s.start == 0);
    let state = Arc::new(BotState {
        config,
        store,
        queue,
        styles,
        responders,
        downloader,
        interrupted: Mutex::new(interrupted),
        stylepacks,
        pack_intake,
        resumed_run: Mutex::new(resumed_run),
        commands_registered: AtomicBool::new(!registers_commands),
    });
    let handler = handler::Handler {
        state: Arc::clone(&state),
    };
    let mut client = ClientBuilder::new_with_http(http.build(), GatewayIntents::DIRECT_MESSAGES)
        .event_handler(handler)
        .await
        .context("creating the Discord client")?;
    let shard_manager = Arc::clone(&client.shard_manager);
    let client = tokio::spawn(async move {
        match shards {
            Some(s) => client.start_shard_range(s.start..s.end, s.total).await,
            None => client.start().await,
        }
    });
    Ok(RunningBot {
        shard_manager,
        client,
        state,
    })
}

/// `toonbot serve`: runs the bot until Ctrl-C (or SIGTERM) or a fatal gateway error.
pub async fn serve(config: BotConfig, token: Token, backend: Backend) -> Result<()> {
    let mut bot = start_backend(config, token, backend).await?;
    let result = tokio::select! {
        r = bot.wait() => r,
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    };
    bot.shutdown().await;
    result
}

/// Returns on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ranges_parse_and_bad_ones_are_refused() {
        let shards: ShardRange = "0..2/4".parse().unwrap();
        assert_eq!(
            shards,
            ShardRange {
                start: 0,
                end: 2,
                total: 4
            }
        );
        for bad in ["0..2", "2..2/4", "3..5/4", "a..b/4", "1/4"] {
            assert!(bad.parse::<ShardRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn token_comes_from_env_first_then_file_and_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "file-token\n").unwrap();
        let t = token_from(Some("env-token".into()), Some(&file)).unwrap();
        assert_eq!(t.expose(), "env-token");
        let t = token_from(Some("  ".into()), Some(&file)).unwrap();
        assert_eq!(t.expose(), "file-token");
        assert!(!format!("{t:?}").contains("file-token"));
        assert!(token_from(None, None).is_err());
        std::fs::write(&file, "\n").unwrap();
        assert!(token_from(None, Some(&file)).is_err());
    }
}
