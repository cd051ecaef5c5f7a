//! Adam as `torch.optim.Adam` (photo2cartoon's optimiser), with its state exposed so that it
//! can be checkpointed. Weight decay is PyTorch Adam's L2 term added to the gradient
//! (`grad + weight_decay * param`), not AdamW's decoupled decay.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor, Var};

/// Adam's hyperparameters (the learning rate is given to each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Decay rate of the first moment (mean) estimate.
    pub beta1: f64,
    /// Decay rate of the second moment (uncentred variance) estimate.
    pub beta2: f64,
    /// Added to the denominator for numerical stability.
    pub eps: f64,
    /// L2 penalty added to the gradient as `weight_decay * param` (0 for none).
    pub weight_decay: f64,
}

impl AdamConfig {
    /// photo2cartoon: betas (0.5, 0.999), weight decay 1e-4, eps 1e-8 (PyTorch's default).
    pub fn photo2cartoon() -> Self {
        Self {
            beta1: 0.5,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

/// One parameter and its first and second moment estimates.
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// An Adam optimiser over a fixed set of variables, updating them in place.
pub struct Adam {
    cfg: AdamConfig,
    slots: Vec<Slot>,
    /// Steps taken (PyTorch's `state['step']`).
    step: u64,
}

impl Adam {
    /// An optimiser over `vars` with zero moments.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    name,
                    m: zeros.clone(),
                    v: zeros,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    /// Updates taken so far (PyTorch's `state['step']`), which the bias corrections use.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr` on the sum of the gradients in `grads`.
    /// Parameters without a gradient are left alone, as PyTorch skips parameters whose
    /// `.grad` is None.
    pub fn step(&mut self, grads: &[GradStore], lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let step_size = lr / (1.0 - c.beta1.powi(t));
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for slot in &mut self.slots {
            let mut parts = grads.iter().filter_map(|g| g.get(slot.var.as_tensor()));
            let Some(first) = parts.next() else {
                continue;
            };
            // Detached: the moments must not keep the step's graph (see `step::differentiate`).
            let grad = parts
                .try_fold(first.clone(), |total, g| total + g)?
                .detach();
            let param = slot.var.as_tensor().detach();
            let grad = if c.weight_decay != 0.0 {
                (grad + param.affine(c.weight_decay, 0.0)?)?
            } else {
                grad
            };
            // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
            slot.m = (&slot.m + ((&grad - &slot.m)? * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((slot.v.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = ((&slot.m / denom)? * step_size)?;
            slot.var.set(&(param - update)?)?;
        }
        Ok(())
    }

    /// The moments as `m.<name>` and `v.<name>` tensors.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("m.{}", s.name), s.m.clone()),
                    (format!("v.{}", s.name), s.v.clone()),
                ]
            })
            .collect()
    }

    /// [`Adam::state`] with every name prefixed by `prefix` (`adam_g.`), as checkpoints
    /// keep it beside the networks.
    pub fn prefixed_state(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.state()
            .into_iter()
            .map(|(k, t)| (format!("{prefix}{k}"), t))
            .collect()
    }

    /// [`Adam::load_state`] from the tensors of a checkpoint whose names start with
    /// `prefix`.
    pub fn load_prefixed(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        step: u64,
    ) -> Result<()> {
        let moments: HashMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
            .collect();
        self.load_state(&moments, step)
    }

    /// Restores the moments saved by [`Adam::state`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for slot in &mut self.slots {
            for (kind, target) in [("m", &mut slot.m), ("v", &mut slot.v)] {
                let key = format!("{kind}.{}", slot.name);
                let Some(t) = tensors.get(&key) else {
                    bail!("optimiser state {key} is missing")
                };
                *target = t.to_device(slot.var.device())?.reshape(slot.var.shape())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn run(
        cfg: AdamConfig,
        lr: f64,
        steps: usize,
        x0: &[f32],
        grad: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Vec<f32>> {
        let var = Var::new(x0, &Device::Cpu)?;
        let mut opt = Adam::new(vec![("x".into(), var.clone())], cfg)?;
        for _ in 0..steps {
            let loss = grad(var.as_tensor())?;
            opt.step(&[loss.backward()?], lr)?;
        }
        var.as_tensor().to_vec1()
    }

    #[test]
    fn first_step_by_hand() -> Result<()> {
        // loss = sum(x^2 * [1, 2]): grad = [2x, 4x] = [2, -4] at x = [1, -1].
        // With wd 0.1: g = [2.1, -4.1]; m = 0.5 g; v = 0.001 g^2; m_hat = g; v_hat = g^2;
        // x -= lr * g / (|g| + eps) = x - lr * sign(g) (up to eps).
        let cfg = AdamConfig {
            weight_decay: 0.1,
            ..AdamConfig::photo2cartoon()
        };
        let weights = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
        let x = run(cfg, 0.01, 1, &[1.0, -1.0], |x| {
            (x.sqr()? * &weights)?.sum_all()
        })?;
        let expect = [
            1.0 - 0.01 * 2.1 / (2.1 + 1e-8),
            -1.0 + 0.01 * 4.1 / (4.1 + 1e-8),
        ];
        for (a, b) in x.iter().zip(expect) {
            assert!((*a as f64 - b).abs() < 1e-7, "{x:?} vs {expect:?}");
        }
        Ok(())
    }

    #[test]
    fn matches_torch_adam_with_weight_decay() -> Result<()> {
        // torch 2.15: p = torch.tensor([0.5, -1.5, 2.0], requires_grad=True)
        // opt = torch.optim.Adam([p], lr=0.1, betas=(0.5, 0.999), weight_decay=0.01)
        // 5 x { opt.zero_grad(); ((p ** 3) * torch.tensor([1., 0.5, -0.25])).sum().backward();
        //       opt.step() }
        let coef = Tensor::new(&[1f32, 0.5, -0.25], &Device::Cpu)?;
        let cfg = AdamConfig {
            weight_decay: 0.01,
            ..AdamConfig::photo2cartoon()
        };
        let x = run(cfg, 0.1, 5, &[0.5, -1.5, 2.0], |x| {
            (x.powf(3.0)? * &coef)?.sum_all()
        })?;
        let torch = TORCH_ADAM_5_STEPS;
        for (a, b) in x.iter().zip(torch) {
            assert!((a - b).abs() < 2e-6, "{x:?} vs torch {torch:?}");
        }
        Ok(())
    }

    /// See `matches_torch_adam_with_weight_decay`.
    const TORCH_ADAM_5_STEPS: [f32; 3] = [0.132_102_4, -2.028_009, 2.522_055_2];

    #[test]
    fn state_round_trip() -> Result<()> {
        let var = Var::new(&[1f32, 2.0], &Device::Cpu)?;
        let mut opt = Adam::new(vec![("x".into(), var.clone())], AdamConfig::photo2cartoon())?;
        opt.step(&[var.as_tensor().sqr()?.sum_all()?.backward()?], 0.1)?;
        let saved: HashMap<String, Tensor> = opt.state().into_iter().collect();
        let mut other = Adam::new(vec![("x".into(), var.clone())], AdamConfig::photo2cartoon())?;
        other.load_state(&saved, opt.step_count())?;
        let m: Vec<f32> = other.state()[0].1.to_vec1()?;
        assert_eq!(m, saved["m.x"].to_vec1::<f32>()?);
        assert_eq!(other.step_count(), 1);
        Ok(())
    }

    #[test]
    fn gradients_of_two_halves_add_up() -> Result<()> {
        let update = |split: bool| -> Result<Vec<f32>> {
            let var = Var::new(&[1f32, -2.0, 0.5], &Device::Cpu)?;
            let mut opt = Adam::new(vec![("x".into(), var.clone())], AdamConfig::photo2cartoon())?;
            let x = var.as_tensor();
            let (a, b) = (x.sqr()?.sum_all()?, (x * 3.0)?.sum_all()?);
            let grads = if split {
                vec![a.backward()?, b.backward()?]
            } else {
                vec![(a + b)?.backward()?]
            };
            opt.step(&grads, 0.1)?;
            // candle's gradients track the forward graph; the moments must not keep it.
            assert!(opt.state().iter().all(|(_, t)| !t.track_op()));
            x.to_vec1()
        };
        assert_eq!(update(true)?, update(false)?);
        Ok(())
    }
}
