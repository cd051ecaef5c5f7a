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

use candle_core::{Result, Tensor};

use super::adam::Adam;
use super::face_id::FaceIdLoss;
use super::losses::{bce_with_logits_to, l1, mse_to, LossWeights};
use super::model::Ugatit;
use crate::nets::discriminator::Discriminator;

/// Loss values of one step by the reference's names (`D_ad_loss_GA`, `G_recon_loss_A`,
/// `Discriminator_loss`, `Generator_loss`, ...).
pub type Losses = BTreeMap<String, f64>;

/// Named scalar tensors, read back in one transfer.
#[derive(Default)]
struct Terms(Vec<(String, Tensor)>);

impl Terms {
    fn push(&mut self, name: impl Into<String>, t: Tensor) -> Tensor {
        self.0.push((name.into(), t.clone()));
        t
    }

    fn read(self, into: &mut Losses) -> Result<()> {
        let (names, tensors): (Vec<String>, Vec<Tensor>) = self.0.into_iter().unzip();
        let values: Vec<f32> = Tensor::stack(&tensors, 0)?.to_vec1()?;
        into.extend(names.into_iter().zip(values.into_iter().map(f64::from)));
        Ok(())
    }
}

fn sum(terms: &[Tensor]) -> Result<Tensor> {
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
    pub model: &'a Ugatit,
    pub face_id: &'a FaceIdLoss,
    pub weights: LossWeights,
}

impl Step<'_> {
    /// One iteration on `real_a` (photos) and `real_b` (cartoons) at learning rate `lr`.
    pub fn run(
        &self,
        real_a: &Tensor,
        real_b: &Tensor,
        d_optim: &mut Adam,
        g_optim: &mut Adam,
        lr: f64,
    ) -> Result<Losses> {
        let mut losses = Losses::new();
        let d_loss = self.discriminator_loss(real_a, real_b, &mut losses)?;
        d_optim.step(&d_loss.backward()?, lr)?;
        drop(d_loss);
        let g_loss = self.generator_loss(real_a, real_b, &mut losses)?;
        g_optim.step(&g_loss.backward()?, lr)?;
        self.model.clip_rho_w()?;
        Ok(losses)
    }

    fn discriminator_loss(
        &self,
        real_a: &Tensor,
        real_b: &Tensor,
        out: &mut Losses,
    ) -> Result<Tensor> {
        let m = self.model;
        let fake_a2b = m.gen_a2b.forward(real_a)?.0.detach();
        let fake_b2a = m.gen_b2a.forward(real_b)?.0.detach();
        let mut terms = Terms::default();
        let mut domain = |tag: char, real: &Tensor, fake: &Tensor, g, l| -> Result<Tensor> {
            let [ad_g, cam_g] = discriminator_terms(g, &format!("G{tag}"), real, fake, &mut terms)?;
            let [ad_l, cam_l] = discriminator_terms(l, &format!("L{tag}"), real, fake, &mut terms)?;
            sum(&[ad_g, cam_g, ad_l, cam_l])? * self.weights.adv
        };
        let loss_a = domain('A', real_a, &fake_b2a, &m.dis_ga, &m.dis_la)?;
        let loss_b = domain('B', real_b, &fake_a2b, &m.dis_gb, &m.dis_lb)?;
        let total = terms.push("Discriminator_loss", (loss_a + loss_b)?);
        terms.read(out)?;
        Ok(total)
    }

    fn generator_loss(&self, real_a: &Tensor, real_b: &Tensor, out: &mut Losses) -> Result<Tensor> {
        let (m, w) = (self.model, self.weights);
        let (fake_a2b, fake_a2b_cam, _) = m.gen_a2b.forward(real_a)?;
        let (fake_b2a, fake_b2a_cam, _) = m.gen_b2a.forward(real_b)?;
        let fake_a2b2a = m.gen_b2a.forward(&fake_a2b)?.0;
        let fake_b2a2b = m.gen_a2b.forward(&fake_b2a)?.0;
        let (fake_a2a, fake_a2a_cam, _) = m.gen_b2a.forward(real_a)?;
        let (fake_b2b, fake_b2b_cam, _) = m.gen_a2b.forward(real_b)?;

        let mut terms = Terms::default();
        let [ad_ga, cam_ga] = generator_adv_terms(&m.dis_ga, "GA", &fake_b2a, &mut terms)?;
        let [ad_la, cam_la] = generator_adv_terms(&m.dis_la, "LA", &fake_b2a, &mut terms)?;
        let [ad_gb, cam_gb] = generator_adv_terms(&m.dis_gb, "GB", &fake_a2b, &mut terms)?;
        let [ad_lb, cam_lb] = generator_adv_terms(&m.dis_lb, "LB", &fake_a2b, &mut terms)?;

        let recon_a = terms.push("G_recon_loss_A", l1(&fake_a2b2a, real_a)?);
        let recon_b = terms.push("G_recon_loss_B", l1(&fake_b2a2b, real_b)?);
        let identity_a = terms.push("G_identity_loss_A", l1(&fake_a2a, real_a)?);
        let identity_b = terms.push("G_identity_loss_B", l1(&fake_b2b, real_b)?);
        // The embedder dominates small-image steps on the CPU: skip it when it does not count.
        let (id_a, id_b) = if w.face_id == 0.0 {
            (
                real_a.zeros_like()?.mean_all()?,
                real_a.zeros_like()?.mean_all()?,
            )
        } else {
            (
                terms.push(
                    "G_id_loss_A",
                    self.face_id.cosine_distance(real_a, &fake_a2b)?,
                ),
                terms.push(
                    "G_id_loss_B",
                    self.face_id.cosine_distance(real_b, &fake_b2a)?,
                ),
            )
        };
        let cam_a = terms.push(
            "G_cam_loss_A",
            (bce_with_logits_to(&fake_b2a_cam, 1.0)? + bce_with_logits_to(&fake_a2a_cam, 0.0)?)?,
        );
        let cam_b = terms.push(
            "G_cam_loss_B",
            (bce_with_logits_to(&fake_a2b_cam, 1.0)? + bce_with_logits_to(&fake_b2b_cam, 0.0)?)?,
        );

        let side = |adv: [Tensor; 4], recon, identity, cam, id| -> Result<Tensor> {
            sum(&[
                (sum(&adv)? * w.adv)?,
                (recon * w.cycle)?,
                (identity * w.identity)?,
                (cam * w.cam)?,
                (id * w.face_id)?,
            ])
        };
        let loss_a = side(
            [ad_ga, cam_ga, ad_la, cam_la],
            recon_a,
            identity_a,
            cam_a,
            id_a,
        )?;
        let loss_b = side(
            [ad_gb, cam_gb, ad_lb, cam_lb],
            recon_b,
            identity_b,
            cam_b,
            id_b,
        )?;
        let total = terms.push("Generator_loss", (loss_a + loss_b)?);
        terms.read(out)?;
        Ok(total)
    }
}
