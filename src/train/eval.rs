//! `toonbot eval`: how good a style is on a photo set, against a cartoon set.
//!
//! The photos are aligned face crops (`toonbot prepare` output, or any aligned set such as
//! photo2cartoon's): each goes through the inference path from its segmentation on (resize
//! to 256, portrait mask, whiten, generator, output composited on white with the mask), so
//! the cartoons scored are the ones users get. Already-whitened crops pass through the
//! mask unchanged.
//!
//! - KID x100 (and its std over subsets) between the FID-Inception pool3 features of those
//!   cartoons and of the cartoon set, both at 256x256 (the network resizes to 299).
//! - Identity: mean cosine between the face embeddings of each photo and its cartoon, on
//!   the face-ID loss's crop.
//! - Copies (with the images the style was trained on): for each cartoon, the cosine
//!   distance in the frozen backbone's pooled features to its nearest training image, beside
//!   the same distance for the held-out cartoons (new drawings in the style, not copies).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::Serialize;

use super::data::ImageFolder;
use super::face_id::FaceIdLoss;
use crate::cartoon::{compose, Cartoonizer};
use crate::config::Config;
use crate::face::FacePipeline;
use crate::face::ALIGNED_SIZE;
use crate::imageops;
use crate::metrics::{identity_cosine, kid, nearest_cosine_distances, KidConfig};
use crate::nets::backbone::Backbone;
use crate::nets::generator::{self, Generator};
use crate::nets::inception::InceptionV3;

/// Images per network batch.
const BATCH: usize = 8;

/// A style's scores on a photo set (`toonbot eval`); printed as JSON with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The style scored, or [`BASELINE_NAME`].
    pub style: String,
    /// Photos cartoonised.
    pub photos: usize,
    /// Images in the reference cartoon set.
    pub cartoons: usize,
    /// KID x100 of the cartoons against the cartoon set, mean over subsets (lower is closer).
    pub kid_x100: f64,
    /// Standard deviation of the KID x100 over subsets.
    pub kid_std_x100: f64,
    /// Images per KID subset (capped at the smaller set's size).
    pub kid_subset_size: usize,
    /// Mean cosine similarity of the face embeddings of each photo and its cartoon.
    pub identity_cosine: f64,
    /// How close the cartoons come to the training images, when those were given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copies: Option<CopyReport>,
}

/// Nearest-neighbour cosine distances (`1 - cos`) in the backbone's pooled features: a copy of
/// a training image is near 0.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// Training images compared against.
    pub training_images: usize,
    /// Each cartoon's distance to its nearest training image, in photo order.
    pub nearest: Vec<f64>,
    /// The smallest of `nearest`.
    pub nearest_min: f64,
    /// The median of `nearest`.
    pub nearest_median: f64,
    /// The held-out cartoons' distances to their nearest training image: smallest and median.
    pub held_out_nearest_min: f64,
    /// The median of the held-out cartoons' distances.
    pub held_out_nearest_median: f64,
}

/// The images a style was trained on, and the network that compares them with its cartoons.
pub struct TrainingImages<'a> {
    /// The frozen backbone of the projected discriminator.
    pub backbone: &'a Backbone,
    /// The training cartoons.
    pub images: &'a ImageFolder,
}

/// The backbone's two deepest features of `x` (`(N, 3, H, W)` in [-1, 1]), each averaged
/// over the image and scaled to unit length, side by side: `(N, 112 + 320)`.
fn pooled_features(backbone: &Backbone, x: &Tensor) -> Result<Tensor> {
    let features = backbone.features(x)?;
    let pooled = features[2..]
        .iter()
        .map(|f| {
            let mean = f.mean((2, 3))?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            mean.broadcast_div(&norm)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&pooled, 1)?)
}

fn min_and_median(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (sorted[0], median)
}

/// The FID Inception network, or an error saying how to make its weights.
pub fn load_inception(config: &Config, device: &Device) -> Result<InceptionV3> {
    let path = config.models.dir.join("inception.safetensors");
    anyhow::ensure!(
        path.is_file(),
        "KID needs the FID Inception weights at {}, which are not committed (87 MB): create \
         them with `python tools/import/inception.py` (see models/README.md)",
        path.display()
    );
    let vb = crate::face::load_weights(&config.models.dir, "inception", device)?;
    Ok(InceptionV3::new(&Default::default(), vb)?)
}

/// `img` at the aligned crop's size.
pub fn square(img: &RgbImage) -> RgbImage {
    let s = ALIGNED_SIZE;
    if img.dimensions() == (s, s) {
        img.clone()
    } else {
        imageops::resize_rgb(img, s, s)
    }
}

/// Name under which the do-nothing baseline is reported.
pub const BASELINE_NAME: &str = "do-nothing (the photos themselves)";

/// Calls `f` with `style` (default style when `None`) ready to score, or with `baseline`
/// the do-nothing baseline: the segmented photos themselves, composited as the cartoons
/// would be.
pub fn with_scored<T>(
    config: &Config,
    device: &Device,
    style: Option<&str>,
    baseline: bool,
    f: impl FnOnce(&Scored) -> Result<T>,
) -> Result<T> {
    let cartoonizer = Cartoonizer::load(config, device)?;
    let generator = match baseline {
        true => None,
        false => Some(
            cartoonizer
                .generator(style)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
    };
    f(&Scored {
        name: generator
            .as_ref()
            .map_or(BASELINE_NAME, |(info, _)| info.name.as_str()),
        generator: generator.as_ref().map(|(_, g)| &**g),
        faces: cartoonizer.faces(),
    })
}

/// Scores `style` (or the baseline, see [`with_scored`]) on `photos` against `cartoons`, and
/// with `training_cartoons` checks for copies of them; `on_image` is called after each photo
/// is cartoonised.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    config: &Config,
    device: &Device,
    style: Option<&str>,
    baseline: bool,
    photos: &Path,
    cartoons: &Path,
    training_cartoons: Option<&Path>,
    on_image: impl FnMut(),
) -> Result<EvalReport> {
    let inception = load_inception(config, device)?;
    let photos = ImageFolder::open(photos)?;
    let training = training_cartoons.map(ImageFolder::open).transpose()?;
    let backbone = training
        .as_ref()
        .map(|_| crate::train::fast::model::load_backbone(&config.models.dir, device))
        .transpose()?;
    let copies = training
        .as_ref()
        .zip(backbone.as_ref())
        .map(|(images, backbone)| TrainingImages { backbone, images });
    with_scored(config, device, style, baseline, |scored| {
        scored.evaluate(
            config,
            device,
            &inception,
            (&photos, cartoons),
            copies.as_ref(),
            on_image,
        )
    })
}

/// A generator to score (none: the do-nothing baseline), with the face pipeline that
/// segments its inputs.
pub struct Scored<'a> {
    /// The style's name, or [`BASELINE_NAME`].
    pub name: &'a str,
    /// The style's generator; `None` for the baseline.
    pub generator: Option<&'a Generator>,
    /// Segments the crops before they go through the generator.
    pub faces: &'a FacePipeline,
}

impl Scored<'_> {
    /// The cartoons users get for aligned `crops` (256 px): segmented, whitened, through
    /// the generator (unchanged for the baseline), composited on white with the mask.
    /// Also returns the generator's input batch, in [-1, 1].
    pub fn cartoons_on_white(
        &self,
        crops: &[RgbImage],
        device: &Device,
    ) -> Result<(Tensor, Vec<RgbImage>)> {
        let masks = self.faces.segment(crops)?;
        let inputs: Vec<RgbImage> = crops
            .iter()
            .zip(&masks)
            .map(|(c, m)| imageops::whiten(c, m))
            .collect();
        let input = generator::normalize(&imageops::rgb_batch(&inputs, device)?)?;
        let output = match self.generator {
            Some(generator) => generator.forward(&input)?.0,
            None => input.clone(),
        }
        .to_device(&Device::Cpu)?;
        let cartoons = masks
            .iter()
            .enumerate()
            .map(|(i, mask)| {
                let values = output.get(i)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(compose::cartoon_on_white(&values, mask))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((input, cartoons))
    }

    /// KID and identity of the generator's cartoons of `photos` against `cartoons`; with
    /// `copies`, their nearest-neighbour distances to the training images.
    pub fn evaluate(
        &self,
        config: &Config,
        device: &Device,
        inception: &InceptionV3,
        (photos, cartoons): (&ImageFolder, &Path),
        copies: Option<&TrainingImages>,
        mut on_image: impl FnMut(),
    ) -> Result<EvalReport> {
        let face_id = FaceIdLoss::load(&config.models.dir, ALIGNED_SIZE as usize, device)?;
        let cartoon_set = ImageFolder::open(cartoons)?;
        let pooled = |images: &Tensor| -> Result<Option<Tensor>> {
            copies
                .map(|c| pooled_features(c.backbone, &generator::normalize(images)?))
                .transpose()
        };

        let (mut generated_pooled, mut held_out_pooled) = (Vec::new(), Vec::new());
        let mut generated_features = Vec::new();
        let (mut photo_embeddings, mut cartoon_embeddings) = (Vec::new(), Vec::new());
        for chunk in (0..photos.len()).collect::<Vec<_>>().chunks(BATCH) {
            let crops = chunk
                .iter()
                .map(|&i| Ok(square(&photos.load(i)?)))
                .collect::<Result<Vec<_>>>()?;
            let (input, cartoons) = self.cartoons_on_white(&crops, device)?;
            let cartoon_batch = imageops::rgb_batch(&cartoons, device)?;
            generated_features.push(inception.forward(&cartoon_batch)?);
            generated_pooled.extend(pooled(&cartoon_batch)?);
            photo_embeddings.push(face_id.embed(&input)?);
            cartoon_embeddings.push(face_id.embed(&generator::normalize(&cartoon_batch)?)?);
            chunk.iter().for_each(|_| on_image());
        }
        let mut reference_features = Vec::new();
        for chunk in (0..cartoon_set.len()).collect::<Vec<_>>().chunks(BATCH) {
            let images = chunk
                .iter()
                .map(|&i| Ok(square(&cartoon_set.load(i)?)))
                .collect::<Result<Vec<_>>>()?;
            let batch = imageops::rgb_batch(&images, device)?;
            reference_features.push(inception.forward(&batch)?);
            held_out_pooled.extend(pooled(&batch)?);
        }
        let cat = |v: Vec<Tensor>| Tensor::cat(&v, 0).context("stacking features");
        let copies = match copies {
            None => None,
            Some(c) => {
                let mut training = Vec::new();
                for chunk in (0..c.images.len()).collect::<Vec<_>>().chunks(BATCH) {
                    let images = chunk
                        .iter()
                        .map(|&i| Ok(square(&c.images.load(i)?)))
                        .collect::<Result<Vec<_>>>()?;
                    training.extend(pooled(&imageops::rgb_batch(&images, device)?)?);
                }
                let training = cat(training)?;
                let nearest = nearest_cosine_distances(&cat(generated_pooled)?, &training)?;
                let held_out = nearest_cosine_distances(&cat(held_out_pooled)?, &training)?;
                let ((nearest_min, nearest_median), (held_min, held_median)) =
                    (min_and_median(&nearest), min_and_median(&held_out));
                Some(CopyReport {
                    training_images: c.images.len(),
                    nearest,
                    nearest_min,
                    nearest_median,
                    held_out_nearest_min: held_min,
                    held_out_nearest_median: held_median,
                })
            }
        };
        let score = kid(
            &cat(generated_features)?,
            &cat(reference_features)?,
            &KidConfig::default(),
        )?;
        let (kid_x100, kid_std_x100) = score.times_100();
        Ok(EvalReport {
            style: self.name.to_string(),
            photos: photos.len(),
            cartoons: cartoon_set.len(),
            kid_x100,
            kid_std_x100,
            kid_subset_size: score.subset_size,
            identity_cosine: identity_cosine(&cat(photo_embeddings)?, &cat(cartoon_embeddings)?)?,
            copies,
        })
    }
}
