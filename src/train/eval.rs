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
use crate::metrics::{identity_cosine, kid, KidConfig};
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

/// Scores `style` (or the baseline, see [`with_scored`]) on `photos` against `cartoons`;
/// `on_image` is called after each photo is cartoonised.
pub fn evaluate(
    config: &Config,
    device: &Device,
    style: Option<&str>,
    baseline: bool,
    photos: &Path,
    cartoons: &Path,
    on_image: impl FnMut(),
) -> Result<EvalReport> {
    let inception = load_inception(config, device)?;
    let photos = ImageFolder::open(photos)?;
    with_scored(config, device, style, baseline, |scored| {
        scored.evaluate(config, device, &inception, &photos, cartoons, on_image)
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

    /// KID and identity of the generator's cartoons of `photos` against `cartoons`.
    pub fn evaluate(
        &self,
        config: &Config,
        device: &Device,
        inception: &InceptionV3,
        photos: &ImageFolder,
        cartoons: &Path,
        mut on_image: impl FnMut(),
    ) -> Result<EvalReport> {
        let face_id = FaceIdLoss::load(&config.models.dir, ALIGNED_SIZE as usize, device)?;
        let cartoon_set = ImageFolder::open(cartoons)?;

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
            reference_features.push(inception.forward(&imageops::rgb_batch(&images, device)?)?);
        }
        let cat = |v: Vec<Tensor>| Tensor::cat(&v, 0).context("stacking features");
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
        })
    }
}
