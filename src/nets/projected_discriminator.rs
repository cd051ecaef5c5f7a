//! The projected discriminator (Sauer et al. 2021, "Projected GANs Converge Faster",
//! autonomousvision/projected-gan `pg_modules/`), with cross-channel mixing only: the
//! frozen [`Backbone`]'s four features, each mixed by a fixed random 1x1 convolution
//! (`scratch.layer{i}_ccm`, PyTorch's default init, never trained) to 64, 128, 256 and 512
//! channels, then one small trainable head per feature: spectral-norm 4x4 stride-2
//! convolutions with LeakyReLU 0.2 down to 8x8 (or the feature's own size when smaller),
//! then a spectral-norm 4x4 convolution to a patch map of logits.
//!
//! Unlike Projected GAN the heads have no batch norm (batches here are 4-8 images), and
//! the image is not resized to 224 first: the features stay at the training size.
//!
//! Parameter names: `scratch.layer{i}_ccm.{weight,bias}` (fixed), and
//! `heads.{i}.down.{j}.{weight_orig,weight_u,weight_v,bias}`, `heads.{i}.out.*`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::backbone::Backbone;
use super::layers::{leaky_relu, torch_default_init, SpectralNorm};
use crate::kernels::train_ops::{self, Pad};

const SLOPE: f64 = 0.2;

/// The discriminator's shape: the backbone's feature widths, their mixed widths and the
/// heads' output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Channels of the backbone's four features.
    pub feature_channels: [usize; 4],
    /// Channels after the random mixing (Projected GAN's `expand`: 64, 128, 256, 512).
    pub mixed_channels: [usize; 4],
    /// Heads downsample until their map is at most this size.
    pub head_size: usize,
}

impl Config {
    /// The fast recipe's discriminator on EfficientNet-Lite0's four features (24, 40, 112 and
    /// 320 channels), mixed to 64-512 channels, heads down to 8x8.
    pub fn lite0() -> Self {
        Self {
            feature_channels: [24, 40, 112, 320],
            mixed_channels: [64, 128, 256, 512],
            head_size: 8,
        }
    }
}

/// A spectral-norm convolution, zero padded.
#[derive(Debug, Clone)]
struct SnConv {
    sn: SpectralNorm,
    bias: Option<Tensor>,
    stride: usize,
    pad: usize,
}

impl SnConv {
    fn new(
        cin: usize,
        cout: usize,
        (stride, pad): (usize, usize),
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", torch_default_init(cin * 16))?)
        } else {
            None
        };
        Ok(Self {
            sn: SpectralNorm::new(&[cout, cin, 4, 4], vb)?,
            bias,
            stride,
            pad,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = train_ops::conv2d(
            x,
            &self.sn.weight(train)?,
            Pad::Zeros(self.pad),
            self.stride,
        )?;
        match &self.bias {
            Some(b) => train_ops::add_channel_bias(&y, b),
            None => Ok(y),
        }
    }
}

/// The fixed random channel mixing of one feature.
#[derive(Debug, Clone)]
struct Mixing {
    weight: Tensor,
    bias: Tensor,
}

impl Mixing {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let init = torch_default_init(cin);
        Ok(Self {
            weight: vb
                .get_with_hints((cout, cin, 1, 1), "weight", init)?
                .detach(),
            bias: vb.get_with_hints(cout, "bias", init)?.detach(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = train_ops::conv2d(x, &self.weight, Pad::Zeros(0), 1)?;
        train_ops::add_channel_bias(&y, &self.bias)
    }
}

/// One feature's head: built for every input size, its depth set by the map's size.
#[derive(Debug, Clone)]
struct Head {
    /// Enough stride-2 layers for the largest feature map (64 at [`MAX_SIZE`]).
    down: Vec<SnConv>,
    out: SnConv,
}

impl Head {
    fn forward_t(&self, x: &Tensor, head_size: usize, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        let mut layers = self.down.iter();
        while x.dim(2)? > head_size {
            let Some(layer) = layers.next() else {
                candle_core::bail!(
                    "projected discriminator: feature map {:?} too large",
                    x.dims()
                )
            };
            x = leaky_relu(&layer.forward_t(&x, train)?, SLOPE)?;
        }
        self.out.forward_t(&x, train)
    }
}

/// Stride-2 layers per head: enough for features of [`MAX_SIZE`] images. A layer more on
/// each head would make images of twice the size possible, at 5.6 M parameters more.
const MAX_DOWN: [usize; 4] = [3, 2, 1, 0];

/// The largest image side the heads take.
pub const MAX_SIZE: usize = 256;

/// The smallest image side the heads take: the backbone's deepest features (stride 32) must
/// cover the heads' 4x4 output kernel.
pub const MIN_SIZE: usize = 128;

/// Checks that the heads take images of side `size`: multiples of 32 from [`MIN_SIZE`] to
/// [`MAX_SIZE`].
pub fn check_size(size: usize) -> Result<()> {
    if !(size.is_multiple_of(32) && (MIN_SIZE..=MAX_SIZE).contains(&size)) {
        candle_core::bail!(
            "the projected discriminator takes image sides that are multiples of 32 from \
             {MIN_SIZE} to {MAX_SIZE}, not {size}"
        )
    }
    Ok(())
}

/// The fast recipe's discriminator: the fixed random mixings and the trainable heads on top
/// of a frozen [`Backbone`] (passed to each forward).
#[derive(Debug, Clone)]
pub struct ProjectedDiscriminator {
    cfg: Config,
    mixing: Vec<Mixing>,
    heads: Vec<Head>,
}

impl ProjectedDiscriminator {
    /// Builds the mixings (`scratch.layer{i}_ccm.*`) and heads (`heads.{i}.down.{j}.*`,
    /// `heads.{i}.out.*`) from `vb`, each head with enough stride-2 layers for [`MAX_SIZE`]
    /// images.
    pub fn new(cfg: Config, vb: VarBuilder) -> Result<Self> {
        let mut mixing = Vec::new();
        let mut heads = Vec::new();
        for (i, depth) in MAX_DOWN.into_iter().enumerate() {
            let c = cfg.mixed_channels[i];
            mixing.push(Mixing::new(
                cfg.feature_channels[i],
                c,
                vb.pp(format!("scratch.layer{i}_ccm")),
            )?);
            let vh = vb.pp(format!("heads.{i}"));
            let down = (0..depth)
                .map(|j| SnConv::new(c, c, (2, 1), true, vh.pp(format!("down.{j}"))))
                .collect::<Result<_>>()?;
            heads.push(Head {
                down,
                out: SnConv::new(c, 1, (1, 0), false, vh.pp("out"))?,
            });
        }
        Ok(Self { cfg, mixing, heads })
    }

    /// Whether `name` (without the network prefix) is one of the fixed random mixings.
    pub fn is_fixed(name: &str) -> bool {
        name.starts_with("scratch.")
    }

    /// The logits of every head, flattened and concatenated: `(N, L)`. With `train`, every
    /// spectral norm does one power iteration. `x` in [-1, 1], sides that pass [`check_size`].
    pub fn forward_t(&self, backbone: &Backbone, x: &Tensor, train: bool) -> Result<Tensor> {
        let features = backbone.features(x)?;
        let n = x.dim(0)?;
        let logits = features
            .iter()
            .zip(self.mixing.iter().zip(&self.heads))
            .map(|(f, (mix, head))| {
                head.forward_t(&mix.forward(f)?, self.cfg.head_size, train)?
                    .reshape((n, ()))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&logits, 1)
    }
}
