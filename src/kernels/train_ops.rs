//! CPU operations for training, where tensors track gradients and `cpu_ops`' inference
//! kernels do not apply.
//!
//! candle 0.11's convolution backward on the CPU is slow: the input gradient is a naive
//! transposed convolution (one dot product per output pixel and tap, across channels
//! strided by the whole image) and the weight gradient is a convolution whose kernel is
//! the whole output gradient. Here the forward and both gradients are one im2col (or
//! col2im) and one GEMM per band of output rows, with the padding (zeros or reflection)
//! read in place; where the GEMM's inner dimension is short (few output channels, 7x7
//! kernels) the forward and the input gradient run `cpu_ops`' direct convolution instead,
//! and the weight gradient a direct kernel of its own.
//! Instance norm (+ReLU) is one pass per channel plane each way.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use candle_nn::{Conv2d, Module};
use gemm::Parallelism;

use super::cpu_ops::{self, f32_slice, PackedConv};
use rayon::prelude::*;
use std::ops::Range;

/// How the convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pad {
    /// `p` zeros on each side (candle's and PyTorch's `padding`).
    Zeros(usize),
    /// `nn.ReflectionPad2d(p)`: the input mirrored about its edge rows and columns.
    Reflect(usize),
}

impl Pad {
    fn size(self) -> usize {
        match self {
            Pad::Zeros(p) | Pad::Reflect(p) => p,
        }
    }
}

/// The geometry of one convolution: NCHW input, OIHW weight, square kernel.
#[derive(Debug, Clone, Copy)]
struct ConvGeometry {
    batch: usize,
    cin: usize,
    height: usize,
    width: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    pad: Pad,
    out_height: usize,
    out_width: usize,
}

impl ConvGeometry {
    fn new(x: &[usize], w: &[usize], pad: Pad, stride: usize) -> Result<Self> {
        let (&[batch, cin, height, width], &[cout, wcin, kernel, kw]) = (x, w) else {
            bail!("train conv2d: NCHW input and OIHW weight expected, got {x:?} and {w:?}")
        };
        if wcin != cin || kw != kernel || stride == 0 {
            bail!("train conv2d: input {x:?} and weight {w:?} (stride {stride}) do not match")
        }
        let padding = pad.size();
        if matches!(pad, Pad::Reflect(_)) && (padding >= height || padding >= width) {
            bail!("train conv2d: reflection pad {padding} needs an input larger than {x:?}")
        }
        let (h, wd) = (height + 2 * padding, width + 2 * padding);
        if h < kernel || wd < kernel {
            bail!("train conv2d: input {x:?} is smaller than the kernel {kernel}")
        }
        Ok(Self {
            batch,
            cin,
            height,
            width,
            cout,
            kernel,
            stride,
            pad,
            out_height: (h - kernel) / stride + 1,
            out_width: (wd - kernel) / stride + 1,
        })
    }

    /// The input index (of `0..size`) that output `o` reads with kernel tap `t`; `None` for
    /// a zero of the padding.
    fn source(&self, o: usize, t: usize, size: usize) -> Option<usize> {
        let i = (o * self.stride + t) as isize - self.pad.size() as isize;
        let last = size as isize - 1;
        match self.pad {
            _ if (0..=last).contains(&i) => Some(i as usize),
            Pad::Zeros(_) => None,
            Pad::Reflect(_) => Some(if i < 0 { -i } else { 2 * last - i } as usize),
        }
    }

    /// Rows of the column matrix: `cin * kernel * kernel`.
    fn taps(&self) -> usize {
        self.cin * self.kernel * self.kernel
    }

    /// Columns of the column matrix: output pixels of one image.
    fn pixels(&self) -> usize {
        self.out_height * self.out_width
    }

    fn image_len(&self) -> usize {
        self.cin * self.height * self.width
    }

    /// A 1x1 stride-1 unpadded convolution, whose column matrix is the image itself.
    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.pad.size() == 0
    }

    /// Fails unless `dims` is this convolution's output shape (a gradient's, say).
    fn check_output(&self, dims: &[usize]) -> Result<()> {
        if dims != self.output_shape().dims() {
            bail!(
                "train conv2d: gradient {dims:?} for output {:?}",
                self.output_shape()
            )
        }
        Ok(())
    }

    fn output_shape(&self) -> Shape {
        (self.batch, self.cout, self.out_height, self.out_width).into()
    }

    fn weight_dims(&self) -> (usize, usize, usize, usize) {
        (self.cout, self.cin, self.kernel, self.kernel)
    }

    /// The padding of `cpu_ops`' direct convolution that computes this one, where it can:
    /// 3x3 and 7x7 kernels, stride 1 or 2, reflection padding or zeros keeping the size,
    /// on a CPU with the direct kernel.
    fn direct_padding(&self) -> Option<cpu_ops::Padding> {
        if cpu_ops::isa().is_none() || !matches!(self.kernel, 3 | 7) || self.stride > 2 {
            return None;
        }
        match self.pad {
            Pad::Reflect(p) => Some(cpu_ops::Padding::Reflect(p)),
            Pad::Zeros(p) if self.stride == 1 && 2 * p + 1 == self.kernel => {
                Some(cpu_ops::Padding::TfSame)
            }
            Pad::Zeros(_) => None,
        }
    }

    /// Whether the direct kernel beats im2col + GEMM for the forward: 7x7 kernels and
    /// outputs of at most 8 channels (the generator's shapes at 128 px, AMD AVX2: 3->32
    /// 7x7 5.7 against 9.9 ms, 32->3 7x7 6.7 against 24.4, 16->8 3x3 2.6 against 3.0;
    /// 128->128 3x3 16.2 against 10.9).
    fn direct_forward_pays(&self) -> bool {
        self.kernel == 7 || self.cout <= 8
    }

    /// Whether the input gradient runs as a direct convolution ([`direct_input_grad`]):
    /// stride 1, the padding keeping the size, at most 32 outputs (the GEMM's inner
    /// dimension, too short to pay for its `taps x pixels` column matrix) and at least 8
    /// inputs (the direct kernel's tile of output channels). At 128 px, batch 4, AMD AVX2:
    /// 32->3 7x7 12 against 64 ms, 64->32 48 against 55, 16->8 5.2 against 7.4, 8->8 2.0
    /// against 3.6; 128->64 51 against 41 and 3->32 7x7 9.9 against 4.5 stay with GEMM.
    fn direct_input_grad_pays(&self) -> bool {
        self.stride == 1
            && 2 * self.pad.size() + 1 == self.kernel
            && self.cout <= 32
            && self.cin >= 8
            && self.direct_padding().is_some()
    }

    /// Whether the weight gradient runs as [`direct_weight_grad`]: as for the input
    /// gradient, with at most 16 outputs (at 128 px, batch 4, AMD AVX2, against im2col +
    /// GEMM: 32->3 7x7 12.6 / 16.0 against 53.7 / 49.8 ms, 16->8 5.8 / 6.3 against 9.2 /
    /// 12.5, 32->16 16.3 / 16.8 against 17.3 / 19.5; 64->32 56 against 51-54 stays GEMM).
    fn direct_weight_grad_pays(&self) -> bool {
        self.direct_input_grad_pays() && self.cout <= 16
    }
}

/// [`ConvInputGrad`] by `cpu_ops`' direct kernel, for a stride-1 convolution whose padding
/// keeps the size: the convolution of `grad` with the weight transposed and flipped, zero
/// padded `k - 1` all round. With reflection padding that gives the gradient of the padded
/// input, whose border is then folded back onto the rows and columns it mirrored.
fn direct_input_grad(g: &ConvGeometry, grad: &[f32], w: &[f32]) -> Result<Vec<f32>> {
    let taps = g.kernel * g.kernel;
    let mut flipped = vec![0f32; w.len()];
    for co in 0..g.cout {
        for ci in 0..g.cin {
            let src = &w[(co * g.cin + ci) * taps..][..taps];
            let dst = &mut flipped[(ci * g.cout + co) * taps..][..taps];
            dst.iter_mut()
                .zip(src.iter().rev())
                .for_each(|(d, &v)| *d = v);
        }
    }
    let dims = (g.cin, g.cout, g.kernel, g.kernel);
    let conv = PackedConv::from_slice(&flipped, dims, None, 1, cpu_ops::Padding::TfSame)?;
    let size = (g.height, g.width);
    match g.pad {
        Pad::Zeros(_) => cpu_ops::conv2d_slice(grad, &[g.batch, g.cout, g.height, g.width], &conv),
        Pad::Reflect(p) => {
            let padded = zero_pad(grad, g.batch * g.cout, size, p);
            let padded_dims = [g.batch, g.cout, g.height + 2 * p, g.width + 2 * p];
            let dx_padded = cpu_ops::conv2d_slice(&padded, &padded_dims, &conv)?;
            Ok(fold_reflection(&dx_padded, g.batch * g.cin, size, p))
        }
    }
}

/// Floats per accumulator of [`weight_grad_task`]: one AVX2 vector.
const LANES: usize = 8;

/// [`ConvWeightGrad`] without a column matrix, for stride-1 convolutions that keep the size
/// and have few outputs: each task takes one image, one input channel
/// and a few output channels, and sweeps the padded input rows once per kernel row,
/// `dw[co, ci, ky, kx] += Σ_x grad[co, y, x] · padded[ci, y + ky, x + kx]`, each loaded
/// input vector feeding every output channel of the task and each gradient vector every
/// kernel column. The images' sums are added in order, so runs agree bit for bit.
fn direct_weight_grad(g: &ConvGeometry, x: &[f32], grad: &[f32]) -> Result<Vec<f32>> {
    let p = g.pad.size();
    let padded = pad_planes(x, g.batch * g.cin, (g.height, g.width), g.pad);
    let tile = if g.kernel == 7 { 2 } else { 4 };
    let tiles = g.cout.div_ceil(tile);
    let (hp, wp) = (g.height + 2 * p, g.width + 2 * p);
    let taps = g.kernel * g.kernel;
    let parts: Vec<Vec<f32>> = (0..g.batch * g.cin * tiles)
        .into_par_iter()
        .map(|task| {
            let (n, ci, t) = (task / (g.cin * tiles), task / tiles % g.cin, task % tiles);
            let plane = &padded[(n * g.cin + ci) * hp * wp..][..hp * wp];
            let cos = t * tile..((t + 1) * tile).min(g.cout);
            let rows: Vec<&[f32]> = cos
                .map(|co| &grad[(n * g.cout + co) * g.pixels()..][..g.pixels()])
                .collect();
            weight_grad_task(g.kernel, &rows, plane, (g.width, wp))
        })
        .collect::<Result<_>>()?;
    let mut dw = vec![0f32; g.cout * g.cin * taps];
    for (task, part) in parts.iter().enumerate() {
        let (ci, t) = (task / tiles % g.cin, task % tiles);
        for (j, sums) in part.chunks(taps).enumerate() {
            let co = t * tile + j;
            let dst = &mut dw[(co * g.cin + ci) * taps..][..taps];
            dst.iter_mut().zip(sums).for_each(|(d, s)| *d += s);
        }
    }
    Ok(dw)
}

/// `planes` planes of `height x width` padded by `pad` on each side (zeros or reflection).
fn pad_planes(x: &[f32], planes: usize, (height, width): (usize, usize), pad: Pad) -> Vec<f32> {
    let p = pad.size();
    if matches!(pad, Pad::Zeros(_)) {
        return zero_pad(x, planes, (height, width), p);
    }
    let wp = width + 2 * p;
    let mut out = vec![0f32; planes * (height + 2 * p) * wp];
    out.par_chunks_mut((height + 2 * p) * wp)
        .zip(x.par_chunks(height * width))
        .for_each(|(out, x)| {
            for (qy, row) in out.chunks_mut(wp).enumerate() {
                let src = &x[cpu_ops::reflect(qy as isize - p as isize, height) * width..][..width];
                row[p..p + width].copy_from_slice(src);
                for qx in (0..p).chain(p + width..wp) {
                    row[qx] = src[cpu_ops::reflect(qx as isize - p as isize, width)];
                }
            }
        });
    out
}

/// The `rows.len() x k x k` weight-gradient sums of one task of [`direct_weight_grad`]:
/// `rows` are the output channels' gradient planes (`width` wide), `plane` the padded input
/// channel (`padded_width` wide). Only what [`ConvGeometry::direct_weight_grad_pays`]
/// admits runs here: AVX2 + FMA, 3x3 kernels in tiles of up to 4 outputs, 7x7 of up to 2.
fn weight_grad_task(
    k: usize,
    rows: &[&[f32]],
    plane: &[f32],
    widths: (usize, usize),
) -> Result<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if cpu_ops::isa().is_some() {
        // SAFETY: `isa()` is `Some` only where the CPU has AVX2 and FMA.
        unsafe {
            match (k, rows.len()) {
                (3, 4) => return Ok(weight_grad_avx2::<3, 4>(rows, plane, widths)),
                (3, 3) => return Ok(weight_grad_avx2::<3, 3>(rows, plane, widths)),
                (3, 2) => return Ok(weight_grad_avx2::<3, 2>(rows, plane, widths)),
                (3, 1) => return Ok(weight_grad_avx2::<3, 1>(rows, plane, widths)),
                (7, 2) => return Ok(weight_grad_avx2::<7, 2>(rows, plane, widths)),
                (7, 1) => return Ok(weight_grad_avx2::<7, 1>(rows, plane, widths)),
                _ => {}
            }
        }
    }
    bail!(
        "train conv2d: no direct weight gradient for {k}x{k} with {} outputs on this CPU",
        rows.len()
    )
}

/// [`weight_grad_task`] for `T` output channels and a `K x K` kernel: `T x K` accumulator
/// vectors per kernel row, each gradient vector loaded once for the `K` shifted input
/// vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
// The tile's `[t][kx]` indices, bounded by constants, keep it in registers.
#[allow(clippy::needless_range_loop)]
unsafe fn weight_grad_avx2<const K: usize, const T: usize>(
    rows: &[&[f32]],
    plane: &[f32],
    (width, padded_width): (usize, usize),
) -> Vec<f32> {
    use std::arch::x86_64::*;
    let height = rows[0].len() / width;
    assert!(rows.len() == T && rows.iter().all(|r| r.len() >= height * width));
    assert!(padded_width + 1 >= width + K && plane.len() >= (height + K - 1) * padded_width);
    let mut sums = vec![0f32; T * K * K];
    let full = width / LANES * LANES;
    for ky in 0..K {
        let mut acc = [[_mm256_setzero_ps(); K]; T];
        let mut tail = [[0f32; K]; T];
        for y in 0..height {
            // SAFETY (all reads below): by the asserts, row `y + ky` of `plane` has
            // `padded_width >= width + K - 1` floats and each gradient row `width`; vector
            // loads start at most at `full - 8 + K - 1`.
            let line = plane.as_ptr().add((y + ky) * padded_width);
            let mut g = [std::ptr::null::<f32>(); T];
            for (t, g) in g.iter_mut().enumerate() {
                *g = rows[t].as_ptr().add(y * width);
            }
            let mut x0 = 0;
            while x0 < full {
                let mut gv = [_mm256_setzero_ps(); T];
                for t in 0..T {
                    gv[t] = _mm256_loadu_ps(g[t].add(x0));
                }
                for kx in 0..K {
                    let xv = _mm256_loadu_ps(line.add(x0 + kx));
                    for t in 0..T {
                        acc[t][kx] = _mm256_fmadd_ps(gv[t], xv, acc[t][kx]);
                    }
                }
                x0 += LANES;
            }
            for x in full..width {
                for t in 0..T {
                    for kx in 0..K {
                        tail[t][kx] += *g[t].add(x) * *line.add(x + kx);
                    }
                }
            }
        }
        for t in 0..T {
            for kx in 0..K {
                let mut lanes = [0f32; LANES];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t][kx]);
                sums[(t * K + ky) * K + kx] = lanes.iter().sum::<f32>() + tail[t][kx];
            }
        }
    }
    sums
}

/// `planes` planes of `height x width` with `p` zeros added on each side.
fn zero_pad(x: &[f32], planes: usize, (height, width): (usize, usize), p: usize) -> Vec<f32> {
    let wp = width + 2 * p;
    let mut out = vec![0f32; planes * (height + 2 * p) * wp];
    out.par_chunks_mut((height + 2 * p) * wp)
        .zip(x.par_chunks(height * width))
        .for_each(|(out, x)| {
            for (row, src) in out[p * wp..].chunks_mut(wp).zip(x.chunks(width)) {
                row[p..p + width].copy_from_slice(src);
            }
        });
    out
}

/// The adjoint of reflection padding by `p`: each of `planes` padded planes
/// (`height + 2p x width + 2p`) summed onto the `height x width` positions it was read from.
fn fold_reflection(
    padded: &[f32],
    planes: usize,
    (height, width): (usize, usize),
    p: usize,
) -> Vec<f32> {
    let (hp, wp) = (height + 2 * p, width + 2 * p);
    let mut out = vec![0f32; planes * height * width];
    out.par_chunks_mut(height * width)
        .zip(padded.par_chunks(hp * wp))
        .for_each(|(out, padded)| {
            for (qy, row) in padded.chunks(wp).enumerate() {
                let y = cpu_ops::reflect(qy as isize - p as isize, height);
                let line = &mut out[y * width..(y + 1) * width];
                line.iter_mut()
                    .zip(&row[p..p + width])
                    .for_each(|(o, &v)| *o += v);
                for qx in (0..p).chain(p + width..wp) {
                    line[cpu_ops::reflect(qx as isize - p as isize, width)] += row[qx];
                }
            }
        });
    out
}

/// Output rows `first_row..first_row + rows` of image `image`: the unit of work, small
/// enough that its column matrix stays in cache.
#[derive(Debug, Clone, Copy)]
struct Band {
    image: usize,
    first_row: usize,
    rows: usize,
}

impl Band {
    /// Floats of a band's column matrix to aim for (512 KiB).
    const TARGET_FLOATS: usize = 128 << 10;

    fn all(g: &ConvGeometry) -> Vec<Band> {
        let per_band = (Self::TARGET_FLOATS / (g.taps() * g.out_width)).max(1);
        (0..g.batch)
            .flat_map(|image| {
                (0..g.out_height)
                    .step_by(per_band)
                    .map(move |first_row| Band {
                        image,
                        first_row,
                        rows: per_band.min(g.out_height - first_row),
                    })
            })
            .collect()
    }

    fn pixels(&self, g: &ConvGeometry) -> usize {
        self.rows * g.out_width
    }

    /// This band's first pixel within its image's output plane.
    fn offset(&self, g: &ConvGeometry) -> usize {
        self.first_row * g.out_width
    }
}

/// The outputs `o` (of `count`) whose tap `t` reads inside `0..size` rather than the
/// padding, and the first input index they read: `o * stride + t - padding`.
fn reads_inside(g: &ConvGeometry, count: usize, t: usize, size: usize) -> (Range<usize>, usize) {
    let padding = g.pad.size();
    let first = padding.saturating_sub(t).div_ceil(g.stride);
    let last = (size + padding)
        .checked_sub(t + 1)
        .map_or(0, |i| (i / g.stride + 1).min(count));
    let first = first.min(last);
    (first..last, (first * g.stride + t).saturating_sub(padding))
}

/// The band's column matrix, `taps x pixels`:
/// `col[(c, ky, kx), (oy, ox)] = padded[c, oy * s + ky, ox * s + kx]`.
fn im2col(g: &ConvGeometry, image: &[f32], band: Band, col: &mut [f32]) {
    let (k, s, plane) = (g.kernel, g.stride, g.height * g.width);
    let rows = col.chunks_mut(band.pixels(g));
    for (tap_row, row) in rows.enumerate() {
        let (c, ky, kx) = (tap_row / (k * k), tap_row / k % k, tap_row % k);
        let channel = &image[c * plane..(c + 1) * plane];
        let (xs, ix0) = reads_inside(g, g.out_width, kx, g.width);
        for (j, out) in row.chunks_mut(g.out_width).enumerate() {
            let Some(iy) = g.source(band.first_row + j, ky, g.height) else {
                out.fill(0.0);
                continue;
            };
            let line = &channel[iy * g.width..(iy + 1) * g.width];
            for ox in (0..xs.start).chain(xs.end..g.out_width) {
                out[ox] = g.source(ox, kx, g.width).map_or(0.0, |ix| line[ix]);
            }
            let inside = &mut out[xs.clone()];
            if s == 1 {
                inside.copy_from_slice(&line[ix0..ix0 + inside.len()]);
            } else {
                for (v, &src) in inside.iter_mut().zip(line[ix0..].iter().step_by(s)) {
                    *v = src;
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: `image[c, y, x] += col[(c, ky, kx), (oy, ox)]` over every
/// tap of the band that reads it.
fn col2im(g: &ConvGeometry, col: &[f32], band: Band, image: &mut [f32]) {
    let (k, s, plane) = (g.kernel, g.stride, g.height * g.width);
    for (tap_row, row) in col.chunks(band.pixels(g)).enumerate() {
        let (c, ky, kx) = (tap_row / (k * k), tap_row / k % k, tap_row % k);
        let channel = &mut image[c * plane..(c + 1) * plane];
        let (xs, ix0) = reads_inside(g, g.out_width, kx, g.width);
        for (j, out) in row.chunks(g.out_width).enumerate() {
            let Some(iy) = g.source(band.first_row + j, ky, g.height) else {
                continue;
            };
            let line = &mut channel[iy * g.width..(iy + 1) * g.width];
            for ox in (0..xs.start).chain(xs.end..g.out_width) {
                if let Some(ix) = g.source(ox, kx, g.width) {
                    line[ix] += out[ox];
                }
            }
            let inside = &out[xs.clone()];
            if s == 1 {
                // Contiguous, so that it vectorises (`step_by` does not).
                for (dst, &v) in line[ix0..ix0 + inside.len()].iter_mut().zip(inside) {
                    *dst += v;
                }
            } else {
                for (dst, &v) in line[ix0..].iter_mut().step_by(s).zip(inside) {
                    *dst += v;
                }
            }
        }
    }
}

/// A matrix view for [`matmul`]: element `(r, c)` is `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
struct Matrix<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Matrix<'a> {
    fn rows(data: &'a [f32], row_stride: usize) -> Self {
        Self {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            data: self.data,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// `dst (m x n, contiguous rows) = [dst +] lhs (m x k) * rhs (k x n)`.
fn matmul(
    dst: &mut [f32],
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    lhs: Matrix,
    rhs: Matrix,
    parallelism: Parallelism,
) {
    if m * n == 0 {
        return;
    }
    let last = |a: Matrix, rows: usize, cols: usize| {
        (rows.max(1) - 1) * a.row_stride + (cols.max(1) - 1) * a.col_stride
    };
    assert!(dst.len() >= m * n);
    assert!(k == 0 || last(lhs, m, k) < lhs.data.len());
    assert!(k == 0 || last(rhs, k, n) < rhs.data.len());
    // SAFETY: the asserts keep every index gemm touches inside the three slices, and `dst`
    // is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Threads for each band's GEMM: all of them when there are too few bands to share out.
fn band_parallelism(bands: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && bands < 2 * threads {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// Folds `bands` in as many contiguous groups as there are threads, one accumulator per
/// group, in parallel. The grouping depends only on the band and thread counts, so sums
/// over the groups' accumulators come out the same on every run.
fn fold_groups<T: Send>(
    bands: &[Band],
    init: impl Fn() -> T + Sync,
    fold: impl Fn(&mut T, Band) + Sync,
) -> Vec<T> {
    let groups = rayon::current_num_threads().clamp(1, bands.len().max(1));
    bands
        .par_chunks(bands.len().div_ceil(groups).max(1))
        .map(|group| {
            let mut acc = init();
            for &band in group {
                fold(&mut acc, band);
            }
            acc
        })
        .collect()
}

/// `dst = Σ parts`, added in order.
fn sum_into<'a>(dst: &mut [f32], parts: impl Iterator<Item = &'a Vec<f32>>) {
    dst.fill(0.0);
    for part in parts {
        dst.iter_mut().zip(part).for_each(|(d, p)| *d += p);
    }
}

/// The band's column matrix (`taps x pixels`): a view of `x` for a pointwise convolution,
/// else [`im2col`] into `buffer`.
fn columns<'a>(g: &ConvGeometry, x: &'a [f32], band: Band, buffer: &'a mut Vec<f32>) -> Matrix<'a> {
    let image = &x[band.image * g.image_len()..(band.image + 1) * g.image_len()];
    if g.is_pointwise() {
        return Matrix::rows(&image[band.offset(g)..], g.pixels());
    }
    buffer.resize(g.taps() * band.pixels(g), 0.0);
    im2col(g, image, band, buffer);
    Matrix::rows(buffer, band.pixels(g))
}

/// The band's rows of an output-shaped tensor (`cout x pixels`, row stride of the plane).
fn output_rows<'a>(g: &ConvGeometry, y: &'a [f32], band: Band) -> Matrix<'a> {
    let start = band.image * g.cout * g.pixels() + band.offset(g);
    Matrix::rows(&y[start..], g.pixels())
}

/// `conv2d(x, w)` padded as `pad`, by bands of output rows: im2col then one GEMM each.
/// Its backward is [`ConvInputGrad`] and [`ConvWeightGrad`].
struct Conv2dOp {
    pad: Pad,
    stride: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "toonbot-train-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeometry::new(xl.dims(), wl.dims(), self.pad, self.stride)?;
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        if let Some(padding) = g.direct_padding().filter(|_| g.direct_forward_pays()) {
            let conv = PackedConv::from_slice(w, g.weight_dims(), None, g.stride, padding)?;
            let out = cpu_ops::conv2d_slice(x, &[g.batch, g.cin, g.height, g.width], &conv)?;
            return Ok((CpuStorage::F32(out), g.output_shape()));
        }
        let bands = Band::all(&g);
        let parallelism = band_parallelism(bands.len());
        let tiles: Vec<Vec<f32>> = bands
            .par_iter()
            .map_init(Vec::new, |buffer, &band| {
                let col = columns(&g, x, band, buffer);
                let mut tile = vec![0f32; g.cout * band.pixels(&g)];
                let dims = (g.cout, band.pixels(&g), g.taps());
                matmul(
                    &mut tile,
                    false,
                    dims,
                    Matrix::rows(w, g.taps()),
                    col,
                    parallelism,
                );
                tile
            })
            .collect();
        let mut out = vec![0f32; g.batch * g.cout * g.pixels()];
        for (band, tile) in bands.iter().zip(&tiles) {
            let start = band.image * g.cout * g.pixels() + band.offset(&g);
            let dst = out[start..].chunks_mut(g.pixels());
            for (dst, src) in dst.zip(tile.chunks(band.pixels(&g))) {
                dst[..src.len()].copy_from_slice(src);
            }
        }
        Ok((CpuStorage::F32(out), g.output_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (pad, stride) = (self.pad, self.stride);
        let grad = grad.contiguous()?;
        // A frozen weight (a detached backbone's) or an input image needs no gradient.
        let grad_x = if x.track_op() {
            let x_dims = x.dims4()?;
            Some(grad.apply_op2_no_bwd(
                w,
                &ConvInputGrad {
                    pad,
                    stride,
                    x_dims,
                },
            )?)
        } else {
            None
        };
        let grad_w = if w.track_op() {
            let w_dims = w.dims4()?;
            Some(x.apply_op2_no_bwd(
                &grad,
                &ConvWeightGrad {
                    pad,
                    stride,
                    w_dims,
                },
            )?)
        } else {
            None
        };
        Ok((grad_x, grad_w))
    }
}

/// The input gradient of [`Conv2dOp`]: `col2im(wᵀ · grad)` per band; arguments `(grad, w)`.
struct ConvInputGrad {
    pad: Pad,
    stride: usize,
    x_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "toonbot-train-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, wd) = self.x_dims;
        let g = ConvGeometry::new(&[b, c, h, wd], wl.dims(), self.pad, self.stride)?;
        g.check_output(gl.dims())?;
        let (grad, w) = (f32_slice(gs, gl)?, f32_slice(ws, wl)?);
        if g.direct_input_grad_pays() {
            let dx = direct_input_grad(&g, grad, w)?;
            return Ok((CpuStorage::F32(dx), Shape::from(self.x_dims)));
        }
        let mut dx = vec![0f32; g.batch * g.image_len()];
        let bands = Band::all(&g);
        let parallelism = band_parallelism(bands.len());
        // Bands of one image overlap in the input rows they read, so each group of bands
        // adds into an image of its own; the groups' images are summed in order.
        for (n, dx) in dx.chunks_mut(g.image_len()).enumerate() {
            let image_bands: Vec<Band> = bands.iter().copied().filter(|b| b.image == n).collect();
            let images = fold_groups(
                &image_bands,
                || (vec![0f32; g.image_len()], Vec::new()),
                |(image, col), band| {
                    col.resize(g.taps() * band.pixels(&g), 0.0);
                    let dims = (g.taps(), band.pixels(&g), g.cout);
                    let wt = Matrix::rows(w, g.taps()).t();
                    let grad = output_rows(&g, grad, band);
                    matmul(col, false, dims, wt, grad, parallelism);
                    col2im(&g, col, band, image);
                },
            );
            sum_into(dx, images.iter().map(|(image, _)| image));
        }
        Ok((CpuStorage::F32(dx), Shape::from(self.x_dims)))
    }
}

/// The weight gradient of [`Conv2dOp`]: `Σ grad · im2col(x)ᵀ` over bands; arguments
/// `(x, grad)`.
struct ConvWeightGrad {
    pad: Pad,
    stride: usize,
    w_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "toonbot-train-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (o, i, kh, kw) = self.w_dims;
        let g = ConvGeometry::new(xl.dims(), &[o, i, kh, kw], self.pad, self.stride)?;
        g.check_output(gl.dims())?;
        let (x, grad) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        if g.direct_weight_grad_pays() {
            let dw = direct_weight_grad(&g, x, grad)?;
            return Ok((CpuStorage::F32(dw), Shape::from(self.w_dims)));
        }
        let bands = Band::all(&g);
        let parallelism = band_parallelism(bands.len());
        let partial = fold_groups(
            &bands,
            || (vec![0f32; g.cout * g.taps()], Vec::new()),
            |(dw, buffer), band| {
                let col = columns(&g, x, band, buffer);
                let dims = (g.cout, g.taps(), band.pixels(&g));
                let grad = output_rows(&g, grad, band);
                matmul(dw, true, dims, grad, col.t(), parallelism);
            },
        );
        let mut dw = vec![0f32; g.cout * g.taps()];
        sum_into(&mut dw, partial.iter().map(|(dw, _)| dw));
        Ok((CpuStorage::F32(dw), Shape::from(self.w_dims)))
    }
}

/// True when these ops replace candle's: some tensor tracks gradients, and all are `f32`
/// on the CPU.
pub fn training_on_cpu(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.track_op())
        && tensors
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// `x.conv2d(w, p, stride, 1, 1)` for `Pad::Zeros(p)`, and `reflection_pad2d(x, p)` then an
/// unpadded convolution for `Pad::Reflect(p)`. When either tensor tracks gradients on the
/// CPU in f32 this runs [`Conv2dOp`], the padding fused in and a backward several times
/// faster than candle's; otherwise (inference, CUDA) candle's own ops.
pub fn conv2d(x: &Tensor, w: &Tensor, pad: Pad, stride: usize) -> Result<Tensor> {
    if !training_on_cpu(&[x, w]) {
        return match pad {
            Pad::Zeros(p) => x.conv2d(w, p, stride, 1, 1),
            Pad::Reflect(p) => reflection_pad2d(x, p)?.conv2d(w, 0, stride, 1, 1),
        };
    }
    cpu_ops::keep_freed_memory();
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dOp { pad, stride })
}

/// `layer.forward(reflection_pad2d(x, reflect))` through [`conv2d`] (grouped or dilated
/// layers run as they are).
pub fn conv2d_layer(layer: &Conv2d, x: &Tensor, reflect: usize) -> Result<Tensor> {
    let cfg = layer.config();
    if cfg.groups != 1 || cfg.dilation != 1 {
        return layer.forward(&reflection_pad2d(x, reflect)?);
    }
    let pad = match (reflect, cfg.padding) {
        (0, p) => Pad::Zeros(p),
        (r, 0) => Pad::Reflect(r),
        (r, p) => bail!("conv2d_layer: reflection pad {r} before a zero-padded ({p}) layer"),
    };
    let y = conv2d(x, layer.weight(), pad, cfg.stride)?;
    match layer.bias() {
        Some(b) => add_channel_bias(&y, b),
        None => Ok(y),
    }
}

/// `y + bias` for an NCHW `y` and a `(C,)` bias; the bias's gradient is each channel's sum
/// of the output gradient, one contiguous pass (candle's `broadcast_add` reduces over three
/// strided dimensions, a few percent of a generator step).
struct ChannelBiasOp;

impl CustomOp2 for ChannelBiasOp {
    fn name(&self) -> &'static str {
        "toonbot-train-channel-bias"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, bias) = (f32_slice(ys, yl)?, f32_slice(bs, bl)?);
        let plane = channel_plane(yl.dims(), bias.len())?;
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(plane)
            .zip(y.par_chunks(plane))
            .enumerate()
            .for_each(|(p, (out, y))| {
                let b = bias[p % bias.len()];
                out.iter_mut().zip(y).for_each(|(o, &v)| *o = v + b);
            });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_bias = if bias.track_op() {
            let grad = grad.contiguous()?;
            let channels = bias.elem_count();
            let plane = channel_plane(grad.dims(), channels)?;
            let sums = cpu_ops::with_slice(&grad, |g| {
                let planes: Vec<f64> = g
                    .par_chunks(plane)
                    .map(|p| p.iter().map(|&v| f64::from(v)).sum())
                    .collect();
                let mut sums = vec![0f64; channels];
                for (i, s) in planes.iter().enumerate() {
                    sums[i % channels] += s;
                }
                Ok(sums.into_iter().map(|s| s as f32).collect::<Vec<f32>>())
            })?;
            Some(Tensor::from_vec(sums, bias.shape(), bias.device())?)
        } else {
            None
        };
        Ok((y.track_op().then(|| grad.clone()), grad_bias))
    }
}

/// Floats per channel plane of an NCHW tensor with `channels` channels.
fn channel_plane(dims: &[usize], channels: usize) -> Result<usize> {
    match dims {
        &[_, c, h, w] if c == channels => Ok(h * w),
        _ => bail!("channel bias: {channels} values for a tensor {dims:?}"),
    }
}

/// `y + bias.reshape((1, C, 1, 1))` for an NCHW `y` and a `(C,)` bias: [`ChannelBiasOp`]
/// when either tracks gradients on the CPU in `f32`, else candle's `broadcast_add`.
pub fn add_channel_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !training_on_cpu(&[y, bias]) {
        return y.broadcast_add(&bias.reshape((1, (), 1, 1))?);
    }
    y.contiguous()?
        .apply_op2(&bias.contiguous()?, ChannelBiasOp)
}

/// Mean and sum of squared deviations of one channel plane.
fn plane_moments(plane: &[f32]) -> (f64, f64) {
    let mean = plane.iter().map(|&v| f64::from(v)).sum::<f64>() / plane.len() as f64;
    let sum_sq = plane.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum();
    (mean, sum_sq)
}

/// Mean and `1 / sqrt(biased variance + eps)` of one channel plane.
fn plane_stats(plane: &[f32], eps: f64) -> (f32, f32) {
    let (mean, sum_sq) = plane_moments(plane);
    let var = sum_sq / plane.len() as f64;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// `nn.InstanceNorm2d` (no affine, biased variance), optionally followed by a ReLU, in one
/// pass over each channel plane; its backward is [`InstanceNormGrad`]. candle's composition
/// of the same takes about ten whole-tensor temporaries forward and back.
struct InstanceNormOp {
    relu: bool,
    eps: f64,
}

impl CustomOp1 for InstanceNormOp {
    fn name(&self) -> &'static str {
        "toonbot-train-instance-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, _, h, w) = l.shape().dims4()?;
        let x = f32_slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w))
            .for_each(|(y, x)| {
                let (mean, inv_std) = plane_stats(x, self.eps);
                for (y, &x) in y.iter_mut().zip(x) {
                    let v = (x - mean) * inv_std;
                    *y = if self.relu { v.max(0.0) } else { v };
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let op = InstanceNormGrad {
            relu: self.relu,
            eps: self.eps,
        };
        Ok(Some(x.apply_op2_no_bwd(&grad, &op)?))
    }
}

/// The input gradient of [`InstanceNormOp`], arguments `(x, grad)`: with `x̂` the normalised
/// plane and `g` the gradient through the ReLU (`grad` where `x̂ > 0`),
/// `dx = (g - mean(g) - x̂ mean(g x̂)) / std`.
struct InstanceNormGrad {
    relu: bool,
    eps: f64,
}

impl CustomOp2 for InstanceNormGrad {
    fn name(&self) -> &'static str {
        "toonbot-train-instance-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if xl.dims() != gl.dims() {
            bail!(
                "instance norm: gradient {:?} for input {:?}",
                gl.dims(),
                xl.dims()
            )
        }
        let (_, _, h, w) = xl.shape().dims4()?;
        let (x, grad) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        let mut dx = vec![0f32; x.len()];
        let through = |xhat: f32, g: f32| if self.relu && xhat <= 0.0 { 0.0 } else { g };
        dx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(grad.par_chunks(h * w)))
            .for_each(|(dx, (x, grad))| {
                let (mean, inv_std) = plane_stats(x, self.eps);
                let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                for (&x, &g) in x.iter().zip(grad) {
                    let xhat = (x - mean) * inv_std;
                    let g = through(xhat, g);
                    sum_g += f64::from(g);
                    sum_gx += f64::from(g * xhat);
                }
                let n = x.len() as f64;
                let (mean_g, mean_gx) = ((sum_g / n) as f32, (sum_gx / n) as f32);
                for (dx, (&x, &g)) in dx.iter_mut().zip(x.iter().zip(grad)) {
                    let xhat = (x - mean) * inv_std;
                    *dx = (through(xhat, g) - mean_g - xhat * mean_gx) * inv_std;
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// `relu?(IN(x))` with [`InstanceNormOp`] when `x` tracks gradients on the CPU in f32;
/// `None` otherwise, for the caller's own ops.
pub fn instance_norm(x: &Tensor, relu: bool, eps: f64) -> Option<Result<Tensor>> {
    training_on_cpu(&[x]).then(|| x.contiguous()?.apply_op1(InstanceNormOp { relu, eps }))
}

/// photo2cartoon's instance/layer-norm statistics of one sample (`C` planes of `hw` pixels),
/// both variances unbiased as `torch.var`: `x̂_in = (x - mean_c) * inv_in_c`, `x̂_ln = (x -
/// layer_mean) * inv_ln`.
struct LinStats {
    mean: Vec<f64>,
    inv_in: Vec<f64>,
    layer_mean: f64,
    inv_ln: f64,
}

impl LinStats {
    /// From each plane's [`plane_moments`].
    fn new(moments: &[(f64, f64)], hw: usize, eps: f64) -> Self {
        let (c, hw) = (moments.len() as f64, hw as f64);
        let layer_mean = moments.iter().map(|m| m.0).sum::<f64>() / c;
        let layer_sum_sq = moments
            .iter()
            .map(|&(mean, sum_sq)| sum_sq + hw * (mean - layer_mean).powi(2))
            .sum::<f64>();
        Self {
            mean: moments.iter().map(|m| m.0).collect(),
            inv_in: moments
                .iter()
                .map(|m| 1.0 / (m.1 / (hw - 1.0) + eps).sqrt())
                .collect(),
            layer_mean,
            inv_ln: 1.0 / (layer_sum_sq / (c * hw - 1.0) + eps).sqrt(),
        }
    }

    /// Every sample's statistics, from the planes of `x` (`n` samples).
    fn of_samples(x: &[f32], n: usize, hw: usize, eps: f64) -> Vec<Self> {
        let moments: Vec<(f64, f64)> = x.par_chunks(hw).map(plane_moments).collect();
        moments
            .chunks(moments.len() / n.max(1))
            .map(|m| Self::new(m, hw, eps))
            .collect()
    }
}

/// The shape of a LIN: `n` samples of `c` planes of `hw` pixels, and whether gamma and beta
/// are per sample (`(N, C, 1, 1)`) or shared (`(1, C, 1, 1)`).
#[derive(Clone, Copy)]
struct LinShape {
    n: usize,
    c: usize,
    hw: usize,
    per_sample: bool,
}

impl LinShape {
    fn new(x: &Layout, gamma_beta: &Layout) -> Result<Self> {
        let (n, c, h, w) = x.shape().dims4()?;
        let (g, c2, _, _) = gamma_beta.shape().dims4()?;
        if c2 != 2 * c || !(g == 1 || g == n) || h * w < 2 {
            bail!(
                "instance/layer norm: gamma and beta {:?} for input {:?}",
                gamma_beta.dims(),
                x.dims()
            )
        }
        Ok(Self {
            n,
            c,
            hw: h * w,
            per_sample: g == n && n > 1,
        })
    }

    /// `(gamma, beta)` of plane `p` from the concatenated `(G, 2C)` values.
    fn gamma_beta(&self, gamma_beta: &[f32], p: usize) -> (f64, f64) {
        let (n, c) = (p / self.c, p % self.c);
        let row = if self.per_sample { n * 2 * self.c } else { 0 };
        (
            f64::from(gamma_beta[row + c]),
            f64::from(gamma_beta[row + self.c + c]),
        )
    }

    /// The index of plane `p`'s gamma in the concatenated values (its beta is `c` later).
    fn gamma_index(&self, p: usize) -> usize {
        let (n, c) = (p / self.c, p % self.c);
        if self.per_sample {
            n * 2 * self.c + c
        } else {
            c
        }
    }
}

/// photo2cartoon's LIN and adaLIN, `(rho * IN(x) + (1 - rho) * LN(x)) * gamma + beta`, as one
/// op of `(x, rho, cat([gamma, beta], 1))`: a statistics pass and an output pass forward, a
/// statistics pass, a sums pass and an output pass backward. candle's composition takes
/// about ten whole-tensor passes each way.
struct InstanceLayerNormOp {
    eps: f64,
}

impl CustomOp3 for InstanceLayerNormOp {
    fn name(&self) -> &'static str {
        "toonbot-train-instance-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = LinShape::new(xl, gl)?;
        let (x, rho, gamma_beta) = (f32_slice(xs, xl)?, f32_slice(rs, rl)?, f32_slice(gs, gl)?);
        if rho.len() != shape.c {
            bail!(
                "instance/layer norm: rho {:?} for input {:?}",
                rl.dims(),
                xl.dims()
            )
        }
        let stats = LinStats::of_samples(x, shape.n, shape.hw, self.eps);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(shape.hw)
            .zip(x.par_chunks(shape.hw))
            .enumerate()
            .for_each(|(p, (y, x))| {
                let (s, c) = (&stats[p / shape.c], p % shape.c);
                let rho = f64::from(rho[c]);
                let (gamma, beta) = shape.gamma_beta(gamma_beta, p);
                let a = rho * s.inv_in[c] + (1.0 - rho) * s.inv_ln;
                let b = (1.0 - rho) * (s.mean[c] - s.layer_mean) * s.inv_ln;
                let (scale, shift) = ((a * gamma) as f32, (b * gamma + beta) as f32);
                let mean = s.mean[c] as f32;
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = (x - mean) * scale + shift;
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        rho: &Tensor,
        gamma_beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let shape = LinShape::new(x.layout(), gamma_beta.layout())?;
        let rho_v = rho.flatten_all()?.to_vec1::<f32>()?;
        let gamma_beta_v = gamma_beta.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad.contiguous()?;
        let (dx, drho, dgamma_beta) = cpu_ops::with_slice(x, |x| {
            cpu_ops::with_slice(&grad, |g| {
                Ok(self.backward(shape, (x, g), &rho_v, &gamma_beta_v))
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(drho, rho.shape(), dev)?),
            Some(Tensor::from_vec(dgamma_beta, gamma_beta.shape(), dev)?),
        ))
    }
}

impl InstanceLayerNormOp {
    /// The gradients of `x`, `rho` and `cat([gamma, beta], 1)` given the output's `g`. With
    /// `d = x - mean_c`, `delta = mean_c - layer_mean`, `G = Σ g` and `H = Σ g d` over a plane,
    /// `Σ g x̂_in = inv_in H` and `Σ g x̂_ln = inv_ln (H + delta G)`; each unbiased
    /// normalisation's backward is `inv_std (u - mean(u) - x̂ Σ(u x̂) / (M - 1))`, so `dx` is
    /// `g P + d Q + R` per plane.
    fn backward(
        &self,
        shape: LinShape,
        (x, g): (&[f32], &[f32]),
        rho: &[f32],
        gamma_beta: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let LinShape { n, c, hw, .. } = shape;
        let stats = LinStats::of_samples(x, n, hw, self.eps);
        let sums: Vec<(f64, f64)> = x
            .par_chunks(hw)
            .zip(g.par_chunks(hw))
            .enumerate()
            .map(|(p, (x, g))| {
                let mean = stats[p / c].mean[p % c];
                x.iter().zip(g).fold((0.0, 0.0), |(sg, sgd), (&x, &g)| {
                    let g = f64::from(g);
                    (sg + g, sgd + g * (f64::from(x) - mean))
                })
            })
            .collect();
        let mut drho = vec![0f32; c];
        let mut dgamma_beta = vec![0f32; gamma_beta.len()];
        // Per sample: mean(u) and Σ u x̂_ln of the layer norm's part, u = (1 - rho) gamma g.
        let (hw_f, chw) = (hw as f64, (c * hw) as f64);
        let layer_terms: Vec<(f64, f64)> = (0..n)
            .map(|s| {
                let st = &stats[s];
                (0..c).fold((0.0, 0.0), |(mu, su), ch| {
                    let p = s * c + ch;
                    let (sg, sgd) = sums[p];
                    let w = (1.0 - f64::from(rho[ch])) * shape.gamma_beta(gamma_beta, p).0;
                    let delta = st.mean[ch] - st.layer_mean;
                    (mu + w * sg / chw, su + w * st.inv_ln * (sgd + delta * sg))
                })
            })
            .collect();
        let coefficients: Vec<(f32, f32, f32, f32)> = (0..n * c)
            .map(|p| {
                let (s, ch) = (p / c, p % c);
                let st = &stats[s];
                let (sg, sgd) = sums[p];
                let rho = f64::from(rho[ch]);
                let gamma = shape.gamma_beta(gamma_beta, p).0;
                let (inv_in, inv_ln) = (st.inv_in[ch], st.inv_ln);
                let delta = st.mean[ch] - st.layer_mean;
                let (g_in, g_ln) = (inv_in * sgd, inv_ln * (sgd + delta * sg));
                let gi = shape.gamma_index(p);
                dgamma_beta[gi] += (rho * g_in + (1.0 - rho) * g_ln) as f32;
                dgamma_beta[gi + c] += sg as f32;
                drho[ch] += (gamma * (g_in - g_ln)) as f32;
                let (mean_u, sum_ux) = layer_terms[s];
                let ln_q = inv_ln * inv_ln * sum_ux / (chw - 1.0);
                let p_ = rho * inv_in * gamma + (1.0 - rho) * inv_ln * gamma;
                let q = -rho * inv_in.powi(3) * gamma * sgd / (hw_f - 1.0) - ln_q;
                let r = -rho * inv_in * gamma * sg / hw_f - inv_ln * mean_u - delta * ln_q;
                (p_ as f32, q as f32, r as f32, st.mean[ch] as f32)
            })
            .collect();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(hw)
            .zip(x.par_chunks(hw).zip(g.par_chunks(hw)))
            .zip(&coefficients)
            .for_each(|((dx, (x, g)), &(p, q, r, mean))| {
                for (dx, (&x, &g)) in dx.iter_mut().zip(x.iter().zip(g)) {
                    *dx = g * p + (x - mean) * q + r;
                }
            });
        (dx, drho, dgamma_beta)
    }
}

/// `(rho * IN(x) + (1 - rho) * LN(x)) * gamma + beta` (photo2cartoon's LIN and adaLIN,
/// unbiased variances) with [`InstanceLayerNormOp`] when a tensor tracks gradients on the CPU
/// in `f32` and `gamma` and `beta` have the same shape; `None` otherwise, for the caller's
/// own ops. `rho`: `(1, C, 1, 1)`; `gamma`, `beta`: `(N or 1, C, 1, 1)`.
pub fn instance_layer_norm(
    x: &Tensor,
    rho: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Option<Result<Tensor>> {
    (training_on_cpu(&[x, rho, gamma, beta]) && gamma.dims() == beta.dims()).then(|| {
        let gamma_beta = Tensor::cat(&[gamma, beta], 1)?;
        x.contiguous()?
            .apply_op3(&rho.contiguous()?, &gamma_beta, InstanceLayerNormOp { eps })
    })
}

/// An element-wise activation of the training ops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)` (EfficientNet's).
    Relu6,
    /// `x` where positive, `slope * x` elsewhere (also PReLU's, a slope per channel).
    LeakyRelu(f32),
}

impl Activation {
    fn value(self, x: f32) -> f32 {
        match self {
            Self::Relu => x.max(0.0),
            Self::Relu6 => x.clamp(0.0, 6.0),
            Self::LeakyRelu(slope) => {
                if x > 0.0 {
                    x
                } else {
                    slope * x
                }
            }
        }
    }

    /// The derivative at `x`.
    fn derivative(self, x: f32) -> f32 {
        match self {
            Self::Relu => f32::from(u8::from(x > 0.0)),
            Self::Relu6 => f32::from(u8::from(x > 0.0 && x < 6.0)),
            Self::LeakyRelu(slope) => {
                if x > 0.0 {
                    1.0
                } else {
                    slope
                }
            }
        }
    }

    /// The same with candle's ops.
    fn candle(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Relu6 => x.relu()?.minimum(6f32),
            Self::LeakyRelu(slope) => x.maximum(&x.affine(f64::from(slope), 0.0)?),
        }
    }
}

/// Elements per parallel chunk of the element-wise ops.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// An [`Activation`] forward in one parallel pass; its backward is [`ActivationGrad`].
/// candle's ReLU backward takes four whole-tensor passes, its `minimum` and `maximum` about
/// ten.
#[derive(Clone)]
struct ActivationOp {
    f: Activation,
    /// PReLU: a fixed `LeakyRelu` slope per channel of an NCHW tensor.
    channel_slopes: Option<Vec<f32>>,
}

impl ActivationOp {
    /// The pieces of a tensor of `shape` processed in parallel: their length, and the
    /// activation of piece `i`.
    fn pieces(&self, shape: &Shape) -> Result<(usize, impl Fn(usize) -> Activation + Sync + '_)> {
        let plane = match &self.channel_slopes {
            Some(slopes) => {
                let (_, c, h, w) = shape.dims4()?;
                if c != slopes.len() {
                    bail!("PReLU: {} slopes for {c} channels", slopes.len())
                }
                h * w
            }
            None => ELEMENTWISE_CHUNK,
        };
        Ok((plane.max(1), move |i: usize| match &self.channel_slopes {
            Some(slopes) => Activation::LeakyRelu(slopes[i % slopes.len()]),
            None => self.f,
        }))
    }
}

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "toonbot-train-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let (piece, f) = self.pieces(l.shape())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(piece)
            .zip(x.par_chunks(piece))
            .enumerate()
            .for_each(|(i, (y, x))| {
                let f = f(i);
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = f.value(x);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &ActivationGrad(self.clone()),
        )?))
    }
}

/// The input gradient of [`ActivationOp`], arguments `(x, grad)`.
struct ActivationGrad(ActivationOp);

impl CustomOp2 for ActivationGrad {
    fn name(&self) -> &'static str {
        "toonbot-train-activation-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if xl.dims() != gl.dims() {
            bail!(
                "activation: gradient {:?} for input {:?}",
                gl.dims(),
                xl.dims()
            )
        }
        let (x, grad) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        let (piece, f) = self.0.pieces(xl.shape())?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(piece)
            .zip(x.par_chunks(piece).zip(grad.par_chunks(piece)))
            .enumerate()
            .for_each(|(i, (dx, (x, grad)))| {
                let f = f(i);
                for (dx, (&x, &g)) in dx.iter_mut().zip(x.iter().zip(grad)) {
                    *dx = g * f.derivative(x);
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// `f(x)`: one parallel pass each way with [`ActivationOp`] for `f32` tensors on the CPU
/// (tracking gradients or not); candle's ops otherwise.
pub fn activation(x: &Tensor, f: Activation) -> Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32) {
        return f.candle(x);
    }
    let op = ActivationOp {
        f,
        channel_slopes: None,
    };
    x.contiguous()?.apply_op1(op)
}

/// PReLU of an NCHW `x` with a fixed slope per channel (`slope`, `(C)`) through
/// [`ActivationOp`] when `x` tracks gradients on the CPU in `f32`; `None` otherwise, for
/// the caller's own ops (or when the slope itself trains).
pub fn frozen_prelu(x: &Tensor, slope: &Tensor) -> Option<Result<Tensor>> {
    (training_on_cpu(&[x]) && !slope.track_op()).then(|| {
        let op = ActivationOp {
            f: Activation::LeakyRelu(0.0),
            channel_slopes: Some(slope.flatten_all()?.to_vec1()?),
        };
        x.contiguous()?.apply_op1(op)
    })
}

/// Nearest-neighbour 2x upsampling (`up`) or 2x2 sum pooling of each NCHW plane, times
/// `scale`: `F.interpolate(x, scale_factor=2)` is `(up, 1)`, `F.avg_pool2d(x, 2)` `(down,
/// 1/4)`. Each is the other's adjoint with the same scale, which is the backward. candle's
/// upsampling is a broadcast whose backward is a strided reduction, its pooling one thread.
#[derive(Debug, Clone, Copy)]
struct Resample2xOp {
    up: bool,
    scale: f32,
}

impl Resample2xOp {
    fn output_shape(&self, dims: &[usize]) -> Result<Shape> {
        let &[n, c, h, w] = dims else {
            bail!("2x resampling: NCHW input expected, got {dims:?}")
        };
        Ok(if self.up {
            (n, c, 2 * h, 2 * w).into()
        } else if h % 2 == 0 && w % 2 == 0 {
            (n, c, h / 2, w / 2).into()
        } else {
            bail!("2x pooling needs even sizes, got {h}x{w}")
        })
    }
}

impl CustomOp1 for Resample2xOp {
    fn name(&self) -> &'static str {
        "toonbot-train-resample2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let shape = self.output_shape(l.dims())?;
        let (_, _, h, w) = l.shape().dims4()?;
        let (_, _, oh, ow) = shape.dims4()?;
        let scale = self.scale;
        let mut y = vec![0f32; shape.elem_count()];
        y.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(y, x)| {
                if self.up {
                    for (iy, line) in x.chunks(w).enumerate() {
                        let out = &mut y[2 * iy * ow..(2 * iy + 1) * ow];
                        for (pair, &v) in out.chunks_mut(2).zip(line) {
                            pair.fill(v * scale);
                        }
                        y.copy_within(2 * iy * ow..(2 * iy + 1) * ow, (2 * iy + 1) * ow);
                    }
                } else {
                    for (oy, out) in y.chunks_mut(ow).enumerate() {
                        let (top, bottom) = x[2 * oy * w..(2 * oy + 2) * w].split_at(w);
                        for (ox, v) in out.iter_mut().enumerate() {
                            let i = 2 * ox;
                            *v = (top[i] + top[i + 1] + bottom[i] + bottom[i + 1]) * scale;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let adjoint = Self {
            up: !self.up,
            scale: self.scale,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&adjoint)?))
    }
}

/// `F.interpolate(x, scale_factor=2)` (nearest) with [`Resample2xOp`] when `x` tracks
/// gradients on the CPU in `f32`; `None` otherwise, for the caller's own ops.
pub fn upsample_nearest2x(x: &Tensor) -> Option<Result<Tensor>> {
    training_on_cpu(&[x]).then(|| {
        x.contiguous()?.apply_op1(Resample2xOp {
            up: true,
            scale: 1.0,
        })
    })
}

/// `F.avg_pool2d(x, 2)` (even sizes) with [`Resample2xOp`] when `x` tracks gradients on the
/// CPU in `f32`; `None` otherwise, for the caller's own ops.
pub fn avg_pool2x(x: &Tensor) -> Option<Result<Tensor>> {
    training_on_cpu(&[x]).then(|| {
        x.contiguous()?.apply_op1(Resample2xOp {
            up: false,
            scale: 0.25,
        })
    })
}

/// Zero padding on each side of a convolution's input: `[top, bottom, left, right]`.
pub type Padding4 = [usize; 4];

/// TensorFlow's `SAME` padding of one axis of `size` pixels: `ceil(size / stride)` outputs,
/// the odd pixel of the padding after (bottom or right).
pub fn same_padding(size: usize, kernel: usize, stride: usize) -> [usize; 2] {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    [total / 2, total - total / 2]
}

/// The geometry of a depthwise convolution over one channel plane.
#[derive(Debug, Clone, Copy)]
struct DepthwiseGeometry {
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    top: usize,
    left: usize,
    out_height: usize,
    out_width: usize,
}

impl DepthwiseGeometry {
    fn new(h: usize, w: usize, kernel: usize, stride: usize, pad: Padding4) -> Result<Self> {
        let [top, bottom, left, right] = pad;
        let (ph, pw) = (h + top + bottom, w + left + right);
        if ph < kernel || pw < kernel || stride == 0 {
            bail!("depthwise conv: {h}x{w} input (padded {pad:?}) for kernel {kernel}")
        }
        Ok(Self {
            height: h,
            width: w,
            kernel,
            stride,
            top,
            left,
            out_height: (ph - kernel) / stride + 1,
            out_width: (pw - kernel) / stride + 1,
        })
    }

    /// Calls `f(output index, input index, tap index)` for every output pixel and every
    /// kernel tap that reads inside the plane (not the padding).
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        let k = self.kernel;
        for oy in 0..self.out_height {
            for i in 0..k {
                let Some(y) = (oy * self.stride + i)
                    .checked_sub(self.top)
                    .filter(|&y| y < self.height)
                else {
                    continue;
                };
                for ox in 0..self.out_width {
                    for j in 0..k {
                        let Some(x) = (ox * self.stride + j)
                            .checked_sub(self.left)
                            .filter(|&x| x < self.width)
                        else {
                            continue;
                        };
                        f(oy * self.out_width + ox, y * self.width + x, i * k + j);
                    }
                }
            }
        }
    }
}

/// A depthwise convolution with fixed (frozen) weights and bias, zero padded: forward and
/// input gradient one pass per channel plane. candle runs a grouped convolution as one
/// convolution per channel, forward and back, which is very slow for these layers.
struct FrozenDepthwiseOp {
    /// `(channels, kernel * kernel)`.
    weight: Vec<f32>,
    bias: Vec<f32>,
    kernel: usize,
    stride: usize,
    pad: Padding4,
}

impl FrozenDepthwiseOp {
    fn geometry(&self, dims: &[usize]) -> Result<(usize, usize, DepthwiseGeometry)> {
        let &[n, c, h, w] = dims else {
            bail!("depthwise conv: NCHW input expected, got {dims:?}")
        };
        if c * self.kernel * self.kernel != self.weight.len() {
            bail!(
                "depthwise conv: {c} channels for a weight of {}",
                self.weight.len()
            )
        }
        Ok((
            n,
            c,
            DepthwiseGeometry::new(h, w, self.kernel, self.stride, self.pad)?,
        ))
    }
}

impl CustomOp1 for FrozenDepthwiseOp {
    fn name(&self) -> &'static str {
        "toonbot-frozen-depthwise-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, g) = self.geometry(l.dims())?;
        let x = f32_slice(s, l)?;
        let (plane, out_plane) = (g.height * g.width, g.out_height * g.out_width);
        let taps = self.kernel * self.kernel;
        let mut y = vec![0f32; n * c * out_plane];
        y.par_chunks_mut(out_plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(i, (y, x))| {
                let ch = i % c;
                let w = &self.weight[ch * taps..(ch + 1) * taps];
                y.fill(self.bias[ch]);
                g.for_each_tap(|o, src, t| y[o] += w[t] * x[src]);
            });
        Ok((
            CpuStorage::F32(y),
            Shape::from((n, c, g.out_height, g.out_width)),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let op = FrozenDepthwiseInputGrad {
            forward: self,
            x_dims: x.dims().to_vec(),
        };
        Ok(Some(grad.apply_op1_no_bwd(&op)?))
    }
}

/// The input gradient of [`FrozenDepthwiseOp`] from its output gradient.
struct FrozenDepthwiseInputGrad<'a> {
    forward: &'a FrozenDepthwiseOp,
    x_dims: Vec<usize>,
}

impl CustomOp1 for FrozenDepthwiseInputGrad<'_> {
    fn name(&self) -> &'static str {
        "toonbot-frozen-depthwise-conv2d-input-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.forward;
        let (n, c, g) = op.geometry(&self.x_dims)?;
        if l.dims() != [n, c, g.out_height, g.out_width] {
            bail!(
                "depthwise conv: gradient {:?} for input {:?}",
                l.dims(),
                self.x_dims
            )
        }
        let grad = f32_slice(s, l)?;
        let (plane, out_plane) = (g.height * g.width, g.out_height * g.out_width);
        let taps = op.kernel * op.kernel;
        let mut dx = vec![0f32; n * c * plane];
        dx.par_chunks_mut(plane)
            .zip(grad.par_chunks(out_plane))
            .enumerate()
            .for_each(|(i, (dx, grad))| {
                let ch = i % c;
                let w = &op.weight[ch * taps..(ch + 1) * taps];
                g.for_each_tap(|o, src, t| dx[src] += w[t] * grad[o]);
            });
        Ok((CpuStorage::F32(dx), Shape::from(self.x_dims.clone())))
    }
}

/// A depthwise convolution (`weight` `(C, 1, k, k)`, `bias` `(C)`, both held fixed) of `x`
/// with zero padding `pad`: [`FrozenDepthwiseOp`] on the CPU in f32, candle's grouped
/// convolution elsewhere. Gradients flow to `x` only.
pub fn frozen_depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    pad: Padding4,
) -> Result<Tensor> {
    let (c, _, k, _) = weight.dims4()?;
    if !(x.device().is_cpu() && x.dtype() == DType::F32) {
        let [top, bottom, left, right] = pad;
        let padded = x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        let y = padded.conv2d(&weight.detach(), 0, stride, 1, c)?;
        return y.broadcast_add(&bias.detach().reshape((1, c, 1, 1))?);
    }
    let op = FrozenDepthwiseOp {
        weight: weight.flatten_all()?.to_vec1()?,
        bias: bias.to_vec1()?,
        kernel: k,
        stride,
        pad,
    };
    x.contiguous()?.apply_op1(op)
}

/// `nn.ReflectionPad2d(pad)` on NCHW: mirrors without repeating the edge; needs `pad < H, W`.
pub fn reflection_pad2d(x: &Tensor, pad: usize) -> Result<Tensor> {
    if pad == 0 {
        return Ok(x.clone());
    }
    let (_, _, h, w) = x.dims4()?;
    if pad >= h || pad >= w {
        candle_core::bail!("reflection pad {pad} needs an input larger than {h}x{w}")
    }
    reflect_dim(&reflect_dim(x, 3, pad)?, 2, pad)
}

/// Concatenates `x[pad..=1]`, `x`, `x[n-2..=n-1-pad]` along `dim`. Built from narrow, a small
/// index_select and one contiguous cat: much faster on CPU than an index_select of the whole
/// tensor along the last dim.
fn reflect_dim(x: &Tensor, dim: usize, pad: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    let edge = |start: usize| -> Result<Tensor> {
        let e = x.narrow(dim, start, pad)?.contiguous()?;
        if pad == 1 {
            return Ok(e);
        }
        let rev: Vec<u32> = (0..pad as u32).rev().collect();
        e.index_select(&Tensor::from_vec(rev, pad, x.device())?, dim)
    };
    Tensor::cat(&[&edge(1)?, x, &edge(n - 1 - pad)?], dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Output, input gradient and weight gradient of `sum(conv(x, w) * r)`.
    fn conv_and_grads(
        x: &Var,
        w: &Var,
        r: &Tensor,
        conv: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<[Tensor; 3]> {
        let y = conv(x.as_tensor(), w.as_tensor())?;
        let grads = (&y * r)?.sum_all()?.backward()?;
        Ok([
            y,
            grads.get(x).expect("input gradient").clone(),
            grads.get(w).expect("weight gradient").clone(),
        ])
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let scale = b
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?
            .max(1e-6);
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / scale)
    }

    #[test]
    fn the_training_convolution_and_its_gradients_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, cin, cout, kernel, stride, padding, height, width)
        let cases = [
            (1, 3, 8, 7, 1, Pad::Zeros(0), 20, 17),
            (2, 5, 6, 3, 1, Pad::Zeros(1), 9, 12),
            (2, 4, 7, 3, 2, Pad::Zeros(0), 13, 11),
            (1, 6, 5, 4, 2, Pad::Zeros(1), 14, 10),
            (3, 8, 4, 1, 1, Pad::Zeros(0), 7, 5),
            (1, 4, 4, 1, 2, Pad::Zeros(0), 8, 8),
            (1, 40, 3, 4, 1, Pad::Zeros(0), 6, 6),
            (1, 3, 8, 7, 1, Pad::Reflect(3), 20, 17),
            (2, 5, 6, 3, 1, Pad::Reflect(1), 9, 12),
            (1, 6, 5, 4, 2, Pad::Reflect(1), 14, 10),
            (2, 4, 7, 3, 2, Pad::Reflect(1), 13, 11),
            (1, 2, 3, 7, 1, Pad::Reflect(3), 4, 5),
            // Where the CPU has the direct kernel: at least 8 inputs and at most 32
            // outputs take it for the input gradient, at most 8 outputs or 7x7 for the
            // output; more than 32 outputs take the GEMM both ways.
            (2, 8, 6, 3, 1, Pad::Reflect(1), 5, 7),
            (1, 8, 3, 7, 1, Pad::Reflect(3), 9, 10),
            (1, 9, 5, 7, 1, Pad::Zeros(3), 11, 9),
            (2, 5, 40, 3, 1, Pad::Reflect(1), 9, 12),
            // Wide enough for several bands per image.
            (2, 16, 4, 3, 1, Pad::Zeros(1), 70, 200),
            (2, 16, 4, 3, 1, Pad::Reflect(1), 70, 200),
        ];
        for (batch, cin, cout, k, stride, pad, h, w) in cases {
            let x = Var::randn(0f32, 1f32, (batch, cin, h, w), &dev)?;
            let wt = Var::randn(0f32, 1f32, (cout, cin, k, k), &dev)?;
            let ho = (h + 2 * pad.size() - k) / stride + 1;
            let wo = (w + 2 * pad.size() - k) / stride + 1;
            let r = Tensor::randn(0f32, 1f32, (batch, cout, ho, wo), &dev)?;
            let ours = conv_and_grads(&x, &wt, &r, |x, w| conv2d(x, w, pad, stride))?;
            let candle = conv_and_grads(&x, &wt, &r, |x, w| match pad {
                Pad::Zeros(p) => x.conv2d(w, p, stride, 1, 1),
                Pad::Reflect(p) => reflection_pad2d(x, p)?.conv2d(w, 0, stride, 1, 1),
            })?;
            for (what, (a, b)) in ["output", "input grad", "weight grad"]
                .iter()
                .zip(ours.iter().zip(&candle))
            {
                assert_eq!(a.dims(), b.dims(), "{what}");
                let diff = max_rel_diff(a, b)?;
                assert!(
                    diff < 1e-5,
                    "{what} of {cin}->{cout} k{k} s{stride} {pad:?} {h}x{w}: {diff}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn the_channel_bias_and_its_gradients_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let y = Var::randn(0f32, 1f32, (3, 5, 6, 7), &dev)?;
        let bias = Var::randn(0f32, 1f32, 5, &dev)?;
        let r = Tensor::randn(0f32, 1f32, (3, 5, 6, 7), &dev)?;
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| -> Result<[Tensor; 3]> {
            let out = f(y.as_tensor(), bias.as_tensor())?;
            let grads = (&out * &r)?.sum_all()?.backward()?;
            Ok([
                out,
                grads.get(&y).expect("input gradient").clone(),
                grads.get(&bias).expect("bias gradient").clone(),
            ])
        };
        let ours = run(&add_channel_bias)?;
        let candle = run(&|y, b| y.broadcast_add(&b.reshape((1, (), 1, 1))?))?;
        for (what, (a, b)) in ["output", "input grad", "bias grad"]
            .iter()
            .zip(ours.iter().zip(&candle))
        {
            assert_eq!(a.dims(), b.dims(), "{what}");
            let diff = max_rel_diff(a, b)?;
            assert!(diff < 1e-5, "{what}: {diff}");
        }
        let wrong = Tensor::zeros(4, DType::F32, &dev)?;
        assert!(add_channel_bias(y.as_tensor(), &wrong).is_err());
        Ok(())
    }

    #[test]
    fn the_instance_norm_and_its_gradient_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0.3f32, 2f32, (2, 3, 9, 13), &dev)?;
        let r = Tensor::randn(0f32, 1f32, (2, 3, 9, 13), &dev)?;
        for relu in [false, true] {
            let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<[Tensor; 2]> {
                let y = f(x.as_tensor())?;
                let grads = (&y * &r)?.sum_all()?.backward()?;
                Ok([y, grads.get(&x).expect("input gradient").clone()])
            };
            let ours = run(&|x| instance_norm(x, relu, 1e-5).expect("training path"))?;
            let candle = run(&|x| {
                let mean = x.mean_keepdim(3)?.mean_keepdim(2)?;
                let d = x.broadcast_sub(&mean)?;
                let var = d.sqr()?.mean_keepdim(3)?.mean_keepdim(2)?;
                let y = d.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
                if relu {
                    y.relu()
                } else {
                    Ok(y)
                }
            })?;
            for (what, (a, b)) in ["output", "input grad"]
                .iter()
                .zip(ours.iter().zip(&candle))
            {
                let diff = max_rel_diff(a, b)?;
                assert!(diff < 1e-5, "{what} (relu {relu}): {diff}");
            }
        }
        let plain = Tensor::randn(0f32, 1f32, (1, 2, 3, 3), &dev)?;
        assert!(
            instance_norm(&plain, true, 1e-5).is_none(),
            "inference keeps its path"
        );
        Ok(())
    }

    #[test]
    fn the_instance_layer_norm_and_its_gradients_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c, h, w) = (3, 4, 7, 9);
        for per_sample in [true, false] {
            let g = if per_sample { n } else { 1 };
            let x = Var::randn(0.5f32, 2f32, (n, c, h, w), &dev)?;
            let rho = Var::rand(0f32, 1f32, (1, c, 1, 1), &dev)?;
            let gamma = Var::randn(1f32, 0.5f32, (g, c, 1, 1), &dev)?;
            let beta = Var::randn(0f32, 0.5f32, (g, c, 1, 1), &dev)?;
            let r = Tensor::randn(0f32, 1f32, (n, c, h, w), &dev)?;
            let vars = [&x, &rho, &gamma, &beta];
            let run = |f: &dyn Fn([&Tensor; 4]) -> Result<Tensor>| -> Result<Vec<Tensor>> {
                let y = f(vars.map(|v| v.as_tensor()))?;
                let grads = (&y * &r)?.sum_all()?.backward()?;
                let mut out = vec![y];
                for v in vars {
                    out.push(grads.get(v).expect("gradient").clone());
                }
                Ok(out)
            };
            let ours = run(&|[x, rho, gamma, beta]| {
                instance_layer_norm(x, rho, gamma, beta, 1e-5).expect("training path")
            })?;
            let candle = run(&|[x, rho, gamma, beta]| {
                // Unbiased variances, as torch.var.
                let normalise = |dims: &[usize], count: usize| -> Result<Tensor> {
                    let mut mean = x.clone();
                    for &d in dims {
                        mean = mean.mean_keepdim(d)?;
                    }
                    let d = x.broadcast_sub(&mean)?;
                    let mut sum_sq = d.sqr()?;
                    for &dim in dims {
                        sum_sq = sum_sq.sum_keepdim(dim)?;
                    }
                    let var = (sum_sq / (count - 1) as f64)?;
                    d.broadcast_div(&(var + 1e-5)?.sqrt()?)
                };
                let x_in = normalise(&[3, 2], h * w)?;
                let x_ln = normalise(&[3, 2, 1], c * h * w)?;
                let mixed =
                    (x_in.broadcast_mul(rho)? + x_ln.broadcast_mul(&rho.affine(-1.0, 1.0)?)?)?;
                mixed.broadcast_mul(gamma)?.broadcast_add(beta)
            })?;
            for (what, (a, b)) in ["output", "x grad", "rho grad", "gamma grad", "beta grad"]
                .iter()
                .zip(ours.iter().zip(&candle))
            {
                assert_eq!(a.dims(), b.dims(), "{what}");
                let diff = max_rel_diff(a, b)?;
                assert!(diff < 1e-4, "{what} (per sample {per_sample}): {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn the_activations_prelu_and_their_gradients_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        // Away from the kinks (0 and 6), where the subgradients may differ.
        let x = Var::randn(2f32, 4f32, (2, 3, 70, 130), &dev)?;
        let r = Tensor::randn(0f32, 1f32, (2, 3, 70, 130), &dev)?;
        for f in [
            Activation::Relu,
            Activation::Relu6,
            Activation::LeakyRelu(0.2),
        ] {
            let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<[Tensor; 2]> {
                let y = f(x.as_tensor())?;
                let grads = (&y * &r)?.sum_all()?.backward()?;
                Ok([y, grads.get(&x).expect("input gradient").clone()])
            };
            let ours = run(&|x| activation(x, f))?;
            let candle = run(&|x| f.candle(x))?;
            for (what, (a, b)) in ["output", "input grad"]
                .iter()
                .zip(ours.iter().zip(&candle))
            {
                assert_eq!(max_rel_diff(a, b)?, 0.0, "{what} of {f:?}");
            }
        }
        let x = Var::randn(0f32, 2f32, (2, 3, 5, 7), &dev)?;
        let r = Tensor::randn(0f32, 1f32, (2, 3, 5, 7), &dev)?;
        let slope = Tensor::new(&[0.25f32, -0.5, 1.5], &dev)?;
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<[Tensor; 2]> {
            let y = f(x.as_tensor())?;
            let grads = (&y * &r)?.sum_all()?.backward()?;
            Ok([y, grads.get(&x).expect("input gradient").clone()])
        };
        let ours = run(&|x| frozen_prelu(x, &slope).expect("training path"))?;
        let candle = run(&|x| {
            let pos = x.relu()?;
            pos.clone() + (x - pos)?.broadcast_mul(&slope.reshape((1, 3, 1, 1))?)?
        })?;
        for (what, (a, b)) in ["PReLU output", "PReLU input grad"]
            .iter()
            .zip(ours.iter().zip(&candle))
        {
            assert!(max_rel_diff(a, b)? < 1e-6, "{what}");
        }
        Ok(())
    }

    #[test]
    fn upsampling_and_pooling_and_their_gradients_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1f32, (2, 3, 6, 10), &dev)?;
        type Op = fn(&Tensor) -> Option<Result<Tensor>>;
        type Reference = fn(&Tensor) -> Result<Tensor>;
        let cases: [(&str, Op, Reference); 2] = [
            ("upsample", upsample_nearest2x, |x| {
                x.upsample_nearest2d(12, 20)
            }),
            ("average pool", avg_pool2x, |x| x.avg_pool2d(2)),
        ];
        for (what, ours, reference) in cases {
            let out_shape = reference(x.as_tensor())?.shape().clone();
            let r = Tensor::randn(0f32, 1f32, out_shape, &dev)?;
            let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<[Tensor; 2]> {
                let y = f(x.as_tensor())?;
                let grads = (&y * &r)?.sum_all()?.backward()?;
                Ok([y, grads.get(&x).expect("input gradient").clone()])
            };
            let a = run(&|x| ours(x).expect("training path"))?;
            let b = run(&|x| reference(x))?;
            for (part, (a, b)) in ["output", "input grad"].iter().zip(a.iter().zip(&b)) {
                assert_eq!(a.dims(), b.dims(), "{what} {part}");
                assert!(max_rel_diff(a, b)? < 1e-6, "{what} {part}");
            }
        }
        Ok(())
    }

    #[test]
    fn the_training_convolution_is_deterministic() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1f32, (2, 16, 66, 130), &dev)?;
        let w = Var::randn(0f32, 1f32, (8, 16, 3, 3), &dev)?;
        let r = Tensor::randn(0f32, 1f32, (2, 8, 66, 130), &dev)?;
        let run = || conv_and_grads(&x, &w, &r, |x, w| conv2d(x, w, Pad::Reflect(1), 1));
        let (a, b) = (run()?, run()?);
        for (a, b) in a.iter().zip(&b) {
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
        }
        Ok(())
    }

    #[test]
    fn inference_keeps_candles_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (1, 3, 8, 8), &dev)?;
        let w = Tensor::randn(0f32, 1f32, (4, 3, 3, 3), &dev)?;
        let y = conv2d(&x, &w, Pad::Zeros(1), 1)?;
        assert!(!y.track_op());
        let expected = x.conv2d(&w, 1, 1, 1, 1)?;
        assert_eq!(max_rel_diff(&y, &expected)?, 0.0);
        Ok(())
    }

    #[test]
    fn the_frozen_depthwise_convolution_and_its_input_gradient_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, channels, kernel, stride, height, width)
        let cases = [
            (2, 5, 3, 1, 9, 12),
            (1, 4, 3, 2, 16, 16),
            (2, 3, 5, 2, 13, 11),
            (1, 6, 5, 1, 8, 8),
        ];
        for (n, c, k, stride, h, w) in cases {
            let pad = {
                let [t, b] = same_padding(h, k, stride);
                let [l, r] = same_padding(w, k, stride);
                [t, b, l, r]
            };
            let x = Var::randn(0f32, 1f32, (n, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1f32, (c, 1, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1f32, c, &dev)?;
            let (ho, wo) = (h.div_ceil(stride), w.div_ceil(stride));
            let r = Tensor::randn(0f32, 1f32, (n, c, ho, wo), &dev)?;
            let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<[Tensor; 2]> {
                let y = f(x.as_tensor())?;
                let grads = (&y * &r)?.sum_all()?.backward()?;
                Ok([y, grads.get(&x).expect("input gradient").clone()])
            };
            let ours = run(&|x| frozen_depthwise_conv2d(x, &wt, &bias, stride, pad))?;
            let candle = run(&|x| {
                let [t, b, l, rt] = pad;
                let p = x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, rt)?;
                p.conv2d(&wt, 0, stride, 1, c)?
                    .broadcast_add(&bias.reshape((1, c, 1, 1))?)
            })?;
            for (what, (a, b)) in ["output", "input grad"]
                .iter()
                .zip(ours.iter().zip(&candle))
            {
                assert_eq!(a.dims(), b.dims(), "{what}");
                let diff = max_rel_diff(a, b)?;
                assert!(diff < 1e-5, "{what} of c{c} k{k} s{stride} {h}x{w}: {diff}");
            }
        }
        assert_eq!(same_padding(128, 3, 2), [0, 1]);
        assert_eq!(same_padding(64, 5, 2), [1, 2]);
        assert_eq!(same_padding(32, 5, 1), [2, 2]);
        Ok(())
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1f32, (1, 3, 6, 6), &dev)?;
        let w = Var::randn(0f32, 1f32, (4, 3, 3, 3), &dev)?;
        let y = conv2d(x.as_tensor(), &w.as_tensor().detach(), Pad::Zeros(1), 1)?;
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&w).is_none());
        Ok(())
    }
}
