//! Configuration: `config.toml` (or the built-in copy of it) plus environment overrides.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::store::Database;

const DEFAULT_CONFIG: &str = include_str!("../config.toml");
const ENV_PREFIX: &str = "TOONBOT_";

/// All of toonbot's settings, one field per section of `config.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[limits]`: photo size limits.
    pub limits: Limits,
    /// `[models]`: where the network weights are.
    pub models: Models,
    /// `[faces]`: face detection settings.
    pub faces: Faces,
    /// `[styles]`: where trained styles go and the default style.
    pub styles: Styles,
    /// `[bot]`: the Discord bot (optional; defaults apply).
    #[serde(default)]
    pub bot: BotConfig,
    /// `[stylepacks]`: uploaded style packs (optional; defaults apply).
    #[serde(default)]
    pub stylepacks: StylePackConfig,
    /// `[broker]`: the NATS JetStream broker of the roles past one machine (optional;
    /// `serve` alone never connects to it).
    #[serde(default)]
    pub broker: BrokerConfig,
}

/// The JetStream broker that `serve --role worker` takes render jobs from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `nats://host:port` (the command line's `--nats` wins).
    pub url: String,
    /// Names the streams, buckets and subjects: letters, digits, `-` and `_`.
    pub prefix: String,
    /// Seconds a worker holds a job without a sign of life before it goes to another.
    pub ack_wait_s: u64,
    /// Failed attempts before a job is set aside on the dead-letter subject.
    pub max_failures: u32,
    /// Seconds finished jobs' records and results are kept.
    pub keep_results_s: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        let defaults = crate::jobs::JetStreamConfig::new("nats://127.0.0.1:4222");
        Self {
            url: defaults.url,
            prefix: defaults.prefix,
            ack_wait_s: defaults.ack_wait.as_secs(),
            max_failures: defaults.max_failures,
            keep_results_s: defaults.keep_results.as_secs(),
        }
    }
}

impl BrokerConfig {
    /// The queue settings: these, `url` (or this section's), and the bot's capacity and
    /// per-user cap. Fails on a prefix the broker would refuse or a zero lease or retry count.
    pub fn jetstream(
        &self,
        url: Option<&str>,
        queue: crate::jobs::QueueConfig,
    ) -> Result<crate::jobs::JetStreamConfig> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if self.prefix.is_empty() || !self.prefix.chars().all(valid) {
            bail!(
                "broker.prefix `{}`: letters, digits, `-` and `_` only",
                self.prefix
            );
        }
        if self.ack_wait_s == 0 || self.max_failures == 0 {
            bail!("broker.ack_wait_s and broker.max_failures must be at least 1");
        }
        Ok(crate::jobs::JetStreamConfig {
            url: url.unwrap_or(&self.url).to_string(),
            prefix: self.prefix.clone(),
            capacity: queue.capacity,
            per_user_limit: queue.per_user_limit,
            ack_wait: std::time::Duration::from_secs(self.ack_wait_s),
            max_failures: self.max_failures,
            keep_results: std::time::Duration::from_secs(self.keep_results_s),
        })
    }
}

/// Input size limits, checked before a photo is decoded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest photo file, in bytes (command line files and the bot's downloads).
    pub max_bytes: u64,
    /// Largest photo, in pixels (width x height), checked before decoding.
    pub max_pixels: u64,
}

/// Where the imported network weights are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Models {
    /// Folder of the network weights (see `models/README.md`); shipped styles are in its
    /// `styles` subfolder.
    pub dir: PathBuf,
}

/// Which detected faces are processed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faces {
    /// Most faces processed per photo, largest first.
    pub max_faces: usize,
    /// Detector confidence below which a candidate face is dropped.
    pub min_score: f32,
    /// Faces whose detected box is narrower than this, in photo pixels, are dropped.
    pub min_face_px: f32,
}

/// Installed styles.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Styles {
    /// Folder where styles trained on this host are installed (shipped ones are in
    /// `<models.dir>/styles`).
    pub dir: PathBuf,
    /// The style used when a request names none.
    pub default: String,
}

/// Settings of `toonbot serve`. The bot token is never here: it comes from `DISCORD_TOKEN`
/// or from the file named by `token_file`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BotConfig {
    /// File holding the bot token, read when `DISCORD_TOKEN` is unset. Keep it outside the
    /// repository, readable by the bot's user only.
    pub token_file: Option<PathBuf>,
    /// The database (presets, jobs, guild settings, style packs, audit log): a SQLite file,
    /// created if missing (a relative path is read from the config's folder), or a
    /// `postgres://` URL, shared by several gateway processes.
    pub database: Database,
    /// Hosts photos may be downloaded from (https only, except loopback hosts used by tests).
    pub allowed_cdn_hosts: Vec<String>,
    /// Largest photo accepted, in bytes: checked on the attachment's declared size and again
    /// while downloading. Not a setting of its own: `limits.max_bytes`, copied here when the
    /// config is read.
    #[serde(skip)]
    pub max_photo_bytes: u64,
    /// Jobs that may wait in the queue; more are refused ("queue full").
    pub queue_capacity: usize,
    /// Jobs one user may have queued or running at once.
    pub per_user_limit: usize,
    /// Render worker threads.
    pub workers: usize,
    /// Results kept in memory for identical requests (0 disables the cache).
    pub cache_entries: usize,
    /// Members with this role may change server settings, besides those with Manage Server.
    pub admin_role_id: Option<u64>,
    /// Register the slash commands in this guild only (instant; for testing a new bot)
    /// instead of globally.
    pub commands_guild_id: Option<u64>,
    /// Send REST calls to this HTTP API proxy (e.g. twilight-http-proxy, or a test double)
    /// instead of Discord, with serenity's own rate limiter off.
    pub api_proxy: Option<String>,
    /// Most bytes of files in one message (Discord's default upload limit is 10 MiB).
    pub max_upload_bytes: u64,
    /// Give up on a photo download after this many seconds.
    pub download_timeout_secs: u64,
    /// Least time between two queue-position edits of a reply, in milliseconds.
    pub progress_interval_ms: u64,
}

impl Default for BotConfig {
    fn default() -> Self {
        Self {
            token_file: None,
            database: Database::Sqlite(PathBuf::from("toonbot.sqlite")),
            allowed_cdn_hosts: vec!["cdn.discordapp.com".into(), "media.discordapp.net".into()],
            max_photo_bytes: 20_000_000,
            queue_capacity: 64,
            per_user_limit: 3,
            workers: 1,
            cache_entries: 64,
            admin_role_id: None,
            commands_guild_id: None,
            api_proxy: None,
            max_upload_bytes: 10 * 1024 * 1024,
            download_timeout_secs: 30,
            progress_interval_ms: 1000,
        }
    }
}

/// How style packs are fine-tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackRecipe {
    /// The decoder side against projected discriminators within `minutes`
    /// ([`crate::train::pack`]).
    Fast,
    /// photo2cartoon's full step for `steps` ([`crate::train::finetune`]).
    Photo2cartoon,
}

/// Style packs (`/stylepack`): limits on the uploaded archive, where packs are kept, and
/// the fine-tune settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StylePackConfig {
    /// Prepared images, checkpoints and draft styles, one folder per guild and pack.
    pub dir: PathBuf,
    /// Largest archive accepted, in bytes (declared size and download both checked).
    pub max_zip_bytes: u64,
    /// Most entries (files and folders) in the archive.
    pub max_entries: usize,
    /// Most bytes one entry may expand to, counted while decompressing.
    pub max_entry_bytes: u64,
    /// Most bytes the whole archive may expand to, counted while decompressing.
    pub max_total_bytes: u64,
    /// Largest image in a pack, in pixels, checked before decoding.
    pub max_image_pixels: u64,
    /// Shortest side an image in a pack may have, in pixels: smaller ones are skipped.
    pub min_image_side: u32,
    /// Most an image's long side may be of its short side: longer strips are skipped.
    pub max_aspect_ratio: f32,
    /// Least share of a pack's images that must show a face, or the pack is refused.
    pub min_face_share: f64,
    /// Style spread (`stylepack::check::style_spread`) over which a pack trains with a warning
    /// that its images are drawn in different styles.
    pub max_style_spread: f64,
    /// Fewest and most images a pack may have.
    pub min_images: usize,
    /// Most images a pack may have.
    pub max_images: usize,
    /// Share of the images (in percent, at least two images) kept out of training for the
    /// evaluation.
    pub held_out_percent: u32,
    /// How packs are fine-tuned: the fast recipe (decoder side, minutes) or photo2cartoon's.
    pub recipe: PackRecipe,
    /// The fast recipe's longest time budget per pack, in minutes (setup included,
    /// evaluation not).
    pub minutes: f64,
    /// The fast recipe's budget per training image, in minutes, from `min_minutes` up to
    /// `minutes`: a few images are learnt (and overfitted) sooner.
    pub minutes_per_image: f64,
    /// The fast recipe's shortest budget, in minutes: what the smallest packs need to reach the
    /// style (a 10-image pack: KID half the base's in 13.5 minutes, not in 12).
    pub min_minutes: f64,
    /// photo2cartoon's recipe: fine-tune steps per pack (the fast recipe: a cap).
    pub steps: u32,
    /// A preview grid is posted after the first step and every this many steps.
    pub preview_every: u32,
    /// Aligned face photos (`toonbot prepare` output): the photo side of every fine-tune,
    /// and the photos the new style is evaluated on.
    pub photos: PathBuf,
    /// Fine-tune image side (256 as photo2cartoon; smaller trains faster on a CPU).
    pub size: usize,
    /// Photos (the first ones of `photos`) cartoonised for the evaluation.
    pub eval_photos: usize,
}

impl StylePackConfig {
    /// The decoding limits of one pack image: `max_entry_bytes` and `max_image_pixels`.
    pub fn image_limits(&self) -> Limits {
        Limits {
            max_bytes: self.max_entry_bytes,
            max_pixels: self.max_image_pixels,
        }
    }

    /// Checks that packs can train with these settings: the aligned photos are there and the
    /// fast recipe's discriminator takes `size`.
    pub fn check_training(&self) -> Result<()> {
        if self.recipe == PackRecipe::Fast {
            crate::nets::projected_discriminator::check_size(self.size)
                .context("stylepacks.size")?;
        }
        crate::train::data::ImageFolder::open(&self.photos).with_context(|| {
            "stylepacks.photos (make aligned photos with `toonbot prepare`)".to_string()
        })?;
        Ok(())
    }

    /// The fast recipe's time budget for a pack of `images` training images, in minutes.
    pub fn budget_minutes(&self, images: usize) -> f64 {
        (self.minutes_per_image * images as f64)
            .clamp(self.min_minutes.min(self.minutes), self.minutes)
    }
}

impl Default for StylePackConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data/packs"),
            max_zip_bytes: 50_000_000,
            max_entries: 2000,
            max_entry_bytes: 20_000_000,
            max_total_bytes: 200_000_000,
            max_image_pixels: 2048 * 2048,
            min_image_side: 96,
            max_aspect_ratio: 3.0,
            min_face_share: 0.15,
            max_style_spread: 1.4,
            min_images: 10,
            max_images: 500,
            held_out_percent: 10,
            recipe: PackRecipe::Fast,
            minutes: 25.0,
            minutes_per_image: 1.2,
            min_minutes: 13.5,
            steps: 2000,
            preview_every: 10,
            photos: PathBuf::from("data/photos"),
            size: 256,
            eval_photos: 50,
        }
    }
}

impl Config {
    /// Reads `path`, or `./config.toml` when it exists, or the built-in defaults; then
    /// applies `TOONBOT_<SECTION>__<KEY>` environment variables.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let local = Path::new("config.toml");
        let (text, base) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?,
                p.parent().map(Path::to_path_buf).unwrap_or_default(),
            ),
            None if local.exists() => (
                std::fs::read_to_string(local).context("reading ./config.toml")?,
                PathBuf::new(),
            ),
            None => (DEFAULT_CONFIG.to_string(), PathBuf::new()),
        };
        Self::from_toml(&text, &base, std::env::vars())
    }

    /// Parses TOML text with the given environment overrides; relative paths are
    /// resolved against `base`.
    pub fn from_toml(
        text: &str,
        base: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        let mut value: toml::Table = toml::from_str(text).context("parsing config")?;
        for (key, raw) in env {
            let Some(path) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, field)) = path.split_once("__") else {
                continue;
            };
            let (section, field) = (section.to_lowercase(), field.to_lowercase());
            let Some(toml::Value::Table(table)) = value.get_mut(&section) else {
                bail!("{key}: no config section [{section}]");
            };
            table.insert(field, parse_env_value(&raw));
        }
        if let Some(toml::Value::Table(bot)) = value.get("bot") {
            if bot.contains_key("max_photo_bytes") {
                bail!(
                    "bot.max_photo_bytes is no longer a setting: the largest photo is \
                     limits.max_bytes, for the bot as for the command line"
                );
            }
        }
        let mut config: Config = toml::Value::Table(value)
            .try_into()
            .context("invalid config")?;
        config.bot.max_photo_bytes = config.limits.max_bytes;
        let bot = &mut config.bot;
        let database_file = match &mut bot.database {
            Database::Sqlite(path) => Some(path),
            Database::Postgres(_) => None,
        };
        for path in [
            &mut config.models.dir,
            &mut config.styles.dir,
            &mut config.stylepacks.dir,
            &mut config.stylepacks.photos,
        ]
        .into_iter()
        .chain(database_file)
        .chain(bot.token_file.as_mut())
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        Ok(config)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::from_toml(DEFAULT_CONFIG, Path::new(""), []).expect("the built-in config is valid")
    }
}

/// An environment value as TOML when it parses as a scalar (number, bool), else a string.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_section_gives_the_queue_settings_and_refuses_bad_ones() {
        let config = Config::from_toml(
            &format!("{DEFAULT_CONFIG}\n"),
            Path::new(""),
            [
                ("TOONBOT_BROKER__PREFIX".to_string(), "guild-42".to_string()),
                ("TOONBOT_BROKER__ACK_WAIT_S".to_string(), "7".to_string()),
            ],
        )
        .unwrap();
        let queue = config.bot.queue_config();
        let js = config.broker.jetstream(None, queue).unwrap();
        assert_eq!(js.url, config.broker.url);
        assert_eq!(js.prefix, "guild-42");
        assert_eq!(js.ack_wait, std::time::Duration::from_secs(7));
        assert_eq!(js.per_user_limit, queue.per_user_limit);
        let js = config
            .broker
            .jetstream(Some("nats://10.0.0.2:4222"), queue)
            .unwrap();
        assert_eq!(js.url, "nats://10.0.0.2:4222", "--nats wins");
        for (prefix, ack_wait_s, max_failures) in
            [("a.b", 30, 3), ("", 30, 3), ("ok", 0, 3), ("ok", 30, 0)]
        {
            let bad = BrokerConfig {
                prefix: prefix.into(),
                ack_wait_s,
                max_failures,
                ..BrokerConfig::default()
            };
            assert!(
                bad.jetstream(None, queue).is_err(),
                "{prefix:?} {ack_wait_s} {max_failures}"
            );
        }
    }

    #[test]
    fn database_is_a_file_beside_the_config_or_a_postgres_url() {
        let read = |env: Vec<(String, String)>| {
            Config::from_toml(DEFAULT_CONFIG, Path::new("/etc/toonbot"), env)
                .unwrap()
                .bot
                .database
        };
        assert_eq!(
            read(vec![]),
            Database::Sqlite(PathBuf::from("/etc/toonbot/toonbot.sqlite"))
        );
        let url = "postgres://toonbot@db.internal:5432/toonbot";
        assert_eq!(
            read(vec![("TOONBOT_BOT__DATABASE".into(), url.into())]),
            Database::Postgres(url.into()),
            "a URL is not a path"
        );
    }

    #[test]
    fn built_in_config_parses() {
        let c = Config::default();
        assert!(c.limits.max_pixels > 1_000_000);
        assert_eq!(c.models.dir, PathBuf::from("models"));
        assert_eq!(c.stylepacks, StylePackConfig::default());
    }

    #[test]
    fn a_pack_gets_more_minutes_with_more_images_up_to_the_cap() {
        let c = StylePackConfig::default();
        assert_eq!(c.budget_minutes(2), 13.5);
        assert_eq!(c.budget_minutes(8), 13.5);
        assert!((c.budget_minutes(15) - 18.0).abs() < 1e-9);
        assert_eq!(c.budget_minutes(30), 25.0);
        assert_eq!(c.budget_minutes(400), 25.0);
    }

    #[test]
    fn packs_train_only_at_sizes_the_recipe_takes_and_with_photos() {
        let photos = tempfile::tempdir().unwrap();
        image::RgbImage::new(8, 8)
            .save(photos.path().join("a.png"))
            .unwrap();
        let at = |recipe, size, photos: &Path| StylePackConfig {
            recipe,
            size,
            photos: photos.to_path_buf(),
            ..StylePackConfig::default()
        };
        for size in [128, 160, 256] {
            at(PackRecipe::Fast, size, photos.path())
                .check_training()
                .unwrap();
        }
        for size in [64, 144, 288] {
            let e = at(PackRecipe::Fast, size, photos.path())
                .check_training()
                .unwrap_err();
            let e = format!("{e:#}");
            assert!(
                e.starts_with("stylepacks.size: ") && e.contains("from 128 to 256"),
                "{e}"
            );
        }
        at(PackRecipe::Photo2cartoon, 64, photos.path())
            .check_training()
            .unwrap();
        let e = at(PackRecipe::Fast, 256, &photos.path().join("missing"))
            .check_training()
            .unwrap_err();
        assert!(format!("{e:#}").starts_with("stylepacks.photos"), "{e:#}");
    }

    #[test]
    fn environment_overrides_numbers_and_paths() {
        let env = [
            ("TOONBOT_LIMITS__MAX_PIXELS".to_string(), "1234".to_string()),
            ("TOONBOT_MODELS__DIR".to_string(), "/opt/models".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = Config::from_toml(DEFAULT_CONFIG, Path::new("/etc/toonbot"), env).unwrap();
        assert_eq!(c.limits.max_pixels, 1234);
        assert_eq!(c.models.dir, PathBuf::from("/opt/models"));
    }

    #[test]
    fn the_bot_takes_its_photo_limit_from_limits() {
        let env = [("TOONBOT_LIMITS__MAX_BYTES".to_string(), "12345".to_string())];
        let c = Config::from_toml(DEFAULT_CONFIG, Path::new(""), env).unwrap();
        assert_eq!(c.bot.max_photo_bytes, 12345);
        let env = [("TOONBOT_BOT__MAX_PHOTO_BYTES".to_string(), "1".to_string())];
        let err = Config::from_toml(DEFAULT_CONFIG, Path::new(""), env).unwrap_err();
        assert!(err.to_string().contains("limits.max_bytes"), "{err}");
    }

    #[test]
    fn unknown_sections_and_bad_values_are_errors() {
        let env = [("TOONBOT_NOPE__X".to_string(), "1".to_string())];
        assert!(Config::from_toml(DEFAULT_CONFIG, Path::new(""), env).is_err());
        let env = [("TOONBOT_LIMITS__MAX_BYTES".to_string(), "lots".to_string())];
        assert!(Config::from_toml(DEFAULT_CONFIG, Path::new(""), env).is_err());
    }
}
