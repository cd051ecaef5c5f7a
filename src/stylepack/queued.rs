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
    archive, check_new_pack, end_unfinished_run, list_packs, own_pack, prepare, Milestone,
    PackError, PackWarning, Requester, RunEnd, RunEvents, RunProgress, Skipped, StylePacks,
};
use crate::cartoon::styles::StyleRegistry;
use crate::config::StylePackConfig;
use crate::jobs::{TrainingJobEnd, TrainingQueue, TrainingSubmitError};
use crate::store::{GuildStyle, RunStatus, Store, StyleStatus, TrainingRun};

/// A pack a gateway checked and queued for the trainers; its archive waits in the packs
/// store ([`archive_key`]).
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
    /// Names this upload's archive (time-ordered, unique): two uploads racing for one name
    /// keep apart. Empty for a resume (the pack's latest archive is used).
    #[serde(default)]
    pub upload: String,
}

impl QueuedPack {
    /// A new upload of `name` for `guild_id` by `by`.
    pub fn upload(guild_id: u64, name: &str, base: Option<String>, by: Requester) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let now_ms = crate::store::now_ms();
        Self {
            guild_id,
            name: name.to_string(),
            base,
            by,
            resume: false,
            upload: format!("{now_ms:013}-{:08x}", random as u32),
        }
    }
}

/// Where a pack's uploaded archives are kept in the packs store, `archive.{guild}.{name}.`
/// and the upload's id: until the pack is trained, published or deleted, so that any trainer
/// can take it over or resume it.
fn archives_of(guild_id: u64, name: &str) -> String {
    format!("archive.{guild_id}.{name}.")
}

fn archive_key(pack: &QueuedPack) -> String {
    format!("{}{}", archives_of(pack.guild_id, &pack.name), pack.upload)
}

/// The pack's latest archive (`None` when there is none left).
async fn latest_archive(queue: &TrainingQueue, pack: &QueuedPack) -> Option<Vec<u8>> {
    let key = if pack.upload.is_empty() {
        let keys = queue
            .file_keys(&archives_of(pack.guild_id, &pack.name))
            .await;
        keys.ok()?.into_iter().map(|(key, _)| key).max()?
    } else {
        archive_key(pack)
    };
    queue.file(&key).await.ok()
}

/// Removes every archive of a pack.
async fn remove_archives(queue: &TrainingQueue, guild_id: u64, name: &str) {
    if let Ok(keys) = queue.file_keys(&archives_of(guild_id, name)).await {
        for (key, _) in keys {
            queue.remove_file(&key).await;
        }
    }
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
    /// A preview grid, kept in the preview store under `file` (the responder removes it).
    Preview {
        /// The step it was made at.
        step: u32,
        /// Steps in all.
        total: u32,
        /// Its key in the preview store.
        file: String,
    },
    /// Something the pack trains despite.
    Warning(PackWarning),
    /// The run ended; a trained pack's latest preview is in the preview store under
    /// `preview`.
    Finished {
        /// The run's id.
        run_id: i64,
        /// How it ended (a trained end's preview bytes moved to `preview`).
        end: RunEnd,
        /// The latest preview grid's key in the preview store.
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
        let key = archive_key(&pack);
        queue.put_file(&key, &zip).await?;
        match self.submit(&pack).await {
            Ok(()) => Ok(QueuedUpload {
                train: n - held_out,
                held_out,
                skipped: archive.skipped,
                base,
            }),
            Err(e) => {
                queue.remove_file(&key).await;
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

    /// Queues a cancelled or failed pack to train again (on whichever trainer takes it: the
    /// one with its checkpoint continues from it, another prepares it again).
    pub async fn resume(&self, guild_id: u64, name: &str, by: Requester) -> Result<(), PackError> {
        let style = own_pack(&self.store, guild_id, name).await?;
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
            upload: String::new(),
        })
        .await
    }

    /// Publishes a draft: its style goes where the render workers install it from (while its
    /// row is a draft, no guild is offered it), then its row says published.
    pub async fn publish(
        &self,
        guild_id: u64,
        user_id: u64,
        name: &str,
    ) -> Result<GuildStyle, PackError> {
        let style = own_pack(&self.store, guild_id, name).await?;
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
        remove_archives(queue, guild_id, name).await;
        Ok(GuildStyle {
            status: StyleStatus::Published,
            ..style
        })
    }

    /// Removes a pack that is not training: its published style first, then (once
    /// `uninstalled` says the render workers no longer offer it: until then its row keeps it
    /// from every guild) its row and the rest of its files.
    pub async fn delete(
        &self,
        guild_id: u64,
        user_id: u64,
        name: &str,
        uninstalled: impl std::future::Future<Output = ()>,
    ) -> Result<(), PackError> {
        let style = own_pack(&self.store, guild_id, name).await?;
        if style.status == StyleStatus::Training {
            return Err(PackError::WrongStatus {
                name: style.name,
                status: style.status,
            });
        }
        let queue = &self.setup.queue;
        // Also a draft's: a publish that failed half-way may have left it.
        queue.remove_file(&format!("{PUBLISHED}{name}")).await;
        if style.status == StyleStatus::Published {
            uninstalled.await;
        }
        self.store
            .delete_guild_style(name, guild_id, user_id)
            .await?;
        queue.remove_file(&draft_key(guild_id, name)).await;
        remove_archives(queue, guild_id, name).await;
        Ok(())
    }

    /// Stops the guild's training at its next step (on whichever trainer runs it), or takes
    /// its pack out of the queue when no trainer runs it; the pack's name, and whether a
    /// training was stopped.
    pub async fn cancel(&self, guild_id: u64, user_id: u64) -> Result<(String, bool), PackError> {
        let queue = &self.setup.queue;
        if let Some(name) = queue.cancel(guild_id, user_id).await? {
            return Ok((name, true));
        }
        let Some(payload) = queue.withdraw(guild_id).await? else {
            return Err(PackError::NothingTraining);
        };
        let pack: QueuedPack =
            serde_json::from_slice(&payload).context("reading the withdrawn pack")?;
        match own_pack(&self.store, guild_id, &pack.name).await {
            // Waiting for its next trainer (one died or stopped with it): it stays resumable.
            Ok(style) if style.status == StyleStatus::Training => {
                if let Some(run) = self.store.latest_run(&pack.name).await? {
                    if run.status == RunStatus::Running {
                        end_unfinished_run(&self.store, &run, RunStatus::Cancelled, None).await?;
                    }
                }
            }
            Ok(_) => {}
            Err(_) => queue.remove_file(&archive_key(&pack)).await,
        }
        self.store
            .record_audit(
                guild_id,
                user_id,
                "stylepack_cancel",
                &format!("name={} queued", pack.name),
            )
            .await?;
        Ok((pack.name, false))
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
        let (reservation, style) = self.take_slot_restoring(style, zip).await?;
        tracing::info!(run = run.id, style = %style.name, "taking over a training run");
        Ok(self.launch(reservation, style, run))
    }

    /// A trained pack's style folder, as one object ([`pack_folder`]).
    async fn draft(&self, guild_id: u64, name: &str) -> anyhow::Result<Vec<u8>> {
        let dir = self.pack_dir(guild_id, name).join(super::STYLE_DIR);
        tokio::task::spawn_blocking(move || pack_folder(&dir)).await?
    }

    /// Removes the pack folders this trainer no longer needs: of packs deleted, or published
    /// or trained into a draft whose style is on the broker; not the one in hand.
    async fn remove_stale_folders(&self, queue: &TrainingQueue) -> anyhow::Result<()> {
        let Ok(guilds) = std::fs::read_dir(&self.config().dir) else {
            return Ok(());
        };
        let training = self.inner.lock_slot().as_ref().map(|s| s.name.clone());
        for guild in guilds.flatten() {
            let Ok(guild_id) = guild.file_name().to_string_lossy().parse::<u64>() else {
                continue;
            };
            for pack in std::fs::read_dir(guild.path())?.flatten() {
                let name = pack.file_name().to_string_lossy().into_owned();
                if training.as_deref() == Some(name.as_str()) {
                    continue;
                }
                let row = self.inner.store.guild_style(&name).await?;
                let needed = match row.filter(|s| s.guild_id == guild_id) {
                    None => false,
                    Some(s) if s.status == StyleStatus::Published => false,
                    Some(s) if s.status == StyleStatus::Draft => {
                        let key = draft_key(guild_id, &name);
                        !queue.file_keys(&key).await?.iter().any(|(k, _)| *k == key)
                    }
                    Some(s) => !super::holds_other_pack(&pack.path(), &s),
                };
                if !needed {
                    tracing::info!(guild_id, pack = %name, "removing a pack folder no longer needed");
                    self.remove_pack_dir(guild_id, &name)?;
                }
            }
        }
        Ok(())
    }
}

/// How often an idle trainer removes the pack folders it no longer needs.
const FOLDER_SWEEP: Duration = Duration::from_secs(600);

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
    let mut next_sweep = tokio::time::Instant::now();
    while !*stop.borrow() {
        if tokio::time::Instant::now() >= next_sweep {
            if let Err(e) = packs.remove_stale_folders(&queue).await {
                tracing::warn!(error = %format!("{e:#}"), "removing stale pack folders");
            }
            next_sweep = tokio::time::Instant::now() + FOLDER_SWEEP;
        }
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
            trainer.give_up("its trainers stopped unexpectedly").await;
            job.set_aside().await;
            continue;
        }
        let end = job.hold(trainer.train(stop.clone())).await;
        if let TrainingJobEnd::Failed(why) = &end {
            if job.is_last_attempt() {
                trainer.give_up(why).await;
                job.set_aside().await;
            }
        }
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

    /// The guild's pack of this name, if it has one.
    async fn own_row(&self) -> anyhow::Result<Option<GuildStyle>> {
        let style = self.packs.inner.store.guild_style(&self.pack.name).await?;
        Ok(style.filter(|s| s.guild_id == self.pack.guild_id))
    }

    /// Trains the pack and relays its news; how the job ends for the broker.
    async fn train(&self, mut stop: watch::Receiver<bool>) -> TrainingJobEnd {
        // Listening first: a cancel asked while the pack is fetched and set up is answered
        // once it runs.
        let mut cancels = self.queue.cancel_requests(self.pack.guild_id).await;
        let own = match self.own_row().await {
            Ok(own) => own,
            Err(e) => return TrainingJobEnd::Failed(format!("{e:#}")),
        };
        if let Some(style) = own.filter(|s| !self.pack.resume && s.status != StyleStatus::Training)
        {
            // This upload already ran to its end (the job came back after it): keep its
            // draft if that was what was lost.
            let folder = self.packs.pack_dir(style.guild_id, &style.name);
            if style.status == StyleStatus::Draft && folder.exists() {
                if let Err(e) = self.keep_draft().await {
                    return TrainingJobEnd::Failed(format!("keeping the trained style: {e:#}"));
                }
            }
            return TrainingJobEnd::Finished;
        }
        let zip = latest_archive(self.queue, self.pack).await;
        let mut events = match self.packs.train_queued(self.pack, zip).await {
            Ok(events) => events,
            // Not the pack's fault: this trainer is busy or broken; another try may work.
            Err(e @ (PackError::Internal(_) | PackError::Busy { .. } | PackError::NoTrainer)) => {
                return TrainingJobEnd::Failed(format!("{e:#}"));
            }
            Err(e) => {
                if !self.pack.resume && !matches!(self.own_row().await, Ok(Some(_))) {
                    self.queue.remove_file(&archive_key(self.pack)).await;
                }
                self.tell(PackEvent::Refused(e.to_string())).await;
                return TrainingJobEnd::Finished;
            }
        };
        let run_id = events.run.id;
        self.tell(PackEvent::Started { run_id }).await;
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
                        match self.queue.put_preview(&file, &png).await {
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
                                return TrainingJobEnd::Failed(format!(
                                    "storing the trained style: {e:#}"
                                ));
                            }
                        }
                        let (end, preview) = self.store_final_preview(run_id, end).await;
                        self.tell(PackEvent::Finished { run_id, end, preview }).await;
                        return TrainingJobEnd::Finished;
                    }
                    // This trainer stopped: the next one resumes the run.
                    None if stopping => return TrainingJobEnd::Interrupted,
                    None => return TrainingJobEnd::Failed("the run ended without an end".into()),
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

    /// Puts the trained style where a gateway publishes it from; the archives and this
    /// host's folder are no longer needed (a draft is not resumed).
    async fn keep_draft(&self) -> anyhow::Result<()> {
        let (guild_id, name) = (self.pack.guild_id, &self.pack.name);
        let draft = self.packs.draft(guild_id, name).await?;
        self.queue
            .put_file(&draft_key(guild_id, name), &draft)
            .await?;
        remove_archives(self.queue, guild_id, name).await;
        self.packs.remove_pack_dir(guild_id, name)?;
        Ok(())
    }

    /// A job set aside after its last attempt: its run is marked failed and its uploader
    /// told; an upload that left no pack leaves no archive either.
    async fn give_up(&self, why: &str) {
        let error = format!("it was set aside after failing too often ({why})");
        if let Err(e) = self.packs.fail_queued(self.pack, &error).await {
            tracing::warn!(error = %format!("{e:#}"), "recording a set-aside pack");
        }
        if !self.pack.resume && !matches!(self.own_row().await, Ok(Some(_))) {
            self.queue.remove_file(&archive_key(self.pack)).await;
        }
        self.tell(PackEvent::Refused(error)).await;
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
        let stored = match self.queue.put_preview(&file, &png).await {
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
    let published: Vec<(String, String)> = queue
        .file_keys(PUBLISHED)
        .await?
        .into_iter()
        .map(|(key, digest)| (key[PUBLISHED.len()..].to_string(), digest))
        .collect();
    for (name, digest) in &published {
        if let Err(e) = install_published(queue, registry, name, digest).await {
            tracing::warn!(style = %name, error = %format!("{e:#}"), "installing a published style");
        }
    }
    let Ok(entries) = std::fs::read_dir(registry.trained_root()) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let from_broker = dir.join(FROM_BROKER).exists();
        if from_broker && !published.iter().any(|(n, _)| *n == name) {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(style = %name, "removed a deleted style"),
                Err(e) => tracing::warn!(style = %name, error = %e, "removing a deleted style"),
            }
        }
    }
    Ok(())
}

/// Installs (or, when its content changed, replaces) the published style `name`; a style of
/// that name not installed from the broker is left alone.
async fn install_published(
    queue: &TrainingQueue,
    registry: &StyleRegistry,
    name: &str,
    digest: &str,
) -> anyhow::Result<()> {
    let dir = registry.trained_dir(name)?;
    if dir.exists() {
        match std::fs::read_to_string(dir.join(FROM_BROKER)) {
            Ok(installed) if installed == digest => return Ok(()),
            Ok(_) => {}
            Err(_) => anyhow::bail!("a style called {name:?} is installed here already"),
        }
    }
    let bytes = queue
        .file(&format!("{PUBLISHED}{name}"))
        .await
        .map_err(anyhow::Error::msg)?;
    let digest = digest.to_string();
    tokio::task::spawn_blocking(move || install_folder(&bytes, &dir, &digest)).await??;
    tracing::info!(style = %name, "installed a published style");
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

/// Writes a [`pack_folder`] object as the folder `dir` (complete or not at all, replacing
/// what was there), marked as installed from the broker with the object's `digest`.
fn install_folder(bytes: &[u8], dir: &Path, digest: &str) -> anyhow::Result<()> {
    let parent = dir.parent().context("a style folder has a parent")?;
    let name = dir.file_name().context("a style folder has a name")?;
    let partial = parent.join(format!(".{}.partial", name.to_string_lossy()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    let written = write_files(bytes, &partial)
        .and_then(|()| Ok(std::fs::write(partial.join(FROM_BROKER), digest)?));
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&partial, dir).with_context(|| format!("installing {}", dir.display()))?;
    Ok(())
}

/// Writes the files of a [`pack_folder`] object into `dir`.
fn write_files(bytes: &[u8], dir: &Path) -> anyhow::Result<()> {
    let damaged = || anyhow::anyhow!("a published style is damaged");
    let len = u32::from_le_bytes(bytes.get(..4).ok_or_else(damaged)?.try_into()?) as usize;
    let header: Vec<(String, usize)> =
        serde_json::from_slice(bytes.get(4..4 + len).ok_or_else(damaged)?)?;
    let mut rest = &bytes[4 + len..];
    for (file, size) in header {
        let plain = Path::new(&file)
            .file_name()
            .is_some_and(|f| f == file.as_str());
        if !plain || file.starts_with('.') {
            anyhow::bail!("a published style names the file {file:?}");
        }
        let data = rest.get(..size).ok_or_else(damaged)?;
        std::fs::write(dir.join(&file), data)?;
        rest = &rest[size..];
    }
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
        install_folder(&bytes, &dir, "digest-1").unwrap();
        assert_eq!(
            std::fs::read(dir.join("generator.safetensors")).unwrap(),
            vec![7u8; 3000]
        );
        assert_eq!(
            std::fs::read(dir.join("style.toml")).unwrap(),
            b"name = 'x'"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(FROM_BROKER)).unwrap(),
            "digest-1"
        );
        let cut = to.path().join("cut");
        assert!(install_folder(&bytes[..bytes.len() - 1], &cut, "d").is_err());
        assert!(!cut.exists(), "nothing half-installed");
        assert_eq!(
            std::fs::read_dir(to.path()).unwrap().count(),
            1,
            "no partial folder left"
        );
    }

    #[test]
    fn a_published_style_cannot_name_files_outside_its_folder() {
        let header = serde_json::to_vec(&[("../evil", 1usize)]).unwrap();
        let mut bytes = (header.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.push(0);
        let to = tempfile::tempdir().unwrap();
        assert!(install_folder(&bytes, &to.path().join("neon"), "d").is_err());
        assert!(!to.path().join("evil").exists());
    }
}
