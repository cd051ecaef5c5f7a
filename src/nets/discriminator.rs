//! The photo2cartoon / U-GAT-IT discriminator (`Discriminator` in minivision-ai/photo2cartoon
//! `models/networks.py`), DESIGN.md §4: spectral-norm 4x4 convolutions with LeakyReLU 0.2, a
//! CAM head and a final 4x4 convolution to a patch map. photo2cartoon trains a global
//! ([`Config::global`], n_layers 7) and a local ([`Config::local`], n_layers 5) one per domain.
//!
//! Parameter names are the PyTorch `state_dict` keys: `model.{1,4,7,..}.weight_orig`,
//! `.weight_u`, `.weight_v`, `.bias`; `gap_fc.weight_orig` (+`_u`, `_v`), `gmp_fc.*`;
//! `conv1x1.weight`, `conv1x1.bias`; `conv.weight_orig` (+`_u`, `_v`). `weight_u`/`weight_v`
//! are buffers (see [`super::layers::is_buffer`]).
//!
//! Input `(N, 3, H, W)` in [-1, 1]. Outputs, as the original: the patch logits
//! `(N, 1, H/2^k - 2, ...)` for k = n_layers - 2 stride-2 layers (6x6 global, 30x30 local at
//! 256), the CAM logits `(N, 2)` and the CAM heatmap `(N, 1, H/2^k - 1, ...)`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Linear, VarBuilder};

use super::layers::{
    cam_features, conv2d, global_avg_pool, global_max_pool, leaky_relu, torch_default_init,
    SpectralNorm,
};
use crate::kernels::train_ops::{self, Pad};

const SLOPE: f64 = 0.2;

/// The discriminator's shape: input channels, base width and depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Channels of the input image (3, RGB).
    pub input_nc: usize,
    /// Output channels of the first convolution (32); each further convolution of `model`
    /// doubles them.
    pub ndf: usize,
    /// Number of 4x4 convolutions in `model` plus one; `n_layers - 2` of them have stride 2.
    pub n_layers: usize,
}

impl Config {
    /// photo2cartoon's global discriminator (`disGA`, `disGB`): ndf 32, n_layers 7.
    pub fn global() -> Self {
        Self {
            input_nc: 3,
            ndf: 32,
            n_layers: 7,
        }
    }

    /// photo2cartoon's local discriminator (`disLA`, `disLB`): ndf 32, n_layers 5.
    pub fn local() -> Self {
        Self {
            n_layers: 5,
            ..Self::global()
        }
    }

    /// The smallest square input size the network accepts (96 global, 24 local); inputs
    /// should be multiples of `2^(n_layers - 2)`.
    pub fn min_input_size(&self) -> usize {
        // The last stride-2 output must be >= 3 (stride-1 4x4 conv, then a reflection pad
        // and the final 4x4 conv need at least 2).
        3 << (self.n_layers - 2)
    }
}

/// `ReflectionPad2d(1)` + spectral-norm `Conv2d(k=4, padding=0)`.
#[derive(Debug, Clone)]
struct SnConv {
    sn: SpectralNorm,
    bias: Option<Tensor>,
    stride: usize,
}

impl SnConv {
    fn new(cin: usize, cout: usize, stride: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", torch_default_init(cin * 16))?)
        } else {
            None
        };
        Ok(Self {
            sn: SpectralNorm::new(&[cout, cin, 4, 4], vb)?,
            bias,
            stride,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = train_ops::conv2d(x, &self.sn.weight(train)?, Pad::Reflect(1), self.stride)?;
        match &self.bias {
            Some(b) => train_ops::add_channel_bias(&y, b),
            None => Ok(y),
        }
    }
}

/// A spectral-norm `Linear(c, 1, bias=False)` (the CAM classifiers).
#[derive(Debug, Clone)]
struct SnLinear(SpectralNorm);

impl SnLinear {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Linear::new(self.0.weight(train)?, None).forward(x)
    }
}

/// photo2cartoon's `Discriminator`: tells real images of a domain from generated ones, per
/// patch and through its CAM logits.
#[derive(Debug, Clone)]
pub struct Discriminator {
    cfg: Config,
    model: Vec<SnConv>,
    gap_fc: SnLinear,
    gmp_fc: SnLinear,
    conv1x1: Conv2d,
    conv: SnConv,
}

impl Discriminator {
    /// Builds the discriminator from `vb` under photo2cartoon's `state_dict` names
    /// (`model.{3i+1}.*`, `gap_fc.*`, `gmp_fc.*`, `conv1x1.*`, `conv.*`); fails when
    /// `n_layers` is under 3.
    pub fn new(cfg: Config, vb: VarBuilder) -> Result<Self> {
        if cfg.n_layers < 3 {
            candle_core::bail!("discriminator needs n_layers >= 3, got {}", cfg.n_layers)
        }
        // Widths: input_nc, ndf, 2 ndf, ..., ndf 2^(n_layers - 2); the last conv has stride 1.
        let mut chans = vec![cfg.input_nc];
        chans.extend((0..cfg.n_layers - 1).map(|i| cfg.ndf << i));
        let model = (0..cfg.n_layers - 1)
            .map(|i| {
                let stride = if i == cfg.n_layers - 2 { 1 } else { 2 };
                // Sequential(ReflectionPad2d, conv, LeakyReLU) per layer: conv at 3i + 1.
                let name = format!("model.{}", 3 * i + 1);
                SnConv::new(chans[i], chans[i + 1], stride, true, vb.pp(name))
            })
            .collect::<Result<_>>()?;
        let c = *chans.last().unwrap_or(&cfg.input_nc);
        Ok(Self {
            cfg,
            model,
            gap_fc: SnLinear(SpectralNorm::new(&[1, c], vb.pp("gap_fc"))?),
            gmp_fc: SnLinear(SpectralNorm::new(&[1, c], vb.pp("gmp_fc"))?),
            conv1x1: conv2d(2 * c, c, 1, 1, true, vb.pp("conv1x1"))?,
            conv: SnConv::new(c, 1, 1, false, vb.pp("conv"))?,
        })
    }

    /// The configuration the discriminator was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Eval-mode forward (PyTorch `model.eval()`): spectral norms use the stored `u`, `v`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        self.forward_t(x, false)
    }

    /// `(patch logits, cam_logit (N, 2), heatmap)`. With `train`, every spectral norm does
    /// one power iteration and updates its `u`, `v` in place, as PyTorch in training mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let mut x = x.clone();
        for layer in &self.model {
            x = leaky_relu(&layer.forward_t(&x, train)?, SLOPE)?;
        }
        let gap_logit = self.gap_fc.forward_t(&global_avg_pool(&x)?, train)?;
        let gmp_logit = self.gmp_fc.forward_t(&global_max_pool(&x)?, train)?;
        // As the original: the CAM weighting uses `list(gap_fc.parameters())[0]`, which under
        // spectral_norm is the unnormalised `weight_orig`.
        let (cam_logit, x) = cam_features(
            &x,
            &gap_logit,
            &gmp_logit,
            self.gap_fc.0.weight_orig(),
            self.gmp_fc.0.weight_orig(),
        )?;
        let x = leaky_relu(&train_ops::conv2d_layer(&self.conv1x1, &x, 0)?, SLOPE)?;
        let heatmap = x.sum_keepdim(1)?;
        let out = self.conv.forward_t(&x, train)?;
        Ok((out, cam_logit, heatmap))
    }
}
