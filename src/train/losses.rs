//! The loss functions of photo2cartoon training (`nn.MSELoss`, `nn.L1Loss`,
//! `nn.BCEWithLogitsLoss`, all mean-reduced), against constant or tensor targets, and the
//! weights it combines them with.

use candle_core::{Result, Tensor};

/// photo2cartoon's loss weights (`train.py` defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossWeights {
    /// The LSGAN adversarial terms, of generators and discriminators (1).
    pub adv: f64,
    /// Cycle L1, `G_BA(G_AB(a))` against `a` (50).
    pub cycle: f64,
    /// Identity L1, a generator on its own output domain against its input (10).
    pub identity: f64,
    /// The generators' CAM BCE: translations towards 1, identities towards 0 (1000).
    pub cam: f64,
    /// Face-ID `1 - cos` between an image and its translation (1; 0 skips the embedder).
    pub face_id: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            adv: 1.0,
            cycle: 50.0,
            identity: 10.0,
            cam: 1000.0,
            face_id: 1.0,
        }
    }
}

/// `MSELoss(x, full_like(x, target))`: the LSGAN terms.
pub fn mse_to(x: &Tensor, target: f64) -> Result<Tensor> {
    x.affine(1.0, -target)?.sqr()?.mean_all()
}

/// `L1Loss(a, b)`.
pub fn l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.abs()?.mean_all()
}

/// `BCEWithLogitsLoss(x, full_like(x, target))`, in PyTorch's stable form
/// `max(x, 0) - x * t + log(1 + exp(-|x|))`.
pub fn bce_with_logits_to(x: &Tensor, target: f64) -> Result<Tensor> {
    let softplus_neg_abs = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((x.relu()? - x.affine(target, 0.0)?)? + softplus_neg_abs)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn match_pytorch_values() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[-30f32, -1.0], [0.5, 40.0]], &dev)?;
        let y = Tensor::new(&[[0f32, 1.0], [1.0, 2.0]], &dev)?;
        let scalar = |t: Tensor| t.to_scalar::<f32>();
        // torch: F.mse_loss(x, torch.ones_like(x)) = (961 + 4 + 0.25 + 1521) / 4
        assert!((scalar(mse_to(&x, 1.0)?)? - 621.5625).abs() < 1e-3);
        // F.l1_loss(x, y) = (30 + 2 + 0.5 + 38) / 4
        assert!((scalar(l1(&x, &y)?)? - 17.625).abs() < 1e-5);
        // F.binary_cross_entropy_with_logits(x, ones) = 7.946835 (torch 2.15)
        assert!((scalar(bce_with_logits_to(&x, 1.0)?)? - 7.946_835).abs() < 1e-4);
        // ... and against zeros: 10.321835
        assert!((scalar(bce_with_logits_to(&x, 0.0)?)? - 10.321_835).abs() < 1e-4);
        Ok(())
    }
}
