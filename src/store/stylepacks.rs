//! Style packs in the store: the guild styles, their training runs, and the audit entries of
//! the admin actions on them (`migrations/0002_stylepacks.sql`, and its PostgreSQL twin in
//! `migrations/postgres/`).

use std::fmt;
use std::str::FromStr;

use anyhow::{anyhow, Result};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{count, id, insert_audit, now_ms, snowflake, Store};

/// Where a guild style stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StyleStatus {
    /// A run is training it (or will resume it after a restart).
    Training,
    /// Its run was cancelled; the last checkpoint is kept for a resume.
    Cancelled,
    /// Its run failed; the last checkpoint is kept for a resume.
    Failed,
    /// Trained and evaluated, usable by nobody until published.
    Draft,
    /// Installed: the guild's members can use it.
    Published,
}

impl StyleStatus {
    /// The name stored in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Training => "training",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
            Self::Draft => "draft",
            Self::Published => "published",
        }
    }
}

impl fmt::Display for StyleStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StyleStatus {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        [
            Self::Training,
            Self::Cancelled,
            Self::Failed,
            Self::Draft,
            Self::Published,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
        .ok_or_else(|| anyhow!("unknown style status {s:?}"))
    }
}

/// How a training run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Training, or waiting to resume after a restart.
    Running,
    /// Trained to its last step (the evaluation may still have failed).
    Done,
    /// Stopped by an admin.
    Cancelled,
    /// Stopped by an error, named in the run's `error`.
    Failed,
}

impl RunStatus {
    /// The name stored in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }
}

impl FromStr for RunStatus {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        [Self::Running, Self::Done, Self::Cancelled, Self::Failed]
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| anyhow!("unknown run status {s:?}"))
    }
}

/// A pack as first recorded (status `training`).
#[derive(Debug, Clone)]
pub struct NewGuildStyle {
    /// The style's name, unique across guilds.
    pub name: String,
    /// The guild that owns the pack.
    pub guild_id: u64,
    /// The style it is fine-tuned from.
    pub base: String,
    /// Images trained on.
    pub images: u32,
    /// Images kept out of training for the evaluation.
    pub held_out: u32,
    /// The admin who uploaded it.
    pub created_by: u64,
}

/// A row of `guild_styles`.
#[derive(Debug, Clone, PartialEq)]
pub struct GuildStyle {
    /// The style's name, unique across guilds.
    pub name: String,
    /// The guild that owns the pack.
    pub guild_id: u64,
    /// The style it is fine-tuned from.
    pub base: String,
    /// Where it stands: training, draft, published...
    pub status: StyleStatus,
    /// Images trained on.
    pub images: u32,
    /// Images kept out of training for the evaluation.
    pub held_out: u32,
    /// Images aligned on a detected face (the others were centre-cropped), once prepared.
    pub faces_found: Option<u32>,
    /// The admin who uploaded it.
    pub created_by: u64,
    /// Upload time, in Unix milliseconds.
    pub created_at: i64,
    /// When it was published, in Unix milliseconds.
    pub published_at: Option<i64>,
    /// The evaluation, once trained and evaluated.
    pub eval: Option<StyleEval>,
    /// Why the evaluation failed, when it did (the style is still a draft).
    pub eval_error: Option<String>,
}

/// The evaluation numbers of a trained style.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StyleEval {
    /// KID x100 of the style's cartoons against the held-out images, mean over subsets (lower
    /// is closer).
    pub kid_x100_mean: f64,
    /// Standard deviation of the KID x100 over subsets.
    pub kid_x100_std: f64,
    /// Mean cosine similarity of the face embeddings of each photo and its cartoon (higher keeps
    /// the person more recognisable).
    pub identity_cosine: f64,
}

/// A training run as first recorded (status `running`).
#[derive(Debug, Clone)]
pub struct NewRun {
    /// The admin who started it.
    pub user_id: u64,
    /// Channel where its progress is posted.
    pub channel_id: u64,
    /// Fine-tune steps it will run.
    pub total_steps: u32,
}

/// A row of `training_runs`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingRun {
    /// The run's id (the row's, ascending).
    pub id: i64,
    /// Name of the guild style it trains.
    pub style: String,
    /// The admin who started it.
    pub user_id: u64,
    /// Channel where its progress is posted.
    pub channel_id: u64,
    /// The progress message the bot edits, once posted.
    pub message_id: Option<u64>,
    /// Running, done, cancelled or failed.
    pub status: RunStatus,
    /// Steps done.
    pub step: u32,
    /// Fine-tune steps it will run.
    pub total_steps: u32,
    /// The latest losses reported, by name.
    pub losses: Vec<(String, f32)>,
    /// Latest training speed, in images per second.
    pub images_per_sec: Option<f64>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Start time, in Unix milliseconds.
    pub created_at: i64,
    /// Time of the latest progress record, in Unix milliseconds.
    pub updated_at: i64,
    /// End time, in Unix milliseconds.
    pub finished_at: Option<i64>,
    /// Milliseconds spent training so far, summed over resumes.
    pub train_ms: f64,
    /// Milliseconds the evaluation took, once done.
    pub eval_ms: Option<f64>,
}

/// Where a run is, as recorded while it trains.
#[derive(Debug, Clone, PartialEq)]
pub struct RunProgressRecord {
    /// Steps done.
    pub step: u32,
    /// The latest losses reported, by name.
    pub losses: Vec<(String, f32)>,
    /// Latest training speed, in images per second.
    pub images_per_sec: Option<f64>,
    /// Milliseconds spent training so far, summed over resumes.
    pub train_ms: f64,
}

/// How a run ended, and what it makes of its style.
#[derive(Debug, Clone, PartialEq)]
pub struct RunFinish {
    /// How the run ended.
    pub status: RunStatus,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Where it stopped.
    pub progress: RunProgressRecord,
    /// Milliseconds the evaluation took, when there was one.
    pub eval_ms: Option<f64>,
    /// The style's status from now on (draft when trained, else cancelled or failed).
    pub style_status: StyleStatus,
    /// The evaluation, when it succeeded.
    pub eval: Option<StyleEval>,
    /// Why the evaluation failed, when it did.
    pub eval_error: Option<String>,
}

/// The columns `guild_style` reads, as a literal for `concat!`.
macro_rules! style_columns {
    () => {
        "name, guild_id, base, status, images, held_out, faces_found, created_by, created_at, \
         published_at, kid_x100_mean, kid_x100_std, identity_cosine, eval_error"
    };
}

/// The columns `training_run` reads, as a literal for `concat!`.
macro_rules! run_columns {
    () => {
        "id, style, user_id, channel_id, message_id, status, step, total_steps, losses, \
         images_per_sec, error, created_at, updated_at, finished_at, train_ms, eval_ms"
    };
}

impl Store {
    /// Records a new pack and its first run (`running`), and audits the upload; returns the
    /// run's id.
    pub async fn create_guild_style(&self, style: &NewGuildStyle, run: &NewRun) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO guild_styles (name, guild_id, base, status, images, held_out, \
             created_by, created_at) VALUES ($1, $2, $3, 'training', $4, $5, $6, $7)",
        )
        .bind(&style.name)
        .bind(id(style.guild_id))
        .bind(&style.base)
        .bind(i64::from(style.images))
        .bind(i64::from(style.held_out))
        .bind(id(style.created_by))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        let run_id = insert_run(&mut tx, &style.name, run).await?;
        let detail = format!(
            "name={} base={} images={} held_out={}",
            style.name, style.base, style.images, style.held_out
        );
        insert_audit(
            &mut tx,
            Some(style.guild_id),
            style.created_by,
            "stylepack_upload",
            &detail,
        )
        .await?;
        tx.commit().await?;
        Ok(run_id)
    }

    /// Starts another run of a cancelled or failed pack (which resumes from its checkpoint)
    /// and audits it; returns the run's id.
    pub async fn resume_guild_style(&self, name: &str, guild_id: u64, run: &NewRun) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE guild_styles SET status = 'training' WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let run_id = insert_run(&mut tx, name, run).await?;
        insert_audit(
            &mut tx,
            Some(guild_id),
            run.user_id,
            "stylepack_resume",
            &format!("name={name}"),
        )
        .await?;
        tx.commit().await?;
        Ok(run_id)
    }

    /// The pack called `name`, whichever guild owns it.
    pub async fn guild_style(&self, name: &str) -> Result<Option<GuildStyle>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            style_columns!(),
            " FROM guild_styles WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(guild_style).transpose()
    }

    /// A guild's packs, oldest first.
    pub async fn guild_styles(&self, guild_id: u64) -> Result<Vec<GuildStyle>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            style_columns!(),
            " FROM guild_styles WHERE guild_id = $1 \
             ORDER BY created_at, name"
        ))
        .bind(id(guild_id))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(guild_style).collect()
    }

    /// Every guild's published styles.
    pub async fn published_guild_styles(&self) -> Result<Vec<GuildStyle>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            style_columns!(),
            " FROM guild_styles WHERE status = 'published' ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(guild_style).collect()
    }

    /// Every guild's packs, in any state.
    pub async fn all_guild_styles(&self) -> Result<Vec<GuildStyle>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            style_columns!(),
            " FROM guild_styles ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(guild_style).collect()
    }

    /// Marks a draft published and audits it.
    pub async fn publish_guild_style(&self, name: &str, guild_id: u64, by_user: u64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE guild_styles SET status = 'published', published_at = $1 WHERE name = $2",
        )
        .bind(now_ms())
        .bind(name)
        .execute(&mut *tx)
        .await?;
        insert_audit(
            &mut tx,
            Some(guild_id),
            by_user,
            "stylepack_publish",
            &format!("name={name}"),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets a pack and its runs, clears it as the guild's default style, and audits it.
    pub async fn delete_guild_style(&self, name: &str, guild_id: u64, by_user: u64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM guild_styles WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE guild_settings SET default_style = NULL, updated_at = $1 \
             WHERE guild_id = $2 AND default_style = $3",
        )
        .bind(now_ms())
        .bind(id(guild_id))
        .bind(name)
        .execute(&mut *tx)
        .await?;
        insert_audit(
            &mut tx,
            Some(guild_id),
            by_user,
            "stylepack_delete",
            &format!("name={name}"),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records an admin action that changes no other row (e.g. a cancel).
    pub async fn record_audit(
        &self,
        guild_id: u64,
        user_id: u64,
        action: &str,
        detail: &str,
    ) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        insert_audit(&mut conn, Some(guild_id), user_id, action, detail).await
    }

    /// The run with this id, if any.
    pub async fn training_run(&self, run_id: i64) -> Result<Option<TrainingRun>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM training_runs WHERE id = $1"
        ))
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(training_run).transpose()
    }

    /// A pack's latest run.
    pub async fn latest_run(&self, style: &str) -> Result<Option<TrainingRun>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM training_runs WHERE style = $1 ORDER BY id DESC LIMIT 1"
        ))
        .bind(style)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(training_run).transpose()
    }

    /// Runs left `running` (by a restart), oldest first.
    pub async fn unfinished_runs(&self) -> Result<Vec<TrainingRun>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM training_runs WHERE status = 'running' ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(training_run).collect()
    }

    /// Records how many of a pack's images were aligned on a face, once it is prepared.
    pub async fn record_prepared(&self, name: &str, faces_found: u32) -> Result<()> {
        sqlx::query("UPDATE guild_styles SET faces_found = $1 WHERE name = $2")
            .bind(i64::from(faces_found))
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The message the bot edits with the run's progress.
    pub async fn set_run_message(&self, run_id: i64, message_id: u64) -> Result<()> {
        sqlx::query("UPDATE training_runs SET message_id = $1 WHERE id = $2")
            .bind(id(message_id))
            .bind(run_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Saves a running run's step, losses, speed and training time.
    pub async fn record_run_progress(
        &self,
        run_id: i64,
        progress: &RunProgressRecord,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE training_runs SET step = $1, losses = $2, images_per_sec = $3, train_ms = $4, \
             updated_at = $5 WHERE id = $6",
        )
        .bind(i64::from(progress.step))
        .bind(serde_json::to_string(&progress.losses)?)
        .bind(progress.images_per_sec)
        .bind(progress.train_ms)
        .bind(now_ms())
        .bind(run_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records how a run ended, and its style's new status and evaluation.
    pub async fn finish_run(&self, run_id: i64, style: &str, end: &RunFinish) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        sqlx::query(
            "UPDATE training_runs SET status = $1, error = $2, step = $3, losses = $4, \
             images_per_sec = $5, train_ms = $6, eval_ms = $7, updated_at = $8, finished_at = $9 \
             WHERE id = $10",
        )
        .bind(end.status.as_str())
        .bind(&end.error)
        .bind(i64::from(end.progress.step))
        .bind(serde_json::to_string(&end.progress.losses)?)
        .bind(end.progress.images_per_sec)
        .bind(end.progress.train_ms)
        .bind(end.eval_ms)
        .bind(now)
        .bind(now)
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE guild_styles SET status = $1, kid_x100_mean = $2, kid_x100_std = $3, \
             identity_cosine = $4, eval_error = $5 WHERE name = $6",
        )
        .bind(end.style_status.as_str())
        .bind(end.eval.map(|e| e.kid_x100_mean))
        .bind(end.eval.map(|e| e.kid_x100_std))
        .bind(end.eval.map(|e| e.identity_cosine))
        .bind(&end.eval_error)
        .bind(style)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

async fn insert_run(conn: &mut AnyConnection, style: &str, run: &NewRun) -> Result<i64> {
    let now = now_ms();
    let run_id = sqlx::query_scalar(
        "INSERT INTO training_runs (style, user_id, channel_id, status, total_steps, \
         created_at, updated_at) VALUES ($1, $2, $3, 'running', $4, $5, $6) RETURNING id",
    )
    .bind(style)
    .bind(id(run.user_id))
    .bind(id(run.channel_id))
    .bind(i64::from(run.total_steps))
    .bind(now)
    .bind(now)
    .fetch_one(conn)
    .await?;
    Ok(run_id)
}

fn guild_style(r: &AnyRow) -> Result<GuildStyle> {
    let eval = match (
        r.get::<Option<f64>, _>("kid_x100_mean"),
        r.get::<Option<f64>, _>("kid_x100_std"),
        r.get::<Option<f64>, _>("identity_cosine"),
    ) {
        (Some(kid_x100_mean), Some(kid_x100_std), Some(identity_cosine)) => Some(StyleEval {
            kid_x100_mean,
            kid_x100_std,
            identity_cosine,
        }),
        _ => None,
    };
    Ok(GuildStyle {
        name: r.get("name"),
        guild_id: snowflake(r.get("guild_id")),
        base: r.get("base"),
        status: r.get::<String, _>("status").parse()?,
        images: count(r.get("images")),
        held_out: count(r.get("held_out")),
        faces_found: r.get::<Option<i64>, _>("faces_found").map(count),
        created_by: snowflake(r.get("created_by")),
        created_at: r.get("created_at"),
        published_at: r.get("published_at"),
        eval,
        eval_error: r.get("eval_error"),
    })
}

fn training_run(r: &AnyRow) -> Result<TrainingRun> {
    let losses = match r.get::<Option<String>, _>("losses") {
        Some(json) => serde_json::from_str(&json)?,
        None => Vec::new(),
    };
    Ok(TrainingRun {
        id: r.get("id"),
        style: r.get("style"),
        user_id: snowflake(r.get("user_id")),
        channel_id: snowflake(r.get("channel_id")),
        message_id: r.get::<Option<i64>, _>("message_id").map(snowflake),
        status: r.get::<String, _>("status").parse()?,
        step: count(r.get("step")),
        total_steps: count(r.get("total_steps")),
        losses,
        images_per_sec: r.get("images_per_sec"),
        error: r.get("error"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        finished_at: r.get("finished_at"),
        train_ms: r.get("train_ms"),
        eval_ms: r.get("eval_ms"),
    })
}
