//! What a pack run computes once per photo: the photo (plain and mirrored), the frozen
//! encoder side's output, the base style's cartoon and its low-level backbone features (the
//! anchor's targets), and the photo's face embedding (face-ID's target).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::imageops;
use crate::nets::backbone::Backbone;
use crate::nets::generator::{self, Encoded, Generator};
use crate::train::data::ImageFolder;
use crate::train::face_id::FaceIdLoss;

/// Photos run through the base generator at once while the cache is built.
const BUILD_BATCH: usize = 4;

/// One cached sample: a photo or its mirror image.
pub struct CachedPhoto {
    /// The photo `(1, 3, S, S)` in [-1, 1].
    pub photo: Tensor,
    /// The base generator's encoder output (`f16`); `None` when the encoder trains.
    pub encoded: Option<Encoded>,
    /// The base style's cartoon `(1, 3, S, S)` in [-1, 1].
    pub base: Tensor,
    /// The backbone's low-level features of `base` (`f16`).
    pub base_features: Tensor,
    /// The photo's face embedding `(1, 192)`.
    pub embedding: Tensor,
}

/// A training batch of cached samples, stacked and in `f32`.
pub struct CachedBatch {
    /// Photos `(N, 3, S, S)`.
    pub photos: Tensor,
    /// The encoder outputs, when cached.
    pub encoded: Option<Encoded>,
    /// The base style's cartoons.
    pub base: Tensor,
    /// Their low-level backbone features.
    pub base_features: Tensor,
    /// The photos' face embeddings.
    pub embeddings: Tensor,
}

/// The cached samples of a run.
pub struct PhotoCache {
    /// Photo `i` of the chosen ones is entry `2i`, its mirror image `2i + 1`.
    pub entries: Vec<CachedPhoto>,
}

/// Indices of `count` photos of `n`, evenly spread.
pub fn spread(n: usize, count: usize) -> Vec<usize> {
    let count = count.min(n);
    (0..count).map(|i| i * n / count).collect()
}

/// What the cache is built with.
pub struct CacheInputs<'a> {
    /// The base style's generator (inference weights: the CPU fast path where it exists).
    pub base: &'a Generator,
    /// The frozen backbone.
    pub backbone: &'a Backbone,
    /// The face-ID loss at the training size.
    pub face_id: &'a FaceIdLoss,
}

impl PhotoCache {
    /// Caches `count` photos of `photos` (evenly spread) and their mirror images at `size`;
    /// the encoder outputs only with `keep_encoded`. Returns `None` when `cancel` is set
    /// (checked between batches).
    pub fn build(
        inputs: &CacheInputs,
        photos: &ImageFolder,
        (count, size): (usize, usize),
        keep_encoded: bool,
        cancel: &AtomicBool,
        device: &Device,
    ) -> Result<Option<Self>> {
        let s = size as u32;
        let mut images = Vec::new();
        for index in spread(photos.len(), count) {
            let photo = imageops::resize_rgb(&photos.load(index)?, s, s);
            images.push(image::imageops::flip_horizontal(&photo));
            images.insert(images.len() - 1, photo);
        }
        let mut entries = Vec::with_capacity(images.len());
        for chunk in images.chunks(BUILD_BATCH) {
            if cancel.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let x = generator::normalize(&imageops::rgb_batch(chunk, device)?)?;
            let encoded = inputs.base.encode(&x)?;
            let base = inputs.base.decode(&encoded)?;
            let features = inputs.backbone.low_level(&base)?.to_dtype(DType::F16)?;
            let embeddings = inputs.face_id.embed(&x)?;
            let encoded = keep_encoded
                .then(|| encoded.to_dtype(DType::F16))
                .transpose()?;
            for i in 0..chunk.len() {
                let one = |t: &Tensor| t.narrow(0, i, 1);
                entries.push(CachedPhoto {
                    photo: one(&x)?,
                    encoded: encoded.as_ref().map(|e| narrow(e, i)).transpose()?,
                    base: one(&base)?,
                    base_features: one(&features)?,
                    embedding: one(&embeddings)?,
                });
            }
        }
        Ok(Some(Self { entries }))
    }

    /// Entries `indices` stacked, in `f32`.
    pub fn batch(&self, indices: &[usize]) -> Result<CachedBatch> {
        let picked: Vec<&CachedPhoto> = indices.iter().map(|&i| &self.entries[i]).collect();
        let stack = |f: &dyn Fn(&CachedPhoto) -> &Tensor| -> Result<Tensor> {
            let ts = picked
                .iter()
                .map(|e| f(e).to_dtype(DType::F32))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&ts, 0).context("stacking cached samples")
        };
        let encoded = picked
            .iter()
            .map(|e| e.encoded.as_ref())
            .collect::<Option<Vec<_>>>()
            .map(|parts| Encoded::cat(&parts, DType::F32))
            .transpose()?;
        Ok(CachedBatch {
            photos: stack(&|e| &e.photo)?,
            encoded,
            base: stack(&|e| &e.base)?,
            base_features: stack(&|e| &e.base_features)?,
            embeddings: stack(&|e| &e.embedding)?,
        })
    }

    /// Number of cached samples.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Sample `i` of a batch's encoding.
fn narrow(e: &Encoded, i: usize) -> candle_core::Result<Encoded> {
    let one = |t: &Tensor| t.narrow(0, i, 1);
    Ok(Encoded {
        features: one(&e.features)?,
        content: e
            .content
            .iter()
            .map(one)
            .collect::<candle_core::Result<_>>()?,
        style: one(&e.style)?,
        cam_logit: one(&e.cam_logit)?,
        heatmap: one(&e.heatmap)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn photos_are_spread_over_the_folder() {
        assert_eq!(spread(10, 4), [0, 2, 5, 7]);
        assert_eq!(spread(3, 8), [0, 1, 2]);
        assert!(spread(0, 4).is_empty());
    }
}
