//! Layers shared by the networks imported from TensorFlow Lite / TensorFlow.js graphs (the
//! operations they are built from are in [`crate::kernels::tf_ops`]).
//!
//! Weights are converted to PyTorch layouts by `tools/import_models`: convolutions are
//! `(out, in / groups, kh, kw)`, depthwise convolutions `(channels, 1, kh, kw)`, dense
//! layers `(out, in)`. Activations are NCHW.

use std::sync::{Arc, OnceLock};

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::cpu_ops::{self, Act, InputTransform, PackedConv, PackedDepthwise};
use crate::kernels::tf_ops::{depthwise_conv, hard_swish, pad_channels, pad_same};
use crate::kernels::train_ops::{self, frozen_depthwise_conv2d, same_padding, Pad};

/// TensorFlow's padding modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Output size `ceil(in / stride)`; the odd extra row/column goes to the bottom/right.
    Same,
    /// No padding: output size `ceil((in - kernel + 1) / stride)`.
    Valid,
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
    /// Channels of the input.
    pub in_channels: usize,
    /// Channels of the output.
    pub out_channels: usize,
    /// Side of the square kernel.
    pub kernel: usize,
    /// Stride in both directions.
    pub stride: usize,
    /// Channel groups: 1 for a regular convolution, the channel count for a depthwise one.
    pub groups: usize,
    /// Whether the layer has a `bias` weight.
    pub bias: bool,
    /// How the input is padded.
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

    /// The same convolution without a `bias` weight.
    pub fn without_bias(self) -> Self {
        Self {
            bias: false,
            ..self
        }
    }

    /// The same convolution with `VALID` padding (none).
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
        if train_ops::training_on_cpu(&[x]) && !self.weight.track_op() {
            return self.forward_training(x);
        }
        self.forward_candle(x)
    }

    /// The convolution with candle's ops.
    fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
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

impl Conv {
    /// [`Self::forward_plain`] where `x` tracks gradients (a frozen network inside a loss):
    /// the training ops' convolutions, whose backward is many times faster than candle's
    /// (and than `depthwise_conv`'s shifted views).
    fn forward_training(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let [top, bottom, left, right] = match self.padding {
            Padding::Same => {
                let [top, bottom] = same_padding(h, self.kernel, self.stride);
                let [left, right] = same_padding(w, self.kernel, self.stride);
                [top, bottom, left, right]
            }
            Padding::Valid => [0; 4],
        };
        if self.is_depthwise() {
            let bias = match &self.bias {
                Some(b) => b.clone(),
                None => Tensor::zeros(c, x.dtype(), x.device())?,
            };
            return frozen_depthwise_conv2d(
                x,
                &self.weight,
                &bias,
                self.stride,
                [top, bottom, left, right],
            );
        }
        if self.groups != 1 {
            return self.forward_candle(x);
        }
        let padded = x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        let y = train_ops::conv2d(&padded, &self.weight, Pad::Zeros(0), self.stride)?;
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Var};

    use super::*;

    #[test]
    fn convolutions_on_tracked_inputs_match_candles_forward_and_back() -> Result<()> {
        let dev = Device::Cpu;
        let configs = [
            ConvConfig::same(3, 8, 3, 2),
            ConvConfig::same(8, 6, 1, 1).without_bias(),
            ConvConfig::depthwise(6, 3, 1),
            ConvConfig::depthwise(6, 3, 2),
            ConvConfig::depthwise(6, 7, 1).valid(),
        ];
        for cfg in configs {
            let shape = (
                cfg.out_channels,
                cfg.in_channels / cfg.groups,
                cfg.kernel,
                cfg.kernel,
            );
            let mut tensors = HashMap::new();
            tensors.insert(
                "weight".to_string(),
                Tensor::randn(0f32, 1f32, shape, &dev)?,
            );
            tensors.insert(
                "bias".to_string(),
                Tensor::randn(0f32, 1f32, cfg.out_channels, &dev)?,
            );
            let conv = Conv::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, &dev))?;
            let x = Var::randn(0f32, 1f32, (2, cfg.in_channels, 11, 9), &dev)?;
            let out_shape = conv.forward_candle(x.as_tensor())?.shape().clone();
            let r = Tensor::randn(0f32, 1f32, out_shape, &dev)?;
            let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<[Tensor; 2]> {
                let y = f(x.as_tensor())?;
                let grads = (&y * &r)?.sum_all()?.backward()?;
                Ok([y, grads.get(&x).expect("input gradient").clone()])
            };
            let ours = run(&|x| conv.forward_training(x))?;
            let candle = run(&|x| conv.forward_candle(x))?;
            for (what, (a, b)) in ["output", "input grad"]
                .iter()
                .zip(ours.iter().zip(&candle))
            {
                assert_eq!(a.dims(), b.dims(), "{what} of {cfg:?}");
                let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-4, "{what} of {cfg:?}: {diff}");
            }
        }
        Ok(())
    }
}
