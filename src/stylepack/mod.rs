//! Style packs: a server admin's archive of cartoon faces becomes a style of that server.
//!
//! [`StylePacks`] does everything but talk to Discord:
//! 1. [`StylePacks::reserve`] checks the name, the base style and that nothing else trains
//!    (one training job at a time per host), and holds the training slot;
//! 2. [`Reservation::upload`] checks the archive ([`archive::read_pack`]), saves its images in
//!    `<stylepacks.dir>/<guild>/<name>/` and records the pack and its run; a refusal leaves no
//!    file and no row behind;
//! 3. [`StylePacks::start`] prepares the images ([`prepare::prepare_pack`]: faces aligned,
//!    whitened), then runs the fine-tune and the evaluation through the [`StyleTrainer`]
//!    boundary, all on a dedicated thread (never the render workers), recording the run's
//!    progress in SQLite and reporting it through [`RunEvents`];
//! 4. the new style is a draft until [`StylePacks::publish`] installs it in the style
//!    registry, where only its guild sees it ([`styles_for_guild`]).
//!
//! A cancel keeps the last checkpoint ([`StylePacks::resume`] continues from it); a restart
//! resumes a run that was training ([`StylePacks::resume_unfinished`]). Publish, delete,
//! cancel and resume are audited with who did it and when.
//!
//! A bot of several processes (DESIGN.md §6b) trains packs on its trainers instead: a
//! gateway checks an upload and queues it ([`PackIntake`]), a trainer takes it from the
//! broker and runs the same flow ([`train_from_queue`]), and the responders post its news.

pub mod archive;
pub mod check;
mod events;
pub mod finetuner;
pub mod prepare;
mod queued;
mod run;
pub mod trainer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

pub use archive::{ArchiveError, PackArchive, SkipReason, Skipped};
pub use check::{PackRefusal, PackWarning};
pub use events::{Milestone, RunEnd, RunEvents, RunProgress};
pub use prepare::PreparedPack;
pub use queued::{
    install_published_styles, train_from_queue, GatewayPacks, PackEvent, PackIntake, PackNews,
    QueuedPack, QueuedUpload,
};
pub use trainer::{
    EvalReport, FinetuneJob, FinetuneOutcome, StyleTrainer, TrainError, TrainEvent, TrainProgress,
};

use crate::cartoon::styles::{self, StyleRegistry};
use crate::config::{Config, StylePackConfig};
use crate::face::FacePipeline;
use crate::jobs::StyleInfo;
use crate::store::{
    GuildStyle, NewGuildStyle, NewRun, RunFinish, RunProgressRecord, RunStatus, Store, StyleStatus,
    TrainingRun,
};

/// The new style, under a pack's folder, until it is published.
pub(crate) const STYLE_DIR: &str = "style";
/// Checkpoints, under a pack's folder.
const WORK_DIR: &str = "work";
/// Which pack a pack's folder holds ([`mark_pack_dir`]).
const PACK_ID: &str = "pack-id";
/// The latest preview grid, under a pack's folder (kept across restarts).
pub(crate) const LATEST_PREVIEW: &str = "latest-preview.png";
/// How long a shutdown waits for the trainer to stop at its next step.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);

/// What the style-pack service is made of.
#[derive(Clone)]
pub struct PackSetup {
    /// The `[stylepacks]` settings: archive limits, folders, steps, preview interval.
    pub config: StylePackConfig,
    /// The installed styles: the bases to train from, and where a published pack is
    /// installed.
    pub registry: StyleRegistry,
    /// The base style when an upload names none.
    pub default_base: String,
    /// The face pipeline that aligns the pack's images while they are prepared.
    pub faces: Arc<FacePipeline>,
    /// `None` where this host cannot train: uploads are refused, the rest works.
    pub trainer: Option<Arc<dyn StyleTrainer>>,
}

impl PackSetup {
    /// Builds the setup from the configuration: `[stylepacks]`, the style registry, and
    /// `styles.default` as the default base.
    pub fn new(
        config: &Config,
        faces: Arc<FacePipeline>,
        trainer: Option<Arc<dyn StyleTrainer>>,
    ) -> Self {
        Self {
            config: config.stylepacks.clone(),
            registry: StyleRegistry::from_config(config),
            default_base: config.styles.default.clone(),
            faces,
            trainer,
        }
    }
}

/// Why a style-pack action was refused.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// This host has no [`StyleTrainer`]: uploads and resumes are refused.
    #[error("this host has no trainer")]
    NoTrainer,
    /// The name is not 1 to 32 lowercase letters, digits, `-` or `_`; holds the name.
    #[error("{0:?} is not a valid style name")]
    InvalidName(String),
    /// An installed style or another pack already has the name; holds it.
    #[error("a style called {0:?} already exists")]
    NameTaken(String),
    /// The base style asked for is not installed, or is another guild's pack.
    #[error("there is no base style called {name:?}")]
    BaseMissing {
        /// The base style asked for.
        name: String,
        /// The base styles this guild may train from.
        available: Vec<String>,
    },
    /// Another pack is being prepared or trained (`guild_id` owns it).
    #[error("the pack {name:?} is training")]
    Busy {
        /// The guild whose pack holds the training slot.
        guild_id: u64,
        /// The name of the pack that holds the training slot.
        name: String,
    },
    /// The uploaded archive was refused.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The guild has no pack of that name; holds the name.
    #[error("this server has no style pack called {0:?}")]
    NotFound(String),
    /// The action does not fit the pack's status: publishing a pack that is not a draft,
    /// resuming one that is not cancelled or failed, deleting one that is training.
    #[error("the pack {name:?} is {status}")]
    WrongStatus {
        /// The pack's name.
        name: String,
        /// The pack's present status.
        status: StyleStatus,
    },
    /// A cancel found no run of this guild training.
    #[error("nothing is training on this server")]
    NothingTraining,
    /// The guild already has a pack queued for the trainers or training (a bot of several
    /// processes trains one pack per server at a time).
    #[error("this server already has a pack queued or training")]
    Queued,
    /// The database, the file system or a background task failed.
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

/// Who starts a training (an upload or a resume), and where the bot talks about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Requester {
    /// The Discord user who asked; recorded on the run (and as a new pack's creator).
    pub user_id: u64,
    /// The Discord channel where the bot reports the run's progress and end.
    pub channel_id: u64,
}

/// The style-pack service. Cheap to clone.
#[derive(Clone)]
pub struct StylePacks {
    inner: Arc<Inner>,
}

struct Inner {
    setup: PackSetup,
    store: Store,
    /// The one pack being prepared or trained on this host.
    slot: Mutex<Option<Slot>>,
    shutting_down: AtomicBool,
}

struct Slot {
    guild_id: u64,
    name: String,
    cancel: Arc<AtomicBool>,
    /// Set once training started.
    run: Option<RunThreads>,
}

struct RunThreads {
    thread: std::thread::JoinHandle<()>,
    follower: tokio::task::JoinHandle<()>,
}

/// The training slot, held from the checks before a download until the run starts (or the
/// upload is refused: dropping it frees the slot).
pub struct Reservation {
    packs: StylePacks,
    guild_id: u64,
    name: String,
    base: styles::StyleInfo,
    cancel: Arc<AtomicBool>,
    /// Whether dropping it frees the slot (until a run takes the slot over).
    frees_slot: bool,
}

/// A checked and recorded pack, ready to prepare and train.
pub struct Accepted {
    reservation: Reservation,
    run_id: i64,
    /// Images to train on, and kept aside for the evaluation.
    pub train: usize,
    /// Images kept aside for the evaluation.
    pub held_out: usize,
    /// The archive's entries that were left out, and why, for the reply to the uploader.
    pub skipped: Vec<Skipped>,
}

impl StylePacks {
    /// The service, from its setup and the database; nothing trains until a start or resume.
    pub fn new(setup: PackSetup, store: Store) -> Self {
        Self {
            inner: Arc::new(Inner {
                setup,
                store,
                slot: Mutex::new(None),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    /// The `[stylepacks]` settings.
    pub fn config(&self) -> &StylePackConfig {
        &self.inner.setup.config
    }

    /// Checks everything that needs no archive and takes the training slot.
    pub async fn reserve(
        &self,
        guild_id: u64,
        name: &str,
        base: Option<&str>,
    ) -> Result<Reservation, PackError> {
        let setup = &self.inner.setup;
        if setup.trainer.is_none() {
            return Err(PackError::NoTrainer);
        }
        let installed = setup.registry.list();
        let names: Vec<String> = installed.iter().map(|s| s.name.clone()).collect();
        let base = base.unwrap_or(&setup.default_base);
        let base = check_new_pack(&self.inner.store, &names, guild_id, name, base).await?;
        let base = installed
            .into_iter()
            .find(|s| s.name == base)
            .context("the base style went away")?;
        self.take_slot(guild_id, name, base)
    }

    /// Takes the training slot for a pack, unless another pack holds it.
    fn take_slot(
        &self,
        guild_id: u64,
        name: &str,
        base: styles::StyleInfo,
    ) -> Result<Reservation, PackError> {
        let mut slot = self.inner.lock_slot();
        if let Some(busy) = slot.as_ref() {
            return Err(PackError::Busy {
                guild_id: busy.guild_id,
                name: busy.name.clone(),
            });
        }
        let cancel = Arc::new(AtomicBool::new(false));
        *slot = Some(Slot {
            guild_id,
            name: name.to_string(),
            cancel: Arc::clone(&cancel),
            run: None,
        });
        Ok(Reservation {
            packs: self.clone(),
            guild_id,
            name: name.to_string(),
            base,
            cancel,
            frees_slot: true,
        })
    }

    /// Starts training an accepted pack.
    pub async fn start(&self, accepted: Accepted) -> Result<RunEvents, PackError> {
        let Accepted {
            reservation,
            run_id,
            ..
        } = accepted;
        let store = &self.inner.store;
        let style = store
            .guild_style(&reservation.name)
            .await?
            .context("the pack's row is missing")?;
        let run = store
            .training_run(run_id)
            .await?
            .context("the run's row is missing")?;
        Ok(self.launch(reservation, style, run))
    }

    /// Trains a cancelled or failed pack again, from its last checkpoint.
    pub async fn resume(
        &self,
        guild_id: u64,
        name: &str,
        by: Requester,
    ) -> Result<RunEvents, PackError> {
        let style = self.own_style(guild_id, name).await?;
        self.resume_style(style, by, None).await
    }

    /// Resumes a cancelled or failed pack; where this host lacks its prepared images, they
    /// are restored from `zip` (the uploaded archive) and prepared again first.
    async fn resume_style(
        &self,
        style: GuildStyle,
        by: Requester,
        zip: Option<Vec<u8>>,
    ) -> Result<RunEvents, PackError> {
        if !matches!(style.status, StyleStatus::Cancelled | StyleStatus::Failed) {
            return Err(PackError::WrongStatus {
                name: style.name,
                status: style.status,
            });
        }
        if self.inner.setup.trainer.is_none() {
            return Err(PackError::NoTrainer);
        }
        let (reservation, style) = self.take_slot_restoring(style, zip).await?;
        let new_run = NewRun {
            user_id: by.user_id,
            channel_id: by.channel_id,
            total_steps: self.config().steps,
        };
        let store = &self.inner.store;
        let run_id = store
            .resume_guild_style(&style.name, style.guild_id, &new_run)
            .await?;
        let run = store
            .training_run(run_id)
            .await?
            .context("the run's row is missing")?;
        let style = GuildStyle {
            status: StyleStatus::Training,
            ..style
        };
        Ok(self.launch(reservation, style, run))
    }

    /// Takes the training slot for an existing pack (its base must still be installed), its
    /// files restored from `zip` where this host lacks them ([`Self::restore_files`]).
    async fn take_slot_restoring(
        &self,
        style: GuildStyle,
        zip: Option<Vec<u8>>,
    ) -> Result<(Reservation, GuildStyle), PackError> {
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
        Ok((reservation, style))
    }

    /// Restores a pack's images from its archive where this host has not prepared them (the
    /// pack started on another trainer, or the folder is a deleted namesake's): the pack is
    /// then prepared again.
    async fn restore_files(
        &self,
        mut style: GuildStyle,
        zip: Vec<u8>,
    ) -> Result<GuildStyle, PackError> {
        let dir = self.pack_dir(style.guild_id, &style.name);
        if dir.join(prepare::TRAIN_DIR).is_dir() && !holds_other_pack(&dir, &style) {
            return Ok(style);
        }
        // Absent, or left by a deleted pack of the same name.
        remove_dir_if_present(&dir)?;
        let config = self.config().clone();
        let originals = dir.clone();
        tokio::task::spawn_blocking(move || {
            let pack = archive::read_pack(&zip, &config)?;
            prepare::save_originals(&pack.images, &originals)
        })
        .await
        .context("restoring the pack stopped")??;
        mark_pack_dir(&dir, &style)?;
        style.faces_found = None;
        Ok(style)
    }

    /// Resumes the run a previous process left training (at most one trains: any other is
    /// marked failed).
    pub async fn resume_unfinished(&self) -> Result<Option<RunEvents>, PackError> {
        let store = &self.inner.store;
        let mut runs = store.unfinished_runs().await?;
        let Some(run) = runs.pop() else {
            return Ok(None);
        };
        for stale in runs {
            self.fail_run(&stale, "interrupted by a restart").await?;
        }
        let style = store
            .guild_style(&run.style)
            .await?
            .context("the run's pack is missing")?;
        let base = match self.inner.setup.registry.find(&style.base) {
            Ok(base) if self.inner.setup.trainer.is_some() => base,
            Ok(_) => {
                self.fail_run(&run, "this host has no trainer").await?;
                return Ok(None);
            }
            Err(e) => {
                self.fail_run(&run, &format!("the base style is gone: {e}"))
                    .await?;
                return Ok(None);
            }
        };
        let reservation = self.take_slot(style.guild_id, &style.name, base)?;
        tracing::info!(run = run.id, style = %style.name, step = run.step, "resuming a training run");
        Ok(Some(self.launch(reservation, style, run)))
    }

    async fn fail_run(&self, run: &TrainingRun, error: &str) -> anyhow::Result<()> {
        tracing::warn!(run = run.id, style = %run.style, error, "training run failed");
        end_unfinished_run(&self.inner.store, run, RunStatus::Failed, Some(error)).await
    }

    /// Marks a queued pack's unfinished run failed with `error` (a pack set aside).
    pub async fn fail_queued(&self, pack: &QueuedPack, error: &str) -> anyhow::Result<()> {
        let store = &self.inner.store;
        let training = store
            .guild_style(&pack.name)
            .await?
            .is_some_and(|s| s.guild_id == pack.guild_id && s.status == StyleStatus::Training);
        if !training {
            return Ok(());
        }
        match store.latest_run(&pack.name).await? {
            Some(run) if run.status == RunStatus::Running => self.fail_run(&run, error).await,
            _ => Ok(()),
        }
    }

    /// Stops the guild's training at its next step (the checkpoint is kept); returns the
    /// pack's name.
    pub async fn cancel(&self, guild_id: u64, user_id: u64) -> Result<String, PackError> {
        let name = {
            let slot = self.inner.lock_slot();
            match slot.as_ref() {
                Some(s) if s.guild_id == guild_id && s.run.is_some() => {
                    s.cancel.store(true, Ordering::SeqCst);
                    s.name.clone()
                }
                _ => return Err(PackError::NothingTraining),
            }
        };
        self.inner
            .store
            .record_audit(
                guild_id,
                user_id,
                "stylepack_cancel",
                &format!("name={name}"),
            )
            .await?;
        Ok(name)
    }

    /// Installs a draft in the style registry, for the guild's members.
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
        let to = self
            .inner
            .setup
            .registry
            .trained_dir(name)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if to.exists() {
            return Err(PackError::NameTaken(name.to_string()));
        }
        let from = self.pack_dir(guild_id, name).join(STYLE_DIR);
        move_dir(&from, &to)
            .with_context(|| format!("installing {} as {}", from.display(), to.display()))?;
        self.inner
            .store
            .publish_guild_style(name, guild_id, user_id)
            .await?;
        Ok(GuildStyle {
            status: StyleStatus::Published,
            ..style
        })
    }

    /// Removes a pack that is not training: its files, its installed style and its rows.
    pub async fn delete(&self, guild_id: u64, user_id: u64, name: &str) -> Result<(), PackError> {
        let style = self.own_style(guild_id, name).await?;
        let training = self
            .inner
            .lock_slot()
            .as_ref()
            .is_some_and(|s| s.name == name);
        if training {
            return Err(PackError::WrongStatus {
                name: style.name,
                status: StyleStatus::Training,
            });
        }
        if style.status == StyleStatus::Published {
            // The installed style goes first: without its row it would be everybody's.
            let installed = self
                .inner
                .setup
                .registry
                .trained_dir(name)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            remove_dir_if_present(&installed)?;
        }
        self.inner
            .store
            .delete_guild_style(name, guild_id, user_id)
            .await?;
        self.remove_pack_dir(guild_id, name)?;
        Ok(())
    }

    /// The guild's packs, oldest first, each with its latest run.
    pub async fn list(
        &self,
        guild_id: u64,
    ) -> Result<Vec<(GuildStyle, Option<TrainingRun>)>, PackError> {
        Ok(list_packs(&self.inner.store, guild_id).await?)
    }

    /// Stops a running training so that the next start resumes it: the run stays `running`.
    /// Waits (a bounded time) for the trainer to stop.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let run = {
            let mut slot = self.inner.lock_slot();
            slot.as_mut().and_then(|s| {
                s.cancel.store(true, Ordering::SeqCst);
                s.run.take()
            })
        };
        let Some(RunThreads { thread, follower }) = run else {
            return;
        };
        let joined = tokio::task::spawn_blocking(move || thread.join());
        if tokio::time::timeout(SHUTDOWN_WAIT, joined).await.is_err() {
            tracing::warn!("the trainer did not stop in time");
            return;
        }
        if tokio::time::timeout(SHUTDOWN_WAIT, follower).await.is_err() {
            tracing::warn!("recording the training's end did not finish in time");
        }
    }

    async fn own_style(&self, guild_id: u64, name: &str) -> Result<GuildStyle, PackError> {
        own_pack(&self.inner.store, guild_id, name).await
    }

    fn pack_dir(&self, guild_id: u64, name: &str) -> PathBuf {
        self.inner
            .setup
            .config
            .dir
            .join(guild_id.to_string())
            .join(name)
    }

    /// Removes a pack's folder, and its guild's folder once empty.
    fn remove_pack_dir(&self, guild_id: u64, name: &str) -> anyhow::Result<()> {
        let dir = self.pack_dir(guild_id, name);
        remove_dir_if_present(&dir)?;
        if let Some(guild_dir) = dir.parent() {
            // Fails (and is meant to) while other packs of the guild remain.
            let _ = std::fs::remove_dir(guild_dir);
        }
        Ok(())
    }

    /// Spawns the training thread (preparing the pack first, unless it was) and the task that
    /// records and reports its progress.
    fn launch(
        &self,
        mut reservation: Reservation,
        style: GuildStyle,
        run: TrainingRun,
    ) -> RunEvents {
        let setup = &self.inner.setup;
        let dir = self.pack_dir(style.guild_id, &style.name);
        let work = run::TrainingWork {
            trainer: Arc::clone(setup.trainer.as_ref().expect("checked before launching")),
            prepare: style.faces_found.is_none().then(|| run::Preparation {
                faces: Arc::clone(&setup.faces),
                limits: setup.config.image_limits(),
                held_out_percent: setup.config.held_out_percent,
                min_face_share: setup.config.min_face_share,
                max_style_spread: setup.config.max_style_spread,
            }),
            job: FinetuneJob {
                base_dir: reservation.base.dir.clone(),
                images_dir: dir.join(prepare::TRAIN_DIR),
                out_dir: dir.join(STYLE_DIR),
                work_dir: dir.join(WORK_DIR),
                steps: run.total_steps,
                preview_every: setup.config.preview_every,
                description: format!(
                    "{}: a style pack fine-tuned from {} on {} images",
                    style.name, style.base, style.images
                ),
            },
            dir: dir.clone(),
            cancel: Arc::clone(&reservation.cancel),
        };
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("toonbot-train".into())
            .spawn(move || work.run(&events_tx))
            .expect("spawning the training thread");
        let (progress_tx, progress_rx) = watch::channel(None);
        let (milestones_tx, milestones_rx) = mpsc::unbounded_channel();
        let follower = tokio::spawn(run::follow(
            self.clone(),
            style.clone(),
            run.clone(),
            dir,
            events_rx,
            progress_tx,
            milestones_tx,
        ));
        // The slot now belongs to the run, which frees it when it ends (maybe already).
        reservation.frees_slot = false;
        let mut slot = self.inner.lock_slot();
        if let Some(s) = slot
            .as_mut()
            .filter(|s| s.name == style.name && s.run.is_none())
        {
            s.run = Some(RunThreads { thread, follower });
        }
        drop(slot);
        RunEvents {
            style,
            run,
            progress: progress_rx,
            milestones: milestones_rx,
        }
    }
}

impl Inner {
    fn lock_slot(&self) -> MutexGuard<'_, Option<Slot>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn free_slot(&self, name: &str) {
        let mut slot = self.lock_slot();
        if slot.as_ref().is_some_and(|s| s.name == name) {
            *slot = None;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.frees_slot {
            self.packs.inner.free_slot(&self.name);
        }
    }
}

impl Accepted {
    /// The base style it trains from.
    pub fn base(&self) -> &str {
        &self.reservation.base.name
    }
}

impl Reservation {
    /// Checks the archive, saves its images and records the pack and its run. On any refusal
    /// nothing stays behind.
    pub async fn upload(self, zip: Vec<u8>, by: Requester) -> Result<Accepted, PackError> {
        let packs = self.packs.clone();
        let config = packs.config().clone();
        let archive = tokio::task::spawn_blocking(move || archive::read_pack(&zip, &config))
            .await
            .context("the archive check stopped")??;
        let dir = packs.pack_dir(self.guild_id, &self.name);
        // A folder left by a crash, before its pack was recorded.
        remove_dir_if_present(&dir)?;
        let mut cleanup = PackDirGuard {
            packs: &packs,
            guild_id: self.guild_id,
            name: &self.name,
            armed: true,
        };
        let PackArchive { images, skipped } = archive;
        let n = images.len();
        let originals = dir.clone();
        tokio::task::spawn_blocking(move || prepare::save_originals(&images, &originals))
            .await
            .context("saving the pack stopped")??;
        let held_out = prepare::held_out_count(n, packs.config().held_out_percent);
        let style = NewGuildStyle {
            name: self.name.clone(),
            guild_id: self.guild_id,
            base: self.base.name.clone(),
            images: (n - held_out) as u32,
            held_out: held_out as u32,
            created_by: by.user_id,
        };
        let run = NewRun {
            user_id: by.user_id,
            channel_id: by.channel_id,
            total_steps: packs.config().steps,
        };
        let run_id = packs.inner.store.create_guild_style(&style, &run).await?;
        let recorded = packs
            .inner
            .store
            .guild_style(&self.name)
            .await?
            .context("the pack's row is missing")?;
        mark_pack_dir(&dir, &recorded)?;
        cleanup.armed = false;
        drop(cleanup);
        Ok(Accepted {
            reservation: self,
            run_id,
            train: n - held_out,
            held_out,
            skipped,
        })
    }
}

/// Removes a pack's folder on a refusal (until disarmed, once the pack is recorded).
struct PackDirGuard<'a> {
    packs: &'a StylePacks,
    guild_id: u64,
    name: &'a str,
    armed: bool,
}

impl Drop for PackDirGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = self.packs.remove_pack_dir(self.guild_id, self.name) {
            tracing::warn!(error = %format!("{e:#}"), "removing a refused pack's folder");
        }
    }
}

/// Ends a run that stopped without recording its end (a failure, or a cancel of a pack
/// waiting for its trainer), at its last recorded step; the pack's status follows.
async fn end_unfinished_run(
    store: &Store,
    run: &TrainingRun,
    status: RunStatus,
    error: Option<&str>,
) -> anyhow::Result<()> {
    let style_status = match status {
        RunStatus::Cancelled => StyleStatus::Cancelled,
        _ => StyleStatus::Failed,
    };
    let end = RunFinish {
        status,
        error: error.map(str::to_string),
        progress: RunProgressRecord {
            step: run.step,
            losses: run.losses.clone(),
            images_per_sec: run.images_per_sec,
            train_ms: run.train_ms,
        },
        eval_ms: None,
        style_status,
        eval: None,
        eval_error: None,
    };
    store.finish_run(run.id, &run.style, &end).await
}

/// The guild's pack called `name`.
async fn own_pack(store: &Store, guild_id: u64, name: &str) -> Result<GuildStyle, PackError> {
    store
        .guild_style(name)
        .await?
        .filter(|s| s.guild_id == guild_id)
        .ok_or_else(|| PackError::NotFound(name.to_string()))
}

/// The guild's packs, oldest first, each with its latest run.
async fn list_packs(
    store: &Store,
    guild_id: u64,
) -> anyhow::Result<Vec<(GuildStyle, Option<TrainingRun>)>> {
    let mut packs = Vec::new();
    for style in store.guild_styles(guild_id).await? {
        let run = store.latest_run(&style.name).await?;
        packs.push((style, run));
    }
    Ok(packs)
}

/// Checks a new pack's name (valid, and neither an `installed` style's nor another pack's)
/// and its `base` (installed, and not another guild's pack); the base's name.
pub async fn check_new_pack(
    store: &Store,
    installed: &[String],
    guild_id: u64,
    name: &str,
    base: &str,
) -> Result<String, PackError> {
    if !styles::is_valid_name(name) {
        return Err(PackError::InvalidName(name.to_string()));
    }
    if installed.iter().any(|s| s == name) || store.guild_style(name).await?.is_some() {
        return Err(PackError::NameTaken(name.to_string()));
    }
    let foreign: Vec<String> = store
        .published_guild_styles()
        .await?
        .into_iter()
        .filter(|s| s.guild_id != guild_id)
        .map(|s| s.name)
        .collect();
    let allowed: Vec<String> = installed
        .iter()
        .filter(|s| !foreign.contains(s))
        .cloned()
        .collect();
    if !allowed.iter().any(|s| s == base) {
        return Err(PackError::BaseMissing {
            name: base.to_string(),
            available: allowed,
        });
    }
    Ok(base.to_string())
}

/// The styles a guild's members may use: the installed styles less every guild's packs (a
/// pack's style installed before its row says published, or still installed after its row
/// is gone, is nobody's), plus the guild's published packs (also before the renderer's list
/// shows them).
pub async fn styles_for_guild(
    store: &Store,
    installed: Vec<StyleInfo>,
    guild_id: Option<u64>,
) -> anyhow::Result<Vec<StyleInfo>> {
    let packs = store.all_guild_styles().await?;
    let mut visible: Vec<StyleInfo> = installed
        .iter()
        .filter(|s| !packs.iter().any(|p| p.name == s.name))
        .cloned()
        .collect();
    let own = packs
        .iter()
        .filter(|p| Some(p.guild_id) == guild_id && p.status == StyleStatus::Published);
    for own in own {
        visible.push(
            installed
                .iter()
                .find(|s| s.name == own.name)
                .cloned()
                .unwrap_or_else(|| StyleInfo {
                    name: own.name.clone(),
                    description: format!("this server's style, fine-tuned from {}", own.base),
                    is_default: false,
                    preview_png: None,
                }),
        );
    }
    visible.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(visible)
}

/// Records in a pack's folder which pack it holds (its row's creation time): a folder left
/// by a deleted pack of the same name is not mistaken for it.
fn mark_pack_dir(dir: &Path, style: &GuildStyle) -> anyhow::Result<()> {
    let marker = dir.join(PACK_ID);
    std::fs::write(&marker, style.created_at.to_string())
        .with_context(|| format!("writing {}", marker.display()))
}

/// Whether a pack's folder is marked as another pack's (a deleted namesake's); folders
/// from before the marks are taken as the pack's.
fn holds_other_pack(dir: &Path, style: &GuildStyle) -> bool {
    std::fs::read_to_string(dir.join(PACK_ID)).is_ok_and(|id| id != style.created_at.to_string())
}

fn remove_dir_if_present(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Moves a style folder (files only), by renaming where possible, else by copying.
fn move_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    std::fs::remove_dir_all(from)?;
    Ok(())
}
