//! The photo2cartoon generator (`ResnetGenerator` in minivision-ai/photo2cartoon
//! `models/networks.py`; U-GAT-IT with hourglass branches and Soft-AdaLIN), DESIGN.md §4.
//!
//! Parameter names are exactly the PyTorch `state_dict` keys (`ConvBlock1.1.weight`,
//! `HourGlass1.HG.0.ConvBlock1_1.ConvBlock1.3.weight`, `DecodeBlock1.norm1.c_gamma.0.weight`,
//! `UpBlock1.2.weight`, `UpBlock1.3.rho`, `FC.0.weight`, `gap_fc.weight`, ...), so one network
//! of a photo2cartoon checkpoint loads with
//! `VarBuilder::from_pth_with_state(path, DType::F32, "genA2B", &device)`, and our own
//! safetensors use the same names.
//!
//! Input: `(N, 3, H, W)` RGB in [-1, 1] (`(x / 255 - 0.5) / 0.5`), H and W multiples of 16 and
//! at least 32 (256 for the shipped model; and exactly `img_size` when `light` is false).
//! [`Generator::forward`] returns, as the original, `(image, cam_logit, heatmap)`: the image
//! `(N, 3, H, W)` in [-1, 1] (tanh), the CAM logits `(N, 2)` (GAP and GMP branches, before any
//! sigmoid) and the CAM heatmap `(N, 1, H / 4, W / 4)` (channel sum, not normalised).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Init, Linear, VarBuilder, VarMap};

use super::layers::{
    avg_pool2x, cam_features, conv2d, global_avg_pool, global_max_pool, instance_layer_norm,
    instance_norm, linear, reflection_pad2d, upsample_nearest2x, ReflConv2d,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Base width (photo2cartoon `--ch`, 32).
    pub ngf: usize,
    /// Training image size; only used by the full (non-light) style MLP.
    pub img_size: usize,
    /// Light U-GAT-IT: the style MLP starts from globally pooled CAM features.
    pub light: bool,
    /// Encoder / decoder residual blocks each (4).
    pub n_blocks: usize,
}

impl Default for Config {
    /// photo2cartoon as trained: ngf 32, 256x256, light.
    fn default() -> Self {
        Self {
            ngf: 32,
            img_size: 256,
            light: true,
            n_blocks: 4,
        }
    }
}

/// Names ending like this are the adaLIN/LIN `rho` and Soft-AdaLIN `w_gamma`/`w_beta`,
/// which photo2cartoon clips to [0, 1] after every generator step.
const CLIPPED_SUFFIXES: [&str; 3] = [".rho", ".w_gamma", ".w_beta"];

/// Clamps every `rho`, `w_gamma`, `w_beta` variable of `vars` to [0, 1] (photo2cartoon's
/// `RhoClipper` / `WClipper`, applied after each optimiser step).
pub fn clip_rho_w(vars: &VarMap) -> Result<()> {
    for (name, var) in vars.data().lock().unwrap().iter() {
        if CLIPPED_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            var.set(&var.as_tensor().clamp(0f32, 1f32)?)?;
        }
    }
    Ok(())
}

/// `nn.Sequential(ReflectionPad2d, Conv2d(no bias), InstanceNorm2d, ReLU)` with the conv at
/// index 1 (`ConvBlock1`, `DownBlock1/2`).
#[derive(Debug, Clone)]
struct ConvInRelu(ReflConv2d);

impl ConvInRelu {
    fn new(cin: usize, cout: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self(ReflConv2d::new(
            k / 2,
            conv2d(cin, cout, k, stride, false, vb.pp("1"))?,
        )))
    }
}

impl Module for ConvInRelu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        instance_norm(&self.0.forward(x)?)?.relu()
    }
}

/// photo2cartoon `ConvBlock`: three pre-activation `IN -> ReLU -> ReflPad 1 -> Conv3x3`
/// branches (widths out/2, out/4, out/4, conv at Sequential index 3), concatenated, plus the
/// input (or `ConvBlock4` = `IN -> ReLU -> Conv1x1` of it when the widths differ).
#[derive(Debug, Clone)]
struct ConvBlock {
    branches: [Conv2d; 3],
    /// `ConvBlock4.2`: exists in every state_dict, used only when `cin != cout`.
    project: Conv2d,
    cout: usize,
}

impl ConvBlock {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let branches = [
            conv2d(cin, cout / 2, 3, 1, false, vb.pp("ConvBlock1.3"))?,
            conv2d(cout / 2, cout / 4, 3, 1, false, vb.pp("ConvBlock2.3"))?,
            conv2d(cout / 4, cout / 4, 3, 1, false, vb.pp("ConvBlock3.3"))?,
        ];
        let project = conv2d(cin, cout, 1, 1, false, vb.pp("ConvBlock4.2"))?;
        Ok(Self {
            branches,
            project,
            cout,
        })
    }
}

impl Module for ConvBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let pre = instance_norm(x)?.relu()?;
        let mut outs = Vec::with_capacity(3);
        let mut h = reflection_pad2d(&pre, 1)?;
        for (i, conv) in self.branches.iter().enumerate() {
            let y = conv.forward(&h)?;
            if i < 2 {
                h = reflection_pad2d(&instance_norm(&y)?.relu()?, 1)?;
            }
            outs.push(y);
        }
        let out = Tensor::cat(&outs, 1)?;
        if x.dim(1)? == self.cout {
            x + out
        } else {
            self.project.forward(&pre)? + out
        }
    }
}

/// Names of the 13 `ConvBlock`s of an `HourGlassBlock`: the `_1` of each level is its skip
/// branch, the `_2` its pooled branch, 5 the centre, 6..9 the way up.
const HOURGLASS_BLOCKS: [&str; 13] = [
    "ConvBlock1_1",
    "ConvBlock1_2",
    "ConvBlock2_1",
    "ConvBlock2_2",
    "ConvBlock3_1",
    "ConvBlock3_2",
    "ConvBlock4_1",
    "ConvBlock4_2",
    "ConvBlock5",
    "ConvBlock6",
    "ConvBlock7",
    "ConvBlock8",
    "ConvBlock9",
];

/// Four-level hourglass: average-pool down to 1/16, nearest-upsample back, skip adds.
#[derive(Debug, Clone)]
struct HourGlassBlock {
    blocks: Vec<ConvBlock>,
}

impl HourGlassBlock {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let blocks = HOURGLASS_BLOCKS
            .iter()
            .enumerate()
            .map(|(i, name)| ConvBlock::new(if i == 0 { cin } else { cout }, cout, vb.pp(name)))
            .collect::<Result<_>>()?;
        Ok(Self { blocks })
    }
}

impl Module for HourGlassBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = &self.blocks;
        let mut skips = Vec::with_capacity(4);
        let mut down = x.clone();
        for level in 0..4 {
            skips.push(b[2 * level].forward(&down)?);
            down = b[2 * level + 1].forward(&avg_pool2x(&down)?)?;
        }
        let mut up = b[8].forward(&down)?;
        for (level, block) in b[9..].iter().enumerate() {
            up = (&skips[3 - level] + upsample_nearest2x(&block.forward(&up)?)?)?;
        }
        Ok(up)
    }
}

/// photo2cartoon `HourGlass`: `HG = Sequential(HourGlassBlock, ConvBlock, Conv1x1, IN, ReLU)`,
/// `Conv1` 1x1 to 3 channels; with the residual, `x + Conv2(ll) + Conv3(Conv1(ll))`, without
/// it `Conv1(ll)` (the last hourglass).
#[derive(Debug, Clone)]
struct HourGlass {
    block: HourGlassBlock,
    conv_block: ConvBlock,
    conv: Conv2d,
    conv1: Conv2d,
    residual: Option<(Conv2d, Conv2d)>,
}

impl HourGlass {
    fn new(cin: usize, cout: usize, use_res: bool, vb: VarBuilder) -> Result<Self> {
        let hg = vb.pp("HG");
        let residual = if use_res {
            Some((
                conv2d(cout, cout, 1, 1, true, vb.pp("Conv2"))?,
                conv2d(3, cout, 1, 1, true, vb.pp("Conv3"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            block: HourGlassBlock::new(cin, cout, hg.pp("0"))?,
            conv_block: ConvBlock::new(cout, cout, hg.pp("1"))?,
            conv: conv2d(cout, cout, 1, 1, false, hg.pp("2"))?,
            conv1: conv2d(cout, 3, 1, 1, true, vb.pp("Conv1"))?,
            residual,
        })
    }
}

impl Module for HourGlass {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ll = self.conv_block.forward(&self.block.forward(x)?)?;
        let ll = instance_norm(&self.conv.forward(&ll)?)?.relu()?;
        let tmp = self.conv1.forward(&ll)?;
        match &self.residual {
            Some((conv2, conv3)) => (x + conv2.forward(&ll)?)? + conv3.forward(&tmp)?,
            None => Ok(tmp),
        }
    }
}

/// `ResnetBlock`: `conv_block = Sequential(Pad, Conv, IN, ReLU, Pad, Conv, IN)` plus the input.
#[derive(Debug, Clone)]
struct ResnetBlock {
    conv1: ReflConv2d,
    conv2: ReflConv2d,
}

impl ResnetBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("conv_block");
        Ok(Self {
            conv1: ReflConv2d::new(1, conv2d(c, c, 3, 1, false, vb.pp("1"))?),
            conv2: ReflConv2d::new(1, conv2d(c, c, 3, 1, false, vb.pp("5"))?),
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = instance_norm(&self.conv1.forward(x)?)?.relu()?;
        x + instance_norm(&self.conv2.forward(&y)?)?
    }
}

/// `Linear -> ReLU -> Linear` at Sequential indices 0 and 2.
#[derive(Debug, Clone)]
struct Mlp2(Linear, Linear);

impl Mlp2 {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self(
            linear(c, c, true, vb.pp("0"))?,
            linear(c, c, true, vb.pp("2"))?,
        ))
    }
}

impl Module for Mlp2 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.1.forward(&self.0.forward(x)?.relu()?)
    }
}

/// `SoftAdaLIN`: adaLIN (`norm.rho`, init 0.9) whose gamma/beta blend the style MLP outputs
/// (`s_gamma`, `s_beta`) with the content ones (`c_gamma`, `c_beta`) by `w_gamma`, `w_beta`.
#[derive(Debug, Clone)]
struct SoftAdaLin {
    rho: Tensor,
    w_gamma: Tensor,
    w_beta: Tensor,
    c_gamma: Mlp2,
    c_beta: Mlp2,
    s_gamma: Linear,
    s_beta: Linear,
}

impl SoftAdaLin {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            rho: vb.get_with_hints((1, c, 1, 1), "norm.rho", Init::Const(0.9))?,
            w_gamma: vb.get_with_hints((1, c), "w_gamma", Init::Const(0.0))?,
            w_beta: vb.get_with_hints((1, c), "w_beta", Init::Const(0.0))?,
            c_gamma: Mlp2::new(c, vb.pp("c_gamma"))?,
            c_beta: Mlp2::new(c, vb.pp("c_beta"))?,
            s_gamma: linear(c, c, true, vb.pp("s_gamma"))?,
            s_beta: linear(c, c, true, vb.pp("s_beta"))?,
        })
    }

    fn forward(&self, x: &Tensor, content: &Tensor, style: &Tensor) -> Result<Tensor> {
        // (1 - w) * style + w * content, as (N, C, 1, 1).
        let blend = |w: &Tensor, c: &Tensor, s: &Tensor| -> Result<Tensor> {
            let (n, ch) = s.dims2()?;
            s.broadcast_mul(&w.affine(-1.0, 1.0)?)?
                .add(&c.broadcast_mul(w)?)?
                .reshape((n, ch, 1, 1))
        };
        let gamma = blend(
            &self.w_gamma,
            &self.c_gamma.forward(content)?,
            &self.s_gamma.forward(style)?,
        )?;
        let beta = blend(
            &self.w_beta,
            &self.c_beta.forward(content)?,
            &self.s_beta.forward(style)?,
        )?;
        instance_layer_norm(x, &self.rho, &gamma, &beta)
    }
}

/// `ResnetSoftAdaLINBlock`: `conv1`, `norm1`, ReLU, `conv2`, `norm2` (3x3, reflection pad 1,
/// no bias) plus the input.
#[derive(Debug, Clone)]
struct ResnetSoftAdaLinBlock {
    conv1: ReflConv2d,
    norm1: SoftAdaLin,
    conv2: ReflConv2d,
    norm2: SoftAdaLin,
}

impl ResnetSoftAdaLinBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: ReflConv2d::new(1, conv2d(c, c, 3, 1, false, vb.pp("conv1"))?),
            norm1: SoftAdaLin::new(c, vb.pp("norm1"))?,
            conv2: ReflConv2d::new(1, conv2d(c, c, 3, 1, false, vb.pp("conv2"))?),
            norm2: SoftAdaLin::new(c, vb.pp("norm2"))?,
        })
    }

    fn forward(&self, x: &Tensor, content: &Tensor, style: &Tensor) -> Result<Tensor> {
        let y = self.conv1.forward(x)?;
        let y = self.norm1.forward(&y, content, style)?.relu()?;
        let y = self.conv2.forward(&y)?;
        x + self.norm2.forward(&y, content, style)?
    }
}

/// `UpBlock`: `Sequential(Upsample x2, ReflPad 1, Conv3x3 (no bias), LIN, ReLU)`; the conv
/// is `UpBlockK.2`, LIN's `rho` (init 0), `gamma` (1), `beta` (0) are `UpBlockK.3.*`.
#[derive(Debug, Clone)]
struct UpBlock {
    conv: ReflConv2d,
    rho: Tensor,
    gamma: Tensor,
    beta: Tensor,
}

impl UpBlock {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let lin = vb.pp("3");
        let shape = (1, cout, 1, 1);
        Ok(Self {
            conv: ReflConv2d::new(1, conv2d(cin, cout, 3, 1, false, vb.pp("2"))?),
            rho: lin.get_with_hints(shape, "rho", Init::Const(0.0))?,
            gamma: lin.get_with_hints(shape, "gamma", Init::Const(1.0))?,
            beta: lin.get_with_hints(shape, "beta", Init::Const(0.0))?,
        })
    }
}

impl Module for UpBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv.forward(&upsample_nearest2x(x)?)?;
        instance_layer_norm(&y, &self.rho, &self.gamma, &self.beta)?.relu()
    }
}

/// photo2cartoon's `ResnetGenerator`.
#[derive(Debug, Clone)]
pub struct Generator {
    cfg: Config,
    conv_block1: ConvInRelu,
    hourglass1: HourGlass,
    hourglass2: HourGlass,
    down_block1: ConvInRelu,
    down_block2: ConvInRelu,
    encode_blocks: Vec<ResnetBlock>,
    gap_fc: Linear,
    gmp_fc: Linear,
    conv1x1: Conv2d,
    fc: (Linear, Linear),
    decode_blocks: Vec<ResnetSoftAdaLinBlock>,
    up_block1: UpBlock,
    up_block2: UpBlock,
    hourglass3: HourGlass,
    hourglass4: HourGlass,
    conv_block2: ReflConv2d,
}

impl Generator {
    pub fn new(cfg: Config, vb: VarBuilder) -> Result<Self> {
        let ngf = cfg.ngf;
        let c = ngf * 4;
        let blocks = |name: &'static str| (1..=cfg.n_blocks).map(move |i| format!("{name}{i}"));
        let fc_in = if cfg.light {
            c
        } else {
            (cfg.img_size / 4) * (cfg.img_size / 4) * c
        };
        Ok(Self {
            cfg,
            conv_block1: ConvInRelu::new(3, ngf, 7, 1, vb.pp("ConvBlock1"))?,
            hourglass1: HourGlass::new(ngf, ngf, true, vb.pp("HourGlass1"))?,
            hourglass2: HourGlass::new(ngf, ngf, true, vb.pp("HourGlass2"))?,
            down_block1: ConvInRelu::new(ngf, ngf * 2, 3, 2, vb.pp("DownBlock1"))?,
            down_block2: ConvInRelu::new(ngf * 2, c, 3, 2, vb.pp("DownBlock2"))?,
            encode_blocks: blocks("EncodeBlock")
                .map(|n| ResnetBlock::new(c, vb.pp(n)))
                .collect::<Result<_>>()?,
            gap_fc: linear(c, 1, true, vb.pp("gap_fc"))?,
            gmp_fc: linear(c, 1, true, vb.pp("gmp_fc"))?,
            conv1x1: conv2d(2 * c, c, 1, 1, true, vb.pp("conv1x1"))?,
            fc: (
                linear(fc_in, c, true, vb.pp("FC.0"))?,
                linear(c, c, true, vb.pp("FC.2"))?,
            ),
            decode_blocks: blocks("DecodeBlock")
                .map(|n| ResnetSoftAdaLinBlock::new(c, vb.pp(n)))
                .collect::<Result<_>>()?,
            up_block1: UpBlock::new(c, ngf * 2, vb.pp("UpBlock1"))?,
            up_block2: UpBlock::new(ngf * 2, ngf, vb.pp("UpBlock2"))?,
            hourglass3: HourGlass::new(ngf, ngf, true, vb.pp("HourGlass3"))?,
            hourglass4: HourGlass::new(ngf, ngf, false, vb.pp("HourGlass4"))?,
            conv_block2: ReflConv2d::new(3, conv2d(3, 3, 7, 1, false, vb.pp("ConvBlock2.1"))?),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// `(image (N,3,H,W) in [-1,1], cam_logit (N,2), heatmap (N,1,H/4,W/4))`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (_, _, h, w) = x.dims4()?;
        if h % 16 != 0 || w % 16 != 0 || h < 32 || w < 32 {
            candle_core::bail!("generator input must be a multiple of 16, at least 32; got {h}x{w}")
        }
        let x = self.conv_block1.forward(x)?;
        let x = self.hourglass2.forward(&self.hourglass1.forward(&x)?)?;
        let mut x = self.down_block2.forward(&self.down_block1.forward(&x)?)?;

        let mut content = Vec::with_capacity(self.encode_blocks.len());
        for block in &self.encode_blocks {
            x = block.forward(&x)?;
            content.push(global_avg_pool(&x)?);
        }

        let gap_logit = self.gap_fc.forward(&global_avg_pool(&x)?)?;
        let gmp_logit = self.gmp_fc.forward(&global_max_pool(&x)?)?;
        let (cam_logit, x) = cam_features(
            &x,
            &gap_logit,
            &gmp_logit,
            self.gap_fc.weight(),
            self.gmp_fc.weight(),
        )?;
        let mut x = self.conv1x1.forward(&x)?.relu()?;
        let heatmap = x.sum_keepdim(1)?;

        let style_in = if self.cfg.light {
            global_avg_pool(&x)?
        } else {
            x.flatten_from(1)?
        };
        let style = self.fc.0.forward(&style_in)?.relu()?;
        let style = self.fc.1.forward(&style)?.relu()?;

        for (block, content) in self.decode_blocks.iter().zip(content.iter().rev()) {
            x = block.forward(&x, content, &style)?;
        }

        let x = self.up_block2.forward(&self.up_block1.forward(&x)?)?;
        let x = self.hourglass4.forward(&self.hourglass3.forward(&x)?)?;
        let image = self.conv_block2.forward(&x)?.tanh()?;
        Ok((image, cam_logit, heatmap))
    }
}

/// `(x / 255 - 0.5) / 0.5`: 0..255 RGB to the generator's [-1, 1] input.
pub fn normalize(rgb_0_255: &Tensor) -> Result<Tensor> {
    rgb_0_255.affine(2.0 / 255.0, -1.0)
}

/// `(y + 1) * 127.5`: the generator's [-1, 1] output to 0..255 (not clamped or rounded).
pub fn denormalize(y: &Tensor) -> Result<Tensor> {
    y.affine(127.5, 127.5)
}
