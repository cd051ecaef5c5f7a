//! The `fast` fine-tune recipe of style packs (DESIGN §5, "Few-shot style packs"): from an
//! installed base style, the encoder side frozen and its outputs cached for a fixed set of
//! photos (each also mirrored), only the decoder side trained, against fresh projected
//! discriminator heads on the frozen backbone (FreezeD by construction) and photo2cartoon's
//! local discriminator, with strong DiffAugment (ADA-adapted) on every discriminator input;
//! an anchor to the base style's output on the same photo (8x8-block colour means and
//! low-level backbone features) and face-ID keep faces the people they were. The run has a
//! time budget: the learning rate falls to 0 over its last part, and the run ends when the
//! budget (or the step cap) is spent.

pub mod cache;
pub mod run;
pub mod step;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::train::model::NetConfig;
use crate::train::params::Freeze;

/// The loss weights of the pack recipe.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PackWeights {
    /// The projected discriminator's adversarial weight (hinge).
    pub adv_global: f64,
    /// The local discriminator's adversarial weight (LSGAN on logits and CAM logits).
    pub adv_local: f64,
    /// Face-ID `1 - cos` between the photo and its new cartoon.
    pub face_id: f64,
    /// Anchor: L1 of the colour averaged over 8x8 blocks, new cartoon against the base
    /// style's cartoon of the same photo.
    pub anchor_colour: f64,
    /// Anchor: L1 of the backbone's low-level features, new cartoon against the base's.
    pub anchor_feature: f64,
}

impl Default for PackWeights {
    fn default() -> Self {
        Self {
            adv_global: 1.0,
            adv_local: 1.0,
            face_id: 2.0,
            anchor_colour: 1.0,
            anchor_feature: 0.05,
        }
    }
}

/// The pack recipe's learning rate, of the generator and the discriminators. On the 30-image
/// s2a pack at batch 2 in 25 minutes, 1e-4 scores KID×100 8.79 and identity 0.57 against 10.39
/// and 0.50 for 2e-4, whose cartoons also turn every skin pink and draw hair on bald heads; on
/// the 10-image pack 2e-4 scores better (10.2 against 11.9) with the same faults
/// (docs/training.md).
pub const PACK_LR: f64 = 1e-4;

/// The pack recipe's images of each domain per step: in a fixed time budget more updates beat
/// bigger batches (batch 2 against 4: KID×100 8.79 against 9.32 on the 30-image pack, 11.94
/// against 12.70 on the 10-image pack).
pub const PACK_BATCH: usize = 2;

/// Everything that defines a pack run's results; stored in its checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackSpec {
    /// The base style's name (for the new style's manifest).
    pub base: String,
    /// SHA-256 of the base style's `generator.safetensors`: a resumed run checks that the
    /// base under that name is still the one it started from.
    pub base_sha256: String,
    /// Aligned photos; `cached_photos` of them, evenly spread, are the photo side.
    pub photos: PathBuf,
    /// The pack's cartoon faces.
    pub cartoons: PathBuf,
    /// Seed of the discriminators' initialisation, data order and augmentation draws.
    pub seed: u64,
    /// The generator's and discriminators' widths (the base's).
    pub net: NetConfig,
    /// Which generator parameters train: [`Freeze::Decoder`] (the recipe: the encoder side
    /// is cached) or [`Freeze::Branches`] (few-shot face2cartoon's branches: the whole
    /// generator runs every step).
    pub freeze: Freeze,
    /// Images of each domain per step.
    pub batch: usize,
    /// Training image side (the base's, 256).
    pub size: usize,
    /// Photos cached (each also mirrored, so twice as many samples).
    pub cached_photos: usize,
    /// Time budget in minutes, setup and the cache included.
    pub minutes: f64,
    /// The run also ends after this many steps.
    pub max_steps: u64,
    /// Adam learning rate of the generator.
    pub lr_g: f64,
    /// Adam learning rate of the discriminators.
    pub lr_d: f64,
    /// Share of the budget after which the learning rate falls linearly to 0.
    pub decay_from: f64,
    /// The loss weights.
    pub weights: PackWeights,
    /// ADA's starting probability (strong augmentation from the first step: a few images).
    pub ada_start: f64,
    /// ADA's target for `E[sign(D(real))]`.
    pub ada_target: f64,
    /// Images over which ADA's `p` may go from 0 to 1.
    pub ada_speed_images: f64,
    /// Sobel magnitude above which a cartoon pixel counts as an edge (edge smoothing).
    pub edge_threshold: f64,
}

impl PackSpec {
    /// The recipe's defaults: decoder side, [`PACK_BATCH`] at 256 px, 32 photos cached, learning
    /// rates [`PACK_LR`] falling to 0 over the last 40 % of `minutes`.
    pub fn new(
        (base, base_sha256): (String, String),
        photos: PathBuf,
        cartoons: PathBuf,
        net: NetConfig,
        minutes: f64,
    ) -> Self {
        Self {
            base,
            base_sha256,
            photos,
            cartoons,
            seed: 0,
            net,
            freeze: Freeze::Decoder,
            batch: PACK_BATCH,
            size: 256,
            cached_photos: 32,
            minutes,
            max_steps: 100_000,
            lr_g: PACK_LR,
            lr_d: PACK_LR,
            decay_from: 0.6,
            weights: PackWeights::default(),
            ada_start: 0.3,
            ada_target: 0.6,
            ada_speed_images: 2_000.0,
            edge_threshold: 2.0,
        }
    }

    /// How much of the run is done, in [0, 1]: the larger of the budget's share spent in
    /// `elapsed_s` seconds and the step cap's share reached in `steps`.
    pub fn fraction_done(&self, steps: u64, elapsed_s: f64) -> f64 {
        let by_time = elapsed_s / (self.minutes * 60.0).max(1e-9);
        let by_steps = steps as f64 / self.max_steps.max(1) as f64;
        by_time.max(by_steps).clamp(0.0, 1.0)
    }

    /// Learning-rate factor at `fraction` of the run: 1 until `decay_from`, then falling
    /// linearly to 0 at the end.
    pub fn lr_factor(&self, fraction: f64) -> f64 {
        if fraction <= self.decay_from {
            1.0
        } else {
            ((1.0 - fraction) / (1.0 - self.decay_from).max(1e-9)).clamp(0.0, 1.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(minutes: f64, max_steps: u64) -> PackSpec {
        PackSpec {
            max_steps,
            ..PackSpec::new(
                ("p2c".into(), "ab".into()),
                "p".into(),
                "c".into(),
                NetConfig::photo2cartoon(),
                minutes,
            )
        }
    }

    #[test]
    fn the_budget_or_the_step_cap_ends_the_run_whichever_comes_first() {
        let s = spec(10.0, 100);
        assert_eq!(s.fraction_done(0, 0.0), 0.0);
        assert!((s.fraction_done(10, 300.0) - 0.5).abs() < 1e-12, "time");
        assert!((s.fraction_done(80, 60.0) - 0.8).abs() < 1e-12, "steps");
        assert_eq!(s.fraction_done(10, 700.0), 1.0);
        assert_eq!(s.fraction_done(200, 1.0), 1.0);
    }

    #[test]
    fn learning_rate_holds_then_falls_to_zero_at_the_end() {
        let s = spec(10.0, 100);
        assert_eq!(s.lr_factor(0.0), 1.0);
        assert_eq!(s.lr_factor(0.6), 1.0);
        assert!((s.lr_factor(0.8) - 0.5).abs() < 1e-9);
        assert_eq!(s.lr_factor(1.0), 0.0);
    }
}
