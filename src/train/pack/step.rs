//! One step of the pack recipe: a discriminator update (the pack's cartoons against the new
//! cartoons and the edge-smoothed pack cartoons, all augmented), then a generator update
//! (adversarial, face-ID, anchor to the base style), then clipping rho and w.

use candle_core::{Result, Tensor};

use super::cache::CachedBatch;
use super::PackSpec;
use crate::train::adam::Adam;
use crate::train::face_id::FaceIdLoss;
use crate::train::fast::augment::{diff_augment, edge_smoothed, AdaptiveProbability};
use crate::train::fast::model::FastNets;
use crate::train::fast::step::{generator_adversarial, update_discriminators};
use crate::train::losses::l1;
use crate::train::step::{differentiate, sum, Losses, Terms};

/// The fixed parts of a step.
pub struct PackStep<'a> {
    /// The networks being trained.
    pub nets: &'a FastNets,
    /// The face-ID loss at the training size.
    pub face_id: &'a FaceIdLoss,
    /// The run's settings.
    pub spec: &'a PackSpec,
}

impl PackStep<'_> {
    /// The generator's cartoons of a cached batch: the decoder side on the cached encoding,
    /// or the whole generator when the encoder trains.
    pub fn translate(&self, batch: &CachedBatch) -> Result<Tensor> {
        match &batch.encoded {
            Some(encoded) => self.nets.gen.decode(encoded),
            None => Ok(self.nets.gen.forward(&batch.photos)?.0),
        }
    }

    /// Step `step` (1-based) on `batch` and the pack's `cartoons` (augmented, in [-1, 1]).
    pub fn run(
        &self,
        (batch, cartoons): (&CachedBatch, &Tensor),
        step: u64,
        ada: &mut AdaptiveProbability,
        (g_optim, d_optim): (&mut Adam, &mut Adam),
        (lr_g, lr_d): (f64, f64),
    ) -> Result<Losses> {
        let (n, w, seed) = (self.nets, self.spec.weights, self.spec.seed);
        let mut terms = Terms::default();
        let fake = self.translate(batch)?;

        let p = ada.p;
        let aug = |x: &Tensor, what: &str| diff_augment(x, p, seed, &format!("{what}.{step}"));
        let smoothed = edge_smoothed(cartoons, self.spec.edge_threshold)?;
        let inputs = [
            &aug(cartoons, "real")?,
            &aug(&fake.detach(), "fake")?,
            &aug(&smoothed, "smoothed")?,
        ];
        update_discriminators(n, inputs, ada, d_optim, lr_d, &mut terms)?;

        let (global, local) = generator_adversarial(n, &aug(&fake, "generated")?, &mut terms)?;
        let id = terms.push(
            "G_face_id",
            self.face_id.distance_to(&batch.embeddings, &fake)?,
        );
        let colour = terms.push(
            "G_anchor_colour",
            l1(&fake.avg_pool2d(8)?, &batch.base.avg_pool2d(8)?)?,
        );
        let feature = terms.push(
            "G_anchor_feature",
            l1(&n.backbone.low_level(&fake)?, &batch.base_features)?,
        );
        let loss = sum(&[
            (global * w.adv_global)?,
            (local * w.adv_local)?,
            (id * w.face_id)?,
            (colour * w.anchor_colour)?,
            (feature * w.anchor_feature)?,
        ])?;
        let (grads, loss) = differentiate(loss)?;
        terms.push("G_loss", loss);
        g_optim.step(&[grads], lr_g)?;
        n.clip_rho_w()?;
        let mut losses = Losses::new();
        terms.read(&mut losses)?;
        losses.insert("ada_p".into(), p);
        Ok(losses)
    }
}
