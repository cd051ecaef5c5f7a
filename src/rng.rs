//! SplitMix64 (Steele et al. 2014): a tiny, seedable generator, for everything that must be
//! reproducible from a seed (KID subsets, weight initialisation, data order, augmentation).

/// A SplitMix64 generator; the field is its state, advanced by every draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// A generator for one named stream of a seed: `seed` and `key` hashed together, so
    /// streams with different keys are independent and none depends on the order of use.
    pub fn keyed(seed: u64, key: &str) -> Self {
        let hash = key.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
        });
        let mut mixer = Self(seed ^ hash.rotate_left(32));
        Self(mixer.next_u64())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: the log is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform in `0..bound` (multiply-shift; the bias is below 2^-32 for the sizes used here).
    pub fn below(&mut self, bound: usize) -> usize {
        ((self.next_u64() as u128 * bound as u128) >> 64) as usize
    }

    /// A uniformly random `m`-subset of `perm`'s entries by a partial Fisher-Yates shuffle
    /// (which also leaves `perm` a permutation for the next call).
    pub fn sample<'a>(&mut self, perm: &'a mut [u32], m: usize) -> &'a [u32] {
        for i in 0..m {
            let j = i + self.below(perm.len() - i);
            perm.swap(i, j);
        }
        &perm[..m]
    }

    /// A uniformly random permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<u32> {
        let mut perm: Vec<u32> = (0..n as u32).collect();
        self.sample(&mut perm, n);
        perm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = SplitMix64::keyed(1, "a");
                move |_| r.next_u64()
            })
            .collect();
        let mut again = SplitMix64::keyed(1, "a");
        assert!(a.iter().all(|&x| x == again.next_u64()));
        assert_ne!(SplitMix64::keyed(1, "b").next_u64(), a[0]);
        assert_ne!(SplitMix64::keyed(2, "a").next_u64(), a[0]);
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut r = SplitMix64(5);
        let xs: Vec<f64> = (0..20_000).map(|_| r.next_normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = SplitMix64(9).permutation(50);
        p.sort_unstable();
        assert_eq!(p, (0..50).collect::<Vec<u32>>());
    }
}
