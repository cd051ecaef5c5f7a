//! Tensor operations with TensorFlow's semantics, for the networks imported from TensorFlow
//! Lite / TensorFlow.js graphs: `SAME` padding, depthwise convolution as shifted views,
//! channel padding of shortcuts, hard-swish, PReLU and TF1's legacy bilinear resize. Each is
//! built from candle ops (any device, differentiable) and tested against candle's own op
//! where there is one.

use candle_core::{Result, Tensor, D};

/// Zero-pads the two spatial dims of an NCHW tensor the way TensorFlow's `SAME` does.
pub fn pad_same(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let total = |size: usize| -> usize {
        let out = size.div_ceil(stride);
        ((out - 1) * stride + kernel).saturating_sub(size)
    };
    let (ph, pw) = (total(h), total(w));
    let x = if ph > 0 {
        x.pad_with_zeros(2, ph / 2, ph - ph / 2)?
    } else {
        x.clone()
    };
    if pw > 0 {
        x.pad_with_zeros(3, pw / 2, pw - pw / 2)
    } else {
        Ok(x)
    }
}

/// Depthwise convolution without padding as a sum of shifted, scaled views.
///
/// candle runs a grouped convolution as one convolution per group, which is very slow
/// for depthwise layers; this form is a handful of large element-wise ops on any device
/// and is differentiable.
pub fn depthwise_conv(x: &Tensor, weight: &Tensor, stride: usize) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    let (oh, ow) = (h - kh + 1, w - kw + 1);
    let mut acc: Option<Tensor> = None;
    for i in 0..kh {
        for j in 0..kw {
            let tap = weight
                .narrow(2, i, 1)?
                .narrow(3, j, 1)?
                .reshape((1, c, 1, 1))?;
            let term = x.narrow(2, i, oh)?.narrow(3, j, ow)?.broadcast_mul(&tap)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
    }
    let full = acc.expect("kernel has at least one tap");
    if stride == 1 {
        return Ok(full);
    }
    subsample(&full, stride)
}

/// Keeps every `stride`-th row and column, starting at the first.
pub fn subsample(x: &Tensor, stride: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h.div_ceil(stride), w.div_ceil(stride));
    let x = x
        .pad_with_zeros(2, 0, oh * stride - h)?
        .pad_with_zeros(3, 0, ow * stride - w)?;
    x.reshape((n, c, oh, stride, ow, stride))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, oh, ow))
}

/// Zero-pads the channel dim (TensorFlow's channel padding used in residual shortcuts).
pub fn pad_channels(x: &Tensor, to: usize) -> Result<Tensor> {
    let c = x.dim(1)?;
    if to > c {
        x.pad_with_zeros(1, 0, to - c)
    } else {
        Ok(x.clone())
    }
}

/// `x * relu6(x + 3) / 6`.
pub fn hard_swish(x: &Tensor) -> Result<Tensor> {
    (x * ((x + 3.0)?.clamp(0f32, 6f32)? / 6.0)?)?.contiguous()
}

/// Per-channel PReLU with an NCHW-broadcast slope of shape `(channels,)`.
pub fn prelu(x: &Tensor, slope: &Tensor) -> Result<Tensor> {
    if let Some(y) = super::train_ops::frozen_prelu(x, slope) {
        return y;
    }
    let slope = slope.reshape((1, (), 1, 1))?;
    let pos = x.relu()?;
    let neg = (x - &pos)?;
    pos + neg.broadcast_mul(&slope)?
}

/// Global average pool over H and W, keeping NCHW rank (`N x C x 1 x 1`).
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)
}

/// `(n_out, n_in)` matrix of TF1's legacy bilinear resize along one axis (`src = dst * in / out`, no half-pixel shift, clamped at the far edge).
fn legacy_bilinear_matrix(n_in: usize, n_out: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let mut m = vec![0f32; n_out * n_in];
    let scale = n_in as f64 / n_out as f64;
    for o in 0..n_out {
        let src = o as f64 * scale;
        let i0 = (src.floor() as usize).min(n_in - 1);
        let frac = (src - i0 as f64) as f32;
        m[o * n_in + i0] += 1.0 - frac;
        m[o * n_in + (i0 + 1).min(n_in - 1)] += frac;
    }
    Tensor::from_vec(m, (n_out, n_in), dev)
}

/// Resizes `(N, C, H, W)` to `(N, C, h, w)` with TF1's legacy bilinear resize, as two matmuls.
pub fn resize_bilinear_legacy(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (n, c, ih, iw) = x.dims4()?;
    if (ih, iw) == (h, w) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let rw = legacy_bilinear_matrix(iw, w, dev)?.to_dtype(x.dtype())?;
    let rh = legacy_bilinear_matrix(ih, h, dev)?.to_dtype(x.dtype())?;
    let x = x
        .contiguous()?
        .reshape((n * c * ih, iw))?
        .matmul(&rw.t()?)?;
    let x = x
        .reshape((n * c, ih, w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * c * w, ih))?
        .matmul(&rh.t()?)?;
    x.reshape((n * c, w, h))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn depthwise_matches_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (2, 4, 9, 8), &dev)?;
        let w = Tensor::randn(0f32, 1f32, (4, 1, 3, 3), &dev)?;
        for stride in [1, 2] {
            let ours = depthwise_conv(&x, &w, stride)?;
            let reference = x.conv2d(&w, 0, stride, 1, 4)?;
            assert_eq!(ours.dims(), reference.dims());
            let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "stride {stride}: max diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn same_padding_gives_ceil_output_size() -> Result<()> {
        let x = Tensor::zeros((1, 1, 7, 8), candle_core::DType::F32, &Device::Cpu)?;
        let padded = pad_same(&x, 3, 2)?;
        // out = ceil(7/2) = 4 needs 9 rows (pad 1+1); ceil(8/2) = 4 needs 9 cols (0+1).
        assert_eq!(padded.dims(), &[1, 1, 9, 9]);
        Ok(())
    }

    #[test]
    fn prelu_scales_only_negatives() -> Result<()> {
        let x = Tensor::new(&[[[[-2f32, 3.0]]], [[[1.0, -1.0]]]], &Device::Cpu)?;
        let slope = Tensor::new(&[0.5f32], &Device::Cpu)?;
        let y = prelu(&x, &slope)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![-1.0, 3.0, 1.0, -0.5]);
        Ok(())
    }
}
