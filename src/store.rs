//! Storage (sqlx): user presets, guild settings, the jobs table, an audit log, and style packs
//! ([`stylepacks`]), in a SQLite file (WAL; the default) or in PostgreSQL, which several
//! gateway processes can share ([`Database`]).
//!
//! Both backends go through sqlx's `Any` driver with one set of queries (`$1`-style
//! parameters, which SQLite reads too; `RETURNING id` for new rows). Migrations are embedded
//! at build time: SQLite's in `migrations/`, PostgreSQL's in `migrations/postgres/`, with the
//! same versions, tables, columns and indexes. Queries are built at run time (`sqlx::query`),
//! so building needs no database. Discord ids (`u64` snowflakes) are stored bit-cast to signed
//! 64-bit integers (SQLite INTEGER, PostgreSQL BIGINT), and flags as 0 or 1 in the same.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Connection, Executor, Row};

mod stylepacks;

pub use stylepacks::{
    GuildStyle, NewGuildStyle, NewRun, RunFinish, RunProgressRecord, RunStatus, StyleEval,
    StyleStatus, TrainingRun,
};

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Where the store lives: `[bot] database` in `config.toml`, a file path or a URL.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum Database {
    /// A SQLite file, created (with its folder) if missing. One process only.
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://` or `postgresql://` URL), which must exist; shared
    /// by every process given the same URL.
    Postgres(String),
}

impl Database {
    /// A `postgres://` or `postgresql://` URL is PostgreSQL; anything else a SQLite path.
    pub fn parse(s: &str) -> Self {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Self::Postgres(s.to_string())
        } else {
            Self::Sqlite(PathBuf::from(s))
        }
    }
}

impl From<String> for Database {
    fn from(s: String) -> Self {
        Self::parse(&s)
    }
}

impl From<PathBuf> for Database {
    fn from(path: PathBuf) -> Self {
        Self::Sqlite(path)
    }
}

impl From<&Path> for Database {
    fn from(path: &Path) -> Self {
        Self::Sqlite(path.to_path_buf())
    }
}

/// The path, or the URL without its password.
impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

/// `scheme://user:secret@host/db` as `scheme://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_string(),
    }
}

/// Which database a [`Store`] is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A user's defaults. `output` is one of `sticker`, `avatar`, `both`, `photo` (the bot checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preset {
    /// The style to use; `None`: the guild's default, else the bot's.
    pub style: Option<String>,
    /// Which files to make (an [`OutputKind`](crate::jobs::OutputKind) name).
    pub output: String,
    /// Draw a white outline around stickers.
    pub outline: bool,
    /// Crop avatars to a circle.
    pub round_avatar: bool,
}

/// Per-guild settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuildSettings {
    /// Style used when the user's preset names none.
    pub default_style: Option<String>,
    /// Whether `/sticker add` is allowed in this guild.
    pub stickers_enabled: bool,
}

impl Default for GuildSettings {
    fn default() -> Self {
        Self {
            default_style: None,
            stickers_enabled: true,
        }
    }
}

/// Where a job came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum JobSource {
    /// The `/cartoon` slash command.
    Slash,
    /// The "Cartoonize" message context menu.
    Menu,
    /// A photo sent to the bot in a direct message.
    Dm,
}

impl JobSource {
    /// The name stored in the jobs table's `source` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Slash => "slash",
            Self::Menu => "menu",
            Self::Dm => "dm",
        }
    }
}

/// How to reach the user about a job if the bot restarts before it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyRef {
    /// An interaction's original response (its token lasts 15 minutes).
    Interaction {
        /// The bot's application id.
        application_id: u64,
        /// The interaction token, which the response is edited with.
        token: String,
    },
    /// A message the bot posted (a DM progress message).
    Message {
        /// The message's id (in the job's channel).
        message_id: u64,
    },
}

/// A job as first recorded.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Who asked.
    pub user_id: u64,
    /// The guild it was asked in; `None` in direct messages.
    pub guild_id: Option<u64>,
    /// The channel it was asked in.
    pub channel_id: u64,
    /// Which command or message started it.
    pub source: JobSource,
    /// Hex SHA-256 of the photo's bytes.
    pub image_sha256: Option<String>,
    /// The style asked for (`None`: the default).
    pub style: Option<String>,
    /// Which files were asked for (an [`OutputKind`](crate::jobs::OutputKind) name).
    pub output: String,
    /// Where to tell the user should the bot restart before the job ends.
    pub reply: Option<ReplyRef>,
}

/// How a job ended.
#[derive(Debug, Clone, Default)]
pub struct JobEnd {
    /// `done` or `failed`.
    pub status: String,
    /// Served from the result cache or shared with an identical job.
    pub cached: bool,
    /// Faces rendered.
    pub faces: Option<u32>,
    /// An error code (`RenderError::code`, `queue_full`, `download`...).
    pub error: Option<String>,
    /// Milliseconds waiting for a worker.
    pub queue_ms: Option<f64>,
    /// Milliseconds the renderer took (0 when cached).
    pub render_ms: Option<f64>,
    /// Milliseconds from the request to the result.
    pub total_ms: Option<f64>,
    /// The style actually used.
    pub style: Option<String>,
}

/// A row of the jobs table.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// The job's id (the row's, ascending).
    pub id: i64,
    /// Who asked.
    pub user_id: u64,
    /// The guild it was asked in; `None` in direct messages.
    pub guild_id: Option<u64>,
    /// The channel it was asked in.
    pub channel_id: u64,
    /// `slash`, `menu` or `dm` ([`JobSource::as_str`]).
    pub source: String,
    /// Hex SHA-256 of the photo's bytes.
    pub image_sha256: Option<String>,
    /// The style asked for, replaced by the one used once the job ended.
    pub style: Option<String>,
    /// Which files were asked for (an [`OutputKind`](crate::jobs::OutputKind) name).
    pub output: String,
    /// `queued`, `running`, `done`, `failed` or `interrupted`.
    pub status: String,
    /// Served from the result cache or shared with an identical job.
    pub cached: bool,
    /// Faces rendered, once done.
    pub faces: Option<u32>,
    /// Error code of a failed or interrupted job.
    pub error: Option<String>,
    /// When it was recorded, in Unix milliseconds.
    pub created_at: i64,
    /// When a worker took it, in Unix milliseconds.
    pub started_at: Option<i64>,
    /// When it ended, in Unix milliseconds.
    pub finished_at: Option<i64>,
    /// Milliseconds waiting for a worker.
    pub queue_ms: Option<f64>,
    /// Milliseconds the renderer took (0 when cached).
    pub render_ms: Option<f64>,
    /// Milliseconds from the request to the result.
    pub total_ms: Option<f64>,
    /// Where to reach the user; cleared once the job ends.
    pub reply: Option<ReplyRef>,
}

/// The database. Cheap to clone (a connection pool).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// The columns `job_record` reads, as a literal for `concat!`.
macro_rules! job_columns {
    () => {
        "id, user_id, guild_id, channel_id, source, image_sha256, style, output, status, \
         cached, faces, error, created_at, started_at, finished_at, queue_ms, render_ms, \
         total_ms, reply_app_id, reply_token, reply_message_id"
    };
}

impl Store {
    /// Opens (creating it and its folder if needed) the SQLite file in WAL mode and applies
    /// the migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        Self::open_sqlite(path)
            .await
            .with_context(|| format!("opening the database {}", path.display()))
    }

    /// Opens the SQLite file or connects to the PostgreSQL database, and applies the
    /// migrations (PostgreSQL: under an advisory lock, so several processes may start at once).
    pub async fn connect(database: &Database) -> Result<Self> {
        match database {
            Database::Sqlite(path) => Self::open(path).await,
            Database::Postgres(url) => Self::connect_postgres(url)
                .await
                .with_context(|| format!("opening the database {database}")),
        }
    }

    async fn open_sqlite(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the database folder {}", dir.display()))?;
        }
        // Created, and switched to WAL (which the file keeps), through the SQLite driver's own
        // options; the pool's connections then set the per-connection pragmas.
        SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .connect()
            .await?
            .close()
            .await?;
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; \
                         PRAGMA busy_timeout = 5000;",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect(&sqlite_url(&std::path::absolute(path)?))
            .await?;
        SQLITE_MIGRATOR.run(&pool).await.context("migrating")?;
        Ok(Self {
            pool,
            backend: Backend::Sqlite,
        })
    }

    async fn connect_postgres(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .connect(url)
            .await?;
        POSTGRES_MIGRATOR.run(&pool).await.context("migrating")?;
        Ok(Self {
            pool,
            backend: Backend::Postgres,
        })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool (checkpointing SQLite's WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The SQLite journal mode in use (`wal`); an error on PostgreSQL.
    pub async fn journal_mode(&self) -> Result<String> {
        if self.backend != Backend::Sqlite {
            bail!("only SQLite has a journal mode");
        }
        Ok(sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&self.pool)
            .await?)
    }

    // --- presets -------------------------------------------------------------------------

    /// The user's saved defaults, if any.
    pub async fn preset(&self, user_id: u64) -> Result<Option<Preset>> {
        let row = sqlx::query(
            "SELECT style, output, outline, round_avatar FROM presets WHERE user_id = $1",
        )
        .bind(id(user_id))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Preset {
            style: r.get("style"),
            output: r.get("output"),
            outline: flag(&r, "outline"),
            round_avatar: flag(&r, "round_avatar"),
        }))
    }

    /// Saves (or replaces) the user's defaults.
    pub async fn set_preset(&self, user_id: u64, preset: &Preset) -> Result<()> {
        sqlx::query(
            "INSERT INTO presets (user_id, style, output, outline, round_avatar, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (user_id) DO UPDATE SET style = excluded.style, \
             output = excluded.output, outline = excluded.outline, \
             round_avatar = excluded.round_avatar, updated_at = excluded.updated_at",
        )
        .bind(id(user_id))
        .bind(preset.style.clone())
        .bind(preset.output.clone())
        .bind(i64::from(preset.outline))
        .bind(i64::from(preset.round_avatar))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes the user's preset; returns whether there was one.
    pub async fn reset_preset(&self, user_id: u64) -> Result<bool> {
        let done = sqlx::query("DELETE FROM presets WHERE user_id = $1")
            .bind(id(user_id))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    // --- guild settings --------------------------------------------------------------------

    /// The guild's settings, or the defaults.
    pub async fn guild_settings(&self, guild_id: u64) -> Result<GuildSettings> {
        let row = sqlx::query(
            "SELECT default_style, stickers_enabled FROM guild_settings WHERE guild_id = $1",
        )
        .bind(id(guild_id))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
            .map(|r| GuildSettings {
                default_style: r.get("default_style"),
                stickers_enabled: flag(&r, "stickers_enabled"),
            })
            .unwrap_or_default())
    }

    /// Saves the guild's settings and records who changed them in the audit log.
    pub async fn set_guild_settings(
        &self,
        guild_id: u64,
        settings: &GuildSettings,
        by_user: u64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO guild_settings (guild_id, default_style, stickers_enabled, updated_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (guild_id) DO UPDATE SET \
             default_style = excluded.default_style, \
             stickers_enabled = excluded.stickers_enabled, updated_at = excluded.updated_at",
        )
        .bind(id(guild_id))
        .bind(settings.default_style.clone())
        .bind(i64::from(settings.stickers_enabled))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        let detail = format!(
            "default_style={} stickers_enabled={}",
            settings.default_style.as_deref().unwrap_or("-"),
            settings.stickers_enabled
        );
        insert_audit(&mut tx, Some(guild_id), by_user, "guild_settings", &detail).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Audit entries of a guild, newest first: (user id, action, detail, unix ms).
    pub async fn audit_log(&self, guild_id: u64) -> Result<Vec<(u64, String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT user_id, action, detail, at FROM audit_log WHERE guild_id = $1 \
             ORDER BY id DESC",
        )
        .bind(id(guild_id))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    snowflake(r.get("user_id")),
                    r.get("action"),
                    r.get("detail"),
                    r.get("at"),
                )
            })
            .collect())
    }

    // --- jobs ------------------------------------------------------------------------------

    /// Records a new job as `queued`; returns its id.
    pub async fn insert_job(&self, job: &NewJob) -> Result<i64> {
        let (app, token, message) = match &job.reply {
            Some(ReplyRef::Interaction {
                application_id,
                token,
            }) => (Some(id(*application_id)), Some(token.clone()), None),
            Some(ReplyRef::Message { message_id }) => (None, None, Some(id(*message_id))),
            None => (None, None, None),
        };
        let job_id = sqlx::query_scalar(
            "INSERT INTO jobs (user_id, guild_id, channel_id, source, image_sha256, style, \
             output, status, created_at, reply_app_id, reply_token, reply_message_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9, $10, $11) RETURNING id",
        )
        .bind(id(job.user_id))
        .bind(job.guild_id.map(id))
        .bind(id(job.channel_id))
        .bind(job.source.as_str())
        .bind(job.image_sha256.clone())
        .bind(job.style.clone())
        .bind(job.output.clone())
        .bind(now_ms())
        .bind(app)
        .bind(token)
        .bind(message)
        .fetch_one(&self.pool)
        .await?;
        Ok(job_id)
    }

    /// Marks a job as running (a worker took it after `queue_ms`).
    pub async fn job_started(&self, job_id: i64) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET status = 'running', started_at = $1 WHERE id = $2 AND status = 'queued'",
        )
        .bind(now_ms())
        .bind(job_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records how a job ended and forgets its reply token.
    pub async fn finish_job(&self, job_id: i64, end: &JobEnd) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET status = $1, cached = $2, faces = $3, error = $4, queue_ms = $5, \
             render_ms = $6, total_ms = $7, style = COALESCE($8, style), finished_at = $9, \
             reply_app_id = NULL, reply_token = NULL, reply_message_id = NULL WHERE id = $10",
        )
        .bind(end.status.clone())
        .bind(i64::from(end.cached))
        .bind(end.faces.map(i64::from))
        .bind(end.error.clone())
        .bind(end.queue_ms)
        .bind(end.render_ms)
        .bind(end.total_ms)
        .bind(end.style.clone())
        .bind(now_ms())
        .bind(job_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The job with this id, if any.
    pub async fn job(&self, job_id: i64) -> Result<Option<JobRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE id = $1"
        ))
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(job_record))
    }

    /// The user's most recent jobs, newest first.
    pub async fn recent_jobs(&self, user_id: u64, limit: u32) -> Result<Vec<JobRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE user_id = $1 ORDER BY id DESC LIMIT $2"
        ))
        .bind(id(user_id))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_record).collect())
    }

    /// Marks every job left `queued` or `running` by a previous run as `interrupted` and returns
    /// them as they were (with their reply reference, which is then cleared).
    pub async fn interrupt_unfinished(&self) -> Result<Vec<JobRecord>> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE status IN ('queued', 'running') ORDER BY id"
        ))
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE jobs SET status = 'interrupted', error = 'restart', finished_at = $1, \
             reply_app_id = NULL, reply_token = NULL, reply_message_id = NULL \
             WHERE status IN ('queued', 'running')",
        )
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows.iter().map(job_record).collect())
    }

    // --- recent stickers (for /sticker add) ----------------------------------------------

    /// Replaces the user's remembered stickers with `stickers` (face 1 first), made in
    /// `guild_id`. Rows older than `ttl` are dropped, and beyond `max_users` users the
    /// oldest users' rows.
    pub async fn remember_stickers(
        &self,
        user_id: u64,
        guild_id: u64,
        stickers: &[Vec<u8>],
        ttl: Duration,
        max_users: usize,
    ) -> Result<()> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM recent_stickers WHERE user_id = $1 OR created_at < $2")
            .bind(id(user_id))
            .bind(now - ttl.as_millis() as i64)
            .execute(&mut *tx)
            .await?;
        for (i, png) in stickers.iter().enumerate() {
            // An upsert: on PostgreSQL another process may have stored this user's result
            // since the delete above (SQLite serialises writers).
            sqlx::query(
                "INSERT INTO recent_stickers (user_id, face, guild_id, png, created_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, face) DO UPDATE SET \
                 guild_id = excluded.guild_id, png = excluded.png, \
                 created_at = excluded.created_at",
            )
            .bind(id(user_id))
            .bind(i as i64 + 1)
            .bind(id(guild_id))
            .bind(png.as_slice())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "DELETE FROM recent_stickers WHERE user_id NOT IN (SELECT user_id FROM \
             recent_stickers GROUP BY user_id ORDER BY MAX(created_at) DESC, user_id LIMIT $1)",
        )
        .bind(max_users as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The user's remembered stickers made in `guild_id` within `ttl`, face 1 first (empty
    /// when there are none).
    pub async fn recent_stickers(
        &self,
        user_id: u64,
        guild_id: u64,
        ttl: Duration,
    ) -> Result<Vec<Vec<u8>>> {
        let rows = sqlx::query(
            "SELECT png FROM recent_stickers WHERE user_id = $1 AND guild_id = $2 \
             AND created_at >= $3 ORDER BY face",
        )
        .bind(id(user_id))
        .bind(id(guild_id))
        .bind(now_ms() - ttl.as_millis() as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get("png")).collect())
    }
}

/// Records who did what, and when, in the audit log.
async fn insert_audit(
    conn: &mut AnyConnection,
    guild_id: Option<u64>,
    user_id: u64,
    action: &str,
    detail: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (guild_id, user_id, action, detail, at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(guild_id.map(id))
    .bind(id(user_id))
    .bind(action)
    .bind(detail)
    .bind(now_ms())
    .execute(conn)
    .await?;
    Ok(())
}

fn job_record(r: &AnyRow) -> JobRecord {
    let reply = match (
        r.get::<Option<i64>, _>("reply_app_id"),
        r.get::<Option<String>, _>("reply_token"),
        r.get::<Option<i64>, _>("reply_message_id"),
    ) {
        (Some(app), Some(token), _) => Some(ReplyRef::Interaction {
            application_id: snowflake(app),
            token,
        }),
        (_, _, Some(message)) => Some(ReplyRef::Message {
            message_id: snowflake(message),
        }),
        _ => None,
    };
    JobRecord {
        id: r.get("id"),
        user_id: snowflake(r.get("user_id")),
        guild_id: r.get::<Option<i64>, _>("guild_id").map(snowflake),
        channel_id: snowflake(r.get("channel_id")),
        source: r.get("source"),
        image_sha256: r.get("image_sha256"),
        style: r.get("style"),
        output: r.get("output"),
        status: r.get("status"),
        cached: flag(r, "cached"),
        faces: r.get::<Option<i64>, _>("faces").map(count),
        error: r.get("error"),
        created_at: r.get("created_at"),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
        queue_ms: r.get("queue_ms"),
        render_ms: r.get("render_ms"),
        total_ms: r.get("total_ms"),
        reply,
    }
}

/// A 0 or 1 column as a bool (SQLite has no boolean type; PostgreSQL's columns are BIGINT too).
fn flag(r: &AnyRow, column: &str) -> bool {
    r.get::<i64, _>(column) != 0
}

/// A count stored as a signed 64-bit integer (written from a `u32`).
fn count(stored: i64) -> u32 {
    u32::try_from(stored).unwrap_or(u32::MAX)
}

/// `sqlite://` URL of an absolute path, every byte but unreserved ones percent-encoded (the
/// SQLite driver decodes it).
fn sqlite_url(path: &Path) -> String {
    let mut url = String::from("sqlite://");
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            url.push(char::from(b));
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url.push_str("?mode=rwc");
    url
}

/// A snowflake as stored.
fn id(snowflake: u64) -> i64 {
    snowflake as i64
}

fn snowflake(stored: i64) -> u64 {
    stored as u64
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_escape_every_byte_the_url_could_misread() {
        assert_eq!(
            sqlite_url(Path::new("/data/toon bot/a%b#c?d.sqlite")),
            "sqlite:///data/toon%20bot/a%25b%23c%3Fd.sqlite?mode=rwc"
        );
    }

    #[test]
    fn only_a_password_is_hidden() {
        for (url, shown) in [
            (
                "postgres://bot:p@ss@db/toonbot",
                "postgres://bot:***@db/toonbot",
            ),
            ("postgres://bot@db/toonbot", "postgres://bot@db/toonbot"),
            ("postgresql://db", "postgresql://db"),
            (
                "postgres:///toonbot?host=/run/postgresql",
                "postgres:///toonbot?host=/run/postgresql",
            ),
        ] {
            assert_eq!(Database::parse(url).to_string(), shown);
        }
    }
}
