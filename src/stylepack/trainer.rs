//! The boundary with the training library: what a fine-tune is asked to do and what it
//! reports. [`StyleTrainer`] is to training what [`crate::jobs::Renderer`] is to inference.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// One fine-tune of a base style on a prepared pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinetuneJob {
    /// The base style's directory (`generator.safetensors`, `style.toml`).
    pub base_dir: PathBuf,
    /// The prepared pack: 256x256 PNG cartoon faces, whitened, aligned where a face was found.
    pub images_dir: PathBuf,
    /// Where the new style is written: a style directory (`generator.safetensors`,
    /// `style.toml` with `description`), complete only once `finetune` returns `Completed`.
    pub out_dir: PathBuf,
    /// Checkpoints: a later call with the same `work_dir` resumes from the last one.
    pub work_dir: PathBuf,
    /// Steps in all (a resumed job counts the steps already done).
    pub steps: u32,
    /// A [`TrainEvent::Preview`] is reported every this many steps.
    pub preview_every: u32,
    /// The new style's description, for its `style.toml`.
    pub description: String,
}

/// What a fine-tune reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    /// After every step.
    Step(TrainProgress),
    /// Every `preview_every` steps: a PNG grid of a few fixed photos through the new style as it
    /// is now.
    Preview {
        /// The step the preview was made at.
        step: u32,
        /// The encoded PNG grid.
        png: Vec<u8>,
    },
}

/// How far a fine-tune is: reported after every step as [`TrainEvent::Step`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainProgress {
    /// Steps done so far (1-based), out of `total`.
    pub step: u32,
    /// Steps in all: the job's `steps`, or for a time-budgeted run the estimate at the
    /// current pace.
    pub total: u32,
    /// The latest losses by name, e.g. `[("g_adv", 0.9), ("cycle", 0.3), ...]`.
    pub losses: Vec<(String, f32)>,
    /// Training throughput over the recent steps.
    pub images_per_sec: f32,
    /// What is left of a time-budgeted run (the fast recipe); `None` where the run is a number
    /// of steps and the follower estimates the rest from the pace.
    pub time_left: Option<std::time::Duration>,
}

/// How a fine-tune returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinetuneOutcome {
    /// All steps done; `out_dir` holds the new style.
    Completed {
        /// Steps done in all.
        steps: u32,
    },
    /// Stopped by the cancel flag after `step` steps; the last checkpoint is in `work_dir`.
    Cancelled {
        /// The step it stopped at.
        step: u32,
    },
}

/// The new style measured on the pack's held-out images.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalReport {
    /// KID x100 (as U-GAT-IT reports it) between the style's cartoons of the evaluation photos
    /// and the held-out pack images: mean and standard deviation over the subsets.
    pub kid_x100_mean: f64,
    /// Standard deviation of KID x100 over the subsets.
    pub kid_x100_std: f64,
    /// Mean cosine similarity between each photo's face embedding and its cartoon's.
    pub identity_cosine: f64,
}

/// Why a fine-tune or an evaluation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrainError {
    /// The base style cannot be fine-tuned (missing or incompatible weights).
    #[error("the base style can't be fine-tuned: {0}")]
    Base(String),
    /// Anything else that failed while training or evaluating (files, data, candle); holds
    /// the error chain.
    #[error("training failed: {0}")]
    Internal(String),
}

/// The training library's side of the boundary.
pub trait StyleTrainer: Send + Sync + 'static {
    /// Blocking: fine-tunes `job.base_dir` on `job.images_dir` into `job.out_dir`, reporting
    /// every step and a preview every `job.preview_every` steps. Returns when done, or soon
    /// after `cancel` is set (keeping the last checkpoint in `job.work_dir`, so that a later
    /// call with the same `work_dir` resumes). Called on a dedicated thread, one job at a time.
    fn finetune(
        &self,
        job: &FinetuneJob,
        report: &dyn Fn(TrainEvent),
        cancel: &AtomicBool,
    ) -> Result<FinetuneOutcome, TrainError>;

    /// Blocking: measures the style in `style_dir` against the held-out pack images (256x256
    /// PNGs in `held_out`).
    fn evaluate(&self, style_dir: &Path, held_out: &Path) -> Result<EvalReport, TrainError>;
}
