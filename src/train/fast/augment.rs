//! Differentiable augmentation of every discriminator input (DiffAugment, Zhao et al.
//! 2020), each transform applied to a sample with probability `p` adapted as in ADA
//! (Karras et al. 2020); and CartoonGAN's edge-smoothed cartoons.
//!
//! The transforms are the mild set: brightness ±0.1, saturation and contrast
//! ×[0.8, 1.2] (on [-1, 1] images; the flat palette is part of the style), translation by
//! up to 1/8 of the side with zero (grey) fill, and a cutout square of half the side.
//! Every draw comes from a stream keyed by the seed, the step and the input's name.

use candle_core::{DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

/// One draw of every transform for every sample of a batch.
struct Draws {
    brightness: Vec<f32>,
    saturation: Vec<f32>,
    contrast: Vec<f32>,
    /// Shift in pixels (x, y).
    shift: Vec<(isize, isize)>,
    /// Top-left corner of the cutout square, when the sample gets one.
    cutout: Vec<Option<(usize, usize)>>,
}

impl Draws {
    fn new(rng: &mut SplitMix64, n: usize, size: usize, p: f64) -> Self {
        let mut draws = Self {
            brightness: Vec::new(),
            saturation: Vec::new(),
            contrast: Vec::new(),
            shift: Vec::new(),
            cutout: Vec::new(),
        };
        let max_shift = (size / 8) as isize;
        let cut = size / 2;
        for _ in 0..n {
            let mut applies = || rng.next_f64() < p;
            let (b, s, c, t, k) = (applies(), applies(), applies(), applies(), applies());
            let mut centred = |scale: f64| (rng.next_f64() - 0.5) * scale;
            let brightness = centred(0.2) as f32;
            let saturation = 1.0 + centred(0.4) as f32;
            let contrast = 1.0 + centred(0.4) as f32;
            let dx = rng.below(2 * max_shift as usize + 1) as isize - max_shift;
            let dy = rng.below(2 * max_shift as usize + 1) as isize - max_shift;
            let corner = (rng.below(size - cut + 1), rng.below(size - cut + 1));
            draws.brightness.push(if b { brightness } else { 0.0 });
            draws.saturation.push(if s { saturation } else { 1.0 });
            draws.contrast.push(if c { contrast } else { 1.0 });
            draws.shift.push(if t { (dx, dy) } else { (0, 0) });
            draws.cutout.push(k.then_some(corner));
        }
        draws
    }
}

fn per_sample(values: &[f32], device: &Device) -> Result<Tensor> {
    Tensor::from_slice(values, (values.len(), 1, 1, 1), device)
}

/// `x` shifted by `(dx, dy)` pixels, zeros where it moved in from outside.
fn translate(x: &Tensor, (dx, dy): (isize, isize)) -> Result<Tensor> {
    if (dx, dy) == (0, 0) {
        return Ok(x.clone());
    }
    let (_, _, h, w) = x.dims4()?;
    let shift = |t: &Tensor, dim: usize, d: isize, len: usize| -> Result<Tensor> {
        let m = d.unsigned_abs();
        if d > 0 {
            t.narrow(dim, 0, len - m)?.pad_with_zeros(dim, m, 0)
        } else if d < 0 {
            t.narrow(dim, m, len - m)?.pad_with_zeros(dim, 0, m)
        } else {
            Ok(t.clone())
        }
    };
    shift(&shift(x, 3, dx, w)?, 2, dy, h)
}

/// DiffAugment of `x` `(N, 3, S, S)` in [-1, 1] with probability `p` per transform and
/// sample, drawn from stream `key` of `seed`.
pub fn diff_augment(x: &Tensor, p: f64, seed: u64, key: &str) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let (n, _, h, w) = x.dims4()?;
    let dev = x.device();
    let mut rng = SplitMix64::keyed(seed, key);
    let draws = Draws::new(&mut rng, n, h.min(w), p);
    let x = x.broadcast_add(&per_sample(&draws.brightness, dev)?)?;
    let mean = x.mean_keepdim(1)?;
    let x = x
        .broadcast_sub(&mean)?
        .broadcast_mul(&per_sample(&draws.saturation, dev)?)?
        .broadcast_add(&mean)?;
    let mean = x
        .mean_keepdim(D::Minus1)?
        .mean_keepdim(2)?
        .mean_keepdim(1)?;
    let x = x
        .broadcast_sub(&mean)?
        .broadcast_mul(&per_sample(&draws.contrast, dev)?)?
        .broadcast_add(&mean)?;
    let shifted = (0..n)
        .map(|i| translate(&x.narrow(0, i, 1)?, draws.shift[i]))
        .collect::<Result<Vec<_>>>()?;
    let x = Tensor::cat(&shifted, 0)?;
    if draws.cutout.iter().all(Option::is_none) {
        return Ok(x);
    }
    let cut = h.min(w) / 2;
    let mut mask = vec![1f32; n * h * w];
    for (i, corner) in draws.cutout.iter().enumerate() {
        if let Some((cx, cy)) = corner {
            for y in *cy..cy + cut {
                mask[i * h * w + y * w + cx..i * h * w + y * w + cx + cut].fill(0.0);
            }
        }
    }
    x.broadcast_mul(&Tensor::from_vec(mask, (n, 1, h, w), dev)?)
}

/// ADA's controller: every `interval` discriminator steps, `p` moves by
/// `sign(E[sign(D(real))] - target)` times `images / speed_images`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveProbability {
    /// Probability, in [0, 1], that each transform is applied to a sample; starts at 0.
    pub p: f64,
    /// The `mean(sign(D(real)))` the controller steers towards: above it, `p` rises.
    pub target: f64,
    /// Images over which `p` can go from 0 to 1.
    pub speed_images: f64,
    /// Discriminator steps between two adjustments of `p` (4).
    pub interval: u64,
    /// Sum of `mean(sign(D(real)))` and steps since the last adjustment.
    sum: f64,
    count: u64,
}

impl AdaptiveProbability {
    /// A controller at `p = 0` adjusting every 4 steps.
    pub fn new(target: f64, speed_images: f64) -> Self {
        Self {
            p: 0.0,
            target,
            speed_images,
            interval: 4,
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one step's `mean(sign(D(real)))` over `batch` images.
    pub fn observe(&mut self, sign_mean: f64, batch: usize) {
        self.sum += sign_mean;
        self.count += 1;
        if self.count >= self.interval {
            let r_t = self.sum / self.count as f64;
            let delta = (r_t - self.target).signum() * (self.count as f64 * batch as f64)
                / self.speed_images;
            self.p = (self.p + delta).clamp(0.0, 1.0);
            self.sum = 0.0;
            self.count = 0;
        }
    }
}

/// `mean(sign(logits))`, ADA's overfitting heuristic `r_t` for one batch.
pub fn sign_mean(logits: &Tensor) -> Result<f64> {
    let s = logits.detach().ge(0f32)?.to_dtype(DType::F32)?;
    Ok(f64::from(
        s.mean_all()?.affine(2.0, -1.0)?.to_scalar::<f32>()?,
    ))
}

/// CartoonGAN's edge-smoothed cartoons: pixels within 2 of a strong edge (Sobel
/// magnitude of the luminance over `threshold`, in [-1, 1] units) replaced by a 5x5
/// Gaussian blur (sigma 1), so that the discriminator learns that soft edges are fake.
pub fn edge_smoothed(x: &Tensor, threshold: f64) -> Result<Tensor> {
    let x = x.detach();
    let (n, c, h, w) = x.dims4()?;
    let dev = x.device();
    let lum = x.mean_keepdim(1)?;
    let sobel = Tensor::new(
        &[
            [[[-1f32, 0., 1.], [-2., 0., 2.], [-1., 0., 1.]]],
            [[[-1f32, -2., -1.], [0., 0., 0.], [1., 2., 1.]]],
        ],
        dev,
    )?;
    // Replicated, not zero, padding: the image's border is not an edge.
    let g = lum
        .pad_with_same(2, 1, 1)?
        .pad_with_same(3, 1, 1)?
        .conv2d(&sobel, 0, 1, 1, 1)?;
    let magnitude = g.sqr()?.sum_keepdim(1)?.sqrt()?;
    let edges = magnitude.ge(threshold)?.to_dtype(DType::F32)?;
    let dilated = edges
        .pad_with_zeros(2, 2, 2)?
        .pad_with_zeros(3, 2, 2)?
        .max_pool2d_with_stride(5, 1)?;
    let taps: Vec<f32> = (-2i32..=2).map(|i| (-(i * i) as f32 / 2.0).exp()).collect();
    let total: f32 = taps.iter().sum();
    let kernel: Vec<f32> = taps
        .iter()
        .flat_map(|a| taps.iter().map(move |b| a * b / (total * total)))
        .collect();
    let kernel = Tensor::from_vec(kernel, (1, 1, 5, 5), dev)?;
    let planes = x.reshape((n * c, 1, h, w))?;
    let padded = planes.pad_with_same(2, 2, 2)?.pad_with_same(3, 2, 2)?;
    let blurred = padded.conv2d(&kernel, 0, 1, 1, 1)?.reshape((n, c, h, w))?;
    let keep = dilated.affine(-1.0, 1.0)?;
    x.broadcast_mul(&keep)? + blurred.broadcast_mul(&dilated)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_augmentation_at_p_zero_and_seeded_draws() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 0.5, (3, 3, 32, 32), &dev)?;
        let same = diff_augment(&x, 0.0, 1, "real.5")?;
        assert_eq!((same - &x)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        let a = diff_augment(&x, 1.0, 1, "real.5")?;
        let b = diff_augment(&x, 1.0, 1, "real.5")?;
        let c = diff_augment(&x, 1.0, 1, "fake.5")?;
        assert_eq!((&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        assert!((&a - &c)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        // At p = 1 every sample has a 16x16 cutout: at least a quarter of it is zero.
        let zeros = a
            .eq(0f32)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!(zeros >= 0.24, "{zeros}");
        Ok(())
    }

    #[test]
    fn gradients_flow_through_the_augmentation() -> Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::randn(0f32, 0.5, (2, 3, 16, 16), &dev)?;
        let y = diff_augment(x.as_tensor(), 1.0, 3, "fake.1")?;
        let grads = y.sum_all()?.backward()?;
        let g = grads.get(&x).expect("gradient");
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn translation_moves_content() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 16., &dev)?.reshape((1, 1, 4, 4))?;
        let t = translate(&x, (1, 0))?;
        let row: Vec<f32> = t.get(0)?.get(0)?.get(0)?.to_vec1()?;
        assert_eq!(row, [0., 0., 1., 2.]);
        let t = translate(&x, (0, -1))?;
        let col: Vec<f32> = t
            .get(0)?
            .get(0)?
            .narrow(1, 0, 1)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(col, [4., 8., 12., 0.]);
        Ok(())
    }

    #[test]
    fn ada_raises_p_when_the_discriminator_is_too_sure() {
        let mut ada = AdaptiveProbability::new(0.6, 1000.0);
        for _ in 0..8 {
            ada.observe(1.0, 5);
        }
        assert!((ada.p - 0.04).abs() < 1e-12, "{}", ada.p);
        for _ in 0..40 {
            ada.observe(-1.0, 5);
        }
        assert_eq!(ada.p, 0.0);
    }

    #[test]
    fn edges_are_smoothed_and_flat_areas_kept() -> Result<()> {
        let dev = Device::Cpu;
        // Left half -1, right half 1: one vertical edge at column 8.
        let row: Vec<f32> = (0..16).map(|i| if i < 8 { -1.0 } else { 1.0 }).collect();
        let img: Vec<f32> = (0..3 * 16).flat_map(|_| row.clone()).collect();
        let x = Tensor::from_vec(img, (1, 3, 16, 16), &dev)?;
        let y = edge_smoothed(&x, 0.5)?;
        let at = |col: usize| -> Result<f32> { y.get(0)?.get(0)?.get(5)?.get(col)?.to_scalar() };
        // Far from the edge, and at the image's border, pixels are kept exactly.
        assert_eq!(at(0)?, -1.0);
        assert_eq!(at(15)?, 1.0);
        let top: Vec<f32> = y.get(0)?.get(1)?.get(0)?.to_vec1()?;
        assert_eq!(top[..5], [-1.0; 5]);
        assert!(at(7)? > -0.9 && at(8)? < 0.9);
        Ok(())
    }
}
