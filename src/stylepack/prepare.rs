//! Turning a checked archive's images into a training set: the largest face of each image
//! aligned the way the face pipeline aligns photos (DESIGN §3) where one is found, else a
//! centre square; whitened with the portrait mask; 256x256 PNG. About `held_out_percent` of
//! the images, evenly spread over the sorted entries, are kept apart for the evaluation.
//!
//! The checked images are saved first ([`save_originals`]), so that the preparation (slow: the
//! face pipeline on every image) runs with the training, and starts again after a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use image::{GrayImage, RgbImage};

use super::archive::PackImage;
use crate::config::Limits;
use crate::face::{FacePipeline, ALIGNED_SIZE};
use crate::imageops;

/// The checked images as uploaded, under the pack's folder.
pub const ORIGINALS_DIR: &str = "originals";
/// Training images, under the pack's folder.
pub const TRAIN_DIR: &str = "train";
/// Images kept for the evaluation.
pub const HELD_OUT_DIR: &str = "held_out";
/// The share of a crop its portrait mask must cover to be trusted for whitening.
const MIN_FIGURE_SHARE: f32 = 0.2;

/// What preparing a pack did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreparedPack {
    /// Images written to `train/`, to fine-tune on.
    pub train: usize,
    /// Images written to `held_out/`, kept for the evaluation.
    pub held_out: usize,
    /// Images where a face was found and aligned (the others were centre-cropped).
    pub faces_found: usize,
}

/// Fewest held-out images: KID compares sets of at least two.
const MIN_HELD_OUT: usize = 2;

/// How many of `n` images are held out: `percent` of them, at least two (fewer only when
/// `n` is smaller).
pub fn held_out_count(n: usize, percent: u32) -> usize {
    ((n * percent as usize + 50) / 100).clamp(MIN_HELD_OUT.min(n), n)
}

/// Whether image `index` of `n` is held out: `held` indices spread evenly.
pub fn is_held_out(index: usize, n: usize, held: usize) -> bool {
    (index + 1) * held / n > index * held / n
}

/// Writes the images as `dir/originals/NNNN` (N = the image's index in `images`).
pub fn save_originals(images: &[PackImage], dir: &Path) -> Result<()> {
    let originals = dir.join(ORIGINALS_DIR);
    std::fs::create_dir_all(&originals)
        .with_context(|| format!("creating {}", originals.display()))?;
    for (index, image) in images.iter().enumerate() {
        let path = originals.join(format!("{index:04}"));
        std::fs::write(&path, &image.bytes)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Prepares `dir/originals/NNNN` into `dir/train/NNNN.png` and `dir/held_out/NNNN.png`,
/// calling `progress(done, total)` after each image. Returns `None` when `cancel` was set
/// (checked between images).
pub fn prepare_pack(
    faces: &FacePipeline,
    limits: &Limits,
    dir: &Path,
    held_out_percent: u32,
    progress: &dyn Fn(usize, usize),
    cancel: &AtomicBool,
) -> Result<Option<PreparedPack>> {
    let originals = dir.join(ORIGINALS_DIR);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&originals)
        .with_context(|| format!("reading {}", originals.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    inputs.sort();
    let (train_dir, held_dir) = (dir.join(TRAIN_DIR), dir.join(HELD_OUT_DIR));
    for d in [&train_dir, &held_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let n = inputs.len();
    let held = held_out_count(n, held_out_percent);
    let mut prepared = PreparedPack {
        train: 0,
        held_out: 0,
        faces_found: 0,
    };
    for (index, input) in inputs.iter().enumerate() {
        if cancel.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let photo = imageops::load_photo(input, limits)
            .with_context(|| format!("decoding {}", input.display()))?;
        let (face, found) = cartoon_face(&photo, faces)?;
        prepared.faces_found += usize::from(found);
        let to = if is_held_out(index, n, held) {
            prepared.held_out += 1;
            &held_dir
        } else {
            prepared.train += 1;
            &train_dir
        };
        let path = to.join(format!("{index:04}.png"));
        face.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        progress(index + 1, n);
    }
    Ok(Some(prepared))
}

/// The largest face aligned, or (`false`) the centre square; whitened where the figure is
/// found.
pub fn cartoon_face(photo: &RgbImage, faces: &FacePipeline) -> Result<(RgbImage, bool)> {
    if let Some(face) = faces.find_faces(photo)?.faces.into_iter().next() {
        return Ok((whiten_figure(&face.crop, &face.mask), true));
    }
    let (w, h) = photo.dimensions();
    let side = w.min(h);
    let square = image::imageops::crop_imm(photo, (w - side) / 2, (h - side) / 2, side, side);
    let crop = imageops::resize_rgb(&square.to_image(), ALIGNED_SIZE, ALIGNED_SIZE);
    let mask = faces.segment(std::slice::from_ref(&crop))?.remove(0);
    Ok((whiten_figure(&crop, &mask), false))
}

/// The crop whitened with its portrait mask, or as it is when the mask misses the figure: the
/// segmenter learnt from photos and finds no one in many drawings, where whitening would
/// leave a blank image.
fn whiten_figure(crop: &RgbImage, mask: &GrayImage) -> RgbImage {
    let figure = mask.pixels().filter(|p| p.0[0] >= 128).count();
    let share = figure as f32 / (mask.width() * mask.height()).max(1) as f32;
    if share >= MIN_FIGURE_SHARE {
        imageops::whiten(crop, mask)
    } else {
        crop.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_images_are_about_the_percentage_and_spread_evenly() {
        assert_eq!(held_out_count(10, 10), 2, "at least two");
        assert_eq!(held_out_count(500, 10), 50);
        assert_eq!(held_out_count(25, 10), 3);
        assert_eq!(held_out_count(3, 0), 2, "at least two");
        assert_eq!(held_out_count(1, 10), 1);
        for (n, held) in [(10, 2), (37, 4), (500, 50)] {
            let picked: Vec<usize> = (0..n).filter(|&i| is_held_out(i, n, held)).collect();
            assert_eq!(picked.len(), held, "{n}");
            let gaps: Vec<usize> = picked.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(gaps.iter().all(|&g| g >= n / held - 1), "{n}: {picked:?}");
        }
    }
}
