//! CPU fast paths for inference of the photo2cartoon generator (issue 7).
//!
//! candle's CPU convolution copies the input to NHWC, builds im2col tiles and calls a GEMM
//! per 512-pixel tile, which does badly on the generator's thin 3x3 convolutions (8-32
//! channels at 256x256) and its 128-channel ones alike; its elementwise ops each make a
//! pass over memory and a fresh tensor. The ops here work on NCHW `f32` directly:
//!
//! - [`ConvOp`]: a direct convolution (1x1, 3x3, 7x7; stride 1 or 2) with, fused in, the
//!   reflection padding, an optional nearest 2x upsample of the input, an optional
//!   per-channel affine + ReLU of the input (a pending instance norm), the bias, an optional
//!   residual add and ReLU of the output. Each task stages a band of padded input rows in a
//!   small buffer and computes `8 output channels x 16..48 pixels` register tiles with
//!   AVX-512 (or AVX2 + FMA) FMAs.
//! - [`ChannelStats`]: per-(sample, channel) mean and sum of squared deviations.
//! - [`AffineOp`]: `relu?(x * scale + shift) (+ residual)` per channel, i.e. a normalisation.
//! - [`AvgPool2x`], [`AddUpsampled`] (`skip + upsample2x(low)`) and [`CatResidual`]
//!   (`x + cat(parts, dim 1)`).
//!
//! They are inference only (no backward): callers use them through [`usable`], which is
//! false when any tensor involved tracks gradients, is not an `f32` CPU tensor, or the CPU
//! lacks AVX2 + FMA (or `TOONBOT_CPU_OPS=0` is set). Otherwise the plain candle ops run, so
//! training and CUDA are unchanged. The one exception: `train_ops`' training convolution
//! runs the direct convolution through [`conv2d_slice`] for its forward and its input
//! gradient where that beats its GEMM (its own backward wraps it).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

/// The SIMD instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: 16 floats a vector, register tiles of 8 output channels.
    Avx512,
    /// AVX2 with FMA: 8 floats a vector, register tiles of 4 output channels (also what
    /// `TOONBOT_CPU_OPS=avx2` picks on an AVX-512 CPU).
    Avx2,
}

/// The instruction set detected at run time, or `None` when the fast paths are off (no AVX2
/// + FMA, not x86-64, or `TOONBOT_CPU_OPS=0`).
pub fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| match std::env::var("TOONBOT_CPU_OPS").as_deref() {
        Ok("0") | Ok("off") => None,
        Ok("avx2") => detect().map(|_| Isa::Avx2),
        _ => detect(),
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Option<Isa> {
    if is_x86_feature_detected!("avx512f") {
        Some(Isa::Avx512)
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Some(Isa::Avx2)
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Option<Isa> {
    None
}

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the fast paths off (or back on) for the whole process, e.g. to time both paths in
/// one run. They are on by default where [`isa`] finds a supported CPU.
pub fn set_enabled(on: bool) {
    DISABLED.store(!on, Ordering::Relaxed);
}

/// True when the fast ops may replace candle's on these tensors: a supported CPU, the fast
/// paths enabled, and every tensor [`eligible`].
pub fn usable(tensors: &[&Tensor]) -> bool {
    isa().is_some() && !DISABLED.load(Ordering::Relaxed) && tensors.iter().all(|t| eligible(t))
}

/// An `f32` CPU tensor that tracks no gradient (a fixed weight or an inference activation).
pub fn eligible(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op()
}

/// The contiguous `f32` data of a custom op's argument (here and in `train_ops`).
pub(super) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("CPU op: f32 tensors only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("CPU op: contiguous tensors only"),
    }
}

/// Runs `f` on the contiguous `f32` data of a CPU tensor.
pub(super) fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(f32_slice(c, l)?),
        _ => bail!("cpu_ops: CPU tensors only"),
    }
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the `Send` wrapper, not the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Asks glibc's malloc (once) to keep freed memory instead of handing it back to the OS:
/// a generator pass allocates and frees dozens of 2-8 MB activations, and by default each
/// one is a fresh `mmap` (or a trimmed heap top) whose pages fault in again and are zeroed by
/// the kernel, about 5 % of a 256x256 pass here (and 13 % of a CPU training step). Blocks up
/// to 32 MiB (glibc's limit) then come from the heap, which keeps its peak size.
/// `TOONBOT_MALLOPT=0` leaves malloc alone.
pub fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("TOONBOT_MALLOPT").is_ok_and(|v| v == "0") {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_TOP_PAD: i32 = -2;
            const M_MMAP_THRESHOLD: i32 = -3;
            // SAFETY: mallopt only changes glibc malloc's tunables; it is thread safe.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, 1 << 30);
                mallopt(M_TOP_PAD, 16 << 20);
            }
        }
    });
}

/// A `Vec` of `len` floats that the caller fully overwrites.
#[allow(clippy::uninit_vec)]
fn uninit_vec(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns and every caller writes all `len` elements
    // before the vector is read.
    unsafe { v.set_len(len) };
    v
}

/// The index that reflection padding reads for `i` (which may lie up to `n - 1` outside
/// `0..n`).
pub(super) fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let r = if i < 0 {
        -i
    } else if i >= n {
        2 * (n - 1) - i
    } else {
        i
    };
    r as usize
}

// ---- Convolution ----------------------------------------------------------------------------

/// Output channels per packed weight block (the register tile's height).
const PB: usize = 8;
/// Largest kernel size supported.
const MAX_K: usize = 7;

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// `nn.ReflectionPad2d(p)` before a `padding=0` convolution (0: no padding).
    Reflect(usize),
    /// TensorFlow's `SAME`: zeros, output `ceil(in / stride)`, the odd extra row or column
    /// at the bottom or right.
    TfSame,
}

/// Convolution weights packed for the kernels: `[cout / 8][cin][k][k][8]` (zero padded).
pub struct PackedConv {
    cout: usize,
    cin: usize,
    k: usize,
    stride: usize,
    padding: Padding,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for PackedConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedConv({}->{}, {}x{}, stride {}, {:?})",
            self.cin, self.cout, self.k, self.k, self.stride, self.padding
        )
    }
}

impl PackedConv {
    /// Packs an `(out, in, k, k)` weight (k 1, 3 or 7; stride 1 or 2) for a convolution
    /// with `padding`.
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: Padding,
    ) -> Result<Self> {
        let src: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bias = bias
            .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1())
            .transpose()?;
        Self::from_slice(&src, weight.dims4()?, bias, stride, padding)
    }

    /// [`PackedConv::new`] of a weight given as its `(out, in, k, k)` values.
    pub fn from_slice(
        src: &[f32],
        (cout, cin, kh, kw): (usize, usize, usize, usize),
        bias: Option<Vec<f32>>,
        stride: usize,
        padding: Padding,
    ) -> Result<Self> {
        if kh != kw || !matches!(kh, 1 | 3 | 7) || !matches!(stride, 1 | 2) {
            bail!("cpu_ops: unsupported convolution {kh}x{kw} stride {stride}")
        }
        if src.len() != cout * cin * kh * kw || bias.as_ref().is_some_and(|b| b.len() != cout) {
            bail!("cpu_ops: weight or bias does not fit a {cout}x{cin}x{kh}x{kw} convolution")
        }
        let k = kh;
        let nblk = cout.div_ceil(PB);
        let mut w = vec![0f32; nblk * cin * k * k * PB];
        for co in 0..cout {
            let (blk, c) = (co / PB, co % PB);
            for ci in 0..cin {
                for t in 0..k * k {
                    w[((blk * cin + ci) * k * k + t) * PB + c] = src[(co * cin + ci) * k * k + t];
                }
            }
        }
        Ok(Self {
            cout,
            cin,
            k,
            stride,
            padding,
            w,
            bias,
        })
    }

    /// Output channels of the convolution.
    pub fn cout(&self) -> usize {
        self.cout
    }
}

/// What the convolution does to its input before padding it.
#[derive(Debug, Clone, Default)]
pub struct InputTransform {
    /// `(scale, shift)`, each `N * Cin` (sample-major): `x * scale + shift` per channel.
    pub affine: Option<(Vec<f32>, Vec<f32>)>,
    /// ReLU after the affine.
    pub relu: bool,
    /// Nearest 2x upsample (before the padding).
    pub upsample: bool,
    /// A depthwise convolution (after the affine and ReLU) whose output the (1x1, stride 1)
    /// convolution reads: a separable convolution in one pass.
    pub depthwise: Option<Arc<PackedDepthwise>>,
}

/// `conv(pad_reflect(up?(relu?(x * scale + shift))))` + bias (+ residual), then ReLU if
/// `relu_out`. CustomOp1 on `x`, or CustomOp2 on `(x, residual)`.
pub struct ConvOp<'a> {
    conv: &'a PackedConv,
    input: &'a InputTransform,
    act: Act,
    isa: Isa,
}

#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    up: bool,
    k: usize,
    stride: usize,
    /// Zero padding (else reflection).
    zero: bool,
    pad_top: usize,
    pad_left: usize,
    /// Input size after the upsample.
    he: usize,
    we: usize,
    /// Padded width staged (and the padded height read).
    wp: usize,
    ho: usize,
    wo: usize,
    /// Stride 2: floats per column phase of a staged row.
    half: usize,
    /// Floats per staged row.
    pitch: usize,
    kw_off: [usize; MAX_K],
}

impl Geom {
    fn new(conv: &PackedConv, dims: &[usize], up: bool) -> Result<Self> {
        Self::with(conv.cin, conv.k, conv.stride, conv.padding, dims, up)
    }

    fn with(
        cin_expected: usize,
        k: usize,
        stride: usize,
        padding: Padding,
        dims: &[usize],
        up: bool,
    ) -> Result<Self> {
        let &[n, cin, h, w] = dims else {
            bail!("cpu_ops conv: NCHW input expected, got {dims:?}")
        };
        if cin != cin_expected {
            bail!("cpu_ops conv: {cin_expected} input channels expected, got {cin}")
        }
        let (he, we) = if up { (2 * h, 2 * w) } else { (h, w) };
        if up && stride != 1 {
            bail!("cpu_ops conv: upsampling needs stride 1")
        }
        let (zero, pad_top, pad_left, hp, wp) = match padding {
            Padding::Reflect(pad) => {
                if pad >= he || pad >= we {
                    bail!("cpu_ops conv: reflection pad {pad} needs an input larger than {he}x{we}")
                }
                (false, pad, pad, he + 2 * pad, we + 2 * pad)
            }
            Padding::TfSame => {
                // Rows read: (out - 1) * stride + k, the padding split with the odd one last.
                let (hp, wp) = (
                    (he.div_ceil(stride) - 1) * stride + k,
                    (we.div_ceil(stride) - 1) * stride + k,
                );
                (
                    true,
                    hp.saturating_sub(he) / 2,
                    wp.saturating_sub(we) / 2,
                    hp,
                    wp,
                )
            }
        };
        if hp < k || wp < k || he == 0 || we == 0 {
            bail!("cpu_ops conv: input {he}x{we} smaller than the kernel")
        }
        let (ho, wo) = ((hp - k) / stride + 1, (wp - k) / stride + 1);
        let half = wp.div_ceil(2);
        let lanes = 16;
        let pitch = if stride == 1 {
            (wp + lanes).next_multiple_of(16)
        } else {
            (2 * half + lanes).next_multiple_of(16)
        };
        let mut kw_off = [0; MAX_K];
        for (kw, off) in kw_off.iter_mut().enumerate().take(k) {
            *off = if stride == 1 {
                kw
            } else {
                (kw % 2) * half + kw / 2
            };
        }
        Ok(Self {
            n,
            cin,
            h,
            w,
            up,
            k,
            stride,
            zero,
            pad_top,
            pad_left,
            he,
            we,
            wp,
            ho,
            wo,
            half,
            pitch,
            kw_off,
        })
    }

    /// Staged rows needed for `rows` output rows.
    fn staged_rows(&self, rows: usize) -> usize {
        (rows - 1) * self.stride + self.k
    }

    /// Output rows per task: the staged band stays within ~384 KiB (L2) and there are at
    /// least ~8 tasks.
    fn band_rows(&self) -> usize {
        let row_bytes = self.cin * self.pitch * 4;
        let fit = (384 * 1024 / row_bytes.max(1)).saturating_sub(self.k - 1) / self.stride;
        let spread = (self.n * self.ho).div_ceil(8);
        fit.min(spread).clamp(1, self.ho)
    }
}

/// One register tile: `nco <= CB` output channels x `ncols <= NV * lanes` pixels of one row.
struct Micro {
    /// Staged input at (channel 0, first row of the window, first column).
    src: *const f32,
    ci_pitch: usize,
    row_pitch: usize,
    cin: usize,
    kw_off: [usize; MAX_K],
    /// Packed weights at (block, channel 0, tap 0, first output channel of the tile).
    w: *const f32,
    out: *mut f32,
    /// Distance between output channels, in `out` and `res`.
    out_pitch: usize,
    /// Residual at the tile's first channel (pitch `out_pitch`), for its first `nres`
    /// channels (a residual may have fewer channels than the output: zeros beyond).
    res: *const f32,
    nres: usize,
    bias: *const f32,
    nco: usize,
    ncols: usize,
    act: Act,
}

/// The activation a fused op applies last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Act {
    /// No activation: the value as it is.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// `x * relu6(x + 3) / 6`.
    HardSwish,
}

impl From<bool> for Act {
    /// `true`: ReLU.
    fn from(relu: bool) -> Self {
        if relu {
            Act::Relu
        } else {
            Act::None
        }
    }
}

impl Act {
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            Act::None => v,
            Act::Relu => v.max(0.0),
            Act::HardSwish => v * (v + 3.0).clamp(0.0, 6.0) * (1.0 / 6.0),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Act, Micro, PB};
    use std::arch::x86_64::*;

    /// Defines a register-tiled micro kernel for one instruction set. `acc[c][v]` holds
    /// output channel `c`, pixels `v * lanes ..`; each step loads `NV` input vectors and
    /// broadcasts `CB` weights.
    macro_rules! micro_kernel {
        ($name:ident, $feat:literal, $lanes:expr, $zero:ident, $loadu:ident, $set1:ident,
         $fmadd:ident, $add:ident, $mul:ident, $max:ident, $min:ident, $storeu:ident) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name<const CB: usize, const NV: usize, const K: usize>(m: &Micro) {
                let mut acc = [[$zero(); NV]; CB];
                let mut wp = m.w;
                for ci in 0..m.cin {
                    let base = m.src.add(ci * m.ci_pitch);
                    for kh in 0..K {
                        let row = base.add(kh * m.row_pitch);
                        for &off in m.kw_off.iter().take(K) {
                            let p = row.add(off);
                            let mut xv = [$zero(); NV];
                            for (v, x) in xv.iter_mut().enumerate() {
                                *x = $loadu(p.add(v * $lanes));
                            }
                            for (c, a) in acc.iter_mut().enumerate() {
                                let wv = $set1(*wp.add(c));
                                for (a, &x) in a.iter_mut().zip(&xv) {
                                    *a = $fmadd(wv, x, *a);
                                }
                            }
                            wp = wp.add(PB);
                        }
                    }
                }
                // Spill the tile to the stack with constant indices only (so that `acc`
                // lives in registers in the loop above), then finish it from there.
                const { assert!(CB * NV <= 24) };
                let mut tile = [[0f32; $lanes]; 24];
                for c in 0..CB {
                    for v in 0..NV {
                        $storeu(tile[c * NV + v].as_mut_ptr(), acc[c][v]);
                    }
                }
                for c in 0..m.nco {
                    let b = if m.bias.is_null() {
                        0.0
                    } else {
                        *m.bias.add(c)
                    };
                    let (bv, zero) = ($set1(b), $set1(0.0));
                    let (three, six, sixth) = ($set1(3.0), $set1(6.0), $set1(1.0 / 6.0));
                    let out = m.out.add(c * m.out_pitch);
                    let has_res = !m.res.is_null() && c < m.nres;
                    let res = m.res.wrapping_add(c * m.out_pitch);
                    let full = m.ncols / $lanes;
                    for v in 0..full {
                        let mut y = $add($loadu(tile[c * NV + v].as_ptr()), bv);
                        if has_res {
                            y = $add(y, $loadu(res.add(v * $lanes)));
                        }
                        y = match m.act {
                            Act::None => y,
                            Act::Relu => $max(y, zero),
                            Act::HardSwish => {
                                let g = $min($max($add(y, three), zero), six);
                                $mul(y, $mul(g, sixth))
                            }
                        };
                        $storeu(out.add(v * $lanes), y);
                    }
                    for i in full * $lanes..m.ncols {
                        let mut t = tile[c * NV + i / $lanes][i % $lanes] + b;
                        if has_res {
                            t += *res.add(i);
                        }
                        *out.add(i) = m.act.apply(t);
                    }
                }
            }
        };
    }

    micro_kernel!(
        micro_avx512,
        "avx512f",
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        _mm512_mul_ps,
        _mm512_max_ps,
        _mm512_min_ps,
        _mm512_storeu_ps
    );
    micro_kernel!(
        micro_avx2,
        "avx2,fma",
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        _mm256_mul_ps,
        _mm256_max_ps,
        _mm256_min_ps,
        _mm256_storeu_ps
    );
}

/// Register tile shape per instruction set: (output channels, vectors of pixels, lanes).
fn tile(isa: Isa) -> (usize, usize, usize) {
    match isa {
        Isa::Avx512 => (8, 3, 16),
        Isa::Avx2 => (4, 3, 8),
    }
}

/// Runs the micro kernel with `nv` pixel vectors.
///
/// # Safety
/// `m` must describe valid memory (see [`conv_band`]) and the CPU must support `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn micro(isa: Isa, k: usize, nv: usize, m: &Micro) {
    macro_rules! by_k {
        ($f:ident, $cb:literal, $nv:literal) => {
            match k {
                1 => simd::$f::<$cb, $nv, 1>(m),
                3 => simd::$f::<$cb, $nv, 3>(m),
                _ => simd::$f::<$cb, $nv, 7>(m),
            }
        };
    }
    match (isa, nv) {
        (Isa::Avx512, 1) => by_k!(micro_avx512, 8, 1),
        (Isa::Avx512, 2) => by_k!(micro_avx512, 8, 2),
        (Isa::Avx512, _) => by_k!(micro_avx512, 8, 3),
        (Isa::Avx2, 1) => by_k!(micro_avx2, 4, 1),
        (Isa::Avx2, 2) => by_k!(micro_avx2, 4, 2),
        (Isa::Avx2, _) => by_k!(micro_avx2, 4, 3),
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro(_: Isa, _: usize, _: usize, _: &Micro) {
    unreachable!("cpu_ops kernels need x86-64")
}

/// `dst[i] = relu?(src[i] * a + b)`, with the choice made once rather than per value.
fn transform_into<'a>(
    dst: &mut [f32],
    src: impl Iterator<Item = &'a f32>,
    affine: Option<(f32, f32)>,
    relu: bool,
) {
    let pairs = dst.iter_mut().zip(src);
    match (affine, relu) {
        (Some((a, b)), true) => pairs.for_each(|(d, &s)| *d = (s * a + b).max(0.0)),
        (Some((a, b)), false) => pairs.for_each(|(d, &s)| *d = s * a + b),
        (None, true) => pairs.for_each(|(d, &s)| *d = s.max(0.0)),
        (None, false) => pairs.for_each(|(d, &s)| *d = s),
    }
}

/// Writes one staged row: the padded (and maybe upsampled, stride-2 deinterleaved) input
/// row `src` after `relu?(x * a + b)`.
fn stage_row(g: &Geom, src: &[f32], dst: &mut [f32], affine: Option<(f32, f32)>, relu: bool) {
    let f = |v: f32| -> f32 {
        match affine {
            Some((a, b)) => {
                let y = v * a + b;
                if relu {
                    y.max(0.0)
                } else {
                    y
                }
            }
            None if relu => v.max(0.0),
            None => v,
        }
    };
    let (pad, we) = (g.pad_left, g.we);
    let col = |e: usize| if g.up { e / 2 } else { e };
    let value = |px: usize| -> f32 {
        let e = px as isize - pad as isize;
        if g.zero {
            if e < 0 || e >= we as isize {
                0.0
            } else {
                f(src[col(e as usize)])
            }
        } else {
            f(src[col(reflect(e, we))])
        }
    };
    // Where padded column `px` goes: stride 2 deinterleaves even and odd columns.
    let slot = |px: usize| {
        if g.stride == 2 {
            (px & 1) * g.half + px / 2
        } else {
            px
        }
    };
    if g.stride == 2 && g.up {
        for px in 0..g.wp {
            dst[slot(px)] = value(px);
        }
        return;
    }
    // The input columns that land in the staged row, then the padding.
    let n = we.min(g.wp - pad);
    if g.stride == 2 {
        // Even padded columns first, then odd ones, each a strided read.
        for parity in 0..2 {
            let first = pad + (parity + pad) % 2;
            if first >= pad + n {
                continue;
            }
            let count = (pad + n - first).div_ceil(2);
            let start = slot(first);
            let columns = src[first - pad..n].iter().step_by(2);
            transform_into(&mut dst[start..start + count], columns, affine, relu);
        }
    } else {
        let interior = &mut dst[pad..pad + n];
        if g.up {
            transform_into(interior, (0..n).map(|i| &src[i / 2]), affine, relu);
        } else if affine.is_none() && !relu {
            interior.copy_from_slice(&src[..n]);
        } else {
            transform_into(interior, src[..n].iter(), affine, relu);
        }
    }
    for px in (0..pad).chain(pad + n..g.wp) {
        dst[slot(px)] = value(px);
    }
}

/// Stages `rows` padded rows of one input plane `xp`, from padded row `prow0` on, at
/// `g.pitch` floats per row, after `relu?(x * a + b)`.
fn stage_plane(
    g: &Geom,
    xp: &[f32],
    affine: Option<(f32, f32)>,
    relu: bool,
    prow0: usize,
    rows: usize,
    dst: &mut [f32],
) {
    for j in 0..rows {
        let dst = &mut dst[j * g.pitch..(j + 1) * g.pitch];
        let e = (prow0 + j) as isize - g.pad_top as isize;
        let e = if !g.zero {
            reflect(e, g.he)
        } else if e < 0 || e >= g.he as isize {
            dst.fill(0.0);
            continue;
        } else {
            e as usize
        };
        let sr = if g.up { e / 2 } else { e };
        stage_row(g, &xp[sr * g.w..(sr + 1) * g.w], dst, affine, relu);
    }
}

/// Computes output rows `r0..r1` of sample `n` (all output channels) into `out`.
///
/// # Safety
/// `out` must point at `N * cout * ho * wo` floats and `res`, when not null, at
/// `N * res_c * ho * wo`; other tasks must not write the same rows.
#[allow(clippy::too_many_arguments)]
unsafe fn conv_band(
    isa: Isa,
    g: &Geom,
    conv: &PackedConv,
    input: &InputTransformRef,
    x: &[f32],
    n: usize,
    r0: usize,
    r1: usize,
    out: SendPtr,
    (res, res_c): (*const f32, usize),
    act: Act,
    scratch: &mut Vec<f32>,
) {
    let (cb, nv_max, lanes) = tile(isa);
    let affine = |ci: usize| {
        input
            .affine
            .as_ref()
            .map(|(s, t)| (s[n * g.cin + ci], t[n * g.cin + ci]))
    };
    // A 1x1 convolution of the input as it is reads it in place: rows of whole vectors, so
    // that no load passes the end of a row.
    let direct = g.k == 1
        && g.stride == 1
        && g.pad_top == 0
        && g.pad_left == 0
        && !g.up
        && input.affine.is_none()
        && !input.relu
        && input.depthwise.is_none()
        && g.w.is_multiple_of(lanes);
    let (src0, ci_pitch, row_pitch) = if let Some((dw, gdw)) = &input.depthwise {
        // Separable: the staged rows are the depthwise convolution's output rows.
        let plane = gdw.h * gdw.w;
        let xn = &x[n * gdw.cin * plane..(n + 1) * gdw.cin * plane];
        let rows = r1 - r0;
        let ci_pitch = rows * g.pitch;
        let need = g.cin * ci_pitch + 64;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let dw_rows = gdw.staged_rows(rows);
        DW_SCRATCH.with(|t| {
            let mut t = t.borrow_mut();
            let need = dw_rows * gdw.pitch + 64;
            if t.len() < need {
                t.resize(need, 0.0);
            }
            for ci in 0..g.cin {
                let xp = &xn[ci * plane..(ci + 1) * plane];
                stage_plane(
                    gdw,
                    xp,
                    affine(ci),
                    input.relu,
                    r0 * gdw.stride,
                    dw_rows,
                    &mut t,
                );
                let k2 = gdw.k * gdw.k;
                depthwise_rows_isa(
                    isa,
                    gdw,
                    &t,
                    rows,
                    &dw.w[ci * k2..(ci + 1) * k2],
                    dw.bias.as_ref().map_or(0.0, |b| b[ci]),
                    Act::None,
                    None,
                    &mut scratch[ci * ci_pitch..(ci + 1) * ci_pitch],
                    g.pitch,
                );
            }
        });
        (scratch.as_ptr(), ci_pitch, g.pitch)
    } else if direct {
        let plane = g.h * g.w;
        let xn = &x[n * g.cin * plane..(n + 1) * g.cin * plane];
        (xn.as_ptr().add(r0 * g.w), plane, g.w)
    } else {
        let plane = g.h * g.w;
        let xn = &x[n * g.cin * plane..(n + 1) * g.cin * plane];
        let rows = g.staged_rows(r1 - r0);
        let ci_pitch = rows * g.pitch;
        let need = g.cin * ci_pitch + 64;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        for ci in 0..g.cin {
            let xp = &xn[ci * plane..(ci + 1) * plane];
            let dst = &mut scratch[ci * ci_pitch..(ci + 1) * ci_pitch];
            stage_plane(g, xp, affine(ci), input.relu, r0 * g.stride, rows, dst);
        }
        (scratch.as_ptr(), ci_pitch, g.pitch)
    };

    let block = g.cin * g.k * g.k * PB;
    let out_pitch = g.ho * g.wo;
    for co0 in (0..conv.cout).step_by(cb) {
        let nco = cb.min(conv.cout - co0);
        let w = conv.w.as_ptr().add((co0 / PB) * block + co0 % PB);
        let bias = conv
            .bias
            .as_ref()
            .map_or(std::ptr::null(), |b| b.as_ptr().add(co0));
        let nres = if res.is_null() {
            0
        } else {
            res_c.saturating_sub(co0).min(nco)
        };
        for r in r0..r1 {
            let src = src0.add((r - r0) * g.stride * row_pitch);
            let base = ((n * conv.cout + co0) * g.ho + r) * g.wo;
            let res_base = ((n * res_c + co0.min(res_c)) * g.ho + r) * g.wo;
            let mut x0 = 0;
            while x0 < g.wo {
                let ncols = (nv_max * lanes).min(g.wo - x0);
                let m = Micro {
                    src: src.add(x0),
                    ci_pitch,
                    row_pitch,
                    cin: g.cin,
                    kw_off: g.kw_off,
                    w,
                    out: out.get().add(base + x0),
                    out_pitch,
                    res: if nres == 0 {
                        std::ptr::null()
                    } else {
                        res.add(res_base + x0)
                    },
                    nres,
                    bias,
                    nco,
                    ncols,
                    act,
                };
                micro(isa, g.k, ncols.div_ceil(lanes), &m);
                x0 += ncols;
            }
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static DW_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl ConvOp<'_> {
    fn run(
        &self,
        x: &[f32],
        dims: &[usize],
        res: Option<(&[f32], &[usize])>,
    ) -> Result<(Vec<f32>, Shape)> {
        let isa = self.isa;
        let (g, input) = match &self.input.depthwise {
            None => (Geom::new(self.conv, dims, self.input.upsample)?, None),
            Some(dw) => {
                if self.conv.k != 1 || self.conv.stride != 1 || self.input.upsample {
                    bail!("cpu_ops conv: a depthwise input needs a plain 1x1 convolution")
                }
                let gdw = Geom::with(dw.c, dw.k, dw.stride, dw.padding, dims, false)?;
                let dims = [gdw.n, gdw.cin, gdw.ho, gdw.wo];
                let g = Geom::new(self.conv, &dims, false)?;
                (g, Some(gdw))
            }
        };
        let n_in = match &input {
            Some(gdw) => gdw.cin,
            None => g.cin,
        };
        if let Some((s, t)) = &self.input.affine {
            if s.len() != g.n * n_in || t.len() != g.n * n_in {
                bail!("cpu_ops conv: input affine needs {} values", g.n * n_in)
            }
        }
        let len = g.n * self.conv.cout * g.ho * g.wo;
        let res_c = match res {
            None => 0,
            Some((_, &[rn, rc, rh, rw]))
                if rn == g.n && rc <= self.conv.cout && (rh, rw) == (g.ho, g.wo) =>
            {
                rc
            }
            Some((_, d)) => bail!(
                "cpu_ops conv: residual {d:?} does not fit the output {:?}",
                [g.n, self.conv.cout, g.ho, g.wo]
            ),
        };
        let mut out = uninit_vec(len);
        let ptr = SendPtr(out.as_mut_ptr());
        let res_ptr = SendPtr(res.map_or(std::ptr::null(), |r| r.0.as_ptr()) as *mut f32);
        let band = g.band_rows();
        let bands = g.ho.div_ceil(band);
        let staged = InputTransformRef {
            inner: self.input,
            depthwise: self.input.depthwise.as_deref().zip(input.as_ref()),
        };
        (0..g.n * bands).into_par_iter().for_each(|t| {
            let (n, b) = (t / bands, t % bands);
            let (r0, r1) = (b * band, ((b + 1) * band).min(g.ho));
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                // SAFETY: bands of distinct tasks cover disjoint rows of `out`, which has
                // `len` floats; `res` has `n * res_c * ho * wo`.
                unsafe {
                    conv_band(
                        isa,
                        &g,
                        self.conv,
                        &staged,
                        x,
                        n,
                        r0,
                        r1,
                        ptr,
                        (res_ptr.get(), res_c),
                        self.act,
                        &mut s,
                    )
                }
            });
        });
        Ok((out, Shape::from((g.n, self.conv.cout, g.ho, g.wo))))
    }
}

/// An [`InputTransform`] with its depthwise geometry resolved for one input shape.
struct InputTransformRef<'a> {
    inner: &'a InputTransform,
    depthwise: Option<(&'a PackedDepthwise, &'a Geom)>,
}

impl std::ops::Deref for InputTransformRef<'_> {
    type Target = InputTransform;

    fn deref(&self) -> &InputTransform {
        self.inner
    }
}

impl CustomOp1 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "toonbot-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.run(f32_slice(s, l)?, l.dims(), None)?;
        Ok((CpuStorage::F32(out), shape))
    }
}

impl CustomOp2 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "toonbot-conv2d-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let res = (f32_slice(s2, l2)?, l2.dims());
        let (out, shape) = self.run(f32_slice(s1, l1)?, l1.dims(), Some(res))?;
        Ok((CpuStorage::F32(out), shape))
    }
}

/// The fused convolution (see [`ConvOp`]): `x` NCHW; `residual` shaped as the output, or
/// with fewer channels (the missing ones count as zeros).
pub fn conv2d(
    x: &Tensor,
    conv: &PackedConv,
    input: &InputTransform,
    residual: Option<&Tensor>,
    act: impl Into<Act>,
) -> Result<Tensor> {
    let Some(isa) = isa() else {
        bail!("cpu_ops conv: no supported CPU")
    };
    keep_freed_memory();
    conv2d_isa(x, conv, input, residual, act.into(), isa)
}

/// [`conv2d`] of an NCHW input given as its values, no input transform or activation: for
/// ops whose inputs are already slices (the training convolution's). Fails without a
/// supported CPU.
pub fn conv2d_slice(x: &[f32], dims: &[usize], conv: &PackedConv) -> Result<Vec<f32>> {
    let Some(isa) = isa() else {
        bail!("cpu_ops conv: no supported CPU")
    };
    let op = ConvOp {
        conv,
        input: &InputTransform::default(),
        act: Act::None,
        isa,
    };
    Ok(op.run(x, dims, None)?.0)
}

/// [`conv2d`] with the given instruction set, which the CPU must support.
fn conv2d_isa(
    x: &Tensor,
    conv: &PackedConv,
    input: &InputTransform,
    residual: Option<&Tensor>,
    act: Act,
    isa: Isa,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = ConvOp {
        conv,
        input,
        act,
        isa,
    };
    match residual {
        Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op),
        None => x.apply_op1_no_bwd(&op),
    }
}

// ---- Depthwise convolution ------------------------------------------------------------------

/// Depthwise convolution weights `(C, 1, k, k)` (k 3 or 5, stride 1 or 2) and bias.
pub struct PackedDepthwise {
    c: usize,
    k: usize,
    stride: usize,
    padding: Padding,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for PackedDepthwise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedDepthwise({} channels, {}x{}, stride {}, {:?})",
            self.c, self.k, self.k, self.stride, self.padding
        )
    }
}

impl PackedDepthwise {
    /// Packs a `(C, 1, k, k)` depthwise weight (k 3 or 5; stride 1 or 2) and its bias for a
    /// convolution with `padding`; fails for other shapes.
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: Padding,
    ) -> Result<Self> {
        let (c, one, kh, kw) = weight.dims4()?;
        if one != 1 || kh != kw || !matches!(kh, 3 | 5) || !matches!(stride, 1 | 2) {
            bail!(
                "cpu_ops: unsupported depthwise convolution {:?} stride {stride}",
                weight.dims()
            )
        }
        Ok(Self {
            c,
            k: kh,
            stride,
            padding,
            w: weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            bias: bias
                .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1())
                .transpose()?,
        })
    }
}

/// `rows` output rows of one depthwise channel from its staged padded rows (row 0 = the
/// first output row's window): `act(sum of k * k shifted rows * w + bias) (+ res)`, 16
/// outputs at a time (vectorised by the compiler for the ISA of the caller). `res` holds
/// `rows * wo` values; output rows are `out_pitch` apart.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_rows(
    g: &Geom,
    staged: &[f32],
    rows: usize,
    w: &[f32],
    bias: f32,
    act: Act,
    res: Option<&[f32]>,
    out: &mut [f32],
    out_pitch: usize,
) {
    let k = g.k;
    for r in 0..rows {
        let orow = &mut out[r * out_pitch..r * out_pitch + g.wo];
        let mut x0 = 0;
        while x0 < g.wo {
            let mut acc = [bias; 16];
            for kh in 0..k {
                let row = &staged[(r * g.stride + kh) * g.pitch + x0..];
                for (kw, &off) in g.kw_off.iter().enumerate().take(k) {
                    let wv = w[kh * k + kw];
                    let src = &row[off..off + 16];
                    for (a, &v) in acc.iter_mut().zip(src) {
                        *a = wv.mul_add(v, *a);
                    }
                }
            }
            let n = 16.min(g.wo - x0);
            match res {
                Some(res) => {
                    let res = &res[r * g.wo + x0..r * g.wo + x0 + n];
                    for ((o, &a), &r) in orow[x0..x0 + n].iter_mut().zip(&acc).zip(res) {
                        *o = act.apply(a) + r;
                    }
                }
                None => {
                    for (o, &a) in orow[x0..x0 + n].iter_mut().zip(&acc) {
                        *o = act.apply(a);
                    }
                }
            }
            x0 += n;
        }
    }
}

macro_rules! depthwise_rows_for {
    ($name:ident, $feat:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            g: &Geom,
            staged: &[f32],
            rows: usize,
            w: &[f32],
            bias: f32,
            act: Act,
            res: Option<&[f32]>,
            out: &mut [f32],
            out_pitch: usize,
        ) {
            depthwise_rows(g, staged, rows, w, bias, act, res, out, out_pitch)
        }
    };
}
depthwise_rows_for!(depthwise_rows_avx512, "avx512f");
depthwise_rows_for!(depthwise_rows_avx2, "avx2,fma");

/// [`depthwise_rows`] compiled for `isa` (which the CPU must support).
#[allow(clippy::too_many_arguments)]
fn depthwise_rows_isa(
    isa: Isa,
    g: &Geom,
    staged: &[f32],
    rows: usize,
    w: &[f32],
    bias: f32,
    act: Act,
    res: Option<&[f32]>,
    out: &mut [f32],
    out_pitch: usize,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` was detected on this CPU.
    unsafe {
        match isa {
            Isa::Avx512 => {
                depthwise_rows_avx512(g, staged, rows, w, bias, act, res, out, out_pitch)
            }
            Isa::Avx2 => depthwise_rows_avx2(g, staged, rows, w, bias, act, res, out, out_pitch),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        depthwise_rows(g, staged, rows, w, bias, act, res, out, out_pitch)
    }
}

/// `act(depthwise(x)) (+ residual)`: CustomOp1 on `x`, or CustomOp2 on `(x, residual)`.
pub struct DepthwiseOp<'a> {
    dw: &'a PackedDepthwise,
    act: Act,
    isa: Isa,
}

impl DepthwiseOp<'_> {
    fn run(&self, x: &[f32], dims: &[usize], res: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let dw = self.dw;
        let g = Geom::with(dw.c, dw.k, dw.stride, dw.padding, dims, false)?;
        let (plane_in, plane_out) = (g.h * g.w, g.ho * g.wo);
        if res.is_some_and(|r| r.len() != g.n * g.cin * plane_out) {
            bail!("cpu_ops depthwise: residual of the wrong size")
        }
        let mut out = uninit_vec(g.n * g.cin * plane_out);
        let rows = g.staged_rows(g.ho);
        out.par_chunks_mut(plane_out.max(1))
            .enumerate()
            .for_each(|(p, o)| {
                let c = p % g.cin;
                let xs = &x[p * plane_in..(p + 1) * plane_in];
                let w = &dw.w[c * g.k * g.k..(c + 1) * g.k * g.k];
                let b = dw.bias.as_ref().map_or(0.0, |b| b[c]);
                let r = res.map(|r| &r[p * plane_out..(p + 1) * plane_out]);
                SCRATCH.with(|s| {
                    let mut s = s.borrow_mut();
                    let need = rows * g.pitch + 64;
                    if s.len() < need {
                        s.resize(need, 0.0);
                    }
                    stage_plane(&g, xs, None, false, 0, rows, &mut s);
                    depthwise_rows_isa(self.isa, &g, &s, g.ho, w, b, self.act, r, o, g.wo);
                });
            });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.cin, g.ho, g.wo))))
    }
}

impl CustomOp1 for DepthwiseOp<'_> {
    fn name(&self) -> &'static str {
        "toonbot-depthwise-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(f32_slice(s, l)?, l.dims(), None)
    }
}

impl CustomOp2 for DepthwiseOp<'_> {
    fn name(&self) -> &'static str {
        "toonbot-depthwise-conv2d-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(f32_slice(s1, l1)?, l1.dims(), Some(f32_slice(s2, l2)?))
    }
}

/// `act(depthwise(x)) (+ residual)`, NCHW, with the convolution's padding and bias.
pub fn depthwise_conv2d(
    x: &Tensor,
    dw: &PackedDepthwise,
    act: Act,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let Some(isa) = isa() else {
        bail!("cpu_ops depthwise: no supported CPU")
    };
    keep_freed_memory();
    depthwise_conv2d_isa(x, dw, act, residual, isa)
}

fn depthwise_conv2d_isa(
    x: &Tensor,
    dw: &PackedDepthwise,
    act: Act,
    residual: Option<&Tensor>,
    isa: Isa,
) -> Result<Tensor> {
    let op = DepthwiseOp { dw, act, isa };
    let x = x.contiguous()?;
    match residual {
        Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op),
        None => x.apply_op1_no_bwd(&op),
    }
}

// ---- Normalisation statistics and elementwise ops -------------------------------------------

/// Per plane of `(N, C, H, W)`: `(N, C, 2)` holding the mean and the sum of squared
/// deviations from it (two passes over each plane, accumulated in f64 by blocks).
pub struct ChannelStats;

fn sum_f32(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

fn sum_sq_dev_f32(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v - m) * (v - m);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&v| (v - m) * (v - m)).sum::<f32>()
}

fn plane_stats(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = x.chunks(1024).map(|c| sum_f32(c) as f64).sum::<f64>() / n;
    let m = mean as f32;
    let ss = x
        .chunks(1024)
        .map(|c| sum_sq_dev_f32(c, m) as f64)
        .sum::<f64>();
    (m, ss as f32)
}

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "toonbot-channel-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let (n, c, h, w) = l.shape().dims4()?;
        let plane = h * w;
        let stats: Vec<(f32, f32)> = x.par_chunks(plane.max(1)).map(plane_stats).collect();
        let out = stats.into_iter().flat_map(|(m, s)| [m, s]).collect();
        Ok((CpuStorage::F32(out), Shape::from((n, c, 2))))
    }
}

/// `(N, C, 2)`: mean and sum of squared deviations of each `(N, C)` plane.
pub fn channel_stats(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&ChannelStats)
}

/// `nn.InstanceNorm2d` (biased variance, `eps`) as a per-channel `(scale, shift)` from
/// [`channel_stats`] of a tensor with `count` = H * W elements per plane.
pub fn instance_norm_affine(
    stats: &Tensor,
    count: usize,
    eps: f64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let s: Vec<f32> = stats.flatten_all()?.to_vec1()?;
    let (scale, shift) = s
        .chunks_exact(2)
        .map(|ms| {
            let inv = 1.0 / (ms[1] as f64 / count as f64 + eps).sqrt();
            (inv as f32, (-(ms[0] as f64) * inv) as f32)
        })
        .unzip();
    Ok((scale, shift))
}

/// `relu?(x * scale + shift)` per `(N, C)` plane, plus `residual`: CustomOp1 on `x` or
/// CustomOp2 on `(x, residual)`.
pub struct AffineOp<'a> {
    /// Per-`(sample, channel)` factors, `N * C` of them, sample-major.
    pub scale: &'a [f32],
    /// Per-`(sample, channel)` offsets added after the factor, `N * C` of them, sample-major.
    pub shift: &'a [f32],
    /// Whether ReLU follows the affine (before any residual is added).
    pub relu: bool,
}

impl AffineOp<'_> {
    fn run(&self, x: &[f32], l: &Layout, res: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let plane = (h * w).max(1);
        if self.scale.len() != n * c || self.shift.len() != n * c {
            bail!("cpu_ops affine: {} values per vector expected", n * c)
        }
        if res.is_some_and(|r| r.len() != x.len()) {
            bail!("cpu_ops affine: residual of the wrong size")
        }
        let mut out = uninit_vec(x.len());
        out.par_chunks_mut(plane).enumerate().for_each(|(p, o)| {
            let (a, b) = (self.scale[p], self.shift[p]);
            let xs = &x[p * plane..(p + 1) * plane];
            match (res, self.relu) {
                (None, true) => {
                    for (o, &v) in o.iter_mut().zip(xs) {
                        *o = (v * a + b).max(0.0);
                    }
                }
                (None, false) => {
                    for (o, &v) in o.iter_mut().zip(xs) {
                        *o = v * a + b;
                    }
                }
                (Some(r), relu) => {
                    let rs = &r[p * plane..(p + 1) * plane];
                    for ((o, &v), &r) in o.iter_mut().zip(xs).zip(rs) {
                        let y = v * a + b;
                        *o = if relu { y.max(0.0) } else { y } + r;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

impl CustomOp1 for AffineOp<'_> {
    fn name(&self) -> &'static str {
        "toonbot-channel-affine"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(f32_slice(s, l)?, l, None)
    }
}

impl CustomOp2 for AffineOp<'_> {
    fn name(&self) -> &'static str {
        "toonbot-channel-affine-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!(
                "cpu_ops affine: residual {:?} vs {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        self.run(f32_slice(s1, l1)?, l1, Some(f32_slice(s2, l2)?))
    }
}

/// `relu?(x * scale + shift) (+ residual)` with per-`(N, C)` `scale`, `shift`.
pub fn channel_affine(
    x: &Tensor,
    scale: &[f32],
    shift: &[f32],
    relu: bool,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = AffineOp { scale, shift, relu };
    match residual {
        Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op),
        None => x.apply_op1_no_bwd(&op),
    }
}

/// 2x2 stride-2 pooling on NCHW with even sizes: `F.avg_pool2d(x, 2)` or
/// `F.max_pool2d(x, 2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool2x {
    /// 2x2 average (`F.avg_pool2d(x, 2)`).
    Avg,
    /// 2x2 maximum (`F.max_pool2d(x, 2)`).
    Max,
}

impl CustomOp1 for Pool2x {
    fn name(&self) -> &'static str {
        match self {
            Pool2x::Avg => "toonbot-avg-pool2x",
            Pool2x::Max => "toonbot-max-pool2x",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let (n, c, h, w) = l.shape().dims4()?;
        if h % 2 != 0 || w % 2 != 0 || h == 0 || w == 0 {
            bail!("cpu_ops {}: even sizes needed, got {h}x{w}", self.name())
        }
        let pool = match self {
            Pool2x::Avg => |a: &[f32], b: &[f32]| (a[0] + a[1] + b[0] + b[1]) * 0.25,
            Pool2x::Max => |a: &[f32], b: &[f32]| a[0].max(a[1]).max(b[0].max(b[1])),
        };
        let (ho, wo) = (h / 2, w / 2);
        let mut out = uninit_vec(n * c * ho * wo);
        out.par_chunks_mut(ho * wo).enumerate().for_each(|(p, o)| {
            let xp = &x[p * h * w..(p + 1) * h * w];
            for (y, orow) in o.chunks_exact_mut(wo).enumerate() {
                let a = &xp[2 * y * w..(2 * y + 1) * w];
                let b = &xp[(2 * y + 1) * w..(2 * y + 2) * w];
                for ((o, a), b) in orow
                    .iter_mut()
                    .zip(a.chunks_exact(2))
                    .zip(b.chunks_exact(2))
                {
                    *o = pool(a, b);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

/// `F.avg_pool2d(x, 2)` on an NCHW `f32` tensor with even H and W, giving
/// `(N, C, H / 2, W / 2)`; inference only (no gradient).
pub fn avg_pool2x(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Pool2x::Avg)
}

/// `F.max_pool2d(x, 2)` on an NCHW `f32` tensor with even H and W, giving
/// `(N, C, H / 2, W / 2)`; inference only (no gradient).
pub fn max_pool2x(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Pool2x::Max)
}

/// `skip + upsample_nearest2x(low)`: CustomOp2 on `(skip, low)`.
pub struct AddUpsampled;

impl CustomOp2 for AddUpsampled {
    fn name(&self) -> &'static str {
        "toonbot-add-upsampled"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (skip, low) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let (n, c, h, w) = l1.shape().dims4()?;
        let (ln, lc, lh, lw) = l2.shape().dims4()?;
        if (ln, lc, 2 * lh, 2 * lw) != (n, c, h, w) {
            bail!("cpu_ops add_upsampled: {:?} vs {:?}", l1.dims(), l2.dims())
        }
        let mut out = uninit_vec(skip.len());
        out.par_chunks_mut((h * w).max(1))
            .enumerate()
            .for_each(|(p, o)| {
                let sp = &skip[p * h * w..(p + 1) * h * w];
                let lp = &low[p * lh * lw..(p + 1) * lh * lw];
                for (y, (orow, srow)) in o.chunks_exact_mut(w).zip(sp.chunks_exact(w)).enumerate() {
                    let lrow = &lp[(y / 2) * lw..(y / 2 + 1) * lw];
                    for ((o, s), &l) in orow.chunks_exact_mut(2).zip(srow.chunks_exact(2)).zip(lrow)
                    {
                        o[0] = s[0] + l;
                        o[1] = s[1] + l;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `skip + upsample_nearest2x(low)` in one pass, `skip` being `(N, C, H, W)` and `low`
/// `(N, C, H / 2, W / 2)`: the hourglass's upward merge, inference only (no gradient).
pub fn add_upsampled(skip: &Tensor, low: &Tensor) -> Result<Tensor> {
    skip.contiguous()?
        .apply_op2_no_bwd(&low.contiguous()?, &AddUpsampled)
}

/// `x + cat(parts, dim 1)`: CustomOp1 on `x`, reading the parts (contiguous, same N, H, W,
/// channels adding up to x's).
pub struct CatResidual<'a> {
    /// The tensors concatenated along the channels, in order: same N, H and W as `x`,
    /// channels adding up to `x`'s.
    pub parts: &'a [Tensor],
}

impl CustomOp1 for CatResidual<'_> {
    fn name(&self) -> &'static str {
        "toonbot-cat-residual"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let (n, c, h, w) = l.shape().dims4()?;
        let plane = h * w;
        let mut out = uninit_vec(x.len());
        let mut c0 = 0;
        for part in self.parts {
            let (pn, pc, ph, pw) = part.dims4()?;
            if (pn, ph, pw) != (n, h, w) || c0 + pc > c {
                bail!(
                    "cpu_ops cat_residual: part {:?} does not fit {:?}",
                    part.dims(),
                    l.dims()
                )
            }
            let ptr = SendPtr(out.as_mut_ptr());
            with_slice(part, |p| {
                (0..n * pc).into_par_iter().for_each(|i| {
                    let (b, ch) = (i / pc, i % pc);
                    let dst = (b * c + c0 + ch) * plane;
                    let xs = &x[dst..dst + plane];
                    let ps = &p[i * plane..(i + 1) * plane];
                    // SAFETY: each (sample, channel) plane of `out` is written by one task.
                    let o = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(dst), plane) };
                    for ((o, &a), &b) in o.iter_mut().zip(xs).zip(ps) {
                        *o = a + b;
                    }
                });
                Ok(())
            })?;
            c0 += pc;
        }
        if c0 != c {
            bail!("cpu_ops cat_residual: parts have {c0} channels, x has {c}")
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `x + cat(parts, dim 1)` in one pass, without building the concatenation; inference only
/// (no gradient).
pub fn cat_residual(x: &Tensor, parts: &[Tensor]) -> Result<Tensor> {
    let parts = parts
        .iter()
        .map(|p| p.contiguous())
        .collect::<Result<Vec<_>>>()?;
    x.contiguous()?
        .apply_op1_no_bwd(&CatResidual { parts: &parts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::train_ops::reflection_pad2d;
    use candle_core::{Device, Module, Var, D};

    fn rand(shape: &[usize], seed: u64) -> Result<Tensor> {
        // Deterministic values in [-1, 1).
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// candle's nearest 2x upsample (its forward; only its backward is wrong for training).
    fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        x.upsample_nearest2d(2 * h, 2 * w)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        assert_eq!(a.dims(), b.dims());
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()
    }

    /// The ISAs this CPU can run: the detected one and, below AVX-512, AVX2.
    fn isas() -> Vec<Isa> {
        match detect() {
            Some(Isa::Avx512) => vec![Isa::Avx512, Isa::Avx2],
            Some(Isa::Avx2) => vec![Isa::Avx2],
            None => vec![],
        }
    }

    /// Candle's version of the fused convolution.
    #[allow(clippy::too_many_arguments)]
    fn reference_conv(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        pad: usize,
        input: &InputTransform,
        residual: Option<&Tensor>,
        relu_out: bool,
    ) -> Result<Tensor> {
        let (n, c, _, _) = x.dims4()?;
        let mut h = x.clone();
        if let Some((scale, shift)) = &input.affine {
            let s = Tensor::from_slice(scale, (n, c, 1, 1), x.device())?;
            let t = Tensor::from_slice(shift, (n, c, 1, 1), x.device())?;
            h = h.broadcast_mul(&s)?.broadcast_add(&t)?;
        }
        if input.relu {
            h = h.relu()?;
        }
        if input.upsample {
            h = upsample_nearest2x(&h)?;
        }
        let cfg = candle_nn::Conv2dConfig {
            stride,
            ..Default::default()
        };
        let conv = candle_nn::Conv2d::new(w.clone(), bias.cloned(), cfg);
        let mut y = conv.forward(&reflection_pad2d(&h, pad)?)?;
        if let Some(r) = residual {
            y = (y + r)?;
        }
        if relu_out {
            y = y.relu()?;
        }
        Ok(y)
    }

    #[test]
    fn conv_matches_candle() -> Result<()> {
        // (n, cin, cout, k, stride, h, w, upsample, affine, relu in, bias, residual, relu out)
        let cases = [
            (
                1, 32, 16, 3, 1, 20, 37, false, true, true, false, false, false,
            ),
            (
                2, 8, 8, 3, 1, 16, 16, false, true, true, false, false, false,
            ),
            (1, 5, 19, 3, 1, 9, 50, false, false, false, true, true, true),
            (
                2, 12, 20, 3, 2, 18, 34, false, false, false, false, false, false,
            ),
            (
                1, 7, 9, 3, 2, 17, 23, false, true, false, true, false, false,
            ),
            (
                1, 6, 10, 3, 2, 15, 21, false, true, true, false, false, false,
            ),
            (
                1, 3, 32, 7, 1, 24, 40, false, false, false, false, false, false,
            ),
            (
                1, 3, 3, 7, 1, 8, 8, false, false, false, false, false, false,
            ),
            (2, 32, 3, 1, 1, 8, 64, false, true, true, true, false, false),
            (
                1, 32, 32, 1, 1, 4, 32, false, false, false, true, true, false,
            ),
            (
                1, 3, 32, 1, 1, 6, 20, false, false, false, true, true, false,
            ),
            (
                1, 16, 24, 1, 1, 6, 20, false, false, false, true, false, true,
            ),
            (
                2, 24, 12, 3, 1, 8, 12, true, true, true, false, false, false,
            ),
            (1, 6, 8, 3, 1, 2, 2, true, false, false, false, false, false),
        ];
        for isa in isas() {
            for (i, &(n, cin, cout, k, stride, h, w, up, affine, relu, bias, res, relu_out)) in
                cases.iter().enumerate()
            {
                let x = rand(&[n, cin, h, w], 1 + i as u64)?;
                let weight = rand(&[cout, cin, k, k], 100 + i as u64)?;
                let b = rand(&[cout], 200 + i as u64)?;
                let bias = bias.then_some(&b);
                let input = InputTransform {
                    affine: affine.then(|| {
                        let s = rand(&[n * cin], 300 + i as u64).unwrap();
                        let t = rand(&[n * cin], 400 + i as u64).unwrap();
                        (s.to_vec1().unwrap(), t.to_vec1().unwrap())
                    }),
                    relu,
                    upsample: up,
                    depthwise: None,
                };
                let pad = k / 2;
                let want = reference_conv(&x, &weight, bias, stride, pad, &input, None, relu_out)?;
                let residual = if res {
                    Some(rand(want.dims(), 500 + i as u64)?)
                } else {
                    None
                };
                let want = match &residual {
                    Some(_) => reference_conv(
                        &x,
                        &weight,
                        bias,
                        stride,
                        pad,
                        &input,
                        residual.as_ref(),
                        relu_out,
                    )?,
                    None => want,
                };
                let packed = PackedConv::new(&weight, bias, stride, Padding::Reflect(pad))?;
                let got = conv2d_isa(&x, &packed, &input, residual.as_ref(), relu_out.into(), isa)?;
                let diff = max_diff(&got, &want)?;
                assert!(diff < 2e-5, "{isa:?} case {i}: differs by {diff}");
            }
        }
        Ok(())
    }

    /// TensorFlow's SAME zero padding with candle ops.
    fn pad_same(x: &Tensor, k: usize, stride: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let total = |n: usize| ((n.div_ceil(stride) - 1) * stride + k).saturating_sub(n);
        let (th, tw) = (total(h), total(w));
        x.pad_with_zeros(2, th / 2, th - th / 2)?
            .pad_with_zeros(3, tw / 2, tw - tw / 2)
    }

    fn hard_swish(x: &Tensor) -> Result<Tensor> {
        x * ((x + 3.0)?.clamp(0f32, 6f32)? / 6.0)?
    }

    #[test]
    fn tf_same_conv_matches_candle() -> Result<()> {
        // (n, cin, cout, k, stride, h, w)
        let cases = [
            (1, 3, 32, 3, 2, 15, 20),
            (2, 8, 12, 3, 1, 9, 17),
            (1, 16, 8, 1, 1, 6, 33),
            (1, 4, 9, 3, 2, 16, 16),
        ];
        for isa in isas() {
            for (i, &(n, cin, cout, k, stride, h, w)) in cases.iter().enumerate() {
                let x = rand(&[n, cin, h, w], 20 + i as u64)?;
                let weight = rand(&[cout, cin, k, k], 30 + i as u64)?;
                let bias = rand(&[cout], 40 + i as u64)?;
                let want = pad_same(&x, k, stride)?
                    .conv2d(&weight, 0, stride, 1, 1)?
                    .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
                let packed = PackedConv::new(&weight, Some(&bias), stride, Padding::TfSame)?;
                let input = InputTransform::default();
                for act in [Act::None, Act::Relu, Act::HardSwish] {
                    let got = conv2d_isa(&x, &packed, &input, None, act, isa)?;
                    let want = match act {
                        Act::None => want.clone(),
                        Act::Relu => want.relu()?,
                        Act::HardSwish => hard_swish(&want)?,
                    };
                    let diff = max_diff(&got, &want)?;
                    assert!(diff < 2e-5, "{isa:?} case {i} {act:?}: differs by {diff}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn depthwise_and_separable_match_candle() -> Result<()> {
        // (n, c, cout, k, stride, h, w)
        let cases = [
            (2, 8, 16, 3, 1, 12, 20),
            (1, 6, 6, 3, 2, 13, 18),
            (1, 5, 7, 5, 2, 16, 16),
            (1, 4, 4, 5, 1, 7, 40),
        ];
        for isa in isas() {
            for (i, &(n, c, cout, k, stride, h, w)) in cases.iter().enumerate() {
                let x = rand(&[n, c, h, w], 50 + i as u64)?;
                let wd = rand(&[c, 1, k, k], 60 + i as u64)?;
                let bd = rand(&[c], 70 + i as u64)?;
                let dw = Arc::new(PackedDepthwise::new(
                    &wd,
                    Some(&bd),
                    stride,
                    Padding::TfSame,
                )?);
                let want_dw = pad_same(&x, k, stride)?
                    .conv2d(&wd, 0, stride, 1, c)?
                    .broadcast_add(&bd.reshape((1, c, 1, 1))?)?;
                // act(dw(x)) + residual
                let res = rand(want_dw.dims(), 80 + i as u64)?;
                let got = depthwise_conv2d_isa(&x, &dw, Act::Relu, Some(&res), isa)?;
                let diff = max_diff(&got, &(want_dw.relu()? + &res)?)?;
                assert!(diff < 2e-5, "{isa:?} depthwise case {i}: differs by {diff}");
                let got = depthwise_conv2d_isa(&x, &dw, Act::None, None, isa)?;
                assert!(max_diff(&got, &want_dw)? < 2e-5);

                // act(pw(dw(relu(x))) + residual with fewer channels)
                let wp = rand(&[cout, c, 1, 1], 90 + i as u64)?;
                let bp = rand(&[cout], 95 + i as u64)?;
                let pw = PackedConv::new(&wp, Some(&bp), 1, Padding::Reflect(0))?;
                let dwx = pad_same(&x.relu()?, k, stride)?
                    .conv2d(&wd, 0, stride, 1, c)?
                    .broadcast_add(&bd.reshape((1, c, 1, 1))?)?;
                let y = dwx
                    .conv2d(&wp, 0, 1, 1, 1)?
                    .broadcast_add(&bp.reshape((1, cout, 1, 1))?)?;
                let (_, _, ho, wo) = y.dims4()?;
                let rc = c.min(cout);
                let res = rand(&[n, rc, ho, wo], 99 + i as u64)?;
                let want = (y + res.pad_with_zeros(1, 0, cout - rc)?)?.relu()?;
                let input = InputTransform {
                    relu: true,
                    depthwise: Some(dw.clone()),
                    ..Default::default()
                };
                let got = conv2d_isa(&x, &pw, &input, Some(&res), Act::Relu, isa)?;
                let diff = max_diff(&got, &want)?;
                assert!(diff < 2e-5, "{isa:?} separable case {i}: differs by {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn stats_affine_and_norm_match_candle() -> Result<()> {
        let x = ((rand(&[2, 3, 12, 20], 7)? * 3.0)? + 5.0)?;
        let stats = channel_stats(&x)?;
        assert_eq!(stats.dims(), &[2, 3, 2]);
        let mean = x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
        let sum_sq = x
            .broadcast_sub(&mean)?
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sum_keepdim(D::Minus2)?;
        let got_mean = stats.narrow(2, 0, 1)?.reshape((2, 3, 1, 1))?;
        let got_sum_sq = stats.narrow(2, 1, 1)?.reshape((2, 3, 1, 1))?;
        assert!(max_diff(&got_mean, &mean)? < 1e-5);
        assert!(max_diff(&got_sum_sq, &sum_sq)? < 1e-3);

        // The instance norm as an affine, applied with and without ReLU and residual.
        let (scale, shift) = instance_norm_affine(&stats, 240, 1e-5)?;
        // Instance norm in candle ops: (x - mean) / sqrt(var + eps), biased variance.
        let want = x
            .broadcast_sub(&mean)?
            .broadcast_div(&((sum_sq / 240.0)? + 1e-5)?.sqrt()?)?;
        let residual = rand(x.dims(), 8)?;
        for (relu, res) in [
            (false, None),
            (true, None),
            (false, Some(&residual)),
            (true, Some(&residual)),
        ] {
            let got = channel_affine(&x, &scale, &shift, relu, res)?;
            let mut w = if relu { want.relu()? } else { want.clone() };
            if let Some(r) = res {
                w = (w + r)?;
            }
            let diff = max_diff(&got, &w)?;
            assert!(
                diff < 1e-5,
                "relu {relu}, residual {}: {diff}",
                res.is_some()
            );
        }
        Ok(())
    }

    #[test]
    fn pool_upsample_add_and_cat_match_candle() -> Result<()> {
        let x = rand(&[2, 3, 8, 12], 11)?;
        let diff = max_diff(&avg_pool2x(&x)?, &x.avg_pool2d(2)?)?;
        assert!(diff < 1e-6, "avg_pool2x differs by {diff}");
        let diff = max_diff(&max_pool2x(&x)?, &x.max_pool2d(2)?)?;
        assert_eq!(diff, 0.0, "max_pool2x differs by {diff}");

        let low = rand(&[2, 3, 4, 6], 12)?;
        let want = (&x + upsample_nearest2x(&low)?)?;
        assert_eq!(max_diff(&add_upsampled(&x, &low)?, &want)?, 0.0);

        let x = rand(&[2, 7, 5, 6], 13)?;
        let parts = [
            rand(&[2, 4, 5, 6], 14)?,
            rand(&[2, 2, 5, 6], 15)?,
            rand(&[2, 1, 5, 6], 16)?,
        ];
        let want = (&x + Tensor::cat(&parts, 1)?)?;
        assert_eq!(max_diff(&cat_residual(&x, &parts)?, &want)?, 0.0);
        assert!(cat_residual(&x, &parts[..2]).is_err());
        Ok(())
    }

    #[test]
    fn not_usable_on_tracked_tensors() -> Result<()> {
        let x = rand(&[1, 2, 4, 4], 1)?;
        let v = Var::from_tensor(&x)?;
        let derived = (v.as_tensor() * 2.0)?;
        assert!(!eligible(v.as_tensor()));
        assert!(!eligible(&derived));
        assert!(!eligible(&x.to_dtype(DType::F64)?));
        assert!(eligible(&x));
        assert_eq!(usable(&[&x]), isa().is_some());
        assert!(!usable(&[&x, v.as_tensor()]));
        Ok(())
    }
}
