//! photo2cartoon's face-ID loss (`models/face_features.py`): `1 - cos` between the
//! embeddings of a real image and its translation, through a frozen face-embedding network
//! (here the imported MobileFaceNet, DESIGN §7) on a fixed crop of the aligned face.
//!
//! The crop, as the reference computes it on an `h x w` batch: rows
//! `int(h / 2.1 * 0.47) .. int(h - h / 2.1 * 0.3)`, the centred square of that height
//! (`left = int(w / 2 - size / 2)`), resized to 112x112 bilinearly with
//! `align_corners=True`. The reference feeds the [-1, 1] images to its network directly;
//! ours expects `(x - 127.5) / 128` of 0..255 values, i.e. the [-1, 1] value times
//! 127.5 / 128.

use std::path::Path;

use candle_core::{bail, Device, Result, Tensor};

use crate::nets::face_embedder::{self, cosine_similarity, FaceEmbedder};

/// The face crop of an `h x w` image, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaceCrop {
    /// First row of the crop.
    pub top: usize,
    /// First column of the crop.
    pub left: usize,
    /// Side of the square crop.
    pub size: usize,
}

impl FaceCrop {
    /// The reference's crop of an `h x w` image (see the module documentation).
    pub fn of(h: usize, w: usize) -> Self {
        let hf = h as f64;
        // Python's int() truncates; every value here is positive.
        let top = (hf / 2.1 * (0.8 - 0.33)) as usize;
        let bottom = (hf - hf / 2.1 * 0.3) as usize;
        let size = bottom - top;
        let left = (w as f64 / 2.0 - size as f64 / 2.0) as usize;
        Self { top, left, size }
    }
}

/// `(dst, src)` matrix of a 1-D bilinear resize with `align_corners=True`: `dst = R src`.
fn bilinear_matrix(src: usize, dst: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; dst * src];
    let scale = if dst > 1 {
        (src - 1) as f64 / (dst - 1) as f64
    } else {
        0.0
    };
    for d in 0..dst {
        let pos = d as f64 * scale;
        let i0 = (pos.floor() as usize).min(src - 1);
        let i1 = (i0 + 1).min(src - 1);
        let frac = (pos - i0 as f64) as f32;
        m[d * src + i0] += 1.0 - frac;
        m[d * src + i1] += frac;
    }
    Tensor::from_vec(m, (dst, src), device)
}

/// The frozen embedder with the crop-and-resize for one image size.
pub struct FaceIdLoss {
    embedder: FaceEmbedder,
    crop: FaceCrop,
    /// `(112, size)`.
    resize_rows: Tensor,
    /// `(size, 112)`.
    resize_cols_t: Tensor,
}

impl FaceIdLoss {
    /// Loads `face_embedder.safetensors` from `models_dir` for square images of `image_size`.
    pub fn load(models_dir: &Path, image_size: usize, device: &Device) -> anyhow::Result<Self> {
        let vb = crate::face::load_weights(models_dir, "face_embedder", device)?;
        Ok(Self::new(
            FaceEmbedder::new(&Default::default(), vb)?,
            image_size,
            device,
        )?)
    }

    /// The loss with an already loaded `embedder`, for square images of side `image_size`.
    pub fn new(embedder: FaceEmbedder, image_size: usize, device: &Device) -> Result<Self> {
        let crop = FaceCrop::of(image_size, image_size);
        let out = face_embedder::INPUT_SIZE;
        Ok(Self {
            embedder,
            crop,
            resize_rows: bilinear_matrix(crop.size, out, device)?,
            resize_cols_t: bilinear_matrix(crop.size, out, device)?.t()?.contiguous()?,
        })
    }

    /// The 112x112 face crops of `(N, 3, H, W)` images in [-1, 1], same range.
    pub fn crop(&self, images: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        if FaceCrop::of(h, w) != self.crop {
            bail!("face-ID loss set up for another image size than {h}x{w}")
        }
        let c = self.crop;
        let face = images.narrow(2, c.top, c.size)?.narrow(3, c.left, c.size)?;
        self.resize_rows
            .broadcast_matmul(&face.contiguous()?)?
            .broadcast_matmul(&self.resize_cols_t)
    }

    /// `(N, 192)` embeddings of `(N, 3, H, W)` images in [-1, 1] (differentiable).
    pub fn embed(&self, images: &Tensor) -> Result<Tensor> {
        let x = self
            .crop(images)?
            .affine(face_embedder::MEAN / face_embedder::STD, 0.0)?;
        self.embedder.forward(&x)
    }

    /// Mean over the batch of `1 - cos(real, embed(fake))` for embeddings `real` computed
    /// beforehand (e.g. with [`FaceIdLoss::embed`] once per photo).
    pub fn distance_to(&self, real: &Tensor, fake: &Tensor) -> Result<Tensor> {
        let cos = cosine_similarity(&real.detach(), &self.embed(fake)?)?;
        cos.affine(-1.0, 1.0)?.mean_all()
    }

    /// Mean over the batch of `1 - cos(embed(real), embed(fake))`; `real` is not
    /// differentiated. Both batches go through the embedder together.
    pub fn cosine_distance(&self, real: &Tensor, fake: &Tensor) -> Result<Tensor> {
        let n = real.dim(0)?;
        let e = self.embed(&Tensor::cat(&[&real.detach(), fake], 0)?)?;
        let cos = cosine_similarity(&e.narrow(0, 0, n)?.detach(), &e.narrow(0, n, n)?)?;
        cos.affine(-1.0, 1.0)?.mean_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_geometry_matches_the_reference() {
        // face_features.py at 256: top int(57.29) = 57, bottom int(219.43) = 219,
        // size 162, left int(128 - 81) = 47.
        assert_eq!(
            FaceCrop::of(256, 256),
            FaceCrop {
                top: 57,
                left: 47,
                size: 162
            }
        );
        // At 64: top int(14.32) = 14, bottom int(54.86) = 54, size 40, left 12.
        assert_eq!(
            FaceCrop::of(64, 64),
            FaceCrop {
                top: 14,
                left: 12,
                size: 40
            }
        );
    }

    #[test]
    fn bilinear_matches_align_corners_interpolation() -> Result<()> {
        let dev = Device::Cpu;
        // torch: F.interpolate(torch.arange(5.).view(1,1,1,5), size=(1,3), mode='bilinear',
        // align_corners=True) = [0, 2, 4]; to size 9: 0, 0.5, ..., 4.
        let x = Tensor::arange(0f32, 5., &dev)?.reshape((5, 1))?;
        let y: Vec<f32> = bilinear_matrix(5, 3, &dev)?
            .matmul(&x)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(y, [0.0, 2.0, 4.0]);
        let y: Vec<f32> = bilinear_matrix(5, 9, &dev)?
            .matmul(&x)?
            .flatten_all()?
            .to_vec1()?;
        let want: Vec<f32> = (0..9).map(|i| i as f32 * 0.5).collect();
        assert_eq!(y, want);
        Ok(())
    }
}
