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

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Init, Linear, VarBuilder, VarMap};

use super::layers::{
    avg_pool2x, cam_features, conv2d, global_avg_pool, global_max_pool, instance_layer_norm,
    instance_layer_norm_affine, instance_norm, instance_norm_affine, instance_norm_relu, linear,
    relu, upsample_nearest2x, ReflConv2d,
};
use crate::kernels::cpu_ops::{self, InputTransform, PackedConv, Padding};
use crate::kernels::train_ops;

/// The generator's shape: base width, image size, light or full style MLP, residual blocks.
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
        instance_norm_relu(&self.0.forward(x)?)
    }
}

impl ConvInRelu {
    fn forward_fast(&self, x: &Tensor) -> Result<Tensor> {
        let y = self
            .0
            .forward_fused(x, &InputTransform::default(), None, false)?;
        let (scale, shift) = instance_norm_affine(&y)?;
        cpu_ops::channel_affine(&y, &scale, &shift, true, None)
    }
}

/// `relu(IN(x))`, left for the consuming convolution to apply while it stages its input.
fn in_relu_input(x: &Tensor) -> Result<InputTransform> {
    Ok(InputTransform {
        affine: Some(instance_norm_affine(x)?),
        relu: true,
        ..Default::default()
    })
}

/// photo2cartoon `ConvBlock`: three pre-activation `IN -> ReLU -> ReflPad 1 -> Conv3x3`
/// branches (widths out/2, out/4, out/4, conv at Sequential index 3), concatenated, plus the
/// input (or `ConvBlock4` = `IN -> ReLU -> Conv1x1` of it when the widths differ).
#[derive(Debug, Clone)]
struct ConvBlock {
    /// Reflection pad 1 + 3x3 convolution.
    branches: [ReflConv2d; 3],
    /// `ConvBlock4.2`: exists in every state_dict, used only when `cin != cout`.
    project: ReflConv2d,
    cout: usize,
}

impl ConvBlock {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let branch = |cin: usize, cout: usize, name: &str| -> Result<ReflConv2d> {
            Ok(ReflConv2d::new(
                1,
                conv2d(cin, cout, 3, 1, false, vb.pp(name))?,
            ))
        };
        let branches = [
            branch(cin, cout / 2, "ConvBlock1.3")?,
            branch(cout / 2, cout / 4, "ConvBlock2.3")?,
            branch(cout / 4, cout / 4, "ConvBlock3.3")?,
        ];
        let project = ReflConv2d::new(0, conv2d(cin, cout, 1, 1, false, vb.pp("ConvBlock4.2"))?);
        Ok(Self {
            branches,
            project,
            cout,
        })
    }
}

impl Module for ConvBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let pre = instance_norm_relu(x)?;
        let mut outs = Vec::with_capacity(3);
        let mut h = pre.clone();
        for (i, conv) in self.branches.iter().enumerate() {
            let y = conv.forward(&h)?;
            if i < 2 {
                h = instance_norm_relu(&y)?;
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

impl ConvBlock {
    /// Each branch applies the previous output's `IN -> ReLU` while staging its input.
    fn forward_fast(&self, x: &Tensor) -> Result<Tensor> {
        let pre = in_relu_input(x)?;
        let mut outs: Vec<Tensor> = Vec::with_capacity(3);
        for conv in &self.branches {
            let input = match outs.last() {
                Some(y) => in_relu_input(y)?,
                None => pre.clone(),
            };
            outs.push(conv.forward_fused(outs.last().unwrap_or(x), &input, None, false)?);
        }
        if x.dim(1)? == self.cout {
            cpu_ops::cat_residual(x, &outs)
        } else {
            let projected = self.project.forward_fused(x, &pre, None, false)?;
            cpu_ops::cat_residual(&projected, &outs)
        }
    }

    fn packed(&self) -> bool {
        self.branches.iter().all(|b| b.packed().is_some()) && self.project.packed().is_some()
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

impl HourGlassBlock {
    fn forward_fast(&self, x: &Tensor) -> Result<Tensor> {
        let b = &self.blocks;
        let mut skips = Vec::with_capacity(4);
        let mut down = x.clone();
        for level in 0..4 {
            skips.push(b[2 * level].forward_fast(&down)?);
            down = b[2 * level + 1].forward_fast(&cpu_ops::avg_pool2x(&down)?)?;
        }
        let mut up = b[8].forward_fast(&down)?;
        for (level, block) in b[9..].iter().enumerate() {
            up = cpu_ops::add_upsampled(&skips[3 - level], &block.forward_fast(&up)?)?;
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
    conv: ReflConv2d,
    conv1: ReflConv2d,
    residual: Option<(ReflConv2d, ReflConv2d)>,
    /// Fast path: `Conv2(ll) + Conv3(Conv1(ll))` as one 1x1 convolution (both are linear).
    folded: OnceLock<Option<Arc<PackedConv>>>,
}

impl HourGlass {
    fn new(cin: usize, cout: usize, use_res: bool, vb: VarBuilder) -> Result<Self> {
        let hg = vb.pp("HG");
        let conv1x1 = |cin: usize, cout: usize, bias: bool, vb: VarBuilder| -> Result<ReflConv2d> {
            Ok(ReflConv2d::new(0, conv2d(cin, cout, 1, 1, bias, vb)?))
        };
        let residual = if use_res {
            Some((
                conv1x1(cout, cout, true, vb.pp("Conv2"))?,
                conv1x1(3, cout, true, vb.pp("Conv3"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            block: HourGlassBlock::new(cin, cout, hg.pp("0"))?,
            conv_block: ConvBlock::new(cout, cout, hg.pp("1"))?,
            conv: conv1x1(cout, cout, false, hg.pp("2"))?,
            conv1: conv1x1(cout, 3, true, vb.pp("Conv1"))?,
            residual,
            folded: OnceLock::new(),
        })
    }

    /// The residual branch `Conv2(ll) + Conv3(Conv1(ll))` folded into one 1x1 convolution:
    /// weight `W2 + W3 W1`, bias `b2 + W3 b1 + b3`. `None` without a residual.
    fn folded(&self) -> Result<Option<&PackedConv>> {
        let Some((conv2, conv3)) = &self.residual else {
            return Ok(None);
        };
        let packed = self.folded.get_or_init(|| {
            let fold = || -> Result<PackedConv> {
                let mat = |c: &ReflConv2d| -> Result<(Tensor, Tensor)> {
                    let w = c.conv().weight();
                    let (o, i, _, _) = w.dims4()?;
                    let b = match c.conv().bias() {
                        Some(b) => b.reshape((o, 1))?,
                        None => Tensor::zeros((o, 1), w.dtype(), w.device())?,
                    };
                    Ok((w.reshape((o, i))?, b))
                };
                let ((w1, b1), (w2, b2), (w3, b3)) = (mat(&self.conv1)?, mat(conv2)?, mat(conv3)?);
                let w = (w2 + w3.matmul(&w1)?)?;
                let b = ((b2 + w3.matmul(&b1)?)? + b3)?;
                let (o, i) = w.dims2()?;
                PackedConv::new(
                    &w.reshape((o, i, 1, 1))?,
                    Some(&b.flatten_all()?),
                    1,
                    Padding::Reflect(0),
                )
            };
            fold().ok().map(Arc::new)
        });
        match packed {
            Some(p) => Ok(Some(p)),
            None => candle_core::bail!("HourGlass: cannot fold the residual convolutions"),
        }
    }
}

impl Module for HourGlass {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ll = self.conv_block.forward(&self.block.forward(x)?)?;
        let ll = instance_norm_relu(&self.conv.forward(&ll)?)?;
        let tmp = self.conv1.forward(&ll)?;
        match &self.residual {
            Some((conv2, conv3)) => (x + conv2.forward(&ll)?)? + conv3.forward(&tmp)?,
            None => Ok(tmp),
        }
    }
}

impl HourGlass {
    fn forward_fast(&self, x: &Tensor) -> Result<Tensor> {
        let plain = InputTransform::default();
        let ll = self.conv_block.forward_fast(&self.block.forward_fast(x)?)?;
        let ll = self.conv.forward_fused(&ll, &plain, None, false)?;
        let norm = in_relu_input(&ll)?;
        match self.folded()? {
            Some(folded) => cpu_ops::conv2d(&ll, folded, &norm, Some(x), false),
            None => self.conv1.forward_fused(&ll, &norm, None, false),
        }
    }

    fn packed(&self) -> bool {
        let convs = [&self.conv, &self.conv1];
        self.folded().is_ok()
            && self.block.blocks.iter().all(ConvBlock::packed)
            && self.conv_block.packed()
            && convs.iter().all(|c| c.packed().is_some())
            && self
                .residual
                .as_ref()
                .is_none_or(|(a, b)| a.packed().is_some() && b.packed().is_some())
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
        let y = instance_norm_relu(&self.conv1.forward(x)?)?;
        x + instance_norm(&self.conv2.forward(&y)?)?
    }
}

impl ResnetBlock {
    fn forward_fast(&self, x: &Tensor) -> Result<Tensor> {
        let y = self
            .conv1
            .forward_fused(x, &InputTransform::default(), None, false)?;
        let y = self
            .conv2
            .forward_fused(&y, &in_relu_input(&y)?, None, false)?;
        let (scale, shift) = instance_norm_affine(&y)?;
        cpu_ops::channel_affine(&y, &scale, &shift, false, Some(x))
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
        let (gamma, beta) = self.gamma_beta(content, style)?;
        instance_layer_norm(x, &self.rho, &gamma, &beta)
    }

    /// The fast path's `(scale, shift)` per `(N, C)`: `forward(x) = x * scale + shift`.
    fn affine(&self, x: &Tensor, content: &Tensor, style: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        let (gamma, beta) = self.gamma_beta(content, style)?;
        instance_layer_norm_affine(x, &self.rho, &gamma, &beta)
    }

    fn gamma_beta(&self, content: &Tensor, style: &Tensor) -> Result<(Tensor, Tensor)> {
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
        Ok((gamma, beta))
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
        let y = relu(&self.norm1.forward(&y, content, style)?)?;
        let y = self.conv2.forward(&y)?;
        x + self.norm2.forward(&y, content, style)?
    }

    fn forward_fast(&self, x: &Tensor, content: &Tensor, style: &Tensor) -> Result<Tensor> {
        let y = self
            .conv1
            .forward_fused(x, &InputTransform::default(), None, false)?;
        let input = InputTransform {
            affine: Some(self.norm1.affine(&y, content, style)?),
            relu: true,
            ..Default::default()
        };
        let y = self.conv2.forward_fused(&y, &input, None, false)?;
        let (scale, shift) = self.norm2.affine(&y, content, style)?;
        cpu_ops::channel_affine(&y, &scale, &shift, false, Some(x))
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
        relu(&instance_layer_norm(
            &y,
            &self.rho,
            &self.gamma,
            &self.beta,
        )?)
    }
}

impl UpBlock {
    fn forward_fast(&self, x: &Tensor) -> Result<Tensor> {
        let input = InputTransform {
            upsample: true,
            ..Default::default()
        };
        let y = self.conv.forward_fused(x, &input, None, false)?;
        let (scale, shift) = instance_layer_norm_affine(&y, &self.rho, &self.gamma, &self.beta)?;
        cpu_ops::channel_affine(&y, &scale, &shift, true, None)
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
    /// Whether the CPU fast path can run (weights untracked, packed), decided on first use.
    fast: OnceLock<bool>,
    /// `conv1x1` with the CAM weights folded in, packed for the fast path.
    cam_conv: OnceLock<Option<Arc<PackedConv>>>,
}

/// One stage of a [`Generator::forward_profiled`] pass.
#[derive(Debug, Clone)]
pub struct StageTime {
    /// The stage's name: its module's checkpoint name (`ConvBlock1`, `EncodeBlock1`, ...,
    /// `ConvBlock2`), or `CAM+FC` for the attention and the style MLP.
    pub stage: String,
    /// Wall time, ms.
    pub wall_ms: f64,
    /// CPU time of all the process's threads, ms (0 where the OS does not tell): steadier
    /// than wall time on a shared machine.
    pub cpu_ms: f64,
}

/// The stages of one profiled pass, in order.
pub type StageTimes = Vec<StageTime>;

/// CPU time used so far by all threads of this process, in ms (Linux schedstat).
pub fn process_cpu_ms() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e6
}

/// Records the time since the previous mark when profiling.
struct Stages<'a> {
    last: (Instant, f64),
    out: Option<&'a mut StageTimes>,
}

impl<'a> Stages<'a> {
    fn new(out: Option<&'a mut StageTimes>) -> Self {
        let mut st = Self {
            last: (Instant::now(), 0.0),
            out,
        };
        st.last = st.now();
        st
    }

    fn now(&self) -> (Instant, f64) {
        match self.out {
            Some(_) => (Instant::now(), process_cpu_ms()),
            None => (Instant::now(), 0.0),
        }
    }

    fn mark(&mut self, name: &str) {
        if self.out.is_some() {
            let now = self.now();
            let (wall_ms, cpu_ms) = (
                (now.0 - self.last.0).as_secs_f64() * 1e3,
                now.1 - self.last.1,
            );
            if let Some(out) = self.out.as_deref_mut() {
                out.push(StageTime {
                    stage: name.to_string(),
                    wall_ms,
                    cpu_ms,
                });
            }
            self.last = self.now();
        }
    }
}

fn linear_params(l: &Linear) -> impl Iterator<Item = &Tensor> {
    std::iter::once(l.weight()).chain(l.bias())
}

impl Generator {
    /// Builds the generator from `vb` under photo2cartoon's `state_dict` names (loaded from a
    /// checkpoint, or created in a `VarMap` for training).
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
            fast: OnceLock::new(),
            cam_conv: OnceLock::new(),
        })
    }

    /// True when [`Generator::forward`] on `x` takes the CPU fast path ([`cpu_ops`]): `x`
    /// and every weight are `f32` CPU tensors that track no gradient, on a CPU with AVX2 +
    /// FMA. Otherwise (training, CUDA) the plain candle ops run.
    pub fn uses_cpu_fast_path(&self, x: &Tensor) -> bool {
        cpu_ops::usable(&[x]) && *self.fast.get_or_init(|| self.fast_weights())
    }

    fn fast_weights(&self) -> bool {
        let convs = [
            &self.conv_block1.0,
            &self.down_block1.0,
            &self.down_block2.0,
            &self.conv_block2,
            &self.up_block1.conv,
            &self.up_block2.conv,
        ];
        let hourglasses = [
            &self.hourglass1,
            &self.hourglass2,
            &self.hourglass3,
            &self.hourglass4,
        ];
        let mut params: Vec<&Tensor> = vec![self.conv1x1.weight()];
        params.extend(self.conv1x1.bias());
        for l in [&self.gap_fc, &self.gmp_fc, &self.fc.0, &self.fc.1] {
            params.extend(linear_params(l));
        }
        for b in &self.decode_blocks {
            for n in [&b.norm1, &b.norm2] {
                params.extend([&n.rho, &n.w_gamma, &n.w_beta]);
                for l in [
                    &n.c_gamma.0,
                    &n.c_gamma.1,
                    &n.c_beta.0,
                    &n.c_beta.1,
                    &n.s_gamma,
                    &n.s_beta,
                ] {
                    params.extend(linear_params(l));
                }
            }
        }
        for u in [&self.up_block1, &self.up_block2] {
            params.extend([&u.rho, &u.gamma, &u.beta]);
        }
        params.iter().all(|t| cpu_ops::eligible(t))
            && convs.iter().all(|c| c.packed().is_some())
            && hourglasses.iter().all(|h| h.packed())
            && self
                .encode_blocks
                .iter()
                .all(|b| b.conv1.packed().is_some() && b.conv2.packed().is_some())
            && self
                .decode_blocks
                .iter()
                .all(|b| b.conv1.packed().is_some() && b.conv2.packed().is_some())
            && self.cam_conv().is_ok()
    }

    /// `conv1x1(cat(x * gap_w, x * gmp_w))` = a 1x1 convolution of `x` whose weight has the
    /// CAM weights folded in: `W[:, :C] * gap_w + W[:, C:] * gmp_w`.
    fn cam_conv(&self) -> Result<&PackedConv> {
        let packed = self.cam_conv.get_or_init(|| {
            let fold = || -> Result<PackedConv> {
                let w = self.conv1x1.weight();
                let (o, c2, _, _) = w.dims4()?;
                let c = c2 / 2;
                let w = w.reshape((o, c2))?;
                let folded = (w.narrow(1, 0, c)?.broadcast_mul(self.gap_fc.weight())?
                    + w.narrow(1, c, c)?.broadcast_mul(self.gmp_fc.weight())?)?;
                PackedConv::new(
                    &folded.reshape((o, c, 1, 1))?,
                    self.conv1x1.bias(),
                    1,
                    Padding::Reflect(0),
                )
            };
            fold().ok().map(Arc::new)
        });
        match packed {
            Some(p) => Ok(p),
            None => candle_core::bail!("generator: the CAM convolution cannot be folded"),
        }
    }

    /// The configuration the generator was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// `(image (N,3,H,W) in [-1,1], cam_logit (N,2), heatmap (N,1,H/4,W/4))`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        self.forward_impl(x, None)
    }

    /// [`Generator::forward`], also timing each stage (ConvBlock1, HourGlass1, ...).
    pub fn forward_profiled(&self, x: &Tensor) -> Result<((Tensor, Tensor, Tensor), StageTimes)> {
        let mut times = Vec::new();
        let out = self.forward_impl(x, Some(&mut times))?;
        Ok((out, times))
    }

    /// The encoder side alone (ConvBlock1 up to the CAM and the style MLP): what
    /// [`Generator::decode`] turns into the image.
    pub fn encode(&self, x: &Tensor) -> Result<Encoded> {
        let mut st = Stages::new(None);
        self.encode_impl(x, &mut st)
    }

    /// The decoder side alone (DecodeBlocks to ConvBlock2): the image `(N, 3, H, W)` in
    /// [-1, 1] of what [`Generator::encode`] returned.
    pub fn decode(&self, encoded: &Encoded) -> Result<Tensor> {
        let mut st = Stages::new(None);
        self.decode_impl(encoded, &mut st)
    }

    fn forward_impl(
        &self,
        x: &Tensor,
        times: Option<&mut StageTimes>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mut st = Stages::new(times);
        let encoded = self.encode_impl(x, &mut st)?;
        let image = self.decode_impl(&encoded, &mut st)?;
        Ok((image, encoded.cam_logit, encoded.heatmap))
    }

    fn encode_impl(&self, x: &Tensor, st: &mut Stages) -> Result<Encoded> {
        let (_, _, h, w) = x.dims4()?;
        if h % 16 != 0 || w % 16 != 0 || h < 32 || w < 32 {
            candle_core::bail!("generator input must be a multiple of 16, at least 32; got {h}x{w}")
        }
        let fast = self.uses_cpu_fast_path(x);
        let conv_in_relu = |m: &ConvInRelu, x: &Tensor| {
            if fast {
                m.forward_fast(x)
            } else {
                m.forward(x)
            }
        };
        let hourglass = |m: &HourGlass, x: &Tensor| {
            if fast {
                m.forward_fast(x)
            } else {
                m.forward(x)
            }
        };

        let x = conv_in_relu(&self.conv_block1, x)?;
        st.mark("ConvBlock1");
        let x = hourglass(&self.hourglass1, &x)?;
        st.mark("HourGlass1");
        let x = hourglass(&self.hourglass2, &x)?;
        st.mark("HourGlass2");
        let x = conv_in_relu(&self.down_block1, &x)?;
        st.mark("DownBlock1");
        let mut x = conv_in_relu(&self.down_block2, &x)?;
        st.mark("DownBlock2");

        let mut content = Vec::with_capacity(self.encode_blocks.len());
        for (i, block) in self.encode_blocks.iter().enumerate() {
            x = if fast {
                block.forward_fast(&x)?
            } else {
                block.forward(&x)?
            };
            content.push(global_avg_pool(&x)?);
            st.mark(&format!("EncodeBlock{}", i + 1));
        }

        let gap_logit = self.gap_fc.forward(&global_avg_pool(&x)?)?;
        let gmp_logit = self.gmp_fc.forward(&global_max_pool(&x)?)?;
        let (cam_logit, x) = if fast {
            let cam_logit = Tensor::cat(&[&gap_logit, &gmp_logit], 1)?;
            let input = InputTransform::default();
            let x = cpu_ops::conv2d(&x, self.cam_conv()?, &input, None, true)?;
            (cam_logit, x)
        } else {
            let (cam_logit, x) = cam_features(
                &x,
                &gap_logit,
                &gmp_logit,
                self.gap_fc.weight(),
                self.gmp_fc.weight(),
            )?;
            (
                cam_logit,
                relu(&train_ops::conv2d_layer(&self.conv1x1, &x, 0)?)?,
            )
        };
        let heatmap = x.sum_keepdim(1)?;

        let style_in = if self.cfg.light {
            global_avg_pool(&x)?
        } else {
            x.flatten_from(1)?
        };
        let style = self.fc.0.forward(&style_in)?.relu()?;
        let style = self.fc.1.forward(&style)?.relu()?;
        st.mark("CAM+FC");
        content.reverse();
        Ok(Encoded {
            features: x,
            content,
            style,
            cam_logit,
            heatmap,
        })
    }

    fn decode_impl(&self, encoded: &Encoded, st: &mut Stages) -> Result<Tensor> {
        let fast = self.uses_cpu_fast_path(&encoded.features)
            && cpu_ops::usable(&[&encoded.style])
            && encoded.content.iter().all(|c| cpu_ops::usable(&[c]));
        let up_block = |m: &UpBlock, x: &Tensor| {
            if fast {
                m.forward_fast(x)
            } else {
                m.forward(x)
            }
        };
        let hourglass = |m: &HourGlass, x: &Tensor| {
            if fast {
                m.forward_fast(x)
            } else {
                m.forward(x)
            }
        };
        let (mut x, style) = (encoded.features.clone(), &encoded.style);
        for (i, (block, content)) in self.decode_blocks.iter().zip(&encoded.content).enumerate() {
            x = if fast {
                block.forward_fast(&x, content, style)?
            } else {
                block.forward(&x, content, style)?
            };
            st.mark(&format!("DecodeBlock{}", i + 1));
        }

        let x = up_block(&self.up_block1, &x)?;
        st.mark("UpBlock1");
        let x = up_block(&self.up_block2, &x)?;
        st.mark("UpBlock2");
        let x = hourglass(&self.hourglass3, &x)?;
        st.mark("HourGlass3");
        let x = hourglass(&self.hourglass4, &x)?;
        st.mark("HourGlass4");
        let image = if fast {
            self.conv_block2
                .forward_fused(&x, &InputTransform::default(), None, false)?
        } else {
            self.conv_block2.forward(&x)?
        };
        let image = image.tanh()?;
        st.mark("ConvBlock2");
        Ok(image)
    }
}

/// What the generator's encoder side hands its decoder side: the input of the first
/// DecodeBlock and what its Soft-AdaLIN layers mix.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The CAM-weighted features `(N, 4 ngf, H/4, W/4)`.
    pub features: Tensor,
    /// The EncodeBlocks' pooled outputs `(N, 4 ngf)`, last block first: the content
    /// statistics each DecodeBlock's Soft-AdaLIN takes, in DecodeBlock order.
    pub content: Vec<Tensor>,
    /// The style MLP's output `(N, 4 ngf)`.
    pub style: Tensor,
    /// The CAM logits `(N, 2)`.
    pub cam_logit: Tensor,
    /// The CAM heatmap `(N, 1, H/4, W/4)`.
    pub heatmap: Tensor,
}

impl Encoded {
    /// The samples of several encodings stacked along the batch axis, converted to `dtype`.
    pub fn cat(parts: &[&Encoded], dtype: candle_core::DType) -> Result<Self> {
        let stack = |f: &dyn Fn(&Encoded) -> &Tensor| -> Result<Tensor> {
            let ts = parts
                .iter()
                .map(|e| f(e).to_dtype(dtype))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&ts, 0)
        };
        let blocks = parts.first().map_or(0, |e| e.content.len());
        Ok(Self {
            features: stack(&|e| &e.features)?,
            content: (0..blocks)
                .map(|i| stack(&|e: &Encoded| &e.content[i]))
                .collect::<Result<_>>()?,
            style: stack(&|e| &e.style)?,
            cam_logit: stack(&|e| &e.cam_logit)?,
            heatmap: stack(&|e| &e.heatmap)?,
        })
    }

    /// The same encoding with every tensor converted to `dtype` (a cache keeps `f16`).
    pub fn to_dtype(&self, dtype: candle_core::DType) -> Result<Self> {
        Self::cat(&[self], dtype)
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
