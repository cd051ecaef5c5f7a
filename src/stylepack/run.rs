//! The run of a style pack: its thread (prepare, fine-tune, evaluate through the
//! [`StyleTrainer`]) and the task that follows it, recording progress and the end in SQLite
//! and reporting them as [`RunProgress`] and [`Milestone`]s.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::check::{check_faces, check_style, folder_style_spread};
use super::{
    prepare, EvalReport, FinetuneJob, FinetuneOutcome, Milestone, PackRefusal, PackWarning,
    PreparedPack, RunEnd, RunProgress, StylePacks, StyleTrainer, TrainError, TrainEvent,
    LATEST_PREVIEW, STYLE_DIR,
};
use crate::cartoon::styles;
use crate::config::Limits;
use crate::face::FacePipeline;
use crate::store::{
    GuildStyle, RunFinish, RunProgressRecord, RunStatus, StyleEval, StyleStatus, TrainingRun,
};

/// Least time between two progress writes to the database.
const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// What the training thread tells its follower.
pub(super) enum ThreadEvent {
    Preparing {
        done: usize,
        total: usize,
    },
    Prepared(PreparedPack),
    Refused(PackRefusal),
    Warning(PackWarning),
    Train(TrainEvent),
    Ended {
        outcome: Result<FinetuneOutcome, String>,
        train_time: Duration,
        eval: Option<(Result<EvalReport, String>, Duration)>,
    },
}

/// What the training thread does.
pub(super) struct TrainingWork {
    pub(super) trainer: Arc<dyn StyleTrainer>,
    /// `None` when the pack is already prepared.
    pub(super) prepare: Option<Preparation>,
    pub(super) job: FinetuneJob,
    /// The pack's folder.
    pub(super) dir: PathBuf,
    pub(super) cancel: Arc<AtomicBool>,
}

pub(super) struct Preparation {
    pub(super) faces: Arc<FacePipeline>,
    pub(super) limits: Limits,
    pub(super) held_out_percent: u32,
    pub(super) min_face_share: f64,
    pub(super) max_style_spread: f64,
}

impl TrainingWork {
    /// Prepare (unless done), fine-tune, then (when completed) evaluate.
    pub(super) fn run(self, events: &mpsc::UnboundedSender<ThreadEvent>) {
        let started = Instant::now();
        let send = |e: ThreadEvent| {
            let _ = events.send(e);
        };
        let stopped = |outcome| {
            send(ThreadEvent::Ended {
                outcome,
                train_time: started.elapsed(),
                eval: None,
            })
        };
        if let Some(p) = &self.prepare {
            let progress = |done, total| send(ThreadEvent::Preparing { done, total });
            let prepared = prepare::prepare_pack(
                &p.faces,
                &p.limits,
                &self.dir,
                p.held_out_percent,
                &progress,
                &self.cancel,
            );
            let prepared = match prepared {
                Ok(Some(prepared)) => prepared,
                Ok(None) => return stopped(Ok(FinetuneOutcome::Cancelled { step: 0 })),
                Err(e) => return stopped(Err(format!("preparing the pack: {e:#}"))),
            };
            send(ThreadEvent::Prepared(prepared));
            if let Err(refusal) = check_faces(&prepared, p.min_face_share) {
                return send(ThreadEvent::Refused(refusal));
            }
            match folder_style_spread(&self.job.images_dir) {
                Ok(spread) => {
                    if let Some(warning) = check_style(spread, p.max_style_spread) {
                        send(ThreadEvent::Warning(warning));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "measuring a pack's style spread")
                }
            }
        }
        let report = |e: TrainEvent| send(ThreadEvent::Train(e));
        let trainer = self.trainer.as_ref();
        let outcome = guarded(|| trainer.finetune(&self.job, &report, &self.cancel));
        let train_time = started.elapsed();
        let eval = matches!(outcome, Ok(FinetuneOutcome::Completed { .. })).then(|| {
            let started = Instant::now();
            let held_out = self.dir.join(prepare::HELD_OUT_DIR);
            let eval = guarded(|| trainer.evaluate(&self.job.out_dir, &held_out));
            (eval, started.elapsed())
        });
        send(ThreadEvent::Ended {
            outcome,
            train_time,
            eval,
        });
    }
}

/// Runs a trainer call, turning its errors and panics into text.
fn guarded<T>(call: impl FnOnce() -> Result<T, TrainError>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!(
            "the trainer panicked: {}",
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default()
        )),
    }
}

/// How the training thread ended, as its follower saw it.
enum Ended {
    /// The trainer returned (or failed); with the evaluation when it completed.
    Trainer(
        Result<FinetuneOutcome, String>,
        Option<(Result<EvalReport, String>, Duration)>,
    ),
    /// The prepared pack was refused before training.
    Refused(PackRefusal),
}

/// Records a run's progress and end, and reports them to the bot; frees the slot at the end.
pub(super) async fn follow(
    packs: StylePacks,
    style: GuildStyle,
    run: TrainingRun,
    dir: PathBuf,
    mut events: mpsc::UnboundedReceiver<ThreadEvent>,
    progress: watch::Sender<Option<RunProgress>>,
    milestones: mpsc::UnboundedSender<Milestone>,
) {
    let store = &packs.inner.store;
    let started = Instant::now();
    let mut record = RunProgressRecord {
        step: run.step,
        losses: run.losses.clone(),
        images_per_sec: run.images_per_sec,
        train_ms: run.train_ms,
    };
    let mut first_step: Option<(Instant, u32)> = None;
    // The trainer's count of steps in all: a time-budgeted run estimates it as it goes.
    let mut total_steps = run.total_steps;
    let mut last_write: Option<Instant> = None;
    let mut preview: Option<Vec<u8>> = std::fs::read(dir.join(LATEST_PREVIEW)).ok();
    let mut faces_found = style.faces_found;
    let mut ended = None;
    while let Some(event) = events.recv().await {
        match event {
            ThreadEvent::Preparing { done, total } => {
                progress.send_replace(Some(RunProgress::Preparing { done, total }));
            }
            ThreadEvent::Prepared(prepared) => {
                let found = prepared.faces_found as u32;
                faces_found = Some(found);
                if let Err(e) = store.record_prepared(&style.name, found).await {
                    tracing::warn!(run = run.id, error = %e, "recording a prepared pack");
                }
            }
            ThreadEvent::Warning(warning) => {
                let _ = milestones.send(Milestone::Warning(warning));
            }
            ThreadEvent::Refused(refusal) => {
                ended = Some(Ended::Refused(refusal));
                break;
            }
            ThreadEvent::Train(TrainEvent::Step(p)) => {
                let now = Instant::now();
                let (t0, s0) = *first_step.get_or_insert((now, p.step));
                let rate = (p.step > s0)
                    .then(|| f64::from(p.step - s0) / now.duration_since(t0).as_secs_f64());
                let eta = p.time_left.or_else(|| {
                    rate.filter(|r| r.is_finite() && *r > 0.0).map(|r| {
                        Duration::from_secs_f64(f64::from(p.total.saturating_sub(p.step)) / r)
                    })
                });
                total_steps = p.total;
                record.step = p.step;
                record.losses = p.losses.clone();
                record.images_per_sec = Some(f64::from(p.images_per_sec));
                record.train_ms = run.train_ms + started.elapsed().as_secs_f64() * 1e3;
                progress.send_replace(Some(RunProgress::Training {
                    step: p.step,
                    total: p.total,
                    losses: p.losses,
                    images_per_sec: p.images_per_sec,
                    eta,
                }));
                if last_write.is_none_or(|t| t.elapsed() >= PROGRESS_WRITE_INTERVAL) {
                    last_write = Some(now);
                    if let Err(e) = store.record_run_progress(run.id, &record).await {
                        tracing::warn!(run = run.id, error = %e, "recording training progress");
                    }
                }
            }
            ThreadEvent::Train(TrainEvent::Preview { step, png }) => {
                if let Err(e) = std::fs::write(dir.join(LATEST_PREVIEW), &png) {
                    tracing::warn!(run = run.id, error = %e, "saving a preview");
                }
                let _ = milestones.send(Milestone::Preview {
                    step,
                    total: total_steps,
                    png: png.clone(),
                });
                preview = Some(png);
            }
            ThreadEvent::Ended {
                outcome,
                train_time,
                eval,
            } => {
                record.train_ms = run.train_ms + train_time.as_secs_f64() * 1e3;
                ended = Some(Ended::Trainer(outcome, eval));
                break;
            }
        }
    }
    // The thread ended without saying how: it panicked outside the trainer's calls.
    let ended = ended.unwrap_or_else(|| {
        Ended::Trainer(Err("the training thread stopped unexpectedly".into()), None)
    });
    let shutting_down = packs.inner.shutting_down.load(Ordering::SeqCst);
    let (outcome, eval, refused) = match ended {
        Ended::Trainer(outcome, eval) => (outcome, eval, None),
        Ended::Refused(refusal) => (Err(refusal.to_string()), None, Some(refusal)),
    };
    let (end, finish) = match outcome {
        Ok(FinetuneOutcome::Cancelled { step }) if shutting_down => {
            // Left `running`: the next start resumes it.
            record.step = step;
            if let Err(e) = store.record_run_progress(run.id, &record).await {
                tracing::warn!(run = run.id, error = %e, "recording an interrupted run");
            }
            tracing::info!(run = run.id, step, "training interrupted by a shutdown");
            return;
        }
        Ok(FinetuneOutcome::Cancelled { step }) => {
            record.step = step;
            (
                RunEnd::Cancelled {
                    step,
                    total: total_steps,
                },
                finish_record(RunStatus::Cancelled, None, &record, StyleStatus::Cancelled),
            )
        }
        Ok(FinetuneOutcome::Completed { steps }) => {
            record.step = steps;
            let (eval, eval_time) = eval.unwrap_or((Err("not evaluated".into()), Duration::ZERO));
            let out_dir = dir.join(STYLE_DIR);
            if let Some(png) = &preview {
                if let Err(e) = std::fs::write(out_dir.join(styles::PREVIEW_FILE), png) {
                    tracing::warn!(run = run.id, error = %e, "saving the style's preview");
                }
            }
            let mut finish = finish_record(RunStatus::Done, None, &record, StyleStatus::Draft);
            finish.eval_ms = Some(eval_time.as_secs_f64() * 1e3);
            match &eval {
                Ok(report) => {
                    finish.eval = Some(StyleEval {
                        kid_x100_mean: report.kid_x100_mean,
                        kid_x100_std: report.kid_x100_std,
                        identity_cosine: report.identity_cosine,
                    })
                }
                Err(e) => finish.eval_error = Some(e.clone()),
            }
            (
                RunEnd::Trained {
                    steps,
                    faces_found: faces_found.unwrap_or(0),
                    eval,
                    preview,
                },
                finish,
            )
        }
        Err(error) => (
            refused.map_or_else(|| RunEnd::Failed(error.clone()), RunEnd::Refused),
            finish_record(RunStatus::Failed, Some(error), &record, StyleStatus::Failed),
        ),
    };
    if let Err(e) = store.finish_run(run.id, &style.name, &finish).await {
        tracing::error!(run = run.id, error = %e, "recording the end of a training run");
    }
    tracing::info!(
        run = run.id,
        style = %style.name,
        status = finish.status.as_str(),
        step = record.step,
        train_ms = record.train_ms.round(),
        error = finish.error.as_deref(),
        "training run"
    );
    packs.inner.free_slot(&style.name);
    let _ = milestones.send(Milestone::Finished(end));
}

fn finish_record(
    status: RunStatus,
    error: Option<String>,
    progress: &RunProgressRecord,
    style_status: StyleStatus,
) -> RunFinish {
    RunFinish {
        status,
        error,
        progress: progress.clone(),
        eval_ms: None,
        style_status,
        eval: None,
        eval_error: None,
    }
}
