//! One photo2cartoon training iteration (`UgatitSadalinHourglass.train`'s loop body):
//! a discriminator update, then a generator update, then clipping rho and w. Every loss is
//! returned under the reference's variable name.
//!
//! As in the reference, each discriminator runs once per input in training mode, so every
//! spectral norm does one power iteration per call (two in the discriminator update, one
//! in the generator update). The discriminator update sees the translations detached:
//! the reference computes their generator gradients and then zeroes them, which gives the
//! same updates.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

use super::adam::Adam;
use super::face_id::FaceIdLoss;
use super::losses::{bce_with_logits_to, l1, mse_to, LossWeights};
use super::model::Ugatit;
use crate::nets::discriminator::Discriminator;

/// Loss values of one step by the reference's names (`D_ad_loss_GA`, `G_recon_loss_A`,
/// `Discriminator_loss`, `Generator_loss`, ...).
pub type Losses = BTreeMap<String, f64>;

/// Named scalar tensors, read back in one transfer. They are kept detached, so that a
/// graph is freed as soon as its loss is differentiated.
#[derive(Default)]
pub(crate) struct Terms(Vec<(String, Tensor)>);

impl Terms {
    pub(crate) fn push(&mut self, name: impl Into<String>, t: Tensor) -> Tensor {
        self.0.push((name.into(), t.detach()));
        t
    }

    pub(crate) fn read(self, into: &mut Losses) -> Result<()> {
        let (names, tensors): (Vec<String>, Vec<Tensor>) = self.0.into_iter().unzip();
        let values: Vec<f32> = Tensor::stack(&tensors, 0)?.to_vec1()?;
        into.extend(names.into_iter().zip(values.into_iter().map(f64::from)));
        Ok(())
    }
}

/// The gradients of `loss`, and its value; its graph is dropped here.
///
/// candle's backward computes a weight's gradient from the layer's input without detaching
/// it, so every gradient would keep the whole forward graph alive (and, through Adam's
/// moments, every earlier step's): the gradients are detached before the graph goes.
pub(crate) fn differentiate(loss: Tensor) -> Result<(GradStore, Tensor)> {
    let mut grads = loss.backward()?;
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        let grad = grads.get_id(id).expect("listed").detach();
        grads.insert_id(id, grad);
    }
    Ok((grads, loss.detach()))
}

pub(crate) fn sum(terms: &[Tensor]) -> Result<Tensor> {
    let mut total = terms[0].clone();
    for t in &terms[1..] {
        total = (total + t)?;
    }
    Ok(total)
}

/// `MSE(real, 1) + MSE(fake, 0)` on the patch logits and on the CAM logits of `d`, pushed as
/// `D_ad_loss_{tag}` and `D_ad_cam_loss_{tag}`.
fn discriminator_terms(
    d: &Discriminator,
    tag: &str,
    real: &Tensor,
    fake: &Tensor,
    terms: &mut Terms,
) -> Result<[Tensor; 2]> {
    let (real_logit, real_cam, _) = d.forward_t(real, true)?;
    let (fake_logit, fake_cam, _) = d.forward_t(fake, true)?;
    let ad = (mse_to(&real_logit, 1.0)? + mse_to(&fake_logit, 0.0)?)?;
    let cam = (mse_to(&real_cam, 1.0)? + mse_to(&fake_cam, 0.0)?)?;
    Ok([
        terms.push(format!("D_ad_loss_{tag}"), ad),
        terms.push(format!("D_ad_cam_loss_{tag}"), cam),
    ])
}

/// `MSE(fake, 1)` on the patch and CAM logits of `d`: `G_ad_loss_{tag}`,
/// `G_ad_cam_loss_{tag}`.
fn generator_adv_terms(
    d: &Discriminator,
    tag: &str,
    fake: &Tensor,
    terms: &mut Terms,
) -> Result<[Tensor; 2]> {
    let (logit, cam, _) = d.forward_t(fake, true)?;
    Ok([
        terms.push(format!("G_ad_loss_{tag}"), mse_to(&logit, 1.0)?),
        terms.push(format!("G_ad_cam_loss_{tag}"), mse_to(&cam, 1.0)?),
    ])
}

/// The optimisers and fixed parts of a training step.
pub struct Step<'a> {
    /// The six networks being trained.
    pub model: &'a Ugatit,
    /// The face-ID loss set up for the run's image size.
    pub face_id: &'a FaceIdLoss,
    /// Weights of the loss terms.
    pub weights: LossWeights,
}

/// The generator terms that start from one domain's real images: its translation (judged
/// by the other domain's discriminators, cycled back, and compared by face ID), its identity
/// mapping, and both CAM outputs.
struct GeneratorSide {
    /// Weighted sum of this side's terms, to differentiate.
    loss: Tensor,
    /// `bce(translation CAM, 1)` and `bce(identity CAM, 0)`: the reference adds them to the
    /// other domain's and this domain's CAM loss respectively.
    cam_translated: Tensor,
    cam_identity: Tensor,
}

impl Step<'_> {
    /// One iteration on `real_a` (photos) and `real_b` (cartoons) at learning rate `lr`.
    ///
    /// Each update differentiates its loss in two halves whose graphs share nothing (the
    /// discriminators of A then of B; the generator terms starting from A then from B) and
    /// adds their gradients, so only half the activations are alive at once.
    pub fn run(
        &self,
        real_a: &Tensor,
        real_b: &Tensor,
        d_optim: &mut Adam,
        g_optim: &mut Adam,
        lr: f64,
    ) -> Result<Losses> {
        let mut losses = Losses::new();
        let d_grads = self.discriminator_grads(real_a, real_b, &mut losses)?;
        d_optim.step(&d_grads, lr)?;
        drop(d_grads);
        let g_grads = self.generator_grads(real_a, real_b, &mut losses)?;
        g_optim.step(&g_grads, lr)?;
        self.model.clip_rho_w()?;
        Ok(losses)
    }

    fn discriminator_grads(
        &self,
        real_a: &Tensor,
        real_b: &Tensor,
        out: &mut Losses,
    ) -> Result<Vec<GradStore>> {
        let m = self.model;
        let mut terms = Terms::default();
        let mut domain = |tag: char, real: &Tensor, fake: &Tensor, g, l| -> Result<Tensor> {
            let [ad_g, cam_g] = discriminator_terms(g, &format!("G{tag}"), real, fake, &mut terms)?;
            let [ad_l, cam_l] = discriminator_terms(l, &format!("L{tag}"), real, fake, &mut terms)?;
            sum(&[ad_g, cam_g, ad_l, cam_l])? * self.weights.adv
        };
        let fake_b2a = m.gen_b2a.forward(real_b)?.0.detach();
        let (grads_a, loss_a) =
            differentiate(domain('A', real_a, &fake_b2a, &m.dis_ga, &m.dis_la)?)?;
        let fake_a2b = m.gen_a2b.forward(real_a)?.0.detach();
        let (grads_b, loss_b) =
            differentiate(domain('B', real_b, &fake_a2b, &m.dis_gb, &m.dis_lb)?)?;
        terms.push("Discriminator_loss", (loss_a + loss_b)?);
        terms.read(out)?;
        Ok(vec![grads_a, grads_b])
    }

    /// The terms starting from `real` (domain A when `from_a`), pushed under the reference's
    /// names for that domain.
    fn generator_side(
        &self,
        real: &Tensor,
        from_a: bool,
        terms: &mut Terms,
    ) -> Result<GeneratorSide> {
        let (m, w) = (self.model, self.weights);
        let (forward, backward, d_global, d_local) = if from_a {
            (&m.gen_a2b, &m.gen_b2a, &m.dis_gb, &m.dis_lb)
        } else {
            (&m.gen_b2a, &m.gen_a2b, &m.dis_ga, &m.dis_la)
        };
        let (this, other) = if from_a { ('A', 'B') } else { ('B', 'A') };
        let (fake, fake_cam, _) = forward.forward(real)?;
        let cycled = backward.forward(&fake)?.0;
        let (same, same_cam, _) = backward.forward(real)?;

        let mut adv = generator_adv_terms(d_global, &format!("G{other}"), &fake, terms)?.to_vec();
        adv.extend(generator_adv_terms(
            d_local,
            &format!("L{other}"),
            &fake,
            terms,
        )?);
        let recon = terms.push(format!("G_recon_loss_{this}"), l1(&cycled, real)?);
        let identity = terms.push(format!("G_identity_loss_{this}"), l1(&same, real)?);
        let cam_translated = bce_with_logits_to(&fake_cam, 1.0)?;
        let cam_identity = bce_with_logits_to(&same_cam, 0.0)?;
        let mut parts = vec![
            (sum(&adv)? * w.adv)?,
            (recon * w.cycle)?,
            (identity * w.identity)?,
            ((&cam_translated + &cam_identity)? * w.cam)?,
        ];
        // The embedder dominates small-image steps on the CPU: skip it when it does not count.
        if w.face_id != 0.0 {
            let id = self.face_id.cosine_distance(real, &fake)?;
            parts.push((terms.push(format!("G_id_loss_{this}"), id) * w.face_id)?);
        }
        Ok(GeneratorSide {
            loss: sum(&parts)?,
            cam_translated: cam_translated.detach(),
            cam_identity: cam_identity.detach(),
        })
    }

    fn generator_grads(
        &self,
        real_a: &Tensor,
        real_b: &Tensor,
        out: &mut Losses,
    ) -> Result<Vec<GradStore>> {
        let mut terms = Terms::default();
        let from_a = self.generator_side(real_a, true, &mut terms)?;
        let (grads_a, loss_a) = differentiate(from_a.loss)?;
        let from_b = self.generator_side(real_b, false, &mut terms)?;
        let (grads_b, loss_b) = differentiate(from_b.loss)?;
        terms.push(
            "G_cam_loss_A",
            (&from_b.cam_translated + &from_a.cam_identity)?,
        );
        terms.push(
            "G_cam_loss_B",
            (&from_a.cam_translated + &from_b.cam_identity)?,
        );
        terms.push("Generator_loss", (loss_a + loss_b)?);
        terms.read(out)?;
        Ok(vec![grads_a, grads_b])
    }
}
