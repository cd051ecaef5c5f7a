//! Layers shared by the networks imported from TensorFlow Lite / TensorFlow.js graphs.
//!
//! Weights are converted to PyTorch layouts by `tools/import_models`: convolutions are
//! `(out, in / groups, kh, kw)`, depthwise convolutions `(channels, 1, kh, kw)`, dense
//! layers `(out, in)`. Activations are NCHW.

use std::sync::{Arc, OnceLock};

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::cpu_ops::{self, Act, InputTransform, PackedConv, PackedDepthwise};

/// TensorFlow's padding modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Output size `ceil(in / stride)`; the odd extra row/column goes to the bottom/right.
    Same,
    Valid,
}

/// Zero-pads the two spatial dims of an NCHW tensor the way TensorFlow's `SAME` does.
pub fn pad_same(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let total = |size: usize| -> usize {
        let out = size.div_ceil(stride);
        ((out - 1) * stride + kernel).saturating_sub(size)
    };
    let (ph, pw) = (total(h), total(w));
    let x = if ph > 0 {
        x.pad_with_zeros(2, ph / 2, ph - ph / 2)?
    } else {
        x.clone()
    };
    if pw > 0 {
        x.pad_with_zeros(3, pw / 2, pw - pw / 2)
    } else {
        Ok(x)
    }
}

/// A 2-D convolution with TensorFlow padding; `groups == in_channels == out_channels`
/// makes it depthwise.
///
/// On the CPU, for inference (no gradient tracked), regular and depthwise convolutions run
/// as [`cpu_ops`] kernels, their weights packed on first use.
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    kernel: usize,
    stride: usize,
    groups: usize,
    padding: Padding,
    fast: OnceLock<Option<Arc<FastConv>>>,
}

#[derive(Debug)]
enum FastConv {
    Dense(PackedConv),
    Depthwise(Arc<PackedDepthwise>),
}

/// `act` with candle ops (the path without [`cpu_ops`]).
fn activate(x: Tensor, act: Act) -> Result<Tensor> {
    match act {
        Act::None => Ok(x),
        Act::Relu => x.relu(),
        Act::HardSwish => hard_swish(&x),
    }
}

/// Shape and options of a [`Conv`].
#[derive(Debug, Clone, Copy)]
pub struct ConvConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
    pub bias: bool,
    pub padding: Padding,
}

impl ConvConfig {
    /// A regular convolution with bias and `SAME` padding.
    pub fn same(in_channels: usize, out_channels: usize, kernel: usize, stride: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel,
            stride,
            groups: 1,
            bias: true,
            padding: Padding::Same,
        }
    }

    /// A depthwise convolution with bias and `SAME` padding.
    pub fn depthwise(channels: usize, kernel: usize, stride: usize) -> Self {
        Self {
            groups: channels,
            ..Self::same(channels, channels, kernel, stride)
        }
    }

    pub fn without_bias(self) -> Self {
        Self {
            bias: false,
            ..self
        }
    }

    pub fn valid(self) -> Self {
        Self {
            padding: Padding::Valid,
            ..self
        }
    }
}

impl Conv {
    /// Loads `weight` and, if configured, `bias` under `vb`.
    pub fn new(cfg: ConvConfig, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(
            (
                cfg.out_channels,
                cfg.in_channels / cfg.groups,
                cfg.kernel,
                cfg.kernel,
            ),
            "weight",
        )?;
        let bias = if cfg.bias {
            Some(vb.get(cfg.out_channels, "bias")?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            kernel: cfg.kernel,
            stride: cfg.stride,
            groups: cfg.groups,
            padding: cfg.padding,
            fast: OnceLock::new(),
        })
    }

    fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.weight.dim(1).is_ok_and(|d| d == 1)
    }

    /// The packed CPU kernel, when the weights track no gradient and the shape is supported.
    fn fast(&self) -> Option<&FastConv> {
        self.fast
            .get_or_init(|| {
                let b = self.bias.as_ref();
                if cpu_ops::isa().is_none()
                    || !cpu_ops::eligible(&self.weight)
                    || !b.is_none_or(cpu_ops::eligible)
                {
                    return None;
                }
                let padding = match self.padding {
                    Padding::Same => cpu_ops::Padding::TfSame,
                    Padding::Valid => cpu_ops::Padding::Reflect(0),
                };
                let fast = if self.is_depthwise() {
                    PackedDepthwise::new(&self.weight, b, self.stride, padding)
                        .map(|p| FastConv::Depthwise(Arc::new(p)))
                } else if self.groups == 1 {
                    PackedConv::new(&self.weight, b, self.stride, padding).map(FastConv::Dense)
                } else {
                    return None;
                };
                fast.ok().map(Arc::new)
            })
            .as_deref()
    }

    /// `act(conv(x))`, fused on the CPU fast path.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        if cpu_ops::usable(&[x]) {
            match self.fast() {
                Some(FastConv::Dense(p)) => {
                    return cpu_ops::conv2d(x, p, &InputTransform::default(), None, act)
                }
                Some(FastConv::Depthwise(p)) => return cpu_ops::depthwise_conv2d(x, p, act, None),
                None => {}
            }
        }
        activate(self.forward_plain(x)?, act)
    }

    /// Depthwise only: `act(conv(x)) + residual`, fused on the CPU fast path.
    pub fn forward_act_add(&self, x: &Tensor, act: Act, residual: &Tensor) -> Result<Tensor> {
        if let (true, Some(FastConv::Depthwise(p))) = (cpu_ops::usable(&[x, residual]), self.fast())
        {
            return cpu_ops::depthwise_conv2d(x, p, act, Some(residual));
        }
        activate(self.forward_plain(x)?, act)? + residual
    }

    /// `conv(x * gate) + residual` for a per-(sample, channel) `gate` `(N, C, 1, 1)` (a
    /// squeeze-excite scaling), the gate fused into the convolution on the CPU fast path.
    pub fn forward_gated(
        &self,
        x: &Tensor,
        gate: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut tensors = vec![x];
        tensors.extend(gate);
        tensors.extend(residual);
        if let (true, Some(FastConv::Dense(p))) = (cpu_ops::usable(&tensors), self.fast()) {
            let affine = match gate {
                Some(g) => {
                    let scale: Vec<f32> = g.flatten_all()?.to_vec1()?;
                    let shift = vec![0.0; scale.len()];
                    Some((scale, shift))
                }
                None => None,
            };
            let input = InputTransform {
                affine,
                ..Default::default()
            };
            return cpu_ops::conv2d(x, p, &input, residual, Act::None);
        }
        let x = match gate {
            Some(g) => x.broadcast_mul(g)?,
            None => x.clone(),
        };
        let y = self.forward_plain(&x)?;
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }

    fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.padding {
            Padding::Same => pad_same(x, self.kernel, self.stride)?,
            Padding::Valid => x.clone(),
        };
        let y = if self.is_depthwise() {
            depthwise_conv(&x, &self.weight, self.stride)?
        } else {
            x.conv2d(&self.weight, 0, self.stride, 1, self.groups)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::None)
    }
}

/// A separable convolution `act(pointwise(depthwise(relu?(x))) + residual)`, in one pass on
/// the CPU fast path. `residual` may have fewer channels than the output (TensorFlow's
/// channel padding of shortcuts: the rest count as zeros).
pub fn separable(
    x: &Tensor,
    depthwise: &Conv,
    pointwise: &Conv,
    relu_in: bool,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    let mut tensors = vec![x];
    tensors.extend(residual);
    if let (true, Some(FastConv::Depthwise(dw)), Some(FastConv::Dense(pw))) = (
        cpu_ops::usable(&tensors),
        depthwise.fast(),
        pointwise.fast(),
    ) {
        let input = InputTransform {
            relu: relu_in,
            depthwise: Some(dw.clone()),
            ..Default::default()
        };
        return cpu_ops::conv2d(x, pw, &input, residual, act);
    }
    let x = if relu_in { x.relu()? } else { x.clone() };
    let y = pointwise.forward_plain(&depthwise.forward_plain(&x)?)?;
    let y = match residual {
        Some(r) => (y + pad_channels(r, pointwise.weight.dim(0)?)?)?,
        None => y,
    };
    activate(y, act)
}

/// Depthwise convolution without padding as a sum of shifted, scaled views.
///
/// candle runs a grouped convolution as one convolution per group, which is very slow
/// for depthwise layers; this form is a handful of large element-wise ops on any device
/// and is differentiable.
pub fn depthwise_conv(x: &Tensor, weight: &Tensor, stride: usize) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    let (oh, ow) = (h - kh + 1, w - kw + 1);
    let mut acc: Option<Tensor> = None;
    for i in 0..kh {
        for j in 0..kw {
            let tap = weight
                .narrow(2, i, 1)?
                .narrow(3, j, 1)?
                .reshape((1, c, 1, 1))?;
            let term = x.narrow(2, i, oh)?.narrow(3, j, ow)?.broadcast_mul(&tap)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
    }
    let full = acc.expect("kernel has at least one tap");
    if stride == 1 {
        return Ok(full);
    }
    subsample(&full, stride)
}

/// Keeps every `stride`-th row and column, starting at the first.
pub fn subsample(x: &Tensor, stride: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h.div_ceil(stride), w.div_ceil(stride));
    let x = x
        .pad_with_zeros(2, 0, oh * stride - h)?
        .pad_with_zeros(3, 0, ow * stride - w)?;
    x.reshape((n, c, oh, stride, ow, stride))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, oh, ow))
}

/// Zero-pads the channel dim (TensorFlow's channel padding used in residual shortcuts).
pub fn pad_channels(x: &Tensor, to: usize) -> Result<Tensor> {
    let c = x.dim(1)?;
    if to > c {
        x.pad_with_zeros(1, 0, to - c)
    } else {
        Ok(x.clone())
    }
}

/// `x * relu6(x + 3) / 6`.
pub fn hard_swish(x: &Tensor) -> Result<Tensor> {
    (x * ((x + 3.0)?.clamp(0f32, 6f32)? / 6.0)?)?.contiguous()
}

/// Per-channel PReLU with an NCHW-broadcast slope of shape `(channels,)`.
pub fn prelu(x: &Tensor, slope: &Tensor) -> Result<Tensor> {
    let slope = slope.reshape((1, (), 1, 1))?;
    let pos = x.relu()?;
    let neg = (x - &pos)?;
    pos + neg.broadcast_mul(&slope)?
}

/// Global average pool over H and W, keeping NCHW rank (`N x C x 1 x 1`).
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)
}

/// `(n_out, n_in)` matrix of TF1's legacy bilinear resize along one axis (`src = dst * in / out`, no half-pixel shift, clamped at the far edge).
fn legacy_bilinear_matrix(n_in: usize, n_out: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let mut m = vec![0f32; n_out * n_in];
    let scale = n_in as f64 / n_out as f64;
    for o in 0..n_out {
        let src = o as f64 * scale;
        let i0 = (src.floor() as usize).min(n_in - 1);
        let frac = (src - i0 as f64) as f32;
        m[o * n_in + i0] += 1.0 - frac;
        m[o * n_in + (i0 + 1).min(n_in - 1)] += frac;
    }
    Tensor::from_vec(m, (n_out, n_in), dev)
}

/// Resizes `(N, C, H, W)` to `(N, C, h, w)` with TF1's legacy bilinear resize, as two matmuls.
pub fn resize_bilinear_legacy(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (n, c, ih, iw) = x.dims4()?;
    if (ih, iw) == (h, w) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let rw = legacy_bilinear_matrix(iw, w, dev)?.to_dtype(x.dtype())?;
    let rh = legacy_bilinear_matrix(ih, h, dev)?.to_dtype(x.dtype())?;
    let x = x
        .contiguous()?
        .reshape((n * c * ih, iw))?
        .matmul(&rw.t()?)?;
    let x = x
        .reshape((n * c, ih, w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * c * w, ih))?
        .matmul(&rh.t()?)?;
    x.reshape((n * c, w, h))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn depthwise_matches_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (2, 4, 9, 8), &dev)?;
        let w = Tensor::randn(0f32, 1f32, (4, 1, 3, 3), &dev)?;
        for stride in [1, 2] {
            let ours = depthwise_conv(&x, &w, stride)?;
            let reference = x.conv2d(&w, 0, stride, 1, 4)?;
            assert_eq!(ours.dims(), reference.dims());
            let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "stride {stride}: max diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn same_padding_gives_ceil_output_size() -> Result<()> {
        let x = Tensor::zeros((1, 1, 7, 8), candle_core::DType::F32, &Device::Cpu)?;
        let padded = pad_same(&x, 3, 2)?;
        // out = ceil(7/2) = 4 needs 9 rows (pad 1+1); ceil(8/2) = 4 needs 9 cols (0+1).
        assert_eq!(padded.dims(), &[1, 1, 9, 9]);
        Ok(())
    }

    #[test]
    fn prelu_scales_only_negatives() -> Result<()> {
        let x = Tensor::new(&[[[[-2f32, 3.0]]], [[[1.0, -1.0]]]], &Device::Cpu)?;
        let slope = Tensor::new(&[0.5f32], &Device::Cpu)?;
        let y = prelu(&x, &slope)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![-1.0, 3.0, 1.0, -0.5]);
        Ok(())
    }
}
