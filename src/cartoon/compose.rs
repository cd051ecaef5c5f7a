//! Turning a cartoon face (256x256 on white, with its soft mask) into what users get: a
//! sticker, an avatar, and the photo with the face replaced (DESIGN §3 step 9).

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{GrayImage, ImageEncoder, Luma, RgbImage, Rgba, RgbaImage};

use rayon::prelude::*;

use crate::imageops::{to_u8, Affine};

/// Discord's sticker size and file limit.
pub const STICKER_SIZE: u32 = 320;
/// Largest sticker file Discord accepts, in bytes (512 KiB).
pub const STICKER_MAX_BYTES: usize = 512 * 1024;
/// Side of an avatar, in pixels.
pub const AVATAR_SIZE: u32 = 512;
/// Width of the optional white sticker outline, in sticker pixels.
const OUTLINE_PX: u32 = 6;
/// Transparent margin around the sticker's subject, in sticker pixels.
const STICKER_MARGIN: u32 = OUTLINE_PX + 4;
/// Blur of the outline's edge, in sticker pixels (anti-aliasing).
const OUTLINE_SOFTNESS: f32 = 0.7;
/// Alpha below this (of 255) does not count as subject when framing the sticker.
const SUBJECT_ALPHA: u8 = 16;

/// Options for [`sticker`] and [`avatar`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ComposeOptions {
    /// Draw a white outline around the sticker's subject.
    pub outline: bool,
    /// Cut the avatar to a disc with transparent corners.
    pub round_avatar: bool,
}

/// A 320x320 RGBA sticker: the masked cartoon framed on its subject, with a clean edge and
/// optionally a white outline.
///
/// The segmenter's mask is nearly binary; scaling it up to the sticker with a cubic filter
/// gives the edge its anti-aliasing.
pub fn sticker(cartoon: &RgbImage, mask: &GrayImage, outline: bool) -> RgbaImage {
    let cutout_pixels = cartoon
        .as_raw()
        .chunks_exact(3)
        .zip(mask.as_raw())
        .flat_map(|(rgb, &alpha)| [rgb[0], rgb[1], rgb[2], alpha])
        .collect();
    let cutout = RgbaImage::from_raw(cartoon.width(), cartoon.height(), cutout_pixels)
        .expect("the mask is the cartoon's size");
    let framed = frame_subject(&cutout, STICKER_SIZE - 2 * STICKER_MARGIN);
    let mut canvas = RgbaImage::new(STICKER_SIZE, STICKER_SIZE);
    let offset = (STICKER_SIZE - framed.width()) / 2;
    image::imageops::overlay(
        &mut canvas,
        &framed,
        i64::from(offset),
        i64::from((STICKER_SIZE - framed.height()) / 2),
    );
    if outline {
        add_outline(&canvas, OUTLINE_PX)
    } else {
        canvas
    }
}

/// The smallest square around the opaque subject (centred, transparent where it runs past
/// the image), scaled to `side`.
fn frame_subject(cutout: &RgbaImage, side: u32) -> RgbaImage {
    let (w, h) = cutout.dimensions();
    let (mut l, mut t, mut r, mut b) = (w, h, 0, 0);
    for (x, y, p) in cutout.enumerate_pixels() {
        if p.0[3] >= SUBJECT_ALPHA {
            (l, t, r, b) = (l.min(x), t.min(y), r.max(x + 1), b.max(y + 1));
        }
    }
    if r <= l || b <= t {
        (l, t, r, b) = (0, 0, w, h);
    }
    let square = (r - l).max(b - t);
    let (left, top) = (
        i64::from(l) - i64::from(square - (r - l)) / 2,
        i64::from(t) - i64::from(square - (b - t)) / 2,
    );
    let mut region = RgbaImage::new(square, square);
    image::imageops::overlay(&mut region, cutout, -left, -top);
    resize_catmull_rom(&region, side, side)
}

/// Puts a white silhouette, grown by `width` pixels, behind the image.
fn add_outline(image: &RgbaImage, width: u32) -> RgbaImage {
    let solid = GrayImage::from_fn(image.width(), image.height(), |x, y| {
        Luma([if image.get_pixel(x, y).0[3] >= 128 {
            255
        } else {
            0
        }])
    });
    let grown = image::imageops::blur(&dilate(&solid, width), OUTLINE_SOFTNESS);
    RgbaImage::from_fn(image.width(), image.height(), |x, y| {
        over(
            *image.get_pixel(x, y),
            Rgba([255, 255, 255, grown.get_pixel(x, y).0[0]]),
        )
    })
}

/// Dilation of a binary (0 / 255) image with a disc of `radius` pixels: a pixel is set when
/// some row `dy` away (|dy| <= radius) has a set pixel within the disc's half-width at that
/// row, found from each row's horizontal distance to its nearest set pixel.
fn dilate(binary: &GrayImage, radius: u32) -> GrayImage {
    let (w, h) = (binary.width() as usize, binary.height() as usize);
    let r = radius as i64;
    // Horizontal distance from each pixel to the nearest set pixel of its row (capped).
    let far = u16::MAX;
    let mut dist = vec![far; w * h];
    for (row, d) in binary
        .as_raw()
        .chunks_exact(w)
        .zip(dist.chunks_exact_mut(w))
    {
        let mut last = far;
        for (&p, d) in row.iter().zip(d.iter_mut()) {
            last = if p != 0 { 0 } else { last.saturating_add(1) };
            *d = last;
        }
        last = far;
        for (&p, d) in row.iter().zip(d.iter_mut()).rev() {
            last = if p != 0 { 0 } else { last.saturating_add(1) };
            *d = (*d).min(last);
        }
    }
    // Half-width of the disc at each row offset: dx^2 + dy^2 <= r^2.
    let half: Vec<u16> = (-r..=r)
        .map(|dy| ((r * r - dy * dy) as f64).sqrt().floor() as u16)
        .collect();
    let mut out = vec![0u8; w * h];
    for (y, orow) in out.chunks_exact_mut(w).enumerate() {
        for (i, &hw) in half.iter().enumerate() {
            let sy = y as i64 + i as i64 - r;
            if sy < 0 || sy >= h as i64 {
                continue;
            }
            let drow = &dist[sy as usize * w..(sy as usize + 1) * w];
            for (o, &d) in orow.iter_mut().zip(drow) {
                if d <= hw {
                    *o = 255;
                }
            }
        }
    }
    GrayImage::from_raw(w as u32, h as u32, out).expect("buffer of the image's size")
}

/// Porter-Duff "over" of straight-alpha pixels.
fn over(top: Rgba<u8>, bottom: Rgba<u8>) -> Rgba<u8> {
    let ta = f32::from(top.0[3]) / 255.0;
    let ba = f32::from(bottom.0[3]) / 255.0;
    let out_a = ta + ba * (1.0 - ta);
    if out_a <= 0.0 {
        return Rgba([0, 0, 0, 0]);
    }
    let [r, g, b] = [0, 1, 2].map(|c| {
        let v = (f32::from(top.0[c]) * ta + f32::from(bottom.0[c]) * ba * (1.0 - ta)) / out_a;
        to_u8(v)
    });
    Rgba([r, g, b, to_u8(out_a * 255.0)])
}

/// A 512x512 avatar of the whole cartoon crop; `round` cuts it to an anti-aliased disc.
pub fn avatar(cartoon: &RgbImage, round: bool) -> RgbaImage {
    let big = resize_catmull_rom(cartoon, AVATAR_SIZE, AVATAR_SIZE);
    let radius = AVATAR_SIZE as f32 / 2.0;
    let mut out = RgbaImage::new(AVATAR_SIZE, AVATAR_SIZE);
    let row_len = AVATAR_SIZE as usize * 4;
    out.par_chunks_mut(row_len)
        .zip(big.par_chunks(AVATAR_SIZE as usize * 3))
        .enumerate()
        .for_each(|(y, (out, src))| {
            let dy = y as f32 + 0.5 - radius;
            for (x, (o, s)) in out.chunks_exact_mut(4).zip(src.chunks_exact(3)).enumerate() {
                o[..3].copy_from_slice(s);
                o[3] = if round {
                    let d = ((x as f32 + 0.5 - radius).powi(2) + dy * dy).sqrt();
                    to_u8((radius - d + 0.5).clamp(0.0, 1.0) * 255.0)
                } else {
                    255
                };
            }
        });
    out
}

/// Catmull-Rom cubic (`a = -0.5`).
fn catmull_rom(d: f32) -> f32 {
    let d = d.abs();
    if d < 1.0 {
        (1.5 * d - 2.5) * d * d + 1.0
    } else if d < 2.0 {
        ((-0.5 * d + 2.5) * d - 4.0) * d + 2.0
    } else {
        0.0
    }
}

/// For each of `to` output positions along an axis of `from` pixels: the first source pixel
/// and the normalised filter weights from there, as `image::imageops::resize` samples.
fn catmull_rom_taps(from: u32, to: u32) -> Vec<(usize, Vec<f32>)> {
    let ratio = from as f32 / to as f32;
    let scale = ratio.max(1.0);
    let support = 2.0 * scale;
    (0..to)
        .map(|o| {
            let centre = (o as f32 + 0.5) * ratio;
            let first = ((centre - support).floor() as i64).clamp(0, i64::from(from) - 1) as usize;
            let end = ((centre + support).ceil() as i64).clamp(first as i64 + 1, i64::from(from));
            let weights: Vec<f32> = (first as i64..end)
                .map(|i| catmull_rom((i as f32 - (centre - 0.5)) / scale))
                .collect();
            let sum: f32 = weights.iter().sum();
            (first, weights.iter().map(|w| w / sum).collect())
        })
        .collect()
}

/// `image::imageops::resize(img, width, height, CatmullRom)` (same taps, every channel
/// alike as the image crate treats them, rounding to within a level), separable and in
/// parallel over rows: the generic resize was most of a sticker's and an avatar's time.
fn resize_catmull_rom<P: image::Pixel<Subpixel = u8>>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
) -> image::ImageBuffer<P, Vec<u8>> {
    let channels = usize::from(P::CHANNEL_COUNT);
    let (w, h) = img.dimensions();
    let (cols, rows) = (catmull_rom_taps(w, width), catmull_rom_taps(h, height));
    let line = width as usize * channels;
    let mut wide = vec![0f32; line * h as usize];
    wide.par_chunks_mut(line)
        .zip(img.par_chunks(w as usize * channels))
        .for_each(|(out, src)| {
            for (o, (first, weights)) in out.chunks_exact_mut(channels).zip(&cols) {
                for (k, weight) in weights.iter().enumerate() {
                    let s = &src[(first + k) * channels..(first + k + 1) * channels];
                    for (o, &s) in o.iter_mut().zip(s) {
                        *o += weight * f32::from(s);
                    }
                }
            }
        });
    let mut out = vec![0u8; line * height as usize];
    out.par_chunks_mut(line).zip(rows.par_iter()).for_each_init(
        || vec![0f32; line],
        |sum, (out, (first, weights))| {
            sum.fill(0.0);
            for (k, weight) in weights.iter().enumerate() {
                let src = &wide[(first + k) * line..(first + k + 1) * line];
                for (s, &v) in sum.iter_mut().zip(src) {
                    *s += weight * v;
                }
            }
            for (o, &s) in out.iter_mut().zip(sum.iter()) {
                *o = to_u8(s);
            }
        },
    );
    image::ImageBuffer::from_raw(width, height, out).expect("buffer sized for the image")
}

/// Blends a cartoon crop back into the photo through the inverse of its alignment,
/// weighted by its mask.
pub fn paste_back(photo: &mut RgbImage, cartoon: &RgbImage, mask: &GrayImage, to_crop: &Affine) {
    let from_crop = to_crop.inverse();
    let (cw, ch) = (cartoon.width() as f32, cartoon.height() as f32);
    let corners = [[0.0, 0.0], [cw, 0.0], [0.0, ch], [cw, ch]].map(|p| from_crop.apply(p));
    let span = |i: usize, limit: u32| {
        let lo = corners
            .iter()
            .map(|c| c[i])
            .fold(f32::MAX, f32::min)
            .floor()
            .max(0.0) as u32;
        let hi = corners
            .iter()
            .map(|c| c[i])
            .fold(f32::MIN, f32::max)
            .ceil()
            .clamp(0.0, limit as f32) as u32;
        lo.min(limit)..hi
    };
    for y in span(1, photo.height()) {
        for x in span(0, photo.width()) {
            let [u, v] = to_crop.apply([x as f32 + 0.5, y as f32 + 0.5]);
            let Some([m]) = sample(mask, u, v) else {
                continue;
            };
            if m <= 0.0 {
                continue; // the blend would give the photo's pixel back
            }
            let Some::<[f32; 3]>(colour) = sample(cartoon, u, v) else {
                continue;
            };
            let m = m / 255.0;
            let p = photo.get_pixel_mut(x, y);
            for (channel, value) in p.0.iter_mut().zip(colour) {
                *channel = to_u8(value * m + f32::from(*channel) * (1.0 - m));
            }
        }
    }
}

/// Bilinear sample at continuous coordinates; `None` outside the image.
fn sample<P: image::Pixel<Subpixel = u8>, const N: usize>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    u: f32,
    v: f32,
) -> Option<[f32; N]> {
    let (w, h) = (img.width() as f32, img.height() as f32);
    if u < 0.0 || v < 0.0 || u >= w || v >= h {
        return None;
    }
    let (fx, fy) = ((u - 0.5).clamp(0.0, w - 1.0), (v - 0.5).clamp(0.0, h - 1.0));
    let (x0, y0) = (fx as u32, fy as u32); // non-negative: truncation floors
    let (x1, y1) = (
        (x0 + 1).min(img.width() - 1),
        (y0 + 1).min(img.height() - 1),
    );
    let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
    let px = |x, y| img.get_pixel(x, y).channels();
    let (p00, p10, p01, p11) = (px(x0, y0), px(x1, y0), px(x0, y1), px(x1, y1));
    let mut out = [0.0; N];
    for (c, o) in out.iter_mut().enumerate() {
        let top = f32::from(p00[c]) + (f32::from(p10[c]) - f32::from(p00[c])) * tx;
        let bottom = f32::from(p01[c]) + (f32::from(p11[c]) - f32::from(p01[c])) * tx;
        *o = top + (bottom - top) * ty;
    }
    Some(out)
}

/// The generator's `[-1, 1]` output composited on white with the mask:
/// `((y + 1) * 127.5) * m + 255 * (1 - m)`.
pub fn cartoon_on_white(generated: &[f32], mask: &GrayImage) -> RgbImage {
    let (w, h) = mask.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0u8; plane * 3];
    out.par_chunks_mut(w as usize * 3)
        .zip(mask.par_chunks(w as usize))
        .enumerate()
        .for_each(|(y, (row, mask_row))| {
            for (x, (rgb, &m)) in row.chunks_exact_mut(3).zip(mask_row).enumerate() {
                let i = y * w as usize + x;
                let m = f32::from(m) / 255.0;
                for (c, o) in rgb.iter_mut().enumerate() {
                    let v = (generated[c * plane + i] + 1.0) * 127.5;
                    *o = to_u8(v * m + 255.0 * (1.0 - m));
                }
            }
        });
    RgbImage::from_raw(w, h, out).expect("buffer sized for the image")
}

/// PNG bytes, compressed fast (fdeflate: about 100x faster than the strongest level here,
/// files about 40 % larger); should that come out over Discord's 512 KiB sticker limit,
/// compressed hard instead.
pub fn encode_png<P: image::PixelWithColorType<Subpixel = u8>>(
    img: &image::ImageBuffer<P, Vec<u8>>,
) -> Vec<u8> {
    let encode = |compression| {
        let mut out = Vec::new();
        PngEncoder::new_with_quality(&mut out, compression, FilterType::Adaptive)
            .write_image(img.as_raw(), img.width(), img.height(), P::COLOR_TYPE)
            .expect("encoding a PNG into memory cannot fail");
        out
    };
    let fast = encode(CompressionType::Fast);
    if fast.len() < STICKER_MAX_BYTES {
        fast
    } else {
        encode(CompressionType::Best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn disc_mask(size: u32, radius: f32) -> GrayImage {
        let c = size as f32 / 2.0;
        GrayImage::from_fn(size, size, |x, y| {
            let d = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
            Luma([if d < radius { 255 } else { 0 }])
        })
    }

    fn noisy_cartoon(size: u32) -> RgbImage {
        // Worst case for PNG size: every pixel different.
        let mut state = 0x2545_f491_u32;
        RgbImage::from_fn(size, size, |_, _| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            Rgb(state.to_le_bytes()[..3].try_into().unwrap())
        })
    }

    #[test]
    fn sticker_is_320_rgba_framed_on_the_subject_and_small_enough() {
        for outline in [false, true] {
            let s = sticker(&noisy_cartoon(256), &disc_mask(256, 60.0), outline);
            assert_eq!(s.dimensions(), (STICKER_SIZE, STICKER_SIZE));
            assert_eq!(s.get_pixel(0, 0).0[3], 0, "corners are transparent");
            assert_eq!(s.get_pixel(160, 160).0[3], 255, "the subject is opaque");
            // The 120-px disc (plus its softened edge) is scaled to fill the sticker minus
            // its margin.
            let opaque_row = (0..STICKER_SIZE)
                .filter(|&x| s.get_pixel(x, 160).0[3] > 128)
                .count() as u32;
            let expected =
                STICKER_SIZE - 2 * STICKER_MARGIN + if outline { 2 * OUTLINE_PX } else { 0 };
            assert!(
                opaque_row.abs_diff(expected) <= 8,
                "{opaque_row} vs {expected}"
            );
            assert!(encode_png(&s).len() < STICKER_MAX_BYTES);
        }
    }

    #[test]
    fn dilate_matches_the_disc_definition() {
        // Brute force: the max over every pixel within the disc.
        let reference = |img: &GrayImage, radius: u32| -> GrayImage {
            let r = radius as i64;
            let (w, h) = (img.width() as i64, img.height() as i64);
            GrayImage::from_fn(img.width(), img.height(), |x, y| {
                let mut max = 0;
                for dy in -r..=r {
                    for dx in -r..=r {
                        let (sx, sy) = (x as i64 + dx, y as i64 + dy);
                        if dx * dx + dy * dy <= r * r && sx >= 0 && sy >= 0 && sx < w && sy < h {
                            max = max.max(img.get_pixel(sx as u32, sy as u32).0[0]);
                        }
                    }
                }
                Luma([max])
            })
        };
        let mut state = 0x1234_5678_u32;
        let img = GrayImage::from_fn(61, 47, |_, _| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            Luma([if state.is_multiple_of(97) { 255 } else { 0 }])
        });
        for radius in [0, 1, 3, 6] {
            assert_eq!(
                dilate(&img, radius),
                reference(&img, radius),
                "radius {radius}"
            );
        }
    }

    #[test]
    fn png_round_trips() {
        let img = noisy_cartoon(64);
        let decoded = image::load_from_memory(&encode_png(&img))
            .unwrap()
            .to_rgb8();
        assert_eq!(decoded, img);
    }

    #[test]
    fn outline_is_white_around_the_subject() {
        let s = sticker(
            &RgbImage::from_pixel(256, 256, Rgb([200, 0, 0])),
            &disc_mask(256, 60.0),
            true,
        );
        // Along the middle row, from the left: transparent, then an opaque white band,
        // then the red subject.
        let row: Vec<[u8; 4]> = (0..STICKER_SIZE).map(|x| s.get_pixel(x, 160).0).collect();
        let first_opaque = row.iter().position(|p| p[3] == 255).unwrap();
        let first_red = row.iter().position(|p| *p == [200, 0, 0, 255]).unwrap();
        let white = row[first_opaque..first_red]
            .iter()
            .filter(|p| **p == [255, 255, 255, 255])
            .count();
        assert!(
            white >= 3,
            "white band of {white} px in {:?}",
            &row[first_opaque..first_red]
        );
        assert!(row[..first_opaque].iter().all(|p| p[3] < 255));
    }

    #[test]
    fn the_parallel_resize_matches_the_image_crates() {
        fn max_diff(a: &[u8], b: &[u8]) -> Option<u8> {
            a.iter().zip(b).map(|(&a, &b)| a.abs_diff(b)).max()
        }
        let cartoon = noisy_cartoon(256);
        for (w, h) in [(512, 512), (300, 700), (256, 256), (100, 180)] {
            let ours = resize_catmull_rom(&cartoon, w, h);
            let theirs =
                image::imageops::resize(&cartoon, w, h, image::imageops::FilterType::CatmullRom);
            assert_eq!(ours.dimensions(), theirs.dimensions());
            let diff = max_diff(ours.as_raw(), theirs.as_raw());
            assert!(diff <= Some(1), "{w}x{h}: max difference {diff:?}");
        }
        // Stickers: a cutout with a ragged alpha, framed up and down to the sticker.
        let cutout = RgbaImage::from_fn(217, 217, |x, y| {
            let [r, g, b] = cartoon.get_pixel(x, y).0;
            Rgba([r, g, b, if (x * 7 + y * 3) % 11 < 5 { 0 } else { g }])
        });
        for side in [300, 150] {
            let ours = resize_catmull_rom(&cutout, side, side);
            let theirs = image::imageops::resize(
                &cutout,
                side,
                side,
                image::imageops::FilterType::CatmullRom,
            );
            let diff = max_diff(ours.as_raw(), theirs.as_raw());
            assert!(diff <= Some(1), "RGBA {side}: max difference {diff:?}");
        }
    }

    #[test]
    fn round_avatar_is_cut_to_a_disc() {
        let cartoon = noisy_cartoon(256);
        let square = avatar(&cartoon, false);
        assert_eq!(square.dimensions(), (AVATAR_SIZE, AVATAR_SIZE));
        assert!(square.pixels().all(|p| p.0[3] == 255));
        let round = avatar(&cartoon, true);
        assert_eq!(round.get_pixel(0, 0).0[3], 0);
        assert_eq!(round.get_pixel(256, 256).0[3], 255);
        assert_eq!(round.get_pixel(256, 1).0[3], 255);
    }

    #[test]
    fn paste_back_replaces_only_the_masked_face() {
        let mut photo = RgbImage::from_pixel(100, 80, Rgb([0, 0, 0]));
        let cartoon = RgbImage::from_pixel(256, 256, Rgb([255, 255, 255]));
        let mask = disc_mask(256, 100.0);
        // The crop covers the 40x40 square at (30, 20).
        let to_crop = Affine::scale(256.0 / 40.0).then_after(Affine::translation(-30.0, -20.0));
        paste_back(&mut photo, &cartoon, &mask, &to_crop);
        assert_eq!(
            photo.get_pixel(50, 40).0,
            [255, 255, 255],
            "face centre replaced"
        );
        assert_eq!(
            photo.get_pixel(31, 21).0,
            [0, 0, 0],
            "crop corner outside the mask kept"
        );
        assert_eq!(photo.get_pixel(5, 5).0, [0, 0, 0], "outside the crop kept");
    }

    #[test]
    fn generator_output_is_mapped_to_pixels_and_whitened() {
        let mask = GrayImage::from_raw(2, 1, vec![255, 0]).unwrap();
        // Planes: R = [-1, -1], G = [1, 1], B = [0, 0].
        let generated = [-1.0, -1.0, 1.0, 1.0, 0.0, 0.0];
        let img = cartoon_on_white(&generated, &mask);
        assert_eq!(img.get_pixel(0, 0).0, [0, 255, 128]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
    }
}
