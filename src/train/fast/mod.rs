//! The `fast` base-training recipe (DESIGN §5): photo2cartoon's generator A->B alone (no
//! B->A, no cycle), first trained to reconstruct its input (photos and cartoons) until the
//! held-out reconstruction is sharp and keeps the identity, then against a projected
//! discriminator on a frozen EfficientNet-Lite0 plus photo2cartoon's local discriminator,
//! with DiffAugment (ADA-adapted) on every discriminator input, face-ID and content
//! losses; most steps at the low size, the last ones at the high size with the learning
//! rate falling to 0.

pub mod augment;
pub mod model;
pub mod run;
pub mod step;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::train::model::NetConfig;
use model::Discriminators;

/// The loss weights of the fast recipe.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FastWeights {
    /// Reconstruction: L1 on pixels and on the backbone's low-level features.
    pub recon_pixel: f64,
    /// Reconstruction L1 on the backbone's low-level features.
    pub recon_feature: f64,
    /// Adversarial: the whole-image discriminator (projected, hinge; or photo2cartoon's
    /// global, LSGAN) and the local one (LSGAN on logits and CAM logits).
    #[serde(alias = "adv_projected")]
    pub adv_global: f64,
    /// The local discriminator's adversarial weight.
    pub adv_local: f64,
    /// Adversarial steps over which the adversarial weights ramp up from 0.
    pub adv_ramp_steps: u64,
    /// Face-ID `1 - cos` between photo and cartoon.
    pub face_id: f64,
    /// Content: L1 of the luminance averaged over 8x8 blocks, and of the backbone's
    /// low-level features, photo against cartoon.
    pub content_luma: f64,
    /// Content L1 of the backbone's low-level features, photo against cartoon.
    pub content_feature: f64,
    /// Content: L1 of the colour (all three channels) averaged over 8x8 blocks, which
    /// also keeps skin tones and hair colours (absent from runs before it existed: 0).
    #[serde(default)]
    pub content_colour: f64,
    /// Identity L1 on cartoons (`G(B) = B`), every `identity_every`-th step.
    pub identity: f64,
    /// The identity term is computed on every this-many-th adversarial step (0: never).
    pub identity_every: u64,
    /// CAM BCE (photo2cartoon's 1000): translation CAM towards 1, identity CAM towards 0.
    pub cam: f64,
}

impl Default for FastWeights {
    fn default() -> Self {
        Self {
            recon_pixel: 1.0,
            // The low-level features' L1 starts about 10x the pixels' (8 against 0.7).
            recon_feature: 0.1,
            adv_global: 1.0,
            adv_local: 1.0,
            adv_ramp_steps: 200,
            face_id: 1.0,
            content_luma: 10.0,
            content_feature: 0.1,
            content_colour: 0.0,
            identity: 10.0,
            identity_every: 4,
            cam: 1000.0,
        }
    }
}

/// When the reconstruction phase ends.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReconTarget {
    /// Mean held-out PSNR in dB.
    pub psnr_db: f64,
    /// Mean face-ID cosine between held-out photos and their reconstructions.
    pub identity: f64,
    /// Held-out check every this many steps.
    pub check_every: u64,
    /// The phase ends here even short of the targets (and says so in the log).
    pub max_steps: u64,
}

impl Default for ReconTarget {
    fn default() -> Self {
        Self {
            psnr_db: 28.0,
            identity: 0.9,
            check_every: 100,
            max_steps: 20_000,
        }
    }
}

/// Everything that defines a fast run's results; stored in its checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FastSpec {
    /// Aligned photos (domain A), e.g. made by `toonbot prepare`.
    pub photos: PathBuf,
    /// Cartoons (domain B).
    pub cartoons: PathBuf,
    /// Held-out aligned photos: the reconstruction check and the sample grids.
    pub val_photos: PathBuf,
    /// Seed of the weight initialisation, data order and augmentation draws.
    pub seed: u64,
    /// The generator's and discriminators' widths (photo2cartoon's; smaller in tests).
    pub net: NetConfig,
    /// The whole-image discriminator (absent from runs before it was a choice: projected).
    #[serde(default)]
    pub discriminators: Discriminators,
    /// Images of each domain per step.
    pub batch: usize,
    /// Side of most steps (128) and of the last `high_fraction` of them (256).
    pub low_size: usize,
    /// Side of the last `high_fraction` of the adversarial steps, in pixels (256).
    pub high_size: usize,
    /// Share of the adversarial steps trained at `high_size` (0.15).
    pub high_fraction: f64,
    /// Adversarial steps (after the reconstruction phase).
    pub steps: u64,
    /// Adam learning rate of the generator in the adversarial phase.
    pub lr_g: f64,
    /// Adam learning rate of the discriminators.
    pub lr_d: f64,
    /// Learning rate of the reconstruction phase.
    pub lr_recon: f64,
    /// When the reconstruction phase ends.
    pub recon: ReconTarget,
    /// The loss weights.
    pub weights: FastWeights,
    /// ADA's target for `E[sign(D(real))]` and the images over which p may go 0 -> 1.
    pub ada_target: f64,
    /// Images over which ADA's `p` may go from 0 to 1.
    pub ada_speed_images: f64,
    /// Sobel magnitude above which a cartoon pixel counts as an edge (edge smoothing).
    pub edge_threshold: f64,
}

impl FastSpec {
    /// The recipe's defaults for the given folders and `steps` adversarial steps: batch 4,
    /// 128 px then 256 px for the last 15 %, learning rates 1e-4 (2e-4 reconstructing).
    pub fn new(photos: PathBuf, cartoons: PathBuf, val_photos: PathBuf, steps: u64) -> Self {
        Self {
            photos,
            cartoons,
            val_photos,
            seed: 0,
            net: NetConfig::photo2cartoon(),
            discriminators: Discriminators::Projected,
            batch: 4,
            low_size: 128,
            high_size: 256,
            high_fraction: 0.15,
            steps,
            lr_g: 1e-4,
            lr_d: 1e-4,
            lr_recon: 2e-4,
            recon: ReconTarget::default(),
            weights: FastWeights::default(),
            ada_target: 0.6,
            ada_speed_images: 20_000.0,
            edge_threshold: 2.0,
        }
    }

    /// The first adversarial step (1-based) trained at the high size.
    pub fn first_high_step(&self) -> u64 {
        let high = (self.steps as f64 * self.high_fraction).round() as u64;
        self.steps - high.min(self.steps) + 1
    }

    /// Image side of adversarial step `step` (1-based).
    pub fn size_at(&self, step: u64) -> usize {
        if step >= self.first_high_step() {
            self.high_size
        } else {
            self.low_size
        }
    }

    /// Learning-rate factor of adversarial step `step` (1-based): 1 at the low size, then
    /// falling linearly to 0 at the last step.
    pub fn lr_factor(&self, step: u64) -> f64 {
        let first = self.first_high_step();
        if step < first {
            return 1.0;
        }
        let span = (self.steps + 1 - first) as f64;
        (1.0 - (step + 1 - first) as f64 / span).max(0.0)
    }

    /// Weight of the adversarial terms at adversarial step `step`: ramps 0 -> 1.
    pub fn adv_ramp(&self, step: u64) -> f64 {
        let ramp = self.weights.adv_ramp_steps;
        if ramp == 0 {
            1.0
        } else {
            (step as f64 / ramp as f64).min(1.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule() {
        let spec = FastSpec::new("a".into(), "b".into(), "c".into(), 100);
        assert_eq!(spec.first_high_step(), 86);
        assert_eq!(spec.size_at(85), 128);
        assert_eq!(spec.size_at(86), 256);
        assert_eq!(spec.lr_factor(50), 1.0);
        assert!(spec.lr_factor(86) < 1.0 && spec.lr_factor(86) > 0.9);
        assert_eq!(spec.lr_factor(100), 0.0);
        assert_eq!(spec.adv_ramp(0), 0.0);
        assert_eq!(spec.adv_ramp(100), 0.5);
        assert_eq!(spec.adv_ramp(5000), 1.0);
    }
}
