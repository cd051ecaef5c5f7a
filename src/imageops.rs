//! Image decoding with limits, geometry (affine warps, crops) and tensor conversion.

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Rgb, RgbImage};
use rayon::prelude::*;

use crate::config::Limits;

/// Why an input could not be turned into an image.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The encoded input is over `limits.max_bytes`.
    #[error("file is {bytes} bytes, over the limit of {limit} bytes")]
    TooManyBytes {
        /// Size of the input, in bytes.
        bytes: u64,
        /// `limits.max_bytes`.
        limit: u64,
    },
    /// The image's declared size is over `limits.max_pixels` (found before decoding).
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels")]
    TooManyPixels {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// `width * height`.
        pixels: u64,
        /// `limits.max_pixels`.
        limit: u64,
    },
    /// The bytes are in no image format the decoder recognises.
    #[error("not a PNG, JPEG or WebP image")]
    NotAnImage,
    /// An image, but not PNG, JPEG or WebP.
    #[error("unsupported image format {0:?}: send a PNG, JPEG or WebP")]
    UnsupportedFormat(ImageFormat),
    /// The decoder failed: bad or truncated data.
    #[error("the image data is corrupt or truncated: {0}")]
    Corrupt(String),
    /// The file could not be read.
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a photo from disk, checking its size before reading it whole.
pub fn load_photo(path: &Path, limits: &Limits) -> Result<RgbImage, DecodeError> {
    decode_photo(&read_photo_file(path, limits)?, limits)
}

/// A photo file's bytes, refused unread when the file is over `limits.max_bytes`.
pub fn read_photo_file(path: &Path, limits: &Limits) -> Result<Vec<u8>, DecodeError> {
    let bytes = std::fs::metadata(path)?.len();
    if bytes > limits.max_bytes {
        return Err(DecodeError::TooManyBytes {
            bytes,
            limit: limits.max_bytes,
        });
    }
    Ok(std::fs::read(path)?)
}

/// Decodes PNG/JPEG/WebP bytes to RGB with the EXIF orientation applied, refusing
/// inputs over the byte or pixel limits before allocating the pixels.
pub fn decode_photo(bytes: &[u8], limits: &Limits) -> Result<RgbImage, DecodeError> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(DecodeError::TooManyBytes {
            bytes: bytes.len() as u64,
            limit: limits.max_bytes,
        });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(DecodeError::Io)?;
    match reader.format() {
        None => return Err(DecodeError::NotAnImage),
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        Some(other) => return Err(DecodeError::UnsupportedFormat(other)),
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(DecodeError::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    let orientation = decoder
        .orientation()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    image.apply_orientation(orientation);
    Ok(image.to_rgb8())
}

/// A 2-D affine map `(x, y) -> (a x + b y + c, d x + e y + f)` in continuous pixel
/// coordinates (pixel `i` covers `[i, i + 1)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    /// Coefficient of `x` in the output `x`.
    pub a: f32,
    /// Coefficient of `y` in the output `x`.
    pub b: f32,
    /// Translation of the output `x`.
    pub c: f32,
    /// Coefficient of `x` in the output `y`.
    pub d: f32,
    /// Coefficient of `y` in the output `y`.
    pub e: f32,
    /// Translation of the output `y`.
    pub f: f32,
}

impl Affine {
    /// The map that leaves every point where it is.
    pub const IDENTITY: Self = Self {
        a: 1.0,
        b: 0.0,
        c: 0.0,
        d: 0.0,
        e: 1.0,
        f: 0.0,
    };

    /// Moves every point by `(dx, dy)` pixels.
    pub fn translation(dx: f32, dy: f32) -> Self {
        Self {
            c: dx,
            f: dy,
            ..Self::IDENTITY
        }
    }

    /// Scales about the origin by `s` in both directions.
    pub fn scale(s: f32) -> Self {
        Self {
            a: s,
            e: s,
            ..Self::IDENTITY
        }
    }

    /// Rotation by `radians` about `(cx, cy)`; positive turns +x towards +y (clockwise on
    /// screen, since y points down).
    pub fn rotation_about(radians: f32, cx: f32, cy: f32) -> Self {
        let (sin, cos) = radians.sin_cos();
        let rot = Self {
            a: cos,
            b: -sin,
            c: 0.0,
            d: sin,
            e: cos,
            f: 0.0,
        };
        Self::translation(cx, cy)
            .then_after(rot)
            .then_after(Self::translation(-cx, -cy))
    }

    /// `self ∘ inner`: applies `inner` first, then `self`.
    pub fn then_after(self, inner: Self) -> Self {
        Self {
            a: self.a * inner.a + self.b * inner.d,
            b: self.a * inner.b + self.b * inner.e,
            c: self.a * inner.c + self.b * inner.f + self.c,
            d: self.d * inner.a + self.e * inner.d,
            e: self.d * inner.b + self.e * inner.e,
            f: self.d * inner.c + self.e * inner.f + self.f,
        }
    }

    /// The image of the point `[x, y]`.
    pub fn apply(&self, [x, y]: [f32; 2]) -> [f32; 2] {
        [
            self.a * x + self.b * y + self.c,
            self.d * x + self.e * y + self.f,
        ]
    }

    /// The map that undoes this one (e.g. crop -> photo from photo -> crop); the map must be
    /// invertible.
    pub fn inverse(&self) -> Self {
        let det = self.a * self.e - self.b * self.d;
        let (a, b, d, e) = (self.e / det, -self.b / det, -self.d / det, self.a / det);
        Self {
            a,
            b,
            c: -(a * self.c + b * self.f),
            d,
            e,
            f: -(d * self.c + e * self.f),
        }
    }

    /// How much the map scales lengths (the square root of its determinant).
    pub fn scale_factor(&self) -> f32 {
        (self.a * self.e - self.b * self.d).abs().sqrt()
    }
}

/// Renders `out_w x out_h` pixels of `src` seen through `to_dst` (source -> output
/// coordinates), bilinear, with `fill` outside the source.
///
/// When the map shrinks the image by more than 2x, the part of the source that is seen is
/// first box-averaged so the bilinear sampling does not alias.
pub fn warp_affine(
    src: &RgbImage,
    to_dst: Affine,
    out_w: u32,
    out_h: u32,
    fill: Rgb<u8>,
) -> RgbImage {
    let shrink = (1.0 / to_dst.scale_factor()).floor() as u32;
    if shrink < 2 {
        return warp_bilinear(src, to_dst, out_w, out_h, fill);
    }
    let Some([x0, y0, x1, y1]) = source_region(src, &to_dst, out_w, out_h, shrink) else {
        return RgbImage::from_pixel(out_w, out_h, fill);
    };
    let region = image::imageops::crop_imm(src, x0, y0, x1 - x0, y1 - y0).to_image();
    let small = image::imageops::resize(
        &region,
        region.width().div_ceil(shrink),
        region.height().div_ceil(shrink),
        image::imageops::FilterType::Triangle,
    );
    let from_small = to_dst
        .then_after(Affine::translation(x0 as f32, y0 as f32))
        .then_after(Affine {
            a: region.width() as f32 / small.width() as f32,
            e: region.height() as f32 / small.height() as f32,
            ..Affine::IDENTITY
        });
    warp_bilinear(&small, from_small, out_w, out_h, fill)
}

/// The pixel rectangle `[x0, y0, x1, y1)` of `src` that the output of `to_dst` samples,
/// with a margin for the filters; `None` when the output lies wholly outside `src`.
fn source_region(
    src: &RgbImage,
    to_dst: &Affine,
    out_w: u32,
    out_h: u32,
    margin: u32,
) -> Option<[u32; 4]> {
    let inv = to_dst.inverse();
    let corners = [
        [0.0, 0.0],
        [out_w as f32, 0.0],
        [0.0, out_h as f32],
        [out_w as f32, out_h as f32],
    ]
    .map(|p| inv.apply(p));
    let m = margin as f32 + 1.0;
    let lo = |i: usize, limit: u32| {
        (corners.iter().map(|c| c[i]).fold(f32::MAX, f32::min) - m).clamp(0.0, limit as f32) as u32
    };
    let hi = |i: usize, limit: u32| {
        (corners.iter().map(|c| c[i]).fold(f32::MIN, f32::max) + m)
            .ceil()
            .clamp(0.0, limit as f32) as u32
    };
    let (x0, x1) = (lo(0, src.width()), hi(0, src.width()));
    let (y0, y1) = (lo(1, src.height()), hi(1, src.height()));
    (x1 > x0 && y1 > y0).then_some([x0, y0, x1, y1])
}

fn warp_bilinear(
    src: &RgbImage,
    to_dst: Affine,
    out_w: u32,
    out_h: u32,
    fill: Rgb<u8>,
) -> RgbImage {
    let inv = to_dst.inverse();
    let (w, h) = (src.width() as usize, src.height() as usize);
    let pixels = src.as_raw();
    let fill = fill.0.map(f32::from);
    let read = |at: usize| [0, 1, 2].map(|k| f32::from(pixels[at + k]));
    let texel = |x: i64, y: i64| -> [f32; 3] {
        if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
            fill
        } else {
            read((y as usize * w + x as usize) * 3)
        }
    };
    let mut out = vec![0u8; out_w as usize * out_h as usize * 3];
    out.par_chunks_mut(out_w as usize * 3)
        .enumerate()
        .for_each(|(v, row)| {
            for (u, rgb) in row.chunks_exact_mut(3).enumerate() {
                let [sx, sy] = inv.apply([u as f32 + 0.5, v as f32 + 0.5]);
                let (fx, fy) = (sx - 0.5, sy - 0.5);
                let (x0, y0) = (floor(fx), floor(fy));
                let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
                let inside = x0 >= 0 && y0 >= 0 && x0 + 1 < w as i64 && y0 + 1 < h as i64;
                let [p00, p10, p01, p11] = if inside {
                    // The 2x2 neighbourhood lies in the photo: read it without the checks.
                    let at = (y0 as usize * w + x0 as usize) * 3;
                    [
                        read(at),
                        read(at + 3),
                        read(at + 3 * w),
                        read(at + 3 * w + 3),
                    ]
                } else {
                    [
                        texel(x0, y0),
                        texel(x0 + 1, y0),
                        texel(x0, y0 + 1),
                        texel(x0 + 1, y0 + 1),
                    ]
                };
                for k in 0..3 {
                    let top = p00[k] + (p10[k] - p00[k]) * tx;
                    let bottom = p01[k] + (p11[k] - p01[k]) * tx;
                    rgb[k] = to_u8(top + (bottom - top) * ty);
                }
            }
        });
    RgbImage::from_raw(out_w, out_h, out).expect("buffer sized for the image")
}

/// `v.round().clamp(0.0, 255.0) as u8` (up to ties) without the libm call `round` costs
/// per pixel on baseline x86-64: clamped, the value is non-negative, so adding a half and
/// truncating rounds it.
#[inline]
pub fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 255.0) + 0.5) as u8
}

/// `x.floor() as i64` without the libm call `floor` costs on baseline x86-64.
fn floor(x: f32) -> i64 {
    let truncated = x as i64;
    truncated - i64::from((truncated as f32) > x)
}

/// Area-style downscale (or bilinear upscale) to an exact size.
pub fn resize_rgb(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle)
}

/// Same-sized RGB images -> one `N x 3 x H x W` f32 tensor of 0..255 values.
pub fn rgb_batch(images: &[RgbImage], device: &Device) -> candle_core::Result<Tensor> {
    let Some(first) = images.first() else {
        candle_core::bail!("an empty batch of images");
    };
    let (w, h) = first.dimensions();
    if images.iter().any(|img| img.dimensions() != (w, h)) {
        candle_core::bail!("images of different sizes in one batch");
    }
    let data: Vec<f32> = images
        .iter()
        .flat_map(|img| img.as_raw().iter().map(|&p| f32::from(p)))
        .collect();
    Tensor::from_vec(data, (images.len(), h as usize, w as usize, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// A soft mask (`1 x 1 x H x W` or `H x W` tensor with values in [0, 1]) as 8-bit grey.
pub fn mask_to_gray(mask: &Tensor) -> candle_core::Result<GrayImage> {
    let (h, w) = {
        let dims = mask.dims();
        (dims[dims.len() - 2], dims[dims.len() - 1])
    };
    let values = mask.flatten_all()?.to_vec1::<f32>()?;
    let bytes = values.iter().map(|v| to_u8(v * 255.0)).collect();
    Ok(GrayImage::from_raw(w as u32, h as u32, bytes).expect("mask size matches its data"))
}

/// `rgb * m + 255 * (1 - m)`: composites the image over white with the soft mask.
pub fn whiten(img: &RgbImage, mask: &GrayImage) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let m = f32::from(mask.get_pixel(x, y).0[0]) / 255.0;
        Rgb(img
            .get_pixel(x, y)
            .0
            .map(|c| to_u8(f32::from(c) * m + 255.0 * (1.0 - m))))
    })
}

/// A 64-bit difference hash (dHash): the image in grey at 9x8, one bit per horizontal
/// neighbour pair (is the left pixel brighter?). Copies that were resized, re-encoded or
/// slightly recoloured keep almost all bits; different pictures differ in about half.
pub fn difference_hash(img: &RgbImage) -> u64 {
    let grey = image::imageops::grayscale(img);
    let small = image::imageops::resize(&grey, 9, 8, image::imageops::FilterType::Triangle);
    let mut hash = 0u64;
    for y in 0..8 {
        for x in 0..8 {
            let brighter = small.get_pixel(x, y).0[0] > small.get_pixel(x + 1, y).0[0];
            hash = (hash << 1) | u64::from(brighter);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_keep_their_difference_hash_and_other_pictures_do_not() {
        let picture = RgbImage::from_fn(200, 160, |x, y| {
            Rgb([
                (x * 255 / 200) as u8,
                ((x * y) % 251) as u8,
                (y * 255 / 160) as u8,
            ])
        });
        let other = RgbImage::from_fn(200, 160, |x, y| {
            Rgb([((x * 7 + y * 3) % 256) as u8, (y * 255 / 160) as u8, 90])
        });
        let hash = difference_hash(&picture);
        let mut jpeg = Vec::new();
        image::DynamicImage::ImageRgb8(resize_rgb(&picture, 120, 96))
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        let copy = decode_photo(&jpeg, &limits()).unwrap();
        assert!((difference_hash(&copy) ^ hash).count_ones() <= 3);
        assert!((difference_hash(&other) ^ hash).count_ones() >= 16);
    }

    fn limits() -> Limits {
        Limits {
            max_bytes: 1 << 20,
            max_pixels: 1 << 20,
        }
    }

    #[test]
    fn affine_inverse_and_composition_round_trip() {
        let m = Affine::rotation_about(0.3, 10.0, 20.0)
            .then_after(Affine::scale(2.0))
            .then_after(Affine::translation(3.0, -4.0));
        let p = [7.0, 11.0];
        let q = m.inverse().apply(m.apply(p));
        assert!(
            (q[0] - p[0]).abs() < 1e-4 && (q[1] - p[1]).abs() < 1e-4,
            "{q:?}"
        );
        assert!((m.scale_factor() - 2.0).abs() < 1e-5);
    }

    #[test]
    fn rotation_keeps_its_centre() {
        let m = Affine::rotation_about(1.0, 5.0, 6.0);
        let c = m.apply([5.0, 6.0]);
        assert!((c[0] - 5.0).abs() < 1e-5 && (c[1] - 6.0).abs() < 1e-5);
    }

    #[test]
    fn identity_warp_copies_and_outside_is_filled() {
        let src = RgbImage::from_fn(8, 6, |x, y| Rgb([x as u8 * 10, y as u8 * 10, 7]));
        let same = warp_affine(&src, Affine::IDENTITY, 8, 6, Rgb([255, 255, 255]));
        assert_eq!(same, src);
        let shifted = warp_affine(
            &src,
            Affine::translation(4.0, 0.0),
            8,
            6,
            Rgb([255, 255, 255]),
        );
        assert_eq!(shifted.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(shifted.get_pixel(5, 2), src.get_pixel(1, 2));
    }

    #[test]
    fn shrinking_warp_of_a_region_matches_resizing_that_region() {
        let src = RgbImage::from_fn(400, 300, |x, y| {
            Rgb([
                (x * 6 / 10) as u8,
                (y * 8 / 10) as u8,
                ((x + y) * 3 / 10) as u8,
            ])
        });
        // Output shows the 200x200 square at (100, 50) shrunk 4x.
        let m = Affine::scale(0.25).then_after(Affine::translation(-100.0, -50.0));
        let warped = warp_affine(&src, m, 50, 50, Rgb([255, 255, 255]));
        let region = image::imageops::crop_imm(&src, 100, 50, 200, 200).to_image();
        let reference = resize_rgb(&region, 50, 50);
        let worst = warped
            .pixels()
            .zip(reference.pixels())
            .flat_map(|(a, b)| {
                a.0.iter()
                    .zip(b.0)
                    .map(|(&p, q)| (i32::from(p) - i32::from(q)).abs())
            })
            .max()
            .unwrap();
        assert!(worst <= 3, "max channel difference {worst}");
        let outside = warp_affine(
            &src,
            Affine::scale(0.25).then_after(Affine::translation(-5000.0, 0.0)),
            8,
            8,
            Rgb([1, 2, 3]),
        );
        assert!(outside.pixels().all(|p| p.0 == [1, 2, 3]));
    }

    #[test]
    fn rejects_non_images_and_oversized_inputs() {
        assert!(matches!(
            decode_photo(b"hello, not a picture", &limits()),
            Err(DecodeError::NotAnImage)
        ));
        let mut png = Vec::new();
        RgbImage::new(2048, 1024)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let big = Limits {
            max_bytes: 1 << 30,
            max_pixels: 1 << 20,
        };
        assert!(matches!(
            decode_photo(&png, &big),
            Err(DecodeError::TooManyPixels { .. })
        ));
        let tiny_bytes = Limits {
            max_bytes: 100,
            max_pixels: 1 << 30,
        };
        assert!(matches!(
            decode_photo(&png, &tiny_bytes),
            Err(DecodeError::TooManyBytes { .. })
        ));
        let mut small = Vec::new();
        RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8, y as u8, 3]))
            .write_to(&mut Cursor::new(&mut small), ImageFormat::Png)
            .unwrap();
        assert!(decode_photo(&small, &big).is_ok());
        assert!(matches!(
            decode_photo(&small[..small.len() / 2], &big),
            Err(DecodeError::Corrupt(_))
        ));
    }

    /// A JPEG with an EXIF APP1 segment carrying only an orientation tag.
    fn jpeg_with_orientation(img: &RgbImage, orientation: u8) -> Vec<u8> {
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        let mut tiff = b"MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        tiff.extend([0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1, 0, orientation, 0, 0]);
        tiff.extend([0, 0, 0, 0]);
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(tiff);
        let len = (app1.len() + 2) as u16;
        let mut out = jpeg[..2].to_vec();
        out.extend([0xFF, 0xE1]);
        out.extend(len.to_be_bytes());
        out.extend(app1);
        out.extend(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied() {
        // Left half dark, right half bright, 40x20.
        let img = RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                Rgb([0, 0, 0])
            } else {
                Rgb([255, 255, 255])
            }
        });
        let plain = decode_photo(&jpeg_with_orientation(&img, 1), &limits()).unwrap();
        assert_eq!(plain.dimensions(), (40, 20));
        // Orientation 6: the stored image must be turned 90 degrees clockwise to display.
        let turned = decode_photo(&jpeg_with_orientation(&img, 6), &limits()).unwrap();
        assert_eq!(turned.dimensions(), (20, 40));
        assert!(
            turned.get_pixel(10, 5).0[0] < 40,
            "top was the dark left half"
        );
        assert!(
            turned.get_pixel(10, 35).0[0] > 215,
            "bottom was the bright right half"
        );
    }

    #[test]
    fn whiten_keeps_masked_pixels_and_whitens_the_rest() {
        let img = RgbImage::from_pixel(2, 1, Rgb([10, 20, 30]));
        let mask = GrayImage::from_raw(2, 1, vec![255, 0]).unwrap();
        let out = whiten(&img, &mask);
        assert_eq!(out.get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(1, 0).0, [255, 255, 255]);
    }
}
