//! Differentiable layers for the networks defined in PyTorch (the photo2cartoon generator and
//! discriminators), with PyTorch's semantics and parameter names.
//!
//! Everything here is built from candle ops that exist on CPU and CUDA and whose backward
//! pass accumulates gradients correctly, so the same code serves inference and training.
//! In particular nearest upsampling is a broadcast + reshape: candle's `upsample_nearest2d`
//! backward overwrites instead of accumulating gradients.
//!
//! Parameters are created through a [`VarBuilder`] with PyTorch's default initialisation, so
//! a `VarMap`-backed builder yields trainable variables. Spectral-norm `weight_u`/`weight_v`
//! are buffers, not parameters: keep them out of the optimiser (see [`is_buffer`]).

use std::sync::{Arc, OnceLock};

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Init, Linear, VarBuilder};

use crate::kernels::cpu_ops::{self, InputTransform, PackedConv, Padding};
use crate::kernels::train_ops;

/// `eps` of every normalisation in these networks (PyTorch's default).
pub const NORM_EPS: f64 = 1e-5;

/// PyTorch's default initialisation of `Conv2d`/`Linear` weights and biases:
/// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
pub fn torch_default_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `nn.Conv2d(cin, cout, k, stride, padding=0, bias)` with parameters `weight` and `bias`.
pub fn conv2d(
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let init = torch_default_init(cin * kernel * kernel);
    let weight = vb.get_with_hints((cout, cin, kernel, kernel), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(cout, "bias", init)?)
    } else {
        None
    };
    let cfg = Conv2dConfig {
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, bias, cfg))
}

/// `nn.Linear(cin, cout, bias)` with parameters `weight` (cout, cin) and `bias`.
pub fn linear(cin: usize, cout: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let init = torch_default_init(cin);
    let weight = vb.get_with_hints((cout, cin), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(cout, "bias", init)?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// `nn.Upsample(scale_factor=2)` / `F.upsample(x, scale_factor=2)` (nearest) on NCHW.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = train_ops::upsample_nearest2x(x) {
        return y;
    }
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, 2, w, 2))?
        .reshape((n, c, 2 * h, 2 * w))
}

/// `F.avg_pool2d(x, 2)` on NCHW with even height and width.
pub fn avg_pool2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("avg_pool2x needs even sizes, got {h}x{w}")
    }
    if let Some(y) = train_ops::avg_pool2x(x) {
        return y;
    }
    x.avg_pool2d(2)
}

/// `nn.LeakyReLU(slope)` for `0 <= slope < 1`.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    train_ops::activation(x, train_ops::Activation::LeakyRelu(slope as f32))
}

/// `nn.ReLU`, through the training ops' one-pass forward and backward on the CPU.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    train_ops::activation(x, train_ops::Activation::Relu)
}

/// Sum over H and W, keeping the dims: `(N, C, 1, 1)`. Summing rows first keeps the f32
/// rounding error near PyTorch's.
fn spatial_sum(x: &Tensor) -> Result<Tensor> {
    x.sum_keepdim(D::Minus1)?.sum_keepdim(D::Minus2)
}

/// `F.adaptive_avg_pool2d(x, 1).view(N, -1)`: `(N, C)`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    (spatial_sum(x)? / (h * w) as f64)?.reshape((n, c))
}

/// `F.adaptive_max_pool2d(x, 1).view(N, -1)`: `(N, C)`.
pub fn global_max_pool(x: &Tensor) -> Result<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    x.max_keepdim(D::Minus1)?
        .max_keepdim(D::Minus2)?
        .reshape((n, c))
}

/// Per-(sample, channel) statistics over H and W.
struct ChannelStats {
    /// `x - mean`, `(N, C, H, W)`.
    centered: Tensor,
    /// `(N, C, 1, 1)`.
    mean: Tensor,
    /// Sum of squared deviations, `(N, C, 1, 1)`.
    sum_sq: Tensor,
    /// H * W.
    count: usize,
}

impl ChannelStats {
    fn new(x: &Tensor) -> Result<Self> {
        let (_, _, h, w) = x.dims4()?;
        let count = h * w;
        let mean = (spatial_sum(x)? / count as f64)?;
        let centered = x.broadcast_sub(&mean)?;
        let sum_sq = spatial_sum(&centered.sqr()?)?;
        Ok(Self {
            centered,
            mean,
            sum_sq,
            count,
        })
    }
}

/// `nn.InstanceNorm2d(C)` as PyTorch defaults it: no affine parameters, no running stats,
/// biased variance, eps 1e-5.
pub fn instance_norm(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = train_ops::instance_norm(x, false, NORM_EPS) {
        return y;
    }
    let s = ChannelStats::new(x)?;
    let inv_std = ((s.sum_sq / s.count as f64)? + NORM_EPS)?.sqrt()?.recip()?;
    s.centered.broadcast_mul(&inv_std)
}

/// `relu(instance_norm(x))`.
pub fn instance_norm_relu(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = train_ops::instance_norm(x, true, NORM_EPS) {
        return y;
    }
    instance_norm(x)?.relu()
}

/// photo2cartoon's instance/layer-norm mix (the core of `adaLIN` and `LIN`):
/// `(rho * IN(x) + (1 - rho) * LN(x)) * gamma + beta`, where both norms use the UNBIASED
/// variance (`torch.var`) and eps 1e-5, LN normalising over C, H, W per sample.
///
/// `rho`: `(1, C, 1, 1)`; `gamma`, `beta`: `(N or 1, C, 1, 1)`.
pub fn instance_layer_norm(
    x: &Tensor,
    rho: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
) -> Result<Tensor> {
    if let Some(y) = train_ops::instance_layer_norm(x, rho, gamma, beta, NORM_EPS) {
        return y;
    }
    let s = ChannelStats::new(x)?;
    let (scale, shift) = lin_scale_shift(&s.mean, &s.sum_sq, s.count, rho, gamma, beta)?;
    s.centered.broadcast_mul(&scale)?.broadcast_add(&shift)
}

/// [`instance_layer_norm`] as `x * scale + shift` per `(N, C)` (sample-major vectors), from
/// the fast CPU statistics: for [`cpu_ops`] inference paths only.
pub fn instance_layer_norm_affine(
    x: &Tensor,
    rho: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (n, c, h, w) = x.dims4()?;
    let stats = cpu_ops::channel_stats(x)?;
    let mean = stats.narrow(2, 0, 1)?.reshape((n, c, 1, 1))?;
    let sum_sq = stats.narrow(2, 1, 1)?.reshape((n, c, 1, 1))?;
    let (scale, shift) = lin_scale_shift(&mean, &sum_sq, h * w, rho, gamma, beta)?;
    // scale * (x - mean) + shift = scale * x + (shift - scale * mean)
    let shift = (shift.broadcast_as((n, c, 1, 1))? - scale.broadcast_mul(&mean)?)?;
    let scale = scale.broadcast_as((n, c, 1, 1))?;
    Ok((
        scale.flatten_all()?.to_vec1()?,
        shift.flatten_all()?.to_vec1()?,
    ))
}

/// `(scale, shift)` with `instance_layer_norm(x) = (x - mean) * scale + shift`, from the
/// channel means and sums of squared deviations `(N, C, 1, 1)` over `count` = H * W.
fn lin_scale_shift(
    mean: &Tensor,
    sum_sq: &Tensor,
    count: usize,
    rho: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let c = mean.dim(1)?;
    let hw = count as f64;
    let inv_in = ((sum_sq / (hw - 1.0))? + NORM_EPS)?.sqrt()?.recip()?;
    // Layer statistics from the channel ones: mean of means, and the pooled sum of squares
    // (sum over channels of sum_sq + hw * (mean_c - mean)^2).
    let ln_mean = mean.mean_keepdim(1)?;
    let delta = mean.broadcast_sub(&ln_mean)?;
    let ln_sum_sq = (sum_sq + (delta.sqr()? * hw)?)?.sum_keepdim(1)?;
    let inv_ln = ((ln_sum_sq / (c as f64 * hw - 1.0))? + NORM_EPS)?
        .sqrt()?
        .recip()?;
    // rho * d * inv_in + (1 - rho) * (d + delta) * inv_ln, d = x - mean_c, as d * a + b.
    let one_minus_rho = rho.affine(-1.0, 1.0)?;
    let a = rho
        .broadcast_mul(&inv_in)?
        .broadcast_add(&one_minus_rho.broadcast_mul(&inv_ln)?)?;
    let b = one_minus_rho.broadcast_mul(&delta.broadcast_mul(&inv_ln)?)?;
    let scale = a.broadcast_mul(gamma)?;
    let shift = b.broadcast_mul(gamma)?.broadcast_add(beta)?;
    Ok((scale, shift))
}

/// [`instance_norm`] as `x * scale + shift` per `(N, C)`, from the fast CPU statistics: for
/// [`cpu_ops`] inference paths only.
pub fn instance_norm_affine(x: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let (_, _, h, w) = x.dims4()?;
    cpu_ops::instance_norm_affine(&cpu_ops::channel_stats(x)?, h * w, NORM_EPS)
}

/// The class-activation-map step of U-GAT-IT (generator and discriminators): the GAP and GMP
/// logits concatenated `(N, 2)`, and the features `x` weighted by `gap_weight` and
/// `gmp_weight` (each `(1, C)`) concatenated `(N, 2C, H, W)`.
pub fn cam_features(
    x: &Tensor,
    gap_logit: &Tensor,
    gmp_logit: &Tensor,
    gap_weight: &Tensor,
    gmp_weight: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let cam_logit = Tensor::cat(&[gap_logit, gmp_logit], 1)?;
    let weighted = |w: &Tensor| -> Result<Tensor> {
        let (o, c) = w.dims2()?;
        x.broadcast_mul(&w.reshape((o, c, 1, 1))?)
    };
    let features = Tensor::cat(&[weighted(gap_weight)?, weighted(gmp_weight)?], 1)?;
    Ok((cam_logit, features))
}

/// `nn.ReflectionPad2d(k / 2)` followed by a `padding=0` convolution: the photo2cartoon idiom
/// (a pad of 0 makes it a plain convolution).
///
/// For inference on the CPU it also runs as one fused [`cpu_ops::conv2d`]
/// ([`ReflConv2d::forward_fused`]), its weights packed on first use.
#[derive(Debug, Clone)]
pub struct ReflConv2d {
    pad: usize,
    conv: Conv2d,
    packed: OnceLock<Option<Arc<PackedConv>>>,
}

impl ReflConv2d {
    /// Wraps `conv` (built with `padding=0`) to reflect-pad its input by `pad` pixels on each
    /// side first.
    pub fn new(pad: usize, conv: Conv2d) -> Self {
        Self {
            pad,
            conv,
            packed: OnceLock::new(),
        }
    }

    /// The wrapped convolution, for its weights and configuration.
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }

    /// The weights packed for [`cpu_ops`], or `None` when they track gradients (or the
    /// shape or CPU is not supported).
    pub fn packed(&self) -> Option<&PackedConv> {
        self.packed
            .get_or_init(|| {
                let (w, b) = (self.conv.weight(), self.conv.bias());
                let ok = cpu_ops::isa().is_some()
                    && cpu_ops::eligible(w)
                    && b.is_none_or(cpu_ops::eligible);
                if !ok {
                    return None;
                }
                PackedConv::new(w, b, self.conv.config().stride, Padding::Reflect(self.pad))
                    .ok()
                    .map(Arc::new)
            })
            .as_deref()
    }

    /// `relu_out?(conv(pad(transform(x))) + residual)` with [`cpu_ops::conv2d`]; fails when
    /// [`ReflConv2d::packed`] is `None`. Inference only (no gradient).
    pub fn forward_fused(
        &self,
        x: &Tensor,
        input: &InputTransform,
        residual: Option<&Tensor>,
        relu_out: bool,
    ) -> Result<Tensor> {
        let Some(packed) = self.packed() else {
            candle_core::bail!("ReflConv2d::forward_fused: weights not packed for the CPU")
        };
        cpu_ops::conv2d(x, packed, input, residual, relu_out)
    }
}

impl Module for ReflConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        train_ops::conv2d_layer(&self.conv, x, self.pad)
    }
}

/// True for names of buffers (spectral-norm `weight_u`, `weight_v`): state that is saved and
/// loaded with the parameters but is not trained.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("weight_u") || name.ends_with("weight_v")
}

/// `torch.nn.utils.spectral_norm(module)` (one power iteration, eps 1e-12, dim 0) on a weight
/// `weight_orig` of shape `(out, ...)`, with buffers `weight_u` (out) and `weight_v`
/// (prod of the other dims).
///
/// In training mode ([`SpectralNorm::weight`] with `train = true`) one power iteration updates
/// `u` and `v` in place (in the tensors the builder gave, i.e. in the `VarMap` when there is
/// one) as PyTorch does; in eval mode the stored `u`, `v` are used as they are. Either way
/// the weight is `weight_orig / sigma` with `sigma = u^T W v`, gradients flowing through
/// `sigma` into `weight_orig` and not into `u`, `v`.
#[derive(Debug, Clone)]
pub struct SpectralNorm {
    weight_orig: Tensor,
    u: Tensor,
    v: Tensor,
}

const SN_EPS: f64 = 1e-12;

/// `F.normalize(x, dim=0, eps)` for a vector.
fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_all()?.sqrt()?.maximum(SN_EPS)?;
    x.broadcast_div(&norm)
}

impl SpectralNorm {
    /// Takes `weight_orig` of `shape` (PyTorch's default init) and the buffers `weight_u`,
    /// `weight_v` from `vb`, the buffers initialised to random vectors of unit length on
    /// average.
    pub fn new(shape: &[usize], vb: VarBuilder) -> Result<Self> {
        let out = shape[0];
        let fan_in: usize = shape[1..].iter().product();
        let weight_orig = vb.get_with_hints(shape, "weight_orig", torch_default_init(fan_in))?;
        // PyTorch starts from normalised N(0, 1) vectors; these are unit length on average.
        let unit = |n: usize| Init::Randn {
            mean: 0.0,
            stdev: 1.0 / (n as f64).sqrt(),
        };
        let u = vb.get_with_hints(out, "weight_u", unit(out))?;
        let v = vb.get_with_hints(fan_in, "weight_v", unit(fan_in))?;
        Ok(Self { weight_orig, u, v })
    }

    /// The unnormalised parameter (`weight_orig`).
    pub fn weight_orig(&self) -> &Tensor {
        &self.weight_orig
    }

    /// The normalised weight `weight_orig / sigma`, same shape as `weight_orig`.
    pub fn weight(&self, train: bool) -> Result<Tensor> {
        let out = self.weight_orig.dim(0)?;
        let mat = self.weight_orig.reshape((out, ()))?;
        let (u, v) = if train {
            let w = mat.detach();
            let v = normalize(&w.t()?.matmul(&self.u.detach().unsqueeze(1)?)?.squeeze(1)?)?;
            let u = normalize(&w.matmul(&v.unsqueeze(1)?)?.squeeze(1)?)?;
            self.u.slice_set(&u, 0, 0)?;
            self.v.slice_set(&v, 0, 0)?;
            (u, v)
        } else {
            (self.u.detach(), self.v.detach())
        };
        let sigma = u.unsqueeze(0)?.matmul(&mat)?.matmul(&v.unsqueeze(1)?)?;
        let sigma = sigma.reshape(vec![1; self.weight_orig.rank()])?;
        self.weight_orig.broadcast_div(&sigma)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::train_ops::reflection_pad2d;
    use candle_core::{DType, Device, Var};

    fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
        t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()
    }

    fn ramp(shape: &[usize], seed: u64) -> Result<Tensor> {
        // Deterministic, irregular values in [-1, 1).
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// Checks d(sum(f(x) * r))/dx from backprop against central finite differences (f64).
    fn check_grad(shape: &[usize], f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
        let x = Var::from_tensor(&ramp(shape, 1)?)?;
        let y = f(x.as_tensor())?;
        let r = ramp(y.dims(), 2)?;
        let loss = (&y * &r)?.sum_all()?;
        let grads = loss.backward()?;
        let analytic = to_f64_vec(grads.get(&x).expect("gradient"))?;
        let x0 = to_f64_vec(x.as_tensor())?;
        let h = 1e-6;
        for (i, a) in analytic.iter().enumerate() {
            let eval = |delta: f64| -> Result<f64> {
                let mut xs = x0.clone();
                xs[i] += delta;
                let xt = Tensor::from_vec(xs, shape, &Device::Cpu)?;
                (f(&xt)? * &r)?.sum_all()?.to_scalar::<f64>()
            };
            let numeric = (eval(h)? - eval(-h)?) / (2.0 * h);
            assert!(
                (numeric - a).abs() < 1e-6 * (1.0 + numeric.abs()),
                "element {i}: backprop {a} vs finite difference {numeric}"
            );
        }
        Ok(())
    }

    #[test]
    fn reflection_pad_values() -> Result<()> {
        let x = Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((1, 1, 3, 4))?;
        let y = reflection_pad2d(&x, 2)?;
        assert_eq!(y.dims(), &[1, 1, 7, 8]);
        // PyTorch: F.pad(torch.arange(12.).view(1,1,3,4), (2,2,2,2), mode='reflect')[0,0,0]
        let first: Vec<f32> = y.get(0)?.get(0)?.get(0)?.to_vec1()?;
        assert_eq!(first, [10., 9., 8., 9., 10., 11., 10., 9.]);
        let mid: Vec<f32> = y.get(0)?.get(0)?.get(3)?.to_vec1()?;
        assert_eq!(mid, [6., 5., 4., 5., 6., 7., 6., 5.]);
        Ok(())
    }

    #[test]
    fn reflection_pad_gradient() -> Result<()> {
        check_grad(&[2, 2, 4, 5], |x| reflection_pad2d(x, 1))?;
        check_grad(&[1, 2, 5, 4], |x| reflection_pad2d(x, 3))
    }

    #[test]
    fn upsample_values_and_gradient() -> Result<()> {
        let x = Tensor::arange(0f32, 4., &Device::Cpu)?.reshape((1, 1, 2, 2))?;
        let y: Vec<f32> = upsample_nearest2x(&x)?.flatten_all()?.to_vec1()?;
        assert_eq!(
            y,
            [0., 0., 1., 1., 0., 0., 1., 1., 2., 2., 3., 3., 2., 2., 3., 3.]
        );
        check_grad(&[2, 3, 3, 2], upsample_nearest2x)
    }

    #[test]
    fn avg_pool_gradient() -> Result<()> {
        check_grad(&[1, 2, 4, 6], avg_pool2x)
    }

    #[test]
    fn instance_norm_matches_definition_and_gradient() -> Result<()> {
        let x = ramp(&[2, 3, 4, 5], 7)?;
        let y = instance_norm(&x)?;
        let mean = x.mean_keepdim(3)?.mean_keepdim(2)?;
        let var = x
            .broadcast_sub(&mean)?
            .sqr()?
            .mean_keepdim(3)?
            .mean_keepdim(2)?;
        let want = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + NORM_EPS)?.sqrt()?)?;
        let diff = (y - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "instance norm differs by {diff}");
        check_grad(&[2, 3, 3, 4], instance_norm)
    }

    #[test]
    fn instance_layer_norm_matches_definition_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c) = (2, 3);
        let x = ((ramp(&[n, c, 4, 5], 3)? * 2.0)? + 0.7)?;
        let rho = Tensor::new(&[0.2f64, 0.9, 0.5], &dev)?.reshape((1, c, 1, 1))?;
        let gamma = (ramp(&[n, c, 1, 1], 4)? + 1.0)?;
        let beta = ramp(&[n, c, 1, 1], 5)?;
        let y = instance_layer_norm(&x, &rho, &gamma, &beta)?;
        // The photo2cartoon formula, literally, with torch.var's unbiased variance.
        let unbiased = |x: &Tensor, dims: &[usize]| -> Result<(Tensor, Tensor)> {
            let mut m = x.clone();
            let mut count = 1;
            for &d in dims.iter().rev() {
                count *= x.dim(d)?;
                m = m.sum_keepdim(d)?;
            }
            let m = (m / count as f64)?;
            let mut v = x.broadcast_sub(&m)?.sqr()?;
            for &d in dims.iter().rev() {
                v = v.sum_keepdim(d)?;
            }
            Ok((m, (v / (count - 1) as f64)?))
        };
        let norm = |dims: &[usize]| -> Result<Tensor> {
            let (m, v) = unbiased(&x, dims)?;
            x.broadcast_sub(&m)?.broadcast_div(&(v + NORM_EPS)?.sqrt()?)
        };
        let mixed = (norm(&[2, 3])?.broadcast_mul(&rho)?
            + norm(&[1, 2, 3])?.broadcast_mul(&rho.affine(-1.0, 1.0)?)?)?;
        let want = mixed.broadcast_mul(&gamma)?.broadcast_add(&beta)?;
        let diff = (y - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "adaLIN differs by {diff}");
        check_grad(&[n, c, 3, 4], |x| {
            instance_layer_norm(x, &rho, &gamma, &beta)
        })
    }

    #[test]
    fn norm_affines_match_the_norms() -> Result<()> {
        // The fast path's x * scale + shift forms, in f32 from the CPU statistics.
        let dev = Device::Cpu;
        let (n, c) = (2, 3);
        let f32s = |t: Tensor| t.to_dtype(DType::F32);
        let x = f32s(((ramp(&[n, c, 6, 7], 3)? * 2.0)? + 0.7)?)?;
        let rho = f32s(Tensor::new(&[0.2f64, 0.9, 0.5], &dev)?.reshape((1, c, 1, 1))?)?;
        let gamma = f32s((ramp(&[n, c, 1, 1], 4)? + 1.0)?)?;
        let beta = f32s(ramp(&[n, c, 1, 1], 5)?)?;
        let apply = |(scale, shift): (Vec<f32>, Vec<f32>)| -> Result<Tensor> {
            let s = Tensor::from_vec(scale, (n, c, 1, 1), &dev)?;
            let t = Tensor::from_vec(shift, (n, c, 1, 1), &dev)?;
            x.broadcast_mul(&s)?.broadcast_add(&t)
        };
        let pairs = [
            (
                apply(instance_layer_norm_affine(&x, &rho, &gamma, &beta)?)?,
                instance_layer_norm(&x, &rho, &gamma, &beta)?,
            ),
            (apply(instance_norm_affine(&x)?)?, instance_norm(&x)?),
        ];
        for (got, want) in pairs {
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn spectral_norm_power_iteration() -> Result<()> {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let sn = SpectralNorm::new(&[4, 3, 2, 2], vb.pp("conv"))?;
        // Many training-mode passes converge to the largest singular value.
        for _ in 0..200 {
            sn.weight(true)?;
        }
        let w = sn.weight(false)?.reshape((4, 12))?;
        // sigma_max(w) == 1  <=>  the largest eigenvalue of w w^T is 1.
        let mut p = Tensor::ones((4, 1), DType::F64, &dev)?;
        let wwt = w.matmul(&w.t()?)?;
        for _ in 0..500 {
            p = normalize(&wwt.matmul(&p)?)?;
        }
        let lambda = p
            .t()?
            .matmul(&wwt)?
            .matmul(&p)?
            .flatten_all()?
            .to_vec1::<f64>()?[0];
        assert!((lambda - 1.0).abs() < 1e-9, "top eigenvalue {lambda}");
        // The updated u, v live in the VarMap.
        let data = vm.data().lock().unwrap();
        let u = to_f64_vec(data["conv.weight_u"].as_tensor())?;
        assert!((u.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(is_buffer("conv.weight_u") && !is_buffer("conv.weight_orig"));
        Ok(())
    }
}
