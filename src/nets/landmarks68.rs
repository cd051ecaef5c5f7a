//! face-api's FaceLandmark68Net: 68 facial landmarks (iBUG 300-W order) from a face crop.
//!
//! Four dense blocks of depthwise-separable convolutions (112 -> 56 -> 28 -> 14 -> 7),
//! a 7x7 average pool and one dense layer to 136 values `(x0, y0, x1, y1, ...)`, each a
//! fraction of the side of the square the network saw. Weights come from npm
//! `@vladmandic/face-api@1.7.15` (`model/face_landmark_68_model.bin`, uint8-quantised);
//! see `tools/import/landmarks68.py`.

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::tf_layers::{separable, Conv, ConvConfig};
use crate::kernels::cpu_ops::Act;
use crate::kernels::tf_ops::resize_bilinear_legacy;

/// Side of the square network input.
pub const INPUT_SIZE: usize = 112;
/// Per-channel RGB mean subtracted from 0..255 pixels before dividing by [`PIXEL_SCALE`].
pub const MEAN_RGB: [f32; 3] = [122.782, 117.001, 104.298];
/// Divisor applied after subtracting [`MEAN_RGB`].
pub const PIXEL_SCALE: f32 = 255.0;
/// Number of landmarks the network predicts (iBUG 300-W's 68).
pub const NUM_LANDMARKS: usize = 68;

/// The network's shape: input channels, dense-block widths and landmark count.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Channels of the input image (3, RGB).
    pub in_channels: usize,
    /// Output channels of the four dense blocks.
    pub channels: [usize; 4],
    /// Number of landmarks; the final dense layer outputs two values per landmark.
    pub num_landmarks: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            in_channels: 3,
            channels: [32, 64, 128, 256],
            num_landmarks: NUM_LANDMARKS,
        }
    }
}

/// tfjs `separableConv2d` (3x3 depthwise, no bias) followed by a 1x1 conv with bias.
#[derive(Debug, Clone)]
struct SeparableConv {
    depthwise: Conv,
    pointwise: Conv,
}

impl SeparableConv {
    fn new(in_c: usize, out_c: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            depthwise: Conv::new(
                ConvConfig::depthwise(in_c, 3, stride).without_bias(),
                vb.pp("depthwise"),
            )?,
            pointwise: Conv::new(ConvConfig::same(in_c, out_c, 1, 1), vb.pp("pointwise"))?,
        })
    }
}

impl Module for SeparableConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.pointwise.forward(&self.depthwise.forward(x)?)
    }
}

#[derive(Debug, Clone)]
enum Entry {
    Conv(Conv),
    Separable(SeparableConv),
}

/// `out1 = relu(conv0(x))` (stride 2); each following conv reads `relu` of the sum of all
/// previous outputs; the block returns `relu(out1 + out2 + out3 + out4)`.
#[derive(Debug, Clone)]
struct DenseBlock {
    conv0: Entry,
    convs: Vec<SeparableConv>,
}

impl DenseBlock {
    fn new(in_c: usize, out_c: usize, first: bool, vb: VarBuilder) -> Result<Self> {
        let conv0 = if first {
            Entry::Conv(Conv::new(
                ConvConfig::same(in_c, out_c, 3, 2),
                vb.pp("conv0"),
            )?)
        } else {
            Entry::Separable(SeparableConv::new(in_c, out_c, 2, vb.pp("conv0"))?)
        };
        let convs = (1..4)
            .map(|i| SeparableConv::new(out_c, out_c, 1, vb.pp(format!("conv{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self { conv0, convs })
    }
}

impl Module for DenseBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut sum = match &self.conv0 {
            Entry::Conv(c) => c.forward_act(x, Act::Relu)?,
            Entry::Separable(c) => {
                separable(x, &c.depthwise, &c.pointwise, false, None, Act::Relu)?
            }
        };
        // sum += conv(relu(sum)), as one fused separable convolution with the sum as its
        // residual; the block's final ReLU is the last one's activation.
        for (i, conv) in self.convs.iter().enumerate() {
            let act = if i + 1 == self.convs.len() {
                Act::Relu
            } else {
                Act::None
            };
            sum = separable(
                &sum,
                &conv.depthwise,
                &conv.pointwise,
                true,
                Some(&sum),
                act,
            )?;
        }
        if self.convs.is_empty() {
            sum = sum.relu()?;
        }
        Ok(sum)
    }
}

/// face-api's FaceLandmark68Net: the 68 landmarks of a 112x112 face crop, used to align
/// detected faces.
#[derive(Debug, Clone)]
pub struct FaceLandmark68Net {
    blocks: Vec<DenseBlock>,
    fc: Linear,
}

impl FaceLandmark68Net {
    /// Builds the network from `vb` under the imported names (`dense{i}.conv{j}.*`, `fc.*`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let mut in_c = cfg.in_channels;
        let mut blocks = Vec::with_capacity(cfg.channels.len());
        for (i, &out_c) in cfg.channels.iter().enumerate() {
            blocks.push(DenseBlock::new(
                in_c,
                out_c,
                i == 0,
                vb.pp(format!("dense{i}")),
            )?);
            in_c = out_c;
        }
        let fc = candle_nn::linear(in_c, 2 * cfg.num_landmarks, vb.pp("fc"))?;
        Ok(Self { blocks, fc })
    }

    /// `(N, 3, 112, 112)` normalised RGB (see [`normalize`]) -> raw `(N, 2 * landmarks)`
    /// outputs `(x0, y0, x1, y1, ...)` as fractions of the input side; no activation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        if (h, w) != (INPUT_SIZE, INPUT_SIZE) {
            bail!("landmarks68 expects {INPUT_SIZE}x{INPUT_SIZE} input, got {h}x{w}");
        }
        let mut x = x.clone();
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        // 7x7 valid pool with stride 2 on the 7x7 map: one value per channel.
        let x = x.avg_pool2d_with_stride(7, 2)?.reshape((n, ()))?;
        self.fc.forward(&x)
    }
}

/// `(x - MEAN_RGB) / 255` on `(N, 3, H, W)` RGB in 0..255.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let mean = Tensor::new(&MEAN_RGB, x.device())?
        .to_dtype(x.dtype())?
        .reshape((1, 3, 1, 1))?;
    x.broadcast_sub(&mean)? / f64::from(PIXEL_SCALE)
}

/// face-api's `toBatchTensor`: zero-pads `(N, 3, H, W)` crops (0..255) to a centred square
/// (the odd extra row/column goes bottom/right) and resizes it to 112 with tfjs'
/// legacy bilinear sampling. Output is still 0..255.
pub fn pad_and_resize(crop: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = crop.dims4()?;
    let side = h.max(w);
    let x = crop
        .pad_with_zeros(2, (side - h) / 2, (side - h).div_ceil(2))?
        .pad_with_zeros(3, (side - w) / 2, (side - w).div_ceil(2))?;
    if side == INPUT_SIZE {
        Ok(x)
    } else {
        resize_bilinear_legacy(&x, INPUT_SIZE, INPUT_SIZE)
    }
}

/// [`pad_and_resize`] then [`normalize`]: crops of one size -> network input.
pub fn preprocess(crop: &Tensor) -> Result<Tensor> {
    normalize(&pad_and_resize(crop)?)
}

/// Maps raw `(N, 136)` outputs to `(N, 68, 2)` pixel positions `(x, y)` in each crop, given
/// the crops' `(width, height)` (one per batch row), as face-api's `detectLandmarks` does:
/// `x = out_x * S - (S - width) / 2` with `S = max(width, height)`, likewise for `y`.
/// A 112x112 input (no padding) gives plain `out * 112`.
pub fn decode(raw: &Tensor, crop_sizes: &[(usize, usize)]) -> Result<Tensor> {
    let (n, k) = raw.dims2()?;
    if crop_sizes.len() != n {
        bail!("{} crop sizes for a batch of {n}", crop_sizes.len());
    }
    let (mut scale, mut offset) = (Vec::with_capacity(n), Vec::with_capacity(2 * n));
    for &(w, h) in crop_sizes {
        let side = w.max(h) as f32;
        scale.push(side);
        offset.extend([(w as f32 - side) / 2.0, (h as f32 - side) / 2.0]);
    }
    let dev = raw.device();
    let scale = Tensor::from_vec(scale, (n, 1, 1), dev)?.to_dtype(raw.dtype())?;
    let offset = Tensor::from_vec(offset, (n, 1, 2), dev)?.to_dtype(raw.dtype())?;
    raw.reshape((n, k / 2, 2))?
        .broadcast_mul(&scale)?
        .broadcast_add(&offset)
}
