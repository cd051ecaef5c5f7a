//! Few-shot fine-tuning: a run that starts from an installed style's networks (or resumes
//! its own checkpoint) and installs its generator as a new style when it completes. Used
//! by `toonbot train finetune` and by the style-pack trainer of the bot.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;

use super::params::Freeze;
use super::run::{RunOptions, Start, Trainer, CHECKPOINT_FILE};
use super::style::{self, WeightsDtype};
use super::RunSpec;
use crate::cartoon::styles::StyleManifest;

/// What a fine-tune starts from and trains on.
#[derive(Debug, Clone)]
pub struct Finetune {
    /// The base style's name and directory.
    pub base_name: String,
    /// The base style's directory, whose networks the run starts from.
    pub base_dir: PathBuf,
    /// Aligned photos; `None`: those the base was trained on.
    pub photos: Option<PathBuf>,
    /// The cartoons to fine-tune on (domain B).
    pub cartoons: PathBuf,
    /// Which generator parameters train.
    pub freeze: Freeze,
}

/// Whether the style in `dir` keeps its training state (all six networks), which
/// [`Freeze::Branches`] needs.
pub fn has_training_state(dir: &Path) -> bool {
    dir.join(style::TRAINING_FILE).is_file()
}

impl Finetune {
    /// Sets up the run: `template` gives size, batch, steps, seed and learning rate. With
    /// `resume`, the checkpoint in `options.out` is continued (its own spec is used).
    pub fn trainer(
        &self,
        template: &RunSpec,
        options: RunOptions,
        resume: bool,
        device: &Device,
    ) -> Result<Trainer> {
        if resume {
            let checkpoint = options.out.join(CHECKPOINT_FILE);
            anyhow::ensure!(
                checkpoint.is_file(),
                "no checkpoint to resume in {}",
                options.out.display()
            );
            return Trainer::new(template.clone(), options, Start::Resume(checkpoint), device);
        }
        let (from, freeze) = (&self.base_name, self.freeze);
        let base = style::load_base(&self.base_dir, device)?;
        if base.spec.is_none() {
            anyhow::ensure!(
                freeze == Freeze::None,
                "style {from:?} holds only its generator, not its training state ({}): \
                 --freeze {freeze:?} needs the base's other networks. Install the base with \
                 `toonbot train export --finetunable`, or use --freeze none",
                style::TRAINING_FILE
            );
            tracing::info!(
                "style {from:?} has no training state: generator B->A and the discriminators \
                 start from scratch"
            );
        }
        let photos = (self.photos.clone())
            .or_else(|| base.spec.as_ref().map(|s| s.photos.clone()))
            .context("photos are needed: the base style does not record its training photos")?;
        let spec = RunSpec {
            photos,
            cartoons: self.cartoons.clone(),
            freeze,
            base: Some(from.clone()),
            net: base.spec.as_ref().map_or(template.net, |s| s.net),
            ..template.clone()
        };
        let start = Start::Weights {
            tensors: base.tensors,
            networks: base.networks,
        };
        Trainer::new(spec, options, start, device)
    }
}

/// Installs a completed fine-tune's generator A->B as a style in `dir`.
pub fn install(
    trainer: &Trainer,
    dir: &Path,
    dtype: WeightsDtype,
    description: String,
) -> Result<()> {
    let manifest = StyleManifest {
        description,
        base: trainer.spec.base.clone(),
        steps: Some(trainer.step()),
    };
    style::install(dir, &trainer.model, dtype, &manifest, None)
}
