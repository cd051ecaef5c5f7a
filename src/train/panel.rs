//! `toonbot panel`: a style judged by eye. Each aligned photo beside the cartoon users get
//! for it (the evaluation's path: segmented, whitened, generator, composited on white),
//! pairs laid out in rows, as `docs/p2c-panel.png`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use image::{Rgb, RgbImage};

use super::data::ImageFolder;
use super::eval::{square, Scored};
use crate::imageops;

/// Pixels between pairs and around the panel.
const GAP: u32 = 8;
/// Photos cartoonised per network batch.
const BATCH: usize = 8;

/// How the panel is laid out.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Photo/cartoon pairs per row.
    pub columns: u32,
    /// Side of each photo and cartoon in the panel.
    pub size: u32,
}

/// The image files behind `inputs`: each a file, or a folder whose images are taken in
/// name order.
pub fn photo_paths(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for input in inputs {
        if input.is_dir() {
            paths.extend(ImageFolder::open(input)?.paths);
        } else {
            anyhow::ensure!(input.is_file(), "{} does not exist", input.display());
            paths.push(input.clone());
        }
    }
    anyhow::ensure!(!paths.is_empty(), "no photos given");
    Ok(paths)
}

/// The panel of `photos` (aligned face crops) and `scored`'s cartoons of them.
pub fn panel(
    scored: &Scored,
    photos: &[PathBuf],
    layout: Layout,
    device: &Device,
) -> Result<RgbImage> {
    anyhow::ensure!(layout.columns > 0 && layout.size > 0, "empty panel layout");
    let (n, s) = (photos.len() as u32, layout.size);
    let rows = n.div_ceil(layout.columns);
    let pair = 2 * s + GAP;
    let mut panel = RgbImage::from_pixel(
        layout.columns * pair + GAP,
        rows * (s + GAP) + GAP,
        Rgb([255, 255, 255]),
    );
    for (b, chunk) in photos.chunks(BATCH).enumerate() {
        let crops = chunk
            .iter()
            .map(|p| load_crop(p))
            .collect::<Result<Vec<_>>>()?;
        let (_, cartoons) = scored.cartoons_on_white(&crops, device)?;
        for (k, (crop, cartoon)) in crops.iter().zip(&cartoons).enumerate() {
            let i = (b * BATCH + k) as u32;
            let x = GAP + (i % layout.columns) * pair;
            let y = GAP + (i / layout.columns) * (s + GAP);
            let place = |panel: &mut RgbImage, img: &RgbImage, x: u32| {
                let img = imageops::resize_rgb(img, s, s);
                image::imageops::replace(panel, &img, i64::from(x), i64::from(y));
            };
            place(&mut panel, crop, x);
            place(&mut panel, cartoon, x + s);
        }
    }
    Ok(panel)
}

fn load_crop(path: &Path) -> Result<RgbImage> {
    let img =
        image::open(path).with_context(|| format!("{} is not a readable image", path.display()))?;
    Ok(square(&img.to_rgb8()))
}
