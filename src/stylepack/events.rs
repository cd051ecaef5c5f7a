//! What a style-pack run reports to the bot while it prepares, trains and ends.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::EvalReport;
use crate::store::{GuildStyle, TrainingRun};

/// Where a running job is, as the bot shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum RunProgress {
    /// Preparing the pack's images: `done` of `total`.
    Preparing { done: usize, total: usize },
    Training {
        step: u32,
        total: u32,
        losses: Vec<(String, f32)>,
        images_per_sec: f32,
        /// From the step rate since this run (re)started.
        eta: Option<Duration>,
    },
}

/// What happens once in a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Milestone {
    Preview { step: u32, total: u32, png: Vec<u8> },
    Finished(RunEnd),
}

#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// Trained: the style is a draft. `faces_found` of its images were aligned on a face;
    /// `eval` is the evaluation or why it failed; `preview` the latest preview grid.
    Trained {
        steps: u32,
        faces_found: u32,
        eval: Result<EvalReport, String>,
        preview: Option<Vec<u8>>,
    },
    Cancelled {
        step: u32,
        total: u32,
    },
    Failed(String),
}

/// A started run: its rows as they were at the start, its progress (latest only) and its
/// milestones. Both channels close when the run ends, or when a shutdown interrupts it.
pub struct RunEvents {
    pub style: GuildStyle,
    pub run: TrainingRun,
    pub progress: watch::Receiver<Option<RunProgress>>,
    pub milestones: mpsc::UnboundedReceiver<Milestone>,
}
