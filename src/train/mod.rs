//! photo2cartoon training in candle (DESIGN §5): U-GAT-IT with Soft-AdaLIN generators,
//! global and local spectral-norm discriminators, LSGAN + cycle + identity + CAM + face-ID
//! losses, Adam, checkpoints that resume exactly; plus the evaluation (KID, identity) and
//! the installation of trained generators as styles.

pub mod adam;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod face_id;
pub mod fast;
pub mod finetune;
pub mod grid;
pub mod losses;
pub mod model;
pub mod pack;
pub mod panel;
pub mod params;
pub mod plot;
pub mod run;
pub mod step;
pub mod style;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use losses::LossWeights;
use model::NetConfig;
use params::Freeze;

/// Everything that defines a training run's results; stored in its checkpoints, so a
/// resumed run uses the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Aligned photos (domain A), e.g. made by `toonbot prepare`.
    pub photos: PathBuf,
    /// Cartoons (domain B).
    pub cartoons: PathBuf,
    /// Training image side (256).
    pub size: usize,
    /// Images per domain and step (1).
    pub batch: usize,
    /// Total steps; the learning rate decays linearly to 0 over the second half.
    pub steps: u64,
    /// Seed of the weight initialisation, the data order and the augmentation (0).
    pub seed: u64,
    /// Initial learning rate (1e-4).
    pub lr: f64,
    /// Shapes of the generators and discriminators.
    pub net: NetConfig,
    /// Which generator parameters train ([`Freeze::None`]: all of them, as in a base run).
    pub freeze: Freeze,
    /// Weights of the loss terms.
    pub weights: LossWeights,
    /// The style a fine-tune started from.
    pub base: Option<String>,
}

impl RunSpec {
    /// photo2cartoon's settings for the given data: 256 px, batch 1, lr 1e-4, seed 0.
    pub fn photo2cartoon(photos: PathBuf, cartoons: PathBuf, steps: u64) -> Self {
        Self {
            photos,
            cartoons,
            size: 256,
            batch: 1,
            steps,
            seed: 0,
            lr: 1e-4,
            net: NetConfig::photo2cartoon(),
            freeze: Freeze::None,
            weights: LossWeights::default(),
            base: None,
        }
    }

    /// The learning rate of step `step` (1-based), as photo2cartoon's `decay_flag`: constant
    /// for the first half, then falling linearly to 0 at the last step.
    pub fn learning_rate(&self, step: u64) -> f64 {
        let half = self.steps / 2;
        if half == 0 || step <= half {
            self.lr
        } else {
            self.lr * (1.0 - (step - half) as f64 / half as f64).max(0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_decays_over_the_second_half() {
        let spec = RunSpec::photo2cartoon("a".into(), "b".into(), 100);
        assert_eq!(spec.learning_rate(1), 1e-4);
        assert_eq!(spec.learning_rate(50), 1e-4);
        assert!((spec.learning_rate(75) - 0.5e-4).abs() < 1e-12);
        assert_eq!(spec.learning_rate(100), 0.0);
    }
}
