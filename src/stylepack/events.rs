//! What a style-pack run reports to the bot while it prepares, trains and ends.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{EvalReport, PackRefusal, PackWarning};
use crate::store::{GuildStyle, TrainingRun};

/// Where a running job is, as the bot shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RunProgress {
    /// Preparing the pack's images: `done` of `total`.
    Preparing {
        /// Images prepared so far.
        done: usize,
        /// Images in the pack.
        total: usize,
    },
    /// Fine-tuning: the numbers of the latest step the trainer reported.
    Training {
        /// Steps done so far, out of `total`.
        step: u32,
        /// Steps in all.
        total: u32,
        /// The latest losses shown in the bot, by name (`G`, `D`, `cycle`, `face-id`).
        losses: Vec<(String, f32)>,
        /// Training throughput over the recent steps, in images per second.
        images_per_sec: f32,
        /// Time left: what the trainer reports of its time budget, else from the step rate
        /// since this run (re)started.
        eta: Option<Duration>,
    },
}

/// What happens once in a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Milestone {
    /// A preview grid, every `preview_every` steps.
    Preview {
        /// The step the preview was made at.
        step: u32,
        /// Steps the run trains in all.
        total: u32,
        /// The PNG grid: a few fixed photos through the new style as it is now.
        png: Vec<u8>,
    },
    /// Something the pack trains despite, found before its first step.
    Warning(PackWarning),
    /// The run ended; the last milestone. Not sent when a shutdown interrupts the run (it
    /// resumes at the next start).
    Finished(RunEnd),
}

/// How a run ended, as the bot announces it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RunEnd {
    /// Trained: the style is a draft. `faces_found` of its images were aligned on a face;
    /// `eval` is the evaluation or why it failed; `preview` the latest preview grid.
    Trained {
        /// Steps trained in all.
        steps: u32,
        /// Pack images aligned on a face; the others were centre-cropped.
        faces_found: u32,
        /// The evaluation on the held-out images, or why it failed.
        eval: Result<EvalReport, String>,
        /// The latest preview grid (PNG), when one was made.
        preview: Option<Vec<u8>>,
    },
    /// Stopped by [`StylePacks::cancel`](super::StylePacks::cancel);
    /// [`StylePacks::resume`](super::StylePacks::resume) continues it.
    Cancelled {
        /// The step the run stopped at.
        step: u32,
        /// Steps the run was to train in all.
        total: u32,
    },
    /// The prepared pack failed a check ([`super::check`]) and was not trained.
    Refused(PackRefusal),
    /// Preparing or fine-tuning failed, or the trainer panicked; holds the error text.
    Failed(String),
}

/// A started run: its rows as they were at the start, its progress (latest only) and its
/// milestones. Both channels close when the run ends, or when a shutdown interrupts it.
pub struct RunEvents {
    /// The pack's `guild_styles` row when the run started.
    pub style: GuildStyle,
    /// The run's `training_runs` row when it started (its `channel_id` is where the bot
    /// reports).
    pub run: TrainingRun,
    /// The latest progress; `None` until the first report.
    pub progress: watch::Receiver<Option<RunProgress>>,
    /// Previews, then the run's end.
    pub milestones: mpsc::UnboundedReceiver<Milestone>,
}
