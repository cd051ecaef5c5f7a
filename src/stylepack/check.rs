//! What a prepared pack must pass before it trains, and what it is warned of: enough of its
//! images must show a face, or the pack is refused (landscapes, logos, objects); its images
//! should be drawn in one style, or it trains with a warning (a pack of photos, anime and
//! paintings mixed learns none of them well).

use std::path::Path;

use anyhow::{Context, Result};
use image::RgbImage;

use super::archive::{read_pack, ArchiveError};
use super::prepare::{cartoon_face, PreparedPack};
use crate::config::StylePackConfig;
use crate::face::FacePipeline;
use crate::train::data::ImageFolder;

/// Why a prepared pack is not trained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum PackRefusal {
    /// Fewer than `min_face_share` of the images show a face the face pipeline finds.
    #[error("a face was found in only {found} of its {images} images")]
    TooFewFaces {
        /// Images where a face was found.
        found: usize,
        /// Images in the pack.
        images: usize,
    },
}

/// What a pack trains despite.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum PackWarning {
    /// The images are drawn in very different ways ([`style_spread`]).
    MixedStyles {
        /// The pack's style spread.
        spread: f64,
        /// `max_style_spread`: one artist's packs stay under it.
        limit: f64,
    },
}

/// Refuses a pack where fewer than `min_face_share` of the images showed a face.
pub fn check_faces(prepared: &PreparedPack, min_face_share: f64) -> Result<(), PackRefusal> {
    let images = prepared.train + prepared.held_out;
    if (prepared.faces_found as f64) < min_face_share * images as f64 {
        return Err(PackRefusal::TooFewFaces {
            found: prepared.faces_found,
            images,
        });
    }
    Ok(())
}

/// Warns of a pack whose style spread is over `limit`.
pub fn check_style(spread: f64, limit: f64) -> Option<PackWarning> {
    (spread > limit).then_some(PackWarning::MixedStyles { spread, limit })
}

/// How much each of the [`drawing_statistics`] varies between the images of one artist's pack
/// (the population standard deviation, measured on packs cut from `../shared/data`: anime
/// faces, photo2cartoon's cartoons, CelebA photos, selfies; `docs/training.md`).
const ONE_STYLE_STD: [f64; 4] = [0.05, 0.033, 0.085, 0.09];

/// Four numbers that describe how an image is drawn rather than what it shows, each in
/// [0, 1]: the entropy of its colours (16 levels a channel, over 12 bits: flat palettes are
/// low), the share of strong edges and the share of flat pixels (grey gradient over 0.1 and
/// under 0.01), and the mean saturation.
pub fn drawing_statistics(img: &RgbImage) -> [f64; 4] {
    let (w, h) = img.dimensions();
    let mut histogram = vec![0u32; 4096];
    let mut saturation = 0.0;
    for p in img.pixels() {
        let [r, g, b] = p.0;
        histogram[(usize::from(r >> 4) << 8) | (usize::from(g >> 4) << 4) | usize::from(b >> 4)] +=
            1;
        let (max, min) = (r.max(g).max(b), r.min(g).min(b));
        saturation += f64::from(max - min) / (f64::from(max) + 1e-6);
    }
    let n = f64::from(w * h).max(1.0);
    let entropy: f64 = histogram
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    let grey = |x: u32, y: u32| {
        let p = img.get_pixel(x, y).0;
        (f64::from(p[0]) + f64::from(p[1]) + f64::from(p[2])) / (3.0 * 255.0)
    };
    let (mut edges, mut flat, mut gradients) = (0usize, 0usize, 0usize);
    for y in 0..h.saturating_sub(1) {
        for x in 0..w.saturating_sub(1) {
            let g = grey(x, y);
            let magnitude = (grey(x + 1, y) - g).hypot(grey(x, y + 1) - g);
            edges += usize::from(magnitude > 0.1);
            flat += usize::from(magnitude < 0.01);
            gradients += 1;
        }
    }
    let share = |count: usize| count as f64 / gradients.max(1) as f64;
    [entropy / 12.0, share(edges), share(flat), saturation / n]
}

/// How differently a pack's images are drawn: the spread of each of their
/// [`drawing_statistics`] over what one artist's pack shows, averaged. About 1 for one
/// artist's faces (0.8 to 1.2 measured), 1.6 for a mix of anime, cartoons and photos, 2.3 and
/// more for images each in their own style.
pub fn style_spread(images: &[RgbImage]) -> f64 {
    let statistics: Vec<[f64; 4]> = images.iter().map(drawing_statistics).collect();
    let n = statistics.len().max(1) as f64;
    (0..4)
        .map(|k| {
            let mean = statistics.iter().map(|s| s[k]).sum::<f64>() / n;
            let variance = statistics
                .iter()
                .map(|s| (s[k] - mean).powi(2))
                .sum::<f64>()
                / n;
            variance.sqrt() / ONE_STYLE_STD[k]
        })
        .sum::<f64>()
        / 4.0
}

/// A folder or archive of images checked as an upload would be (`toonbot check-pack`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PackCheck {
    /// Images read.
    pub images: usize,
    /// Entries of an archive left out before the checks, each with its reason.
    pub skipped: Vec<String>,
    /// Images where a face was found and aligned.
    pub faces_found: usize,
    /// The prepared images' style spread.
    pub style_spread: f64,
    /// Why the pack would be refused, if it would.
    pub refusal: Option<String>,
    /// Whether it would train with the mixed-styles warning.
    pub mixed_styles: bool,
}

/// Prepares every image of `dir` in memory (the largest face aligned and whitened, or the
/// centre square) and applies the pack checks of `config`.
pub fn check_folder(
    dir: &Path,
    faces: &FacePipeline,
    config: &StylePackConfig,
) -> Result<PackCheck> {
    let folder = ImageFolder::open(dir)?;
    let limits = config.image_limits();
    let photos = folder.paths.iter().map(|path| {
        crate::imageops::load_photo(path, &limits)
            .with_context(|| format!("decoding {}", path.display()))
    });
    check_images(photos, Vec::new(), faces, config)
}

/// Reads a style-pack archive as `/stylepack upload` does (refusing it with the same
/// [`ArchiveError`]s), then checks its usable images as [`check_folder`] does.
pub fn check_archive(
    zip: &[u8],
    faces: &FacePipeline,
    config: &StylePackConfig,
) -> Result<std::result::Result<PackCheck, ArchiveError>> {
    let archive = match read_pack(zip, config) {
        Ok(archive) => archive,
        Err(refused) => return Ok(Err(refused)),
    };
    let limits = config.image_limits();
    let photos = archive.images.iter().map(|image| {
        crate::imageops::decode_photo(&image.bytes, &limits)
            .with_context(|| format!("decoding {}", image.entry))
    });
    let skipped = archive
        .skipped
        .iter()
        .map(|s| format!("{}: {}", s.entry, s.reason))
        .collect();
    check_images(photos, skipped, faces, config).map(Ok)
}

fn check_images(
    photos: impl Iterator<Item = Result<RgbImage>>,
    skipped: Vec<String>,
    faces: &FacePipeline,
    config: &StylePackConfig,
) -> Result<PackCheck> {
    let mut prepared: Vec<RgbImage> = Vec::new();
    let mut faces_found = 0;
    for photo in photos {
        let (face, found) = cartoon_face(&photo?, faces)?;
        faces_found += usize::from(found);
        prepared.push(face);
    }
    let style_spread = style_spread(&prepared);
    let counts = PreparedPack {
        train: prepared.len(),
        held_out: 0,
        faces_found,
    };
    Ok(PackCheck {
        images: prepared.len(),
        skipped,
        faces_found,
        style_spread,
        refusal: check_faces(&counts, config.min_face_share)
            .err()
            .map(|r| r.to_string()),
        mixed_styles: check_style(style_spread, config.max_style_spread).is_some(),
    })
}

/// The style spread of the prepared images in `dir`.
pub fn folder_style_spread(dir: &Path) -> Result<f64> {
    let folder = ImageFolder::open(dir)?;
    let images = (0..folder.len())
        .map(|i| folder.load(i))
        .collect::<Result<Vec<_>>>()?;
    Ok(style_spread(&images))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_needs_faces_in_a_share_of_its_images() {
        let pack = |faces_found| PreparedPack {
            train: 18,
            held_out: 2,
            faces_found,
        };
        assert_eq!(
            check_faces(&pack(4), 0.25),
            Err(PackRefusal::TooFewFaces {
                found: 4,
                images: 20
            })
        );
        assert_eq!(check_faces(&pack(5), 0.25), Ok(()));
        assert_eq!(check_style(1.2, 1.4), None);
        assert_eq!(
            check_style(1.6, 1.4),
            Some(PackWarning::MixedStyles {
                spread: 1.6,
                limit: 1.4
            })
        );
    }

    fn drawn(seed: u32, flat: bool) -> RgbImage {
        RgbImage::from_fn(64, 64, |x, y| {
            let face = (x as i32 - 32).pow(2) + (y as i32 - 32).pow(2) < 400;
            if flat {
                let shade = if face { 200 + (seed % 5) as u8 } else { 255 };
                image::Rgb([shade, shade - 40, shade - 60])
            } else {
                let noise = (x * 7919 + y * 104_729 + seed * 1_299_709).wrapping_mul(2_654_435_761);
                let v = (noise >> 24) as u8;
                image::Rgb([v, v / 2 + 60, 255 - v])
            }
        })
    }

    #[test]
    fn flat_drawings_and_noisy_pictures_mixed_spread_more_than_either() {
        let flat = drawing_statistics(&drawn(0, true));
        let noisy = drawing_statistics(&drawn(0, false));
        assert!(flat[0] < noisy[0], "fewer colours: {flat:?} {noisy:?}");
        assert!(flat[2] > noisy[2], "more flat pixels: {flat:?} {noisy:?}");
        let one_style: Vec<RgbImage> = (0..6).map(|i| drawn(i, true)).collect();
        let mixed: Vec<RgbImage> = (0..6).map(|i| drawn(i, i % 2 == 0)).collect();
        assert!(
            style_spread(&one_style) < 0.5,
            "{}",
            style_spread(&one_style)
        );
        assert!(style_spread(&mixed) > 3.0, "{}", style_spread(&mixed));
    }
}
