//! Packs trained from the broker's training stream (`serve --role worker --work train`): a
//! gateway checks an upload and queues it ([`QueuedPack`]); a trainer takes it, trains it with
//! its own [`StylePacks`] on the shared database, and tells the responders how it goes
//! ([`PackNews`]), which post the progress message, previews and the end in the channel.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    archive, check_new_pack, list_packs, prepare, Milestone, PackError, PackWarning, Requester,
    RunEnd, RunEvents, RunProgress, Skipped, StylePacks,
};
use crate::cartoon::styles::StyleRegistry;
use crate::config::StylePackConfig;
use crate::jobs::{TrainingJob, TrainingJobEnd, TrainingQueue, TrainingSubmitError};
use crate::store::{GuildStyle, RunStatus, Store, StyleStatus, TrainingRun};

/// A pack a gateway checked and queued for the trainers; its archive travels beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedPack {
    /// The server the pack is for.
    pub guild_id: u64,
    /// The new style's name.
    pub name: String,
    /// The base style asked for (`None`: the default).
    pub base: Option<String>,
    /// Who uploaded it (or asked to resume it), and the channel the news goes to.
    pub by: Requester,
    /// Train a cancelled or failed pack again from its checkpoint, not a new upload.
    #[serde(default)]
    pub resume: bool,
}

/// Where a pack's uploaded archive is kept in the packs store: until the pack is trained,
/// published or deleted, so that any trainer can resume it.
fn archive_key(guild_id: u64, name: &str) -> String {
    format!("archive.{guild_id}.{name}")
}

/// Where a trained pack's style waits in the packs store until it is published.
fn draft_key(guild_id: u64, name: &str) -> String {
    format!("draft.{guild_id}.{name}")
}

/// Published styles in the packs store, `style.<name>`: the render workers install them.
const PUBLISHED: &str = "style.";
/// Marks a style folder a render worker installed from the broker (and removes once the
/// style is deleted).
const FROM_BROKER: &str = "installed-from-broker";
/// How often render workers look for published and deleted styles.
const STYLE_SYNC: Duration = Duration::from_secs(5);

/// Something a trainer tells the responders about a queued pack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackNews {
    /// The server the pack is for.
    pub guild_id: u64,
    /// The pack's name.
    pub name: String,
    /// Who uploaded it, and the channel the news goes to.
    pub by: Requester,
    /// What happened.
    pub event: PackEvent,
}

/// What a trainer tells about a pack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PackEvent {
    /// The trainer refused the pack (a name taken since the upload was checked, a base style
    /// it lacks, ...); holds why, for the uploader.
    Refused(String),
    /// The run started, or another trainer took it over: its `training_runs` row.
    Started {
        /// The run's id.
        run_id: i64,
    },
    /// Where the run is.
    Progress {
        /// The run's id.
        run_id: i64,
        /// Its latest progress.
        progress: RunProgress,
    },
    /// A preview grid, kept in the packs store under `file` (the responder removes it).
    Preview {
        /// The step it was made at.
        step: u32,
        /// Steps in all.
        total: u32,
        /// Its key in the packs store.
        file: String,
    },
    /// Something the pack trains despite.
    Warning(PackWarning),
    /// The run ended; a trained pack's latest preview is in the packs store under `preview`.
    Finished {
        /// The run's id.
        run_id: i64,
        /// How it ended (a trained end's preview bytes moved to `preview`).
        end: RunEnd,
        /// The latest preview grid's key in the packs store.
        preview: Option<String>,
    },
}

/// What a gateway needs to take uploads for the trainers.
#[derive(Clone)]
pub struct GatewayPacks {
    /// The broker's training queue.
    pub queue: TrainingQueue,
    /// The `[stylepacks]` settings (archive limits, the share held out), as the trainers'.
    pub config: StylePackConfig,
    /// The base style when an upload names none.
    pub default_base: String,
}

/// A gateway's side of style packs (`serve --role gateway`): it checks an upload as far as
/// it can without models (name, base style, the archive itself) and queues it for the
/// trainers. Cheap to clone.
#[derive(Clone)]
pub struct PackIntake {
    setup: GatewayPacks,
    store: Store,
}

/// An upload queued for the trainers, as its uploader is told.
#[derive(Debug)]
pub struct QueuedUpload {
    /// Images to train on.
    pub train: usize,
    /// Images kept aside for the evaluation.
    pub held_out: usize,
    /// The archive's entries that were left out, and why.
    pub skipped: Vec<Skipped>,
    /// The base style it trains from.
    pub base: String,
}

impl PackIntake {
    /// The intake of `setup`, recording in `store`.
    pub fn new(setup: GatewayPacks, store: Store) -> Self {
        Self { setup, store }
    }

    /// The `[stylepacks]` settings.
    pub fn config(&self) -> &StylePackConfig {
        &self.setup.config
    }

    /// Checks what needs no archive: the name, the base among the `installed` styles (the
    /// workers' catalog), and that the guild has no pack queued or training.
    pub async fn check(
        &self,
        installed: &[String],
        guild_id: u64,
        name: &str,
        base: Option<&str>,
    ) -> Result<String, PackError> {
        let base = base.unwrap_or(&self.setup.default_base);
        let base = check_new_pack(&self.store, installed, guild_id, name, base).await?;
        if self
            .setup
            .queue
            .is_busy(guild_id)
            .await
            .map_err(anyhow::Error::from)?
        {
            return Err(PackError::Queued);
        }
        Ok(base)
    }

    /// Checks the archive and queues the pack for the trainers (after [`Self::check`]).
    pub async fn queue(&self, pack: QueuedPack, zip: Vec<u8>) -> Result<QueuedUpload, PackError> {
        let config = self.setup.config.clone();
        let (zip, archive) = tokio::task::spawn_blocking(move || {
            let archive = archive::read_pack(&zip, &config);
            (zip, archive)
        })
        .await
        .context("the archive check stopped")?;
        let archive = archive?;
        let n = archive.images.len();
        let held_out = prepare::held_out_count(n, self.setup.config.held_out_percent);
        let base = pack
            .base
            .clone()
            .unwrap_or_else(|| self.setup.default_base.clone());
        let queue = &self.setup.queue;
        let archive_key = archive_key(pack.guild_id, &pack.name);
        queue.put_file(&archive_key, &zip).await?;
        match self.submit(&pack).await {
            Ok(()) => Ok(QueuedUpload {
                train: n - held_out,
                held_out,
                skipped: archive.skipped,
                base,
            }),
            Err(e) => {
                queue.remove_file(&archive_key).await;
                Err(e)
            }
        }
    }

    async fn submit(&self, pack: &QueuedPack) -> Result<(), PackError> {
        let payload = serde_json::to_vec(pack).expect("a queued pack serialises");
        match self.setup.queue.submit(pack.guild_id, payload).await {
            Ok(()) => Ok(()),
            Err(TrainingSubmitError::Busy) => Err(PackError::Queued),
            Err(e) => Err(PackError::Internal(e.into())),
        }
    }

    /// Queues a cancelled or failed pack to train again from its checkpoint (on whichever
    /// trainer takes it: one without the checkpoint prepares it again from the archive).
    pub async fn resume(&self, guild_id: u64, name: &str, by: Requester) -> Result<(), PackError> {
        let style = self.own_style(guild_id, name).await?;
        if !matches!(style.status, StyleStatus::Cancelled | StyleStatus::Failed) {
            return Err(PackError::WrongStatus {
                name: style.name,
                status: style.status,
            });
        }
        self.submit(&QueuedPack {
            guild_id,
            name: style.name,
            base: Some(style.base),
            by,
            resume: true,
        })
        .await
    }

    /// Publishes a draft: its style goes where the render workers install it from, and the
    /// guild's members see it once they have.
    pub async fn publish(
        &self,
        guild_id: u64,
        user_id: u64,
        name: &str,
    ) -> Result<GuildStyle, PackError> {
        let style = self.own_style(guild_id, name).await?;
        if style.status != StyleStatus::Draft {
            return Err(PackError::WrongStatus {
                name: style.name,
                status: style.status,
            });
        }
        let queue = &self.setup.queue;
        let draft = queue
            .file(&draft_key(guild_id, name))
            .await
            .map_err(|e| anyhow::anyhow!("the trained style is missing: {e}"))?;
        queue
            .put_file(&format!("{PUBLISHED}{name}"), &draft)
            .await?;
        self.store
            .publish_guild_style(name, guild_id, user_id)
            .await?;
        queue.remove_file(&draft_key(guild_id, name)).await;
        queue.remove_file(&archive_key(guild_id, name)).await;
        Ok(GuildStyle {
            status: StyleStatus::Published,
            ..style
        })
    }

    /// Removes a pack that is not training: its rows and its files on the broker (the render
    /// workers then uninstall it).
    pub async fn delete(&self, guild_id: u64, user_id: u64, name: &str) -> Result<(), PackError> {
        let style = self.own_style(guild_id, name).await?;
        if style.status == StyleStatus::Training {
            return Err(PackError::WrongStatus {
                name: style.name,
                status: style.status,
            });
        }
        let queue = &self.setup.queue;
        // The published style goes first: without its row it would be everybody's.
        queue.remove_file(&format!("{PUBLISHED}{name}")).await;
        self.store
            .delete_guild_style(name, guild_id, user_id)
            .await?;
        queue.remove_file(&draft_key(guild_id, name)).await;
        queue.remove_file(&archive_key(guild_id, name)).await;
        Ok(())
    }

    async fn own_style(&self, guild_id: u64, name: &str) -> Result<GuildStyle, PackError> {
        self.store
            .guild_style(name)
            .await?
            .filter(|s| s.guild_id == guild_id)
            .ok_or_else(|| PackError::NotFound(name.to_string()))
    }

    /// Stops the guild's training at its next step (on whichever trainer runs it); the
    /// pack's name.
    pub async fn cancel(&self, guild_id: u64, user_id: u64) -> Result<String, PackError> {
        self.setup
            .queue
            .cancel(guild_id, user_id)
            .await?
            .ok_or(PackError::NothingTraining)
    }

    /// The guild's packs, oldest first, each with its latest run.
    pub async fn list(
        &self,
        guild_id: u64,
    ) -> Result<Vec<(GuildStyle, Option<TrainingRun>)>, PackError> {
        Ok(list_packs(&self.store, guild_id).await?)
    }
}

impl StylePacks {
    /// Trains a pack a gateway queued: records and starts it, resumes it (a queued resume),
    /// or (when a trainer died with it or stopped) takes its unfinished run over. Where this
    /// host lacks the pack's prepared images they are restored from `zip` and prepared again.
    pub async fn train_queued(
        &self,
        pack: &QueuedPack,
        zip: Option<Vec<u8>>,
    ) -> Result<RunEvents, PackError> {
        let own = self
            .inner
            .store
            .guild_style(&pack.name)
            .await?
            .filter(|s| s.guild_id == pack.guild_id);
        match own {
            Some(style) if style.status == StyleStatus::Training => {
                self.take_over(style, zip).await
            }
            Some(style) if pack.resume => self.resume_style(style, pack.by, zip).await,
            None if pack.resume => Err(PackError::NotFound(pack.name.clone())),
            _ => {
                let zip = zip.context("the queued pack's archive is missing")?;
                let reservation = self
                    .reserve(pack.guild_id, &pack.name, pack.base.as_deref())
                    .await?;
                let accepted = reservation.upload(zip, pack.by).await?;
                self.start(accepted).await
            }
        }
    }

    async fn take_over(
        &self,
        style: GuildStyle,
        zip: Option<Vec<u8>>,
    ) -> Result<RunEvents, PackError> {
        let store = &self.inner.store;
        let run = store
            .latest_run(&style.name)
            .await?
            .filter(|r| r.status == RunStatus::Running)
            .context("the pack's run is missing")?;
        let base = self
            .inner
            .setup
            .registry
            .find(&style.base)
            .map_err(|e| anyhow::anyhow!("the base style is gone: {e}"))?;
        let reservation = self.take_slot(style.guild_id, &style.name, base)?;
        let style = match zip {
            Some(zip) => self.restore_files(style, zip).await?,
            None => style,
        };
        tracing::info!(run = run.id, style = %style.name, "taking over a training run");
        Ok(self.launch(reservation, style, run))
    }

    /// A trained pack's style folder, as one object ([`pack_folder`]).
    async fn draft(&self, guild_id: u64, name: &str) -> anyhow::Result<Vec<u8>> {
        let dir = self.pack_dir(guild_id, name).join(super::STYLE_DIR);
        tokio::task::spawn_blocking(move || pack_folder(&dir)).await?
    }

    /// Whether the guild has a pack of that name (in any state).
    async fn has_pack(&self, guild_id: u64, name: &str) -> anyhow::Result<bool> {
        let style = self.inner.store.guild_style(name).await?;
        Ok(style.is_some_and(|s| s.guild_id == guild_id))
    }
}

/// Takes training jobs from `queue` one at a time and trains them with `packs` until `stop`
/// turns true; a run in hand then stops at its next step (its checkpoint kept) and the job
/// goes back to the queue. `progress_every` spaces the progress news.
pub async fn train_from_queue(
    packs: StylePacks,
    queue: TrainingQueue,
    progress_every: Duration,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut jobs = queue.jobs().await?;
    while !*stop.borrow() {
        let job = tokio::select! {
            job = jobs.next(Duration::from_secs(1)) => job,
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
                None
            }
        };
        let Some(job) = job else { continue };
        let pack: QueuedPack = match serde_json::from_slice(job.payload()) {
            Ok(pack) => pack,
            Err(e) => {
                tracing::warn!("dropping a training job that does not parse: {e}");
                job.set_aside().await;
                continue;
            }
        };
        let trainer = Trainer {
            packs: &packs,
            queue: &queue,
            pack: &pack,
            progress_every,
        };
        if job.failed_too_often() {
            trainer.give_up(job).await;
            continue;
        }
        // Missing once the pack was trained or deleted; a new upload or take-over then fails.
        let zip = queue
            .file(&archive_key(pack.guild_id, &pack.name))
            .await
            .ok();
        job.hold(trainer.train(zip, stop.clone())).await;
    }
    packs.shutdown().await;
    Ok(())
}

/// One queued pack in a trainer's hands.
struct Trainer<'a> {
    packs: &'a StylePacks,
    queue: &'a TrainingQueue,
    pack: &'a QueuedPack,
    progress_every: Duration,
}

impl Trainer<'_> {
    async fn tell(&self, event: PackEvent) {
        let news = PackNews {
            guild_id: self.pack.guild_id,
            name: self.pack.name.clone(),
            by: self.pack.by,
            event,
        };
        let payload = serde_json::to_vec(&news).expect("pack news serialises");
        if let Err(e) = self.queue.tell(self.pack.guild_id, payload).await {
            tracing::warn!(error = %format!("{e:#}"), "telling the responders about a pack");
        }
    }

    /// Trains the pack and relays its news; how the job ends for the broker.
    async fn train(self, zip: Option<Vec<u8>>, mut stop: watch::Receiver<bool>) -> TrainingJobEnd {
        let mut events = match self.packs.train_queued(self.pack, zip).await {
            Ok(events) => events,
            Err(PackError::Internal(e)) => return TrainingJobEnd::Failed(format!("{e:#}")),
            Err(e) => {
                // An upload refused here (a name taken meanwhile) leaves no pack behind.
                if !self.pack.resume
                    && !matches!(
                        self.packs
                            .has_pack(self.pack.guild_id, &self.pack.name)
                            .await,
                        Ok(true)
                    )
                {
                    let key = archive_key(self.pack.guild_id, &self.pack.name);
                    self.queue.remove_file(&key).await;
                }
                self.tell(PackEvent::Refused(e.to_string())).await;
                return TrainingJobEnd::Finished;
            }
        };
        let run_id = events.run.id;
        self.tell(PackEvent::Started { run_id }).await;
        let mut cancels = self.queue.cancel_requests(self.pack.guild_id).await;
        let mut next_progress = tokio::time::Instant::now();
        let (mut changed, mut progress_open, mut stopping) = (false, true, false);
        loop {
            tokio::select! {
                next = events.progress.changed(), if progress_open => match next {
                    Ok(()) => changed = true,
                    Err(_) => progress_open = false,
                },
                milestone = events.milestones.recv() => match milestone {
                    Some(Milestone::Preview { step, total, png }) => {
                        let file = format!("preview.{run_id}.{step}");
                        match self.queue.put_file(&file, &png).await {
                            Ok(()) => self.tell(PackEvent::Preview { step, total, file }).await,
                            Err(e) => tracing::warn!(error = %format!("{e:#}"), "storing a preview"),
                        }
                    }
                    Some(Milestone::Warning(warning)) => {
                        self.tell(PackEvent::Warning(warning)).await;
                    }
                    Some(Milestone::Finished(end)) => {
                        if matches!(end, RunEnd::Trained { .. }) {
                            if let Err(e) = self.keep_draft().await {
                                return TrainingJobEnd::Failed(format!("storing the trained style: {e:#}"));
                            }
                        }
                        let (end, preview) = self.store_final_preview(run_id, end).await;
                        self.tell(PackEvent::Finished { run_id, end, preview }).await;
                        return TrainingJobEnd::Finished;
                    }
                    // This trainer stopped: the run resumes from its checkpoint elsewhere.
                    None => return TrainingJobEnd::Interrupted,
                },
                Some(request) = cancels.next() => {
                    let cancelled = self.packs.cancel(self.pack.guild_id, request.user_id).await;
                    request.answer(cancelled.ok()).await;
                }
                _ = stop.changed(), if !stopping => {
                    stopping = true;
                    self.packs.shutdown().await;
                }
                _ = tokio::time::sleep_until(next_progress), if changed => {}
            }
            if changed && tokio::time::Instant::now() >= next_progress {
                changed = false;
                next_progress = tokio::time::Instant::now() + self.progress_every;
                let progress = events.progress.borrow_and_update().clone();
                if let Some(progress) = progress {
                    self.tell(PackEvent::Progress { run_id, progress }).await;
                }
            }
        }
    }

    /// Puts the trained style where a gateway publishes it from; the archive is no longer
    /// needed (a draft is not resumed).
    async fn keep_draft(&self) -> anyhow::Result<()> {
        let (guild_id, name) = (self.pack.guild_id, &self.pack.name);
        let draft = self.packs.draft(guild_id, name).await?;
        self.queue
            .put_file(&draft_key(guild_id, name), &draft)
            .await?;
        self.queue.remove_file(&archive_key(guild_id, name)).await;
        Ok(())
    }

    /// Moves a trained end's preview grid to the packs store: the end as told, and the key.
    async fn store_final_preview(&self, run_id: i64, end: RunEnd) -> (RunEnd, Option<String>) {
        let RunEnd::Trained {
            steps,
            faces_found,
            eval,
            preview: Some(png),
        } = end
        else {
            return (end, None);
        };
        let file = format!("preview.{run_id}.final");
        let stored = match self.queue.put_file(&file, &png).await {
            Ok(()) => Some(file),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "storing the final preview");
                None
            }
        };
        let end = RunEnd::Trained {
            steps,
            faces_found,
            eval,
            preview: None,
        };
        (end, stored)
    }

    /// A job that failed (or killed its trainers) too often: its run is marked failed, its
    /// uploader told, and the job set aside.
    async fn give_up(self, job: TrainingJob) {
        let why = "it failed too many times and was set aside";
        if let Err(e) = self.packs.fail_queued(self.pack, why).await {
            tracing::warn!(error = %format!("{e:#}"), "recording a set-aside pack");
        }
        self.tell(PackEvent::Refused(why.into())).await;
        job.set_aside().await;
    }
}

/// Installs the styles published on the broker in `registry`'s trained folder, and removes
/// those it installed once they are deleted, every few seconds until `stop` (render workers:
/// their catalog then shows the change to the gateways).
pub async fn install_published_styles(
    queue: TrainingQueue,
    registry: StyleRegistry,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        if let Err(e) = sync_published_styles(&queue, &registry).await {
            tracing::warn!(error = %format!("{e:#}"), "installing published styles");
        }
        tokio::select! {
            _ = tokio::time::sleep(STYLE_SYNC) => {}
            changed = stop.changed() => if changed.is_err() { return },
        }
    }
}

async fn sync_published_styles(
    queue: &TrainingQueue,
    registry: &StyleRegistry,
) -> anyhow::Result<()> {
    let published: Vec<String> = queue
        .file_keys(PUBLISHED)
        .await?
        .into_iter()
        .map(|key| key[PUBLISHED.len()..].to_string())
        .collect();
    for name in &published {
        let dir = registry.trained_dir(name)?;
        if dir.exists() {
            continue;
        }
        let bytes = queue
            .file(&format!("{PUBLISHED}{name}"))
            .await
            .map_err(anyhow::Error::msg)?;
        tokio::task::spawn_blocking(move || install_folder(&bytes, &dir)).await??;
        tracing::info!(style = %name, "installed a published style");
    }
    let Ok(entries) = std::fs::read_dir(registry.trained_root()) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if dir.join(FROM_BROKER).exists() && !published.contains(&name) {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            tracing::info!(style = %name, "removed a deleted style");
        }
    }
    Ok(())
}

/// A style folder's files as one object: the JSON list of `(name, size)` after its length
/// (u32 LE), then the files' bytes in that order.
fn pack_folder(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            files.push((name, std::fs::read(entry.path())?));
        }
    }
    files.sort();
    let header: Vec<(&str, usize)> = files.iter().map(|(n, b)| (n.as_str(), b.len())).collect();
    let header = serde_json::to_vec(&header)?;
    let mut out = (header.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    for (_, bytes) in &files {
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

/// Writes a [`pack_folder`] object as the folder `dir` (complete or not at all), marked as
/// installed from the broker.
fn install_folder(bytes: &[u8], dir: &Path) -> anyhow::Result<()> {
    let damaged = || anyhow::anyhow!("a published style is damaged");
    let len = u32::from_le_bytes(bytes.get(..4).ok_or_else(damaged)?.try_into()?) as usize;
    let header: Vec<(String, usize)> =
        serde_json::from_slice(bytes.get(4..4 + len).ok_or_else(damaged)?)?;
    let parent = dir.parent().ok_or_else(damaged)?;
    let name = dir.file_name().ok_or_else(damaged)?.to_string_lossy();
    let partial = parent.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    let mut rest = &bytes[4 + len..];
    for (file, size) in header {
        let plain = Path::new(&file)
            .file_name()
            .is_some_and(|f| f == file.as_str());
        if !plain || file.starts_with('.') {
            anyhow::bail!("a published style names the file {file:?}");
        }
        let data = rest.get(..size).ok_or_else(damaged)?;
        std::fs::write(partial.join(&file), data)?;
        rest = &rest[size..];
    }
    std::fs::write(partial.join(FROM_BROKER), b"")?;
    std::fs::rename(&partial, dir).with_context(|| format!("installing {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_style_folder_travels_as_one_object() {
        let from = tempfile::tempdir().unwrap();
        std::fs::write(from.path().join("generator.safetensors"), vec![7u8; 3000]).unwrap();
        std::fs::write(from.path().join("style.toml"), b"name = 'x'").unwrap();
        let bytes = pack_folder(from.path()).unwrap();
        let to = tempfile::tempdir().unwrap();
        let dir = to.path().join("neon");
        install_folder(&bytes, &dir).unwrap();
        assert_eq!(
            std::fs::read(dir.join("generator.safetensors")).unwrap(),
            vec![7u8; 3000]
        );
        assert_eq!(
            std::fs::read(dir.join("style.toml")).unwrap(),
            b"name = 'x'"
        );
        assert!(dir.join(FROM_BROKER).exists());
        assert!(install_folder(&bytes[..bytes.len() - 1], &to.path().join("cut")).is_err());
        assert!(!to.path().join("cut").exists(), "nothing half-installed");
    }

    #[test]
    fn a_published_style_cannot_name_files_outside_its_folder() {
        let header = serde_json::to_vec(&[("../evil", 1usize)]).unwrap();
        let mut bytes = (header.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.push(0);
        let to = tempfile::tempdir().unwrap();
        assert!(install_folder(&bytes, &to.path().join("neon")).is_err());
        assert!(!to.path().join("evil").exists());
    }
}
