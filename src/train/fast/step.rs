//! One step of the fast recipe: a reconstruction step, or an adversarial step (a
//! discriminator update, then a generator update, then clipping rho and w). Losses are
//! returned by name: `R_*` reconstruction, `D_*` discriminators, `G_*` generator.

use candle_core::{Result, Tensor};

use super::augment::{diff_augment, sign_mean, AdaptiveProbability};
use super::model::{FastNets, GlobalDiscriminator};
use super::{FastSpec, FastWeights};
use crate::nets::discriminator::Discriminator;
use crate::train::adam::Adam;
use crate::train::face_id::FaceIdLoss;
use crate::train::losses::{bce_with_logits_to, l1, mse_to};
use crate::train::step::{differentiate, sum, Losses, Terms};

/// Luminance averaged over 8x8 blocks: what the content term keeps of the photo.
fn low_pass_luminance(x: &Tensor) -> Result<Tensor> {
    x.mean_keepdim(1)?.avg_pool2d(8)
}

/// photo2cartoon's discriminator loss: LSGAN on the patch and CAM logits, real towards 1,
/// the translations and the edge-smoothed cartoons towards 0. Also returns the real
/// patch logits.
fn lsgan_d(d: &Discriminator, [real, fakes, smoothed]: [&Tensor; 3]) -> Result<(Tensor, Tensor)> {
    let (real_logit, real_cam, _) = d.forward_t(real, true)?;
    let mut losses = vec![mse_to(&real_logit, 1.0)?, mse_to(&real_cam, 1.0)?];
    for x in [fakes, smoothed] {
        let (logit, cam, _) = d.forward_t(x, true)?;
        losses.push(mse_to(&logit, 0.0)?);
        losses.push(mse_to(&cam, 0.0)?);
    }
    Ok((sum(&losses)?, real_logit))
}

/// The generator's LSGAN loss against `d`: patch and CAM logits towards 1.
fn lsgan_g(d: &Discriminator, fake: &Tensor) -> Result<Tensor> {
    let (logit, cam, _) = d.forward_t(fake, true)?;
    mse_to(&logit, 1.0)? + mse_to(&cam, 1.0)?
}

/// The discriminators' update of an adversarial step: the augmented real cartoons against
/// the augmented translations (detached) and edge-smoothed cartoons; feeds ADA the real
/// logits' signs. Its losses go to `terms` (`D_projected` or `D_global`, `D_local`,
/// `D_loss`).
pub(crate) fn update_discriminators(
    n: &FastNets,
    [real, fakes, smoothed]: [&Tensor; 3],
    ada: &mut AdaptiveProbability,
    optim: &mut Adam,
    lr: f64,
    terms: &mut Terms,
) -> Result<()> {
    let mut d_terms = Vec::new();
    match &n.global {
        GlobalDiscriminator::Projected(projected) => {
            let real_logits = projected.forward_t(&n.backbone, real, true)?;
            let fake_logits = projected.forward_t(&n.backbone, fakes, true)?;
            ada.observe(sign_mean(&real_logits)?, real.dim(0)?);
            let hinge = (real_logits.affine(-1.0, 1.0)?.relu()?.mean_all()?
                + fake_logits.affine(1.0, 1.0)?.relu()?.mean_all()?)?;
            d_terms.push(terms.push("D_projected", hinge));
        }
        GlobalDiscriminator::Photo2cartoon(global) => {
            let (loss, real_logit) = lsgan_d(global, [real, fakes, smoothed])?;
            // LSGAN's real target is 1 and fake 0: ADA's sign is taken about 0.5.
            ada.observe(sign_mean(&real_logit.affine(1.0, -0.5)?)?, real.dim(0)?);
            d_terms.push(terms.push("D_global", loss));
        }
    }
    let (loss, _) = lsgan_d(&n.local, [real, fakes, smoothed])?;
    d_terms.push(terms.push("D_local", loss));
    let (grads, loss) = differentiate(sum(&d_terms)?)?;
    terms.push("D_loss", loss);
    optim.step(&[grads], lr)
}

/// The generator's adversarial losses on its augmented images `fake_aug`: (whole-image
/// discriminator, local discriminator), also pushed to `terms`.
pub(crate) fn generator_adversarial(
    n: &FastNets,
    fake_aug: &Tensor,
    terms: &mut Terms,
) -> Result<(Tensor, Tensor)> {
    let global = match &n.global {
        GlobalDiscriminator::Projected(projected) => {
            let logits = projected.forward_t(&n.backbone, fake_aug, true)?;
            terms.push("G_projected", logits.mean_all()?.neg()?)
        }
        GlobalDiscriminator::Photo2cartoon(global) => {
            terms.push("G_global", lsgan_g(global, fake_aug)?)
        }
    };
    let local = terms.push("G_local", lsgan_g(&n.local, fake_aug)?);
    Ok((global, local))
}

/// The fixed parts of a step.
pub struct FastStep<'a> {
    /// The networks being trained.
    pub nets: &'a FastNets,
    /// The face-ID loss set up for this step's image size.
    pub face_id: &'a FaceIdLoss,
    /// The run's settings (loss weights, schedule, seed).
    pub spec: &'a FastSpec,
}

/// An adversarial step's inputs: photos, cartoons, and the cartoons edge-smoothed.
pub struct AdversarialBatch<'a> {
    /// Photos `(N, 3, size, size)` in [-1, 1].
    pub photos: &'a Tensor,
    /// Cartoons `(N, 3, size, size)` in [-1, 1].
    pub cartoons: &'a Tensor,
    /// The same cartoons with their edges blurred, shown to the discriminators as fakes.
    pub smoothed: &'a Tensor,
}

impl FastStep<'_> {
    fn weights(&self) -> FastWeights {
        self.spec.weights
    }

    /// `G(x) = x` on photos and cartoons together: L1 on pixels and on the backbone's
    /// low-level features.
    pub fn reconstruct(
        &self,
        photos: &Tensor,
        cartoons: &Tensor,
        optim: &mut Adam,
        lr: f64,
    ) -> Result<Losses> {
        let (n, w) = (self.nets, self.weights());
        let mut terms = Terms::default();
        let x = Tensor::cat(&[photos, cartoons], 0)?;
        let y = n.gen.forward(&x)?.0;
        let pixel = terms.push("R_pixel", l1(&y, &x)?);
        let target = n.backbone.low_level(&x)?.detach();
        let feature = terms.push("R_feature", l1(&n.backbone.low_level(&y)?, &target)?);
        let loss = ((pixel * w.recon_pixel)? + (feature * w.recon_feature)?)?;
        let (grads, loss) = differentiate(loss)?;
        terms.push("R_loss", loss);
        optim.step(&[grads], lr)?;
        n.clip_rho_w()?;
        let mut losses = Losses::new();
        terms.read(&mut losses)?;
        Ok(losses)
    }

    /// Adversarial step `step` (1-based).
    pub fn adversarial(
        &self,
        batch: &AdversarialBatch,
        step: u64,
        ada: &mut AdaptiveProbability,
        (g_optim, d_optim): (&mut Adam, &mut Adam),
        (lr_g, lr_d): (f64, f64),
    ) -> Result<Losses> {
        let (n, w, seed) = (self.nets, self.weights(), self.spec.seed);
        let mut terms = Terms::default();
        let (fake, fake_cam, _) = n.gen.forward(batch.photos)?;

        // Discriminators: real cartoons against translations and edge-smoothed cartoons.
        let p = ada.p;
        let aug = |x: &Tensor, what: &str| diff_augment(x, p, seed, &format!("{what}.{step}"));
        let real = aug(batch.cartoons, "real")?;
        let fakes = aug(&fake.detach(), "fake")?;
        let smoothed = aug(batch.smoothed, "smoothed")?;
        update_discriminators(
            n,
            [&real, &fakes, &smoothed],
            ada,
            d_optim,
            lr_d,
            &mut terms,
        )?;

        // Generator: fool both, keep the face and the content, CAM towards "translated".
        let fake_aug = aug(&fake, "generated")?;
        let (g_global, g_local) = generator_adversarial(n, &fake_aug, &mut terms)?;
        let ramp = self.spec.adv_ramp(step);
        let adv = ((g_global * (ramp * w.adv_global))? + (g_local * (ramp * w.adv_local))?)?;
        let photos = batch.photos;
        let id = terms.push("G_face_id", self.face_id.cosine_distance(photos, &fake)?);
        let luma = terms.push(
            "G_content_luma",
            l1(&low_pass_luminance(&fake)?, &low_pass_luminance(photos)?)?,
        );
        let colour = terms.push(
            "G_content_colour",
            l1(&fake.avg_pool2d(8)?, &photos.avg_pool2d(8)?)?,
        );
        let target = n.backbone.low_level(photos)?.detach();
        let feature = terms.push(
            "G_content_feature",
            l1(&n.backbone.low_level(&fake)?, &target)?,
        );
        let cam = terms.push("G_cam", bce_with_logits_to(&fake_cam, 1.0)?);
        let loss = sum(&[
            adv,
            (id * w.face_id)?,
            (luma * w.content_luma)?,
            (colour * w.content_colour)?,
            (feature * w.content_feature)?,
            (cam * w.cam)?,
        ])?;
        let (grads, loss) = differentiate(loss)?;
        let mut g_grads = vec![grads];
        let mut g_loss = loss;
        if w.identity_every > 0 && step.is_multiple_of(w.identity_every) {
            let (same, same_cam, _) = n.gen.forward(batch.cartoons)?;
            let identity = terms.push("G_identity", l1(&same, batch.cartoons)?);
            let cam = terms.push("G_cam_identity", bce_with_logits_to(&same_cam, 0.0)?);
            let (grads, loss) = differentiate(((identity * w.identity)? + (cam * w.cam)?)?)?;
            g_grads.push(grads);
            g_loss = (g_loss + loss)?;
        }
        terms.push("G_loss", g_loss);
        g_optim.step(&g_grads, lr_g)?;
        n.clip_rho_w()?;
        let mut losses = Losses::new();
        terms.read(&mut losses)?;
        losses.insert("ada_p".into(), p);
        Ok(losses)
    }
}
