//! A [`StyleTrainer`] for tests: steps that take a set time, a checkpoint file in the work
//! folder (so a later call resumes), preview grids, the cancel flag honoured between steps, a
//! point where training holds until released (or cancelled), and fixed evaluation numbers. A
//! completed job's style is the base's generator weights: a real style folder.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};
use toonbot::stylepack::{
    EvalReport, FinetuneJob, FinetuneOutcome, StyleTrainer, TrainError, TrainEvent, TrainProgress,
};

pub const EVAL: EvalReport = EvalReport {
    kid_x100_mean: 4.25,
    kid_x100_std: 0.5,
    identity_cosine: 0.71,
};

const CHECKPOINT: &str = "checkpoint.txt";

#[derive(Default)]
pub struct TestTrainer {
    step_delay: Mutex<Duration>,
    /// Training waits before this step until released.
    hold_before: Mutex<Option<u32>>,
    /// The step training waits before, while it waits.
    holding: Mutex<Option<u32>>,
    released: Condvar,
    /// The step each `finetune` call started from (0: from the base).
    starts: Mutex<Vec<u32>>,
    /// Makes `finetune` fail after this step.
    fail_after: Mutex<Option<u32>>,
}

impl TestTrainer {
    pub fn new(step_delay: Duration) -> Self {
        Self {
            step_delay: Mutex::new(step_delay),
            ..Self::default()
        }
    }

    /// Training stops before `step` until [`release`](Self::release) (or a cancel).
    pub fn hold_before(&self, step: u32) {
        *self.hold_before.lock().unwrap() = Some(step);
    }

    pub fn release(&self) {
        *self.hold_before.lock().unwrap() = None;
        self.released.notify_all();
    }

    /// Waits (at most 60 s: the pack is prepared first) until training holds before `step`.
    pub fn wait_holding(&self, step: u32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while *self.holding.lock().unwrap() != Some(step) {
            assert!(Instant::now() < deadline, "training reached step {step}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `finetune` fails after `step` steps (until [`stop_failing`](Self::stop_failing)).
    pub fn fail_after(&self, step: u32) {
        *self.fail_after.lock().unwrap() = Some(step);
    }

    pub fn stop_failing(&self) {
        *self.fail_after.lock().unwrap() = None;
    }

    /// The checkpoint step each `finetune` call started from.
    pub fn starts(&self) -> Vec<u32> {
        self.starts.lock().unwrap().clone()
    }

    /// Waits before `step` while held; false when cancelled meanwhile.
    fn wait_if_held(&self, step: u32, cancel: &AtomicBool) -> bool {
        let mut hold = self.hold_before.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while *hold == Some(step) && Instant::now() < deadline {
            *self.holding.lock().unwrap() = Some(step);
            if cancel.load(Ordering::SeqCst) {
                *self.holding.lock().unwrap() = None;
                return false;
            }
            hold = self
                .released
                .wait_timeout(hold, Duration::from_millis(5))
                .unwrap()
                .0;
        }
        *self.holding.lock().unwrap() = None;
        true
    }
}

/// A 3-cell grid whose colours change with the step.
fn preview_grid(step: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(96, 32, |x, _| {
        Rgb([(x / 32 * 80) as u8, (step * 10) as u8, 120])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn internal(e: impl std::fmt::Display) -> TrainError {
    TrainError::Internal(e.to_string())
}

impl StyleTrainer for TestTrainer {
    fn finetune(
        &self,
        job: &FinetuneJob,
        report: &dyn Fn(TrainEvent),
        cancel: &AtomicBool,
    ) -> Result<FinetuneOutcome, TrainError> {
        let base = job.base_dir.join("generator.safetensors");
        if !base.is_file() {
            return Err(TrainError::Base(format!("{} is missing", base.display())));
        }
        let images = std::fs::read_dir(&job.images_dir)
            .map_err(internal)?
            .count();
        std::fs::create_dir_all(&job.work_dir).map_err(internal)?;
        let checkpoint = job.work_dir.join(CHECKPOINT);
        let mut step: u32 = std::fs::read_to_string(&checkpoint)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        self.starts.lock().unwrap().push(step);
        while step < job.steps {
            if cancel.load(Ordering::SeqCst) || !self.wait_if_held(step + 1, cancel) {
                return Ok(FinetuneOutcome::Cancelled { step });
            }
            std::thread::sleep(*self.step_delay.lock().unwrap());
            if *self.fail_after.lock().unwrap() == Some(step) {
                return Err(TrainError::Internal(format!(
                    "test failure after step {step}"
                )));
            }
            step += 1;
            std::fs::write(&checkpoint, step.to_string()).map_err(internal)?;
            report(TrainEvent::Step(TrainProgress {
                step,
                total: job.steps,
                losses: vec![("g_adv".into(), 1.0 / step as f32), ("cycle".into(), 0.5)],
                images_per_sec: images as f32 * 2.0,
                time_left: None,
            }));
            if step.is_multiple_of(job.preview_every) {
                report(TrainEvent::Preview {
                    step,
                    png: preview_grid(step),
                });
            }
        }
        std::fs::create_dir_all(&job.out_dir).map_err(internal)?;
        std::fs::copy(&base, job.out_dir.join("generator.safetensors")).map_err(internal)?;
        std::fs::write(
            job.out_dir.join("style.toml"),
            format!("description = {:?}\n", job.description),
        )
        .map_err(internal)?;
        Ok(FinetuneOutcome::Completed { steps: step })
    }

    fn evaluate(&self, style_dir: &Path, held_out: &Path) -> Result<EvalReport, TrainError> {
        if !style_dir.join("generator.safetensors").is_file() {
            return Err(internal("the style has no generator"));
        }
        let held = std::fs::read_dir(held_out).map_err(internal)?.count();
        if held == 0 {
            return Err(internal("no held-out images"));
        }
        Ok(EVAL)
    }
}
