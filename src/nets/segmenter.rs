//! MediaPipe Selfie Segmentation (general model), imported from `selfie_segmentation.tflite` in
//! npm `@mediapipe/selfie_segmentation@0.1.1675465747`.
//!
//! A MobileNetV3-style encoder, an LR-ASPP-like head at 1/16 resolution and a U-Net decoder
//! that fuses the encoder features at 1/8, 1/4 and 1/2 with squeeze-excite gates, ending in a
//! 2x2 stride-2 transposed convolution (MediaPipe's `Convolution2DTransposeBias`).
//!
//! Input: `(N, 3, 256, 256)` RGB in [0, 1] (see [`normalize`]); MediaPipe stretches the whole
//! frame to 256x256 without keeping the aspect ratio. Output of [`SelfieSegmenter::forward`]:
//! `(N, 1, 256, 256)` person probability in [0, 1] (sigmoid applied), same frame as the input.

use candle_core::{Module, Result, Tensor};
use candle_nn::ops::sigmoid;
use candle_nn::VarBuilder;

use super::tf_layers::{Conv, ConvConfig};
use crate::kernels::cpu_ops::Act;
use crate::kernels::tf_ops::global_avg_pool;

/// Input height and width.
pub const INPUT_SIZE: usize = 256;
/// Network input = RGB (0..255) * `INPUT_SCALE`, i.e. [0, 1], as MediaPipe's
/// `ImageToTensorCalculator` (`output_tensor_float_range { min: 0 max: 1 }`) feeds it.
pub const INPUT_SCALE: f64 = 1.0 / 255.0;

/// Maps 0..255 RGB (any shape, any float dtype) to the network's [0, 1] input.
pub fn normalize(rgb_0_255: &Tensor) -> Result<Tensor> {
    rgb_0_255.affine(INPUT_SCALE, 0.0)
}

/// The activation of a block's expand and depthwise convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// ReLU, in the shipped model's first three blocks.
    Relu,
    /// Hard swish, `x * relu6(x + 3) / 6`, in its later blocks.
    HardSwish,
}

impl Activation {
    /// As the fused ops' activation.
    fn act(self) -> Act {
        match self {
            Self::Relu => Act::Relu,
            Self::HardSwish => Act::HardSwish,
        }
    }
}

/// One inverted-residual block: 1x1 expand, depthwise, optional squeeze-excite, 1x1 project.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    /// Channels after the 1x1 expand convolution: the width of the depthwise convolution.
    pub expanded_channels: usize,
    /// Channels out of the 1x1 project convolution.
    pub out_channels: usize,
    /// Side of the depthwise convolution's kernel (3 or 5).
    pub kernel: usize,
    /// Stride of the depthwise convolution (1 or 2); a stride-2 block's input is also a skip
    /// connection of the decoder.
    pub stride: usize,
    /// Activation after the expand and depthwise convolutions.
    pub activation: Activation,
    /// Bottleneck width of the squeeze-excite gate, if the block has one.
    pub squeeze_channels: Option<usize>,
}

/// The segmenter's shape: input and stem widths, encoder blocks, head width and output layer.
#[derive(Debug, Clone)]
pub struct Config {
    /// Channels of the input image (3, RGB).
    pub in_channels: usize,
    /// 3x3 stride-2 stem, hard-swish.
    pub stem_channels: usize,
    /// The encoder's inverted-residual blocks, in order.
    pub blocks: Vec<BlockConfig>,
    /// Channels of the head's gated features at 1/16 resolution, where the decoder starts
    /// (128).
    pub head_channels: usize,
    /// Transposed-convolution kernel and stride of the output layer.
    pub output_kernel: usize,
    /// Stride of the output transposed convolution (2: from 1/2 to full resolution).
    pub output_stride: usize,
}

impl Default for Config {
    fn default() -> Self {
        use Activation::{HardSwish, Relu};
        let block =
            |expanded_channels, out_channels, kernel, stride, activation, squeeze| BlockConfig {
                expanded_channels,
                out_channels,
                kernel,
                stride,
                activation,
                squeeze_channels: squeeze,
            };
        Self {
            in_channels: 3,
            stem_channels: 16,
            blocks: vec![
                block(16, 16, 3, 2, Relu, Some(8)),
                block(72, 24, 3, 2, Relu, None),
                block(88, 24, 3, 1, Relu, None),
                block(96, 32, 5, 2, HardSwish, Some(24)),
                block(128, 32, 5, 1, HardSwish, Some(32)),
                block(128, 32, 5, 1, HardSwish, Some(32)),
                block(96, 32, 5, 1, HardSwish, Some(24)),
                block(96, 32, 5, 1, HardSwish, Some(24)),
            ],
            head_channels: 128,
            output_kernel: 2,
            output_stride: 2,
        }
    }
}

/// Hands out the Keras auto-generated layer names (`conv2d`, `conv2d_1`, ...) in graph order,
/// which are the weight names in the safetensors file.
#[derive(Default)]
struct LayerNames {
    conv: usize,
    depthwise: usize,
}

impl LayerNames {
    fn numbered(base: &str, index: usize) -> String {
        if index == 0 {
            base.to_string()
        } else {
            format!("{base}_{index}")
        }
    }

    fn conv(&mut self) -> String {
        self.conv += 1;
        Self::numbered("conv2d", self.conv - 1)
    }

    fn depthwise(&mut self) -> String {
        self.depthwise += 1;
        Self::numbered("depthwise_conv2d", self.depthwise - 1)
    }
}

fn conv1x1(cin: usize, cout: usize, names: &mut LayerNames, vb: &VarBuilder) -> Result<Conv> {
    Conv::new(ConvConfig::same(cin, cout, 1, 1), vb.pp(names.conv()))
}

/// `sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2)` as an `(N, C, 1, 1)` channel gate.
#[derive(Debug, Clone)]
struct ChannelGate {
    reduce: Conv,
    expand: Conv,
}

impl ChannelGate {
    fn new(
        channels: usize,
        squeeze: usize,
        names: &mut LayerNames,
        vb: &VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            reduce: conv1x1(channels, squeeze, names, vb)?,
            expand: conv1x1(squeeze, channels, names, vb)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.reduce.forward(&global_avg_pool(x)?)?.relu()?;
        sigmoid(&self.expand.forward(&s)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    expand: Conv,
    depthwise: Conv,
    excite: Option<ChannelGate>,
    project: Conv,
    activation: Activation,
    stride: usize,
    residual: bool,
}

impl Block {
    fn new(cin: usize, cfg: &BlockConfig, names: &mut LayerNames, vb: &VarBuilder) -> Result<Self> {
        let e = cfg.expanded_channels;
        let expand = conv1x1(cin, e, names, vb)?;
        let dw_cfg = ConvConfig::depthwise(e, cfg.kernel, cfg.stride);
        let depthwise = Conv::new(dw_cfg, vb.pp(names.depthwise()))?;
        let excite = match cfg.squeeze_channels {
            Some(s) => Some(ChannelGate::new(e, s, names, vb)?),
            None => None,
        };
        Ok(Self {
            expand,
            depthwise,
            excite,
            project: conv1x1(e, cfg.out_channels, names, vb)?,
            activation: cfg.activation,
            stride: cfg.stride,
            residual: cfg.stride == 1 && cin == cfg.out_channels,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let act = self.activation.act();
        let h = self.expand.forward_act(x, act)?;
        let h = self.depthwise.forward_act(&h, act)?;
        let gate = match &self.excite {
            Some(gate) => Some(gate.forward(&h)?),
            None => None,
        };
        let residual = self.residual.then_some(x);
        self.project.forward_gated(&h, gate.as_ref(), residual)
    }
}

/// `relu(conv(x)) * sigmoid(conv(mean_hw(x)))` on the 1/16 features.
#[derive(Debug, Clone)]
struct Head {
    features: Conv,
    gate: Conv,
}

impl Module for Head {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = sigmoid(&self.gate.forward(&global_avg_pool(x)?)?)?;
        self.features
            .forward_act(x, Act::Relu)?
            .broadcast_mul(&gate)
    }
}

/// Upsamples the coarser features 2x, gates the skip connection with them and refines.
#[derive(Debug, Clone)]
struct DecoderStage {
    project: Conv,
    gate: ChannelGate,
    conv: Conv,
    depthwise: Conv,
}

impl DecoderStage {
    fn new(cin: usize, c: usize, names: &mut LayerNames, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            project: conv1x1(cin, c, names, vb)?,
            gate: ChannelGate::new(c, c, names, vb)?,
            conv: conv1x1(c, c, names, vb)?,
            depthwise: Conv::new(ConvConfig::depthwise(c, 3, 1), vb.pp(names.depthwise()))?,
        })
    }

    fn forward(&self, x: &Tensor, skip: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = skip.dims4()?;
        // TF half-pixel-centre resize == candle's align_corners = false. The 1x1
        // projection commutes with the resize (its weights sum to 1 per output pixel), so
        // it runs on the 4x fewer coarse pixels.
        let up = self.project.forward(x)?.upsample_bilinear2d(h, w, false)?;
        let gate = self.gate.forward(&(skip + &up)?)?;
        let fused = (skip.broadcast_mul(&gate)? + up)?;
        let f = self.conv.forward_act(&fused, Act::Relu)?;
        self.depthwise.forward_act_add(&f, Act::Relu, &f)
    }
}

/// The selfie segmentation network.
#[derive(Debug, Clone)]
pub struct SelfieSegmenter {
    stem: Conv,
    blocks: Vec<Block>,
    head: Head,
    decoder: Vec<DecoderStage>,
    output_weight: Tensor,
    output_bias: Tensor,
    output_stride: usize,
}

impl SelfieSegmenter {
    /// Builds the network from `vb` under the Keras layer names (`conv2d`, `conv2d_1`, ...,
    /// `depthwise_conv2d_*`, and `segment` for the output layer).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let mut names = LayerNames::default();
        let stem_cfg = ConvConfig::same(cfg.in_channels, cfg.stem_channels, 3, 2);
        let stem = Conv::new(stem_cfg, vb.pp(names.conv()))?;
        let mut blocks = Vec::with_capacity(cfg.blocks.len());
        // Channels of the features entering each stride-2 block: the decoder's skips.
        let mut skip_channels = Vec::new();
        let mut c = cfg.stem_channels;
        for block in &cfg.blocks {
            if block.stride > 1 {
                skip_channels.push(c);
            }
            blocks.push(Block::new(c, block, &mut names, &vb)?);
            c = block.out_channels;
        }
        let head = Head {
            features: conv1x1(c, cfg.head_channels, &mut names, &vb)?,
            gate: conv1x1(c, cfg.head_channels, &mut names, &vb)?,
        };
        let mut c = cfg.head_channels;
        let mut decoder = Vec::with_capacity(skip_channels.len());
        for &skip in skip_channels.iter().rev() {
            decoder.push(DecoderStage::new(c, skip, &mut names, &vb)?);
            c = skip;
        }
        let vb_out = vb.pp("segment");
        let k = cfg.output_kernel;
        Ok(Self {
            stem,
            blocks,
            head,
            decoder,
            output_weight: vb_out.get((c, 1, k, k), "weight")?,
            output_bias: vb_out.get(1, "bias")?,
            output_stride: cfg.output_stride,
        })
    }

    /// Mask logits `(N, 1, H, W)` (before the sigmoid; they reach several hundred).
    pub fn forward_logits(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.stem.forward_act(x, Act::HardSwish)?;
        let mut skips = Vec::with_capacity(self.decoder.len());
        for block in &self.blocks {
            if block.stride > 1 {
                skips.push(x.clone());
            }
            x = block.forward(&x)?;
        }
        let mut x = self.head.forward(&x)?;
        for (stage, skip) in self.decoder.iter().zip(skips.iter().rev()) {
            x = stage.forward(&x, skip)?;
        }
        conv_transpose_same(&x, &self.output_weight, self.output_stride)?
            .broadcast_add(&self.output_bias.reshape((1, (), 1, 1))?)
    }

    /// Person probability `(N, 1, H, W)` in [0, 1], at the input resolution.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        sigmoid(&self.forward_logits(x)?)
    }
}

// Transposed convolution as MediaPipe crops it

/// Transposed convolution (no bias) with the output size and cropping of MediaPipe's
/// `Convolution2DTransposeBias` with `SAME` padding; `weight` is `(in, out, kh, kw)`.
///
/// The full `(size - 1) * stride + k` output loses `max(0, k - 1 - (size - 1) % stride)` rows
/// (columns), the smaller half at the top (left). With `size % stride == 0` and `k >= stride`
/// this is TF's `SAME` (`size * stride` outputs).
pub fn conv_transpose_same(x: &Tensor, weight: &Tensor, stride: usize) -> Result<Tensor> {
    let (n, cin, h, w) = x.dims4()?;
    let (_, cout, kh, kw) = weight.dims4()?;
    if kh == stride && kw == stride {
        // No overlap and no cropping: each input pixel's channels times the kernel give
        // its own k x k output patch; one matrix product instead of candle's per-pixel
        // dot products.
        let patches = x
            .reshape((n, cin, h * w))?
            .transpose(1, 2)?
            .contiguous()?
            .matmul(&weight.reshape((cin, cout * kh * kw))?.broadcast_left(n)?)?;
        return patches
            .reshape((n, h, w, cout, kh, kw))?
            .permute((0, 3, 1, 4, 2, 5))?
            .contiguous()?
            .reshape((n, cout, h * kh, w * kw));
    }
    let full = x.conv_transpose2d(weight, 0, 0, stride, 1)?;
    let crop = |t: Tensor, dim: usize, size: usize, k: usize| -> Result<Tensor> {
        let pad = k.saturating_sub((size - 1) % stride + 1);
        if pad == 0 {
            return Ok(t);
        }
        let len = t.dim(dim)? - pad;
        t.narrow(dim, pad / 2, len)
    };
    let full = crop(full, 2, h, kh)?;
    crop(full, 3, w, kw)
}
