//! Evaluation metrics on feature sets: KID (Bińkowski et al. 2018, "Demystifying MMD GANs")
//! the mean identity cosine between paired embeddings, and nearest-neighbour cosine distances
//! (how close generated images come to copying training images).
//!
//! KID follows torch-fidelity / clean-fid: the unbiased MMD² estimate with the cubic
//! polynomial kernel `k(x, y) = (x·y / d + 1)^3`, averaged over random subsets (drawn without
//! replacement, independently from each set) of size `min(subset_size, N, M)`; the reported
//! spread is the population standard deviation over subsets. U-GAT-IT reports both × 100.

use candle_core::{bail, DType, Result, Tensor, D};

use crate::rng::SplitMix64;

/// Settings of a KID estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KidConfig {
    /// Number of random subsets averaged.
    pub subsets: usize,
    /// Subset size; capped at the size of the smaller set.
    pub subset_size: usize,
    /// Seed of the subset sampling: same features and seed, same result.
    pub seed: u64,
}

impl Default for KidConfig {
    fn default() -> Self {
        Self {
            subsets: 100,
            subset_size: 1000,
            seed: 0,
        }
    }
}

/// A KID estimate in raw MMD² units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kid {
    /// Mean of the per-subset unbiased MMD² (may be slightly negative for equal distributions).
    pub mean: f64,
    /// Population standard deviation of the per-subset values.
    pub std: f64,
    /// Subset size actually used.
    pub subset_size: usize,
}

impl Kid {
    /// `(mean × 100, std × 100)`, the "KID×100" of U-GAT-IT.
    pub fn times_100(&self) -> (f64, f64) {
        (self.mean * 100.0, self.std * 100.0)
    }
}

/// KID between feature sets `a` `(N, D)` and `b` `(M, D)`, on their device, in f64.
pub fn kid(a: &Tensor, b: &Tensor, cfg: &KidConfig) -> Result<Kid> {
    let (n, d) = a.dims2()?;
    let (m_b, d_b) = b.dims2()?;
    if d != d_b {
        bail!("kid: feature sizes differ ({d} vs {d_b})");
    }
    let m = cfg.subset_size.min(n).min(m_b);
    if m < 2 || cfg.subsets == 0 {
        bail!(
            "kid: needs at least 2 samples per set and 1 subset (N={n}, M={m_b}, subset size {m})"
        );
    }
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let mut rng = SplitMix64(cfg.seed);
    let mut perm_a: Vec<u32> = (0..n as u32).collect();
    let mut perm_b: Vec<u32> = (0..m_b as u32).collect();
    let mut values = Vec::with_capacity(cfg.subsets);
    for _ in 0..cfg.subsets {
        let x = select(&a, rng.sample(&mut perm_a, m))?;
        let y = select(&b, rng.sample(&mut perm_b, m))?;
        values.push(unbiased_mmd2(&x, &y)?);
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    Ok(Kid {
        mean,
        std: var.sqrt(),
        subset_size: m,
    })
}

fn select(features: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let ids = Tensor::from_slice(rows, rows.len(), features.device())?;
    features.index_select(&ids, 0)
}

/// `(x·y / d + 1)^3` applied to a Gram matrix (or vector of squared norms).
fn cubic_kernel(gram: &Tensor, d: usize) -> Result<Tensor> {
    let t = gram.affine(1.0 / d as f64, 1.0)?;
    t.sqr()? * t
}

/// Unbiased MMD² of two equally sized samples `(m, d)`: off-diagonal means of `K_xx` and
/// `K_yy` minus twice the full mean of `K_xy`.
fn unbiased_mmd2(x: &Tensor, y: &Tensor) -> Result<f64> {
    let (m, d) = x.dims2()?;
    let off_diagonal_sum = |s: &Tensor| -> Result<Tensor> {
        let full = cubic_kernel(&s.matmul(&s.t()?)?, d)?.sum_all()?;
        let diag = cubic_kernel(&s.sqr()?.sum(1)?, d)?.sum_all()?;
        full - diag
    };
    let within = (off_diagonal_sum(x)? + off_diagonal_sum(y)?)?;
    let between = cubic_kernel(&x.matmul(&y.t()?)?, d)?.sum_all()?;
    let (m, m1) = (m as f64, (m - 1) as f64);
    ((within / (m * m1))? - (between * (2.0 / (m * m)))?)?.to_scalar::<f64>()
}

/// Mean cosine similarity between paired rows of `a` and `b` `(N, D)` (e.g. the face
/// embeddings of each photo and of its cartoon).
pub fn identity_cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (n, d) = a.dims2()?;
    if b.dims2()? != (n, d) || n == 0 {
        bail!(
            "identity_cosine: need two non-empty sets of the same shape ({:?} vs {:?})",
            a.dims(),
            b.dims()
        );
    }
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let norm =
        |t: &Tensor| -> Result<Tensor> { t.sqr()?.sum(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX) };
    let cos = ((&a * &b)?.sum(D::Minus1)? / (norm(&a)? * norm(&b)?)?)?;
    cos.mean_all()?.to_scalar::<f64>()
}

/// For each row of `queries` `(N, D)`, the cosine distance `1 - cos` to its nearest row of
/// `references` `(M, D)`: 0 for a copy (in that feature space), about 1 for unrelated ones.
pub fn nearest_cosine_distances(queries: &Tensor, references: &Tensor) -> Result<Vec<f64>> {
    let (n, d) = queries.dims2()?;
    let (m, d_ref) = references.dims2()?;
    if d != d_ref || n == 0 || m == 0 {
        bail!(
            "nearest_cosine_distances: need non-empty sets of one width ({:?} vs {:?})",
            queries.dims(),
            references.dims()
        );
    }
    let unit = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F64)?;
        let norm = t
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        t.broadcast_div(&norm)
    };
    let cos = unit(queries)?.matmul(&unit(references)?.t()?)?;
    let nearest = cos.max(D::Minus1)?.to_vec1::<f64>()?;
    Ok(nearest.into_iter().map(|c| 1.0 - c).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg(subsets: usize, subset_size: usize) -> KidConfig {
        KidConfig {
            subsets,
            subset_size,
            seed: 7,
        }
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn uniform(seed: u64, shape: (usize, usize, usize, usize), dev: &Device) -> Result<Tensor> {
        let mut rng = SplitMix64(seed);
        let len = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..len)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, dev)
    }

    fn gaussian_features(seed: u64, n: usize, d: usize, shift: f64) -> Result<Tensor> {
        // Sum of 4 uniforms: roughly Gaussian with std 2/sqrt(3).
        let u = uniform(seed, (4, n, d, 1), &Device::Cpu)?;
        u.sum(0)?.squeeze(2)?.affine(1.0, shift)
    }

    #[test]
    fn nearest_distance_is_zero_for_a_copy_and_one_for_an_orthogonal_set() -> Result<()> {
        let dev = Device::Cpu;
        let references = Tensor::new(&[[1f32, 0., 0.], [0., 2., 0.]], &dev)?;
        let queries = Tensor::new(&[[0f32, 5., 0.], [0., 0., 1.], [1., 1., 0.]], &dev)?;
        let d = nearest_cosine_distances(&queries, &references)?;
        assert!(d[0].abs() < 1e-12, "a scaled copy: {}", d[0]);
        assert!((d[1] - 1.0).abs() < 1e-12);
        assert!((d[2] - (1.0 - 0.5f64.sqrt())).abs() < 1e-9);
        assert!(nearest_cosine_distances(&queries, &queries.narrow(1, 0, 2)?).is_err());
        Ok(())
    }

    #[test]
    fn hand_computed_case() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &dev)?;
        let y = Tensor::new(&[[2f32, 0.0], [0.0, 2.0], [1.0, 2.0]], &dev)?;
        // numpy / exact fractions: off-diagonal sums 20.75 and 113.75 over 6, K_xy sum 60.375:
        // 134.5 / 6 - 2 * 60.375 / 9 = 37 / 36.
        let k = kid(&x, &y, &cfg(5, 1000))?;
        assert_eq!(k.subset_size, 3);
        assert!((k.mean - 37.0 / 36.0).abs() < 1e-12, "{k:?}");
        assert!(
            k.std < 1e-12,
            "every 3-subset of 3 points is the whole set: {k:?}"
        );
        assert!((k.times_100().0 - 3700.0 / 36.0).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn identical_sets_give_about_zero() -> Result<()> {
        let a = gaussian_features(1, 400, 64, 0.0)?;
        // Full-size subsets: the same value every time. Both samples hold the same points, so
        // K_xy's diagonal holds self-similarities k(z, z) (~13 here, vs ~1 between points) and
        // the estimate is slightly negative: -2 (mean k(z, z) - mean k(z, z')) / m.
        let k = kid(&a, &a, &cfg(3, 400))?;
        println!("KID(A, A), full subsets = {k:?}");
        let gram = cubic_kernel(&a.matmul(&a.t()?)?, 64)?.to_dtype(DType::F64)?;
        let diag_sum = cubic_kernel(&a.sqr()?.sum(1)?, 64)?
            .to_dtype(DType::F64)?
            .sum_all()?;
        let off_sum = (gram.sum_all()? - &diag_sum)?.to_scalar::<f64>()?;
        let diag_mean = diag_sum.to_scalar::<f64>()? / 400.0;
        let expected = -2.0 * (diag_mean - off_sum / (400.0 * 399.0)) / 400.0;
        assert!(
            k.mean < 0.0 && (k.mean - expected).abs() < 1e-4,
            "{k:?} vs {expected}"
        );
        assert!(k.std < 1e-12, "{k:?}");
        // Random half-size subsets: near 0 on the kernel's scale, and reproducible by seed.
        let k = kid(&a, &a, &cfg(50, 200))?;
        println!("KID(A, A), subsets of 200 = {k:?}");
        assert!(k.mean.abs() < 0.1, "{k:?}");
        assert_eq!(kid(&a, &a, &cfg(50, 200))?, k);
        let other = kid(
            &a,
            &a,
            &KidConfig {
                seed: 8,
                ..cfg(50, 200)
            },
        )?;
        assert_ne!(other.mean, k.mean);
        Ok(())
    }

    #[test]
    fn kid_grows_with_the_shift() -> Result<()> {
        let a = gaussian_features(1, 200, 32, 0.0)?;
        let mut last = kid(&a, &gaussian_features(2, 200, 32, 0.0)?, &cfg(20, 100))?;
        println!("shift 0: {last:?}");
        assert!(last.mean.abs() < 0.05, "{last:?}");
        for shift in [0.25, 0.5, 1.0] {
            let k = kid(&a, &gaussian_features(2, 200, 32, shift)?, &cfg(20, 100))?;
            println!("shift {shift}: {k:?}");
            assert!(k.mean > last.mean + 3.0 * k.std, "{k:?} vs {last:?}");
            last = k;
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::zeros((4, 3), DType::F32, &dev)?;
        assert!(kid(&a, &Tensor::zeros((4, 2), DType::F32, &dev)?, &cfg(1, 10)).is_err());
        assert!(kid(&a, &Tensor::zeros((1, 3), DType::F32, &dev)?, &cfg(1, 10)).is_err());
        assert!(kid(&a, &a, &cfg(0, 10)).is_err());
        Ok(())
    }

    #[test]
    fn subsets_are_uniform_and_distinct() {
        let mut rng = SplitMix64(3);
        let mut perm: Vec<u32> = (0..10).collect();
        let mut counts = [0usize; 10];
        for _ in 0..20_000 {
            let s = rng.sample(&mut perm, 4).to_vec();
            let mut sorted = s.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 4);
            s.iter().for_each(|&i| counts[i as usize] += 1);
        }
        // Each index is picked with probability 0.4: 8000 ± ~70 (1 sigma).
        assert!(
            counts.iter().all(|&c| (7600..8400).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn identity_cosine_of_pairs() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 0.0], [0.0, 2.0], [3.0, 3.0]], &dev)?;
        let b = Tensor::new(&[[2f32, 0.0], [1.0, 0.0], [-1.0, -1.0]], &dev)?;
        // cosines 1, 0, -1.
        assert!(identity_cosine(&a, &b)?.abs() < 1e-12);
        assert!((identity_cosine(&a, &a)? - 1.0).abs() < 1e-12);
        assert!(identity_cosine(&a, &b.narrow(0, 0, 2)?).is_err());
        Ok(())
    }

    /// A fixed two-layer conv net standing in for Inception: images -> features -> KID.
    struct TinyFeatures {
        w1: Tensor,
        w2: Tensor,
    }

    impl TinyFeatures {
        fn new(dev: &Device) -> Result<Self> {
            Ok(Self {
                w1: (uniform(11, (8, 3, 3, 3), dev)? * 0.5)?,
                w2: (uniform(12, (16, 8, 3, 3), dev)? * 0.3)?,
            })
        }

        /// `(N, 3, H, W)` in 0..=255 -> `(N, 16)`.
        fn forward(&self, images: &Tensor) -> Result<Tensor> {
            let x = images.affine(1.0 / 128.0, -1.0)?;
            let x = x.conv2d(&self.w1, 1, 2, 1, 1)?.relu()?;
            let x = x.conv2d(&self.w2, 1, 2, 1, 1)?.relu()?;
            x.mean(D::Minus1)?.mean(D::Minus1)
        }
    }

    /// `n` 24x24 images: smooth random colour blobs around `brightness`.
    fn images(seed: u64, n: usize, brightness: f64, dev: &Device) -> Result<Tensor> {
        let coarse = uniform(seed, (n, 3, 6, 6), dev)?.affine(60.0, brightness)?;
        let fine = uniform(seed + 1000, (n, 3, 24, 24), dev)?.affine(10.0, 0.0)?;
        (coarse.upsample_nearest2d(24, 24)? + fine)?.clamp(0f32, 255f32)
    }

    #[test]
    fn tiny_network_pipeline() -> Result<()> {
        let dev = Device::Cpu;
        let net = TinyFeatures::new(&dev)?;
        let reference = net.forward(&images(1, 64, 110.0, &dev)?)?;
        assert_eq!(reference.dims(), &[64, 16]);
        let settings = cfg(30, 48);
        let same = kid(
            &reference,
            &net.forward(&images(2, 64, 110.0, &dev)?)?,
            &settings,
        )?;
        let near = kid(
            &reference,
            &net.forward(&images(3, 64, 130.0, &dev)?)?,
            &settings,
        )?;
        let far = kid(
            &reference,
            &net.forward(&images(4, 64, 170.0, &dev)?)?,
            &settings,
        )?;
        println!(
            "KID x100: same {:?}, +20 {:?}, +60 {:?}",
            same.times_100(),
            near.times_100(),
            far.times_100()
        );
        assert!(same.mean.abs() < near.mean, "{same:?} vs {near:?}");
        assert!(near.mean > 3.0 * near.std, "{near:?}");
        assert!(far.mean > near.mean + 3.0 * far.std, "{far:?} vs {near:?}");
        Ok(())
    }
}
