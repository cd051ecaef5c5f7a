//! Training data: two image folders (aligned photos, cartoons), read in a seeded order with
//! photo2cartoon's augmentation (random horizontal flip, resize to `size + 30/256 * size`,
//! 286 at 256, random `size` crop), mapped to [-1, 1].
//!
//! Nothing here has state: sample `k` of a domain (the k-th image it serves since the start
//! of training) is image `perm_e[k % n]` of epoch `e = k / n`, each epoch's permutation
//! and each sample's augmentation drawn from streams keyed by the seed, the domain and
//! `e` or `k`. Batch `s` holds samples `s * batch ..`; a run resumed at step `s` therefore
//! sees exactly the images an uninterrupted one would.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::imageops;
use crate::nets::generator;
use crate::rng::SplitMix64;

const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// The images of a folder, sorted by file name.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// The folder.
    pub dir: PathBuf,
    /// Its PNG, JPEG and WebP files, sorted; never empty.
    pub paths: Vec<PathBuf>,
}

impl ImageFolder {
    /// Lists the images of `dir` (by extension); fails when it has none.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading image folder {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        paths.sort();
        anyhow::ensure!(
            !paths.is_empty(),
            "{} holds no PNG, JPEG or WebP images",
            dir.display()
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            paths,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether the folder has no images (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Image `index`, its format told by its content (datasets hold PNGs named `.jpg`).
    pub fn load(&self, index: usize) -> Result<RgbImage> {
        let path = &self.paths[index];
        let decode = || -> Result<RgbImage> {
            let reader = image::ImageReader::open(path)?.with_guessed_format()?;
            Ok(reader.decode()?.to_rgb8())
        };
        decode().with_context(|| format!("decoding {}", path.display()))
    }
}

/// The side images are resized to before the random crop: `size + 30` at 256.
pub fn resized_side(size: usize) -> usize {
    size + (size * 30 + 128) / 256
}

/// One sample's augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augmentation {
    /// Mirror the image left to right first.
    pub flip: bool,
    /// Left edge of the crop in the resized image, in pixels.
    pub x: u32,
    /// Top edge of the crop in the resized image, in pixels.
    pub y: u32,
}

impl Augmentation {
    fn draw(rng: &mut SplitMix64, size: usize) -> Self {
        let slack = resized_side(size) - size + 1;
        Self {
            flip: rng.next_u64() >> 63 == 1,
            x: rng.below(slack) as u32,
            y: rng.below(slack) as u32,
        }
    }

    /// Flip, resize to [`resized_side`], crop `size`.
    pub fn apply(&self, img: &RgbImage, size: usize) -> RgbImage {
        let img = if self.flip {
            image::imageops::flip_horizontal(img)
        } else {
            img.clone()
        };
        let side = resized_side(size) as u32;
        let resized = imageops::resize_rgb(&img, side, side);
        let s = size as u32;
        image::imageops::crop_imm(&resized, self.x, self.y, s, s).to_image()
    }
}

/// The two domains and the sampling settings.
#[derive(Debug, Clone)]
pub struct TrainData {
    /// Domain A: aligned photos.
    pub photos: ImageFolder,
    /// Domain B: cartoons.
    pub cartoons: ImageFolder,
    /// Side of the training images, in pixels.
    pub size: usize,
    /// Images per domain and step.
    pub batch: usize,
    /// Seed of the data order and the augmentation.
    pub seed: u64,
}

impl TrainData {
    /// Which image of `folder` (domain `key`) sample `k` is, and its augmentation.
    pub fn sample(&self, key: &str, folder: &ImageFolder, k: u64) -> (usize, Augmentation) {
        let n = folder.len() as u64;
        let epoch = k / n;
        let perm =
            SplitMix64::keyed(self.seed, &format!("order.{key}.{epoch}")).permutation(folder.len());
        let mut rng = SplitMix64::keyed(self.seed, &format!("augment.{key}.{k}"));
        (
            perm[(k % n) as usize] as usize,
            Augmentation::draw(&mut rng, self.size),
        )
    }

    fn domain_batch(&self, key: &str, folder: &ImageFolder, step: u64) -> Result<Vec<RgbImage>> {
        let first = step * self.batch as u64;
        let samples: Vec<_> = (first..first + self.batch as u64)
            .map(|k| self.sample(key, folder, k))
            .collect();
        std::thread::scope(|scope| {
            let jobs: Vec<_> = samples
                .iter()
                .map(|&(index, aug)| {
                    scope.spawn(move || -> Result<RgbImage> {
                        Ok(aug.apply(&folder.load(index)?, self.size))
                    })
                })
                .collect();
            jobs.into_iter()
                .map(|j| j.join().expect("image loading thread panicked"))
                .collect()
        })
    }

    /// `(real_A, real_B)` of training step `step` (0-based), `(batch, 3, size, size)` in
    /// [-1, 1] on `device`.
    pub fn batch(&self, step: u64, device: &Device) -> Result<(Tensor, Tensor)> {
        let to_tensor = |images: Vec<RgbImage>| -> Result<Tensor> {
            Ok(generator::normalize(&imageops::rgb_batch(
                &images, device,
            )?)?)
        };
        Ok((
            to_tensor(self.domain_batch("A", &self.photos, step)?)?,
            to_tensor(self.domain_batch("B", &self.cartoons, step)?)?,
        ))
    }

    /// The cartoons (domain B) of training step `step` (0-based) alone, as in
    /// [`TrainData::batch`].
    pub fn cartoon_batch(&self, step: u64, device: &Device) -> Result<Tensor> {
        let images = self.domain_batch("B", &self.cartoons, step)?;
        Ok(generator::normalize(&imageops::rgb_batch(
            &images, device,
        )?)?)
    }

    /// The first `n` photos, resized to `size` without augmentation, in [-1, 1]: the
    /// fixed inputs of the sample grids.
    pub fn preview_photos(&self, n: usize, device: &Device) -> Result<Tensor> {
        let s = self.size as u32;
        let images = (0..n.min(self.photos.len()))
            .map(|i| Ok(imageops::resize_rgb(&self.photos.load(i)?, s, s)))
            .collect::<Result<Vec<_>>>()?;
        Ok(generator::normalize(&imageops::rgb_batch(
            &images, device,
        )?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder_of(dir: &Path, n: usize, colour: u8) -> ImageFolder {
        std::fs::create_dir_all(dir).unwrap();
        for i in 0..n {
            let img = RgbImage::from_fn(40, 40, |x, y| {
                image::Rgb([colour, (x * 6) as u8, (y * 6 + i as u32 * 20) as u8])
            });
            img.save(dir.join(format!("{i:03}.png"))).unwrap();
        }
        ImageFolder::open(dir).unwrap()
    }

    #[test]
    fn a_png_named_jpg_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(8, 6, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 7]));
        img.save_with_format(tmp.path().join("0300.jpg"), image::ImageFormat::Png)
            .unwrap();
        let folder = ImageFolder::open(tmp.path()).unwrap();
        assert_eq!(folder.load(0).unwrap(), img);
    }

    #[test]
    fn order_and_augmentation_follow_the_seed() {
        let tmp = tempfile::tempdir().unwrap();
        let data = |seed| TrainData {
            photos: folder_of(&tmp.path().join("a"), 5, 10),
            cartoons: folder_of(&tmp.path().join("b"), 3, 200),
            size: 32,
            batch: 2,
            seed,
        };
        let (d1, d2, d3) = (data(7), data(7), data(8));
        let draws = |d: &TrainData| -> Vec<(usize, Augmentation)> {
            (0..15).map(|k| d.sample("A", &d.photos, k)).collect()
        };
        assert_eq!(draws(&d1), draws(&d2));
        assert_ne!(draws(&d1), draws(&d3));
        // Every epoch shows each image once.
        for epoch in draws(&d1).chunks(5) {
            let mut seen: Vec<usize> = epoch.iter().map(|s| s.0).collect();
            seen.sort_unstable();
            assert_eq!(seen, [0, 1, 2, 3, 4]);
        }
        // Crops stay inside the 36-px resized image, and both flips occur.
        assert_eq!(resized_side(32), 36);
        assert_eq!(resized_side(256), 286);
        let augs: Vec<Augmentation> = draws(&d1).into_iter().map(|s| s.1).collect();
        assert!(augs.iter().all(|a| a.x <= 4 && a.y <= 4));
        assert!(augs.iter().any(|a| a.flip) && augs.iter().any(|a| !a.flip));

        let dev = Device::Cpu;
        let (a, b) = d1.batch(3, &dev).unwrap();
        assert_eq!(a.dims(), &[2, 3, 32, 32]);
        assert_eq!(b.dims(), &[2, 3, 32, 32]);
        let (a2, b2) = d2.batch(3, &dev).unwrap();
        let same = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                == 0.0
        };
        assert!(same(&a, &a2) && same(&b, &b2));
        let max = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(max <= 1.0);
    }

    #[test]
    fn flip_mirrors() {
        let img = RgbImage::from_fn(32, 32, |x, _| image::Rgb([x as u8 * 8, 0, 0]));
        let aug = Augmentation {
            flip: true,
            x: 0,
            y: 0,
        };
        let out = aug.apply(&img, 32);
        // Resized 32 -> 36 then cropped at 0: the left column is the original's right edge.
        assert!(out.get_pixel(0, 5).0[0] > 200);
    }
}
