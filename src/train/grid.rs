//! Sample grids: one row per fixed preview photo, columns photo | its cartoon (A->B) | the
//! cycle back to a photo (B->A of the cartoon).

use candle_core::{Device, Result, Tensor};
use image::RgbImage;

use super::model::Ugatit;
use crate::nets::generator;

/// `(N, 3, H, W)` images in [-1, 1] as 8-bit RGB images.
pub fn to_rgb_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, _, h, w) = images.dims4()?;
    let bytes = generator::denormalize(&images.detach())?
        .clamp(0f32, 255f32)?
        .round()?
        .permute((0, 2, 3, 1))?
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    Ok(bytes
        .chunks_exact(h * w * 3)
        .take(n)
        .map(|c| RgbImage::from_raw(w as u32, h as u32, c.to_vec()).expect("sizes match"))
        .collect())
}

/// The grid for `photos` `(N, 3, S, S)` in [-1, 1].
pub fn sample_grid(model: &Ugatit, photos: &Tensor) -> Result<RgbImage> {
    let cartoons = model.gen_a2b.forward(photos)?.0.detach();
    let cycle = model.gen_b2a.forward(&cartoons)?.0.detach();
    let columns = [
        to_rgb_images(photos)?,
        to_rgb_images(&cartoons)?,
        to_rgb_images(&cycle)?,
    ];
    Ok(columns_grid(&columns))
}

/// Images side by side in columns, one row per index: every image the size of the first.
pub fn columns_grid(columns: &[Vec<RgbImage>]) -> RgbImage {
    let (w, h) = columns
        .first()
        .and_then(|c| c.first())
        .map_or((0, 0), |i| i.dimensions());
    let rows = columns.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let mut grid = RgbImage::new(columns.len() as u32 * w, rows * h);
    for (col, images) in columns.iter().enumerate() {
        for (row, img) in images.iter().enumerate() {
            image::imageops::replace(
                &mut grid,
                img,
                (col as u32 * w).into(),
                (row as u32 * h).into(),
            );
        }
    }
    grid
}
