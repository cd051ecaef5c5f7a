//! Packs trained from the broker's training stream (`serve --role worker --work train`): a
//! gateway checks an upload and queues it ([`QueuedPack`]); a trainer takes it, trains it with
//! its own [`StylePacks`] on the shared database, and tells the responders how it goes
//! ([`PackNews`]), which post the progress message, previews and the end in the channel.

use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    archive, check_new_pack, list_packs, prepare, Milestone, PackError, PackWarning, Requester,
    RunEnd, RunEvents, RunProgress, Skipped, StylePacks,
};
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
    /// Who uploaded it, and the channel the news goes to.
    pub by: Requester,
}

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
        let payload = serde_json::to_vec(&pack).expect("a queued pack serialises");
        match self
            .setup
            .queue
            .submit(pack.guild_id, payload, Some(&zip))
            .await
        {
            Ok(()) => Ok(QueuedUpload {
                train: n - held_out,
                held_out,
                skipped: archive.skipped,
                base,
            }),
            Err(TrainingSubmitError::Busy) => Err(PackError::Queued),
            Err(e) => Err(PackError::Internal(e.into())),
        }
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
    /// Trains a pack a gateway queued: records and starts it, or (when a trainer died with
    /// it or stopped) takes its unfinished run over, restoring its files from `zip` where
    /// this host lacks them (the run then starts again from its preparation).
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
            .filter(|s| s.guild_id == pack.guild_id && s.status == StyleStatus::Training);
        if let Some(style) = own {
            return self.take_over(style, zip).await;
        }
        let zip = zip.context("the queued pack has no archive")?;
        let reservation = self
            .reserve(pack.guild_id, &pack.name, pack.base.as_deref())
            .await?;
        let accepted = reservation.upload(zip, pack.by).await?;
        self.start(accepted).await
    }

    async fn take_over(
        &self,
        mut style: GuildStyle,
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
        let dir = self.pack_dir(style.guild_id, &style.name);
        if !dir.join(prepare::TRAIN_DIR).is_dir() {
            let zip = zip.context("the queued pack has no archive")?;
            let config = self.config().clone();
            let originals = dir.clone();
            tokio::task::spawn_blocking(move || {
                let pack = archive::read_pack(&zip, &config)?;
                prepare::save_originals(&pack.images, &originals)
            })
            .await
            .context("restoring the pack stopped")??;
            style.faces_found = None;
        }
        tracing::info!(run = run.id, style = %style.name, "taking over a training run");
        Ok(self.launch(reservation, style, run))
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
        let zip = match job.archive().await {
            Ok(zip) => zip,
            Err(e) => {
                job.hold(async { TrainingJobEnd::Failed(e) }).await;
                continue;
            }
        };
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
