//! A hostile corpus: bad photos, bad style-pack archives and bad requests, each through the
//! command line (`toonbot cartoonize`, `toonbot check-pack`) and through the bot against the
//! fake Discord. Every case must get a clear answer (a message and an exit status, or an
//! ephemeral reply), no panic, nothing left behind, and a peak memory under [`CLI_PEAK_MB`]
//! and [`BOT_PEAK_MB`]. The peaks are printed per case (`cargo test --test hostile --
//! --nocapture`); `docs/hostile.md` lists them.

mod common;
#[path = "support/packs.rs"]
mod packs;
#[path = "support/pipeline.rs"]
mod pipeline;
mod support;

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use packs::{cartoon, faces_entries, pack_zip, zip_of, Packs, ADMIN_PERMS, USER};
use pipeline::real_pipeline_bot;
use serde_json::{json, Value};
use support::discord::{FakeDiscord, APP_ID, PERM_ALL_TEXT};
use support::harness::{assert_immediate_ephemeral, MEMBER};
use support::memory::{own_mb, reset_peak, vm_mb};
use support::trainer::TestTrainer;
use zip::write::SimpleFileOptions;

/// The most any one command-line run may hold (measured: 14 MB for a refused archive, up to
/// 510 MB for the 60-face photo).
const CLI_PEAK_MB: f64 = 800.0;
/// The most the bot's process (with the test harness) may hold while answering one case
/// (measured: 135 to 630 MB).
const BOT_PEAK_MB: f64 = 1_000.0;
/// A render of up to eight faces on a loaded 2-core machine.
const RENDER_TIMEOUT: Duration = Duration::from_secs(300);

/// What a case must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A cartoon of this many faces.
    Faces(usize),
    /// A refusal or error saying this.
    Says(&'static str),
}

/// A photo as sent: file name, declared type, bytes.
struct Photo {
    filename: &'static str,
    content_type: &'static str,
    bytes: Vec<u8>,
}

struct PhotoCase {
    name: &'static str,
    photo: Photo,
    cli: Expect,
    bot: Expect,
}

struct PackCase {
    name: &'static str,
    zip: Vec<u8>,
    /// What `toonbot check-pack` prints (stderr or stdout), and whether it refuses (exit 1).
    cli: (&'static str, bool),
    /// What the upload's answer says.
    bot: &'static str,
}

// --- images ---------------------------------------------------------------------------------

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// An 8x8 24-bit Windows bitmap (a format the image crate here is built without).
fn bmp_8x8() -> Vec<u8> {
    let pixels = 8 * 8 * 3;
    let mut bmp = b"BM".to_vec();
    for v in [54 + pixels, 0, 54, 40, 8, 8] {
        bmp.extend_from_slice(&(v as u32).to_le_bytes());
    }
    bmp.extend_from_slice(&1u16.to_le_bytes());
    bmp.extend_from_slice(&24u16.to_le_bytes());
    for v in [0, pixels, 2835, 2835, 0, 0] {
        bmp.extend_from_slice(&(v as u32).to_le_bytes());
    }
    bmp.extend(std::iter::repeat_n(200u8, pixels));
    bmp
}

/// A PNG chunk: length, type, data, CRC.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    chunk.extend_from_slice(&crc.finalize().to_be_bytes());
    chunk
}

/// A PNG that declares `width` x `height` RGB pixels but holds a few bytes of data.
fn png_header_bomb(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"IDAT", &deflate(&[0; 64])));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

fn deflate(bytes: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(bytes).unwrap();
    z.finish().unwrap()
}

/// `png` with a compressed text chunk that inflates to `mb` MB, before its IEND.
fn png_with_text_bomb(png: &[u8], mb: usize) -> Vec<u8> {
    let mut text = b"Comment\0\0".to_vec();
    text.extend(deflate(&vec![b'a'; mb << 20]));
    let iend = png.len() - 12;
    let mut out = png[..iend].to_vec();
    out.extend(png_chunk(b"zTXt", &text));
    out.extend_from_slice(&png[iend..]);
    out
}

/// `jpeg` with its frame header changed to declare `side` x `side` pixels.
fn jpeg_header_bomb(jpeg: &[u8], side: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = (0..out.len() - 1)
        .find(|&i| out[i] == 0xFF && (0xC0..=0xC2).contains(&out[i + 1]))
        .expect("a frame header");
    out[sof + 5..sof + 7].copy_from_slice(&side.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&side.to_be_bytes());
    out
}

/// `jpeg` with an APP1 EXIF segment holding `tiff` after SOI.
fn jpeg_with_exif(jpeg: &[u8], tiff: &[u8]) -> Vec<u8> {
    let mut exif = b"Exif\0\0".to_vec();
    exif.extend_from_slice(tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
    out.extend(exif);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// A little-endian TIFF with one entry: Orientation = `orientation`.
fn orientation_tiff(orientation: u16) -> Vec<u8> {
    let mut tiff = b"II*\0".to_vec();
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&1u16.to_le_bytes());
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes());
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    tiff
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hostile")
            .join(name),
    )
    .unwrap()
}

/// 60 CelebA faces in a 10 x 6 grid.
fn sixty_faces(data: &Path) -> Vec<u8> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(data.join("photos/celeba"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let mut grid = RgbImage::from_pixel(10 * 256, 6 * 256, Rgb([255, 255, 255]));
    for (i, path) in paths.iter().take(60).enumerate() {
        let face = image::open(path).unwrap().to_rgb8();
        let (x, y) = ((i % 10) as i64 * 256, (i / 10) as i64 * 256);
        image::imageops::overlay(&mut grid, &face, x, y);
    }
    encode(&DynamicImage::ImageRgb8(grid), ImageFormat::Jpeg)
}

fn photo(filename: &'static str, content_type: &'static str, bytes: Vec<u8>) -> Photo {
    Photo {
        filename,
        content_type,
        bytes,
    }
}

fn photo_cases(data: &Path) -> Vec<PhotoCase> {
    let face = image::open(data.join("samples/groups/sample1.jpg")).unwrap();
    let face = face.crop_imm(0, 0, face.width() / 2, face.height());
    let face_jpeg = encode(&DynamicImage::ImageRgb8(face.to_rgb8()), ImageFormat::Jpeg);
    let face_png = encode(&DynamicImage::ImageRgb8(face.to_rgb8()), ImageFormat::Png);
    let white = |w, h| {
        encode(
            &DynamicImage::ImageRgb8(RgbImage::from_pixel(w, h, Rgb([255; 3]))),
            ImageFormat::Png,
        )
    };
    let mut corrupt_png = face_png.clone();
    let idat = (0..corrupt_png.len())
        .find(|&i| &corrupt_png[i..i + 4] == b"IDAT")
        .unwrap();
    for b in &mut corrupt_png[idat + 200..idat + 1200] {
        *b ^= 0x5A;
    }
    let mut random = vec![0u8; 4096];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for b in &mut random {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = (state >> 56) as u8;
    }
    let rotated = DynamicImage::ImageRgb8(face.rotate270().to_rgb8());
    let says = Expect::Says;
    let case = |name, photo, cli, bot| PhotoCase {
        name,
        photo,
        cli,
        bot,
    };
    vec![
        case(
            "zero-byte file",
            photo("empty.png", "image/png", vec![]),
            says("not a PNG, JPEG or WebP"),
            says("isn't a photo I can read"),
        ),
        case(
            "random bytes",
            photo("noise.png", "image/png", random),
            says("not a PNG, JPEG or WebP"),
            says("isn't a photo I can read"),
        ),
        case(
            "text named .jpg",
            photo(
                "notes.jpg",
                "image/jpeg",
                b"Dear Discord, this is not a photo.".to_vec(),
            ),
            says("not a PNG, JPEG or WebP"),
            says("isn't a photo I can read"),
        ),
        case(
            "GIF",
            photo(
                "anim.gif",
                "image/gif",
                b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
            ),
            says("unsupported image format"),
            says("PNG, JPEG or WebP"),
        ),
        case(
            "BMP named .png",
            photo("bitmap.png", "image/png", bmp_8x8()),
            says("unsupported image format"),
            says("isn't a photo I can read"),
        ),
        case(
            "truncated PNG",
            photo(
                "cut.png",
                "image/png",
                face_png[..face_png.len() / 2].to_vec(),
            ),
            says("corrupt or truncated"),
            says("isn't a photo I can read"),
        ),
        case(
            "JPEG cut after a third",
            photo(
                "cut.jpg",
                "image/jpeg",
                face_jpeg[..face_jpeg.len() / 3].to_vec(),
            ),
            // The decoder keeps what arrived (grey below it), as browsers show it: the face
            // in the top third is found.
            Expect::Faces(1),
            Expect::Faces(1),
        ),
        case(
            "corrupt PNG data",
            photo("corrupt.png", "image/png", corrupt_png),
            says("corrupt or truncated"),
            says("isn't a photo I can read"),
        ),
        case(
            "PNG declaring 100000x100000",
            photo("bomb.png", "image/png", png_header_bomb(100_000, 100_000)),
            says("over the limit of 40000000 pixels"),
            says("too large"),
        ),
        case(
            "JPEG declaring 65000x65000",
            photo(
                "bomb.jpg",
                "image/jpeg",
                jpeg_header_bomb(&face_jpeg, 65_000),
            ),
            says("over the limit of 40000000 pixels"),
            says("too large"),
        ),
        case(
            "WebP of 10000x5000 in 38 bytes",
            photo("bomb.webp", "image/webp", fixture("50mpx.webp")),
            says("over the limit of 40000000 pixels"),
            says("too large"),
        ),
        case(
            "blank 6000x6000 PNG (36 Mpx in 100 KB)",
            photo("blank.png", "image/png", white(6000, 6000)),
            says("no face found"),
            says("couldn't find a face"),
        ),
        case(
            "PNG with a 64 MB text chunk",
            photo(
                "text-bomb.png",
                "image/png",
                png_with_text_bomb(&face_png, 64),
            ),
            Expect::Faces(2),
            Expect::Faces(2),
        ),
        case(
            "1x60000 PNG",
            photo("tall.png", "image/png", white(1, 60_000)),
            says("no face found"),
            says("couldn't find a face"),
        ),
        case(
            "60000x1 PNG",
            photo("wide.png", "image/png", white(60_000, 1)),
            says("no face found"),
            says("couldn't find a face"),
        ),
        case(
            "16-bit RGB PNG",
            photo(
                "deep.png",
                "image/png",
                encode(&DynamicImage::ImageRgb16(face.to_rgb16()), ImageFormat::Png),
            ),
            Expect::Faces(2),
            Expect::Faces(2),
        ),
        case(
            "16-bit grey + alpha PNG",
            photo(
                "deep-grey.png",
                "image/png",
                encode(
                    &DynamicImage::ImageLumaA16(face.to_luma_alpha16()),
                    ImageFormat::Png,
                ),
            ),
            Expect::Faces(2),
            Expect::Faces(2),
        ),
        case(
            "grey JPEG",
            photo(
                "grey.jpg",
                "image/jpeg",
                encode(
                    &DynamicImage::ImageLuma8(face.to_luma8()),
                    ImageFormat::Jpeg,
                ),
            ),
            Expect::Faces(2),
            Expect::Faces(2),
        ),
        case(
            "CMYK JPEG",
            photo("cmyk.jpg", "image/jpeg", fixture("cmyk.jpg")),
            says("no face found"),
            says("couldn't find a face"),
        ),
        case(
            "animated WebP",
            photo("anim.webp", "image/webp", fixture("animated.webp")),
            says("no face found"),
            says("couldn't find a face"),
        ),
        case(
            "EXIF orientation 6",
            photo(
                "rotated.jpg",
                "image/jpeg",
                jpeg_with_exif(&encode(&rotated, ImageFormat::Jpeg), &orientation_tiff(6)),
            ),
            Expect::Faces(2),
            Expect::Faces(2),
        ),
        case(
            "malformed EXIF",
            photo(
                "bad-exif.jpg",
                "image/jpeg",
                jpeg_with_exif(&face_jpeg, b"MM\0*\xff\xff\xff\xf0garbage"),
            ),
            Expect::Faces(2),
            Expect::Faces(2),
        ),
        case(
            "60 faces",
            photo("crowd.jpg", "image/jpeg", sixty_faces(data)),
            Expect::Faces(8),
            Expect::Faces(8),
        ),
        case(
            "over 20 MB",
            photo("huge.png", "image/png", vec![0; 20_000_001]),
            says("over the limit of 20000000 bytes"),
            says("too large"),
        ),
    ]
}

// --- archives -------------------------------------------------------------------------------

fn zip_with(build: impl FnOnce(&mut zip::ZipWriter<Cursor<Vec<u8>>>)) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    build(&mut zip);
    zip.finish().unwrap().into_inner()
}

fn deflated() -> SimpleFileOptions {
    SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated)
}

/// 12 faces and one entry of `mb` MB of zeros (about `mb` KB deflated).
fn flat_bomb(mb: usize) -> Vec<u8> {
    zip_with(|zip| {
        for (name, bytes) in faces_entries(12) {
            zip.start_file(name, deflated()).unwrap();
            zip.write_all(&bytes).unwrap();
        }
        zip.start_file("faces/zeros.png", deflated()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..mb {
            zip.write_all(&zeros).unwrap();
        }
    })
}

/// Zips of zips: 12 faces, then ten entries each a zip of ten 1 MB zero files.
fn nested_bomb() -> Vec<u8> {
    let inner = zip_with(|zip| {
        for i in 0..10 {
            zip.start_file(format!("{i}.png"), deflated()).unwrap();
            zip.write_all(&vec![0u8; 1 << 20]).unwrap();
        }
    });
    let mut entries = faces_entries(12);
    entries.extend((0..10).map(|i| (format!("inner{i}.zip"), inner.clone())));
    zip_of(&entries)
}

/// Every entry's name pair `a` / `b` (same length) rewritten so that both are `a`.
fn with_duplicate_names(mut zip: Vec<u8>, a: &str, b: &str) -> Vec<u8> {
    for at in 0..zip.len() - b.len() {
        if &zip[at..at + b.len()] == b.as_bytes() {
            zip[at..at + b.len()].copy_from_slice(a.as_bytes());
        }
    }
    zip
}

fn encrypted(mut zip: Vec<u8>) -> Vec<u8> {
    for at in 0..zip.len() - 4 {
        match &zip[at..at + 4] {
            [0x50, 0x4b, 0x03, 0x04] => zip[at + 6] |= 1,
            [0x50, 0x4b, 0x01, 0x02] => zip[at + 8] |= 1,
            _ => {}
        }
    }
    zip
}

fn pack_cases() -> Vec<PackCase> {
    let tiny = encode(
        &DynamicImage::ImageRgb8(RgbImage::new(1, 1)),
        ImageFormat::Png,
    );
    let case = |name, zip, cli, bot| PackCase {
        name,
        zip,
        cli,
        bot,
    };
    let good = pack_zip(12, &[]);
    vec![
        case(
            "zip slip",
            pack_zip(12, &[("../../etc/evil.png", cartoon(99))]),
            ("could escape its folder", true),
            "leads outside",
        ),
        case(
            "absolute path",
            pack_zip(12, &[("/tmp/evil.png", cartoon(99))]),
            ("could escape its folder", true),
            "leads outside",
        ),
        case(
            "backslash path",
            pack_zip(12, &[("faces\\..\\..\\evil.png", cartoon(99))]),
            ("could escape its folder", true),
            "leads outside",
        ),
        case(
            "symlink entry",
            zip_with(|zip| {
                for (name, bytes) in faces_entries(12) {
                    zip.start_file(name, SimpleFileOptions::default()).unwrap();
                    zip.write_all(&bytes).unwrap();
                }
                zip.add_symlink(
                    "faces/passwd.png",
                    "/etc/passwd",
                    SimpleFileOptions::default(),
                )
                .unwrap();
            }),
            ("is a symbolic link", true),
            "is a symbolic link",
        ),
        case(
            "flat zip bomb (1 GB of zeros)",
            flat_bomb(1024),
            ("expands to more than", true),
            "expands to more than",
        ),
        case(
            "nested zip bomb",
            nested_bomb(),
            ("inner0.zip: not a PNG, JPEG or WebP image", false),
            "`inner0.zip`: not a PNG, JPEG or WebP image",
        ),
        case(
            "encrypted",
            encrypted(good.clone()),
            ("is encrypted", true),
            "is encrypted",
        ),
        case(
            "no images",
            zip_of(&[("readme.txt".into(), b"hello".to_vec())]),
            ("0 usable images", true),
            "0 usable images",
        ),
        case(
            "empty archive",
            zip_of(&[]),
            ("0 usable images", true),
            "0 usable images",
        ),
        case(
            "10,000 tiny entries",
            zip_of(
                &(0..10_000)
                    .map(|i| (format!("{i}.png"), tiny.clone()))
                    .collect::<Vec<_>>(),
            ),
            ("10000 entries", true),
            "10000 files",
        ),
        case(
            "duplicate names",
            with_duplicate_names(pack_zip(12, &[]), "faces/00.png", "faces/01.png"),
            ("same name", true),
            "same name",
        ),
        case(
            "not a zip",
            cartoon(1),
            ("not a zip archive", true),
            "isn't a zip archive",
        ),
        case(
            "truncated zip",
            good[..good.len() / 2].to_vec(),
            ("not a zip archive", true),
            "isn't a zip archive",
        ),
        case(
            "strips and bombs inside",
            pack_zip(
                12,
                &[
                    (
                        "strip.png",
                        encode(
                            &DynamicImage::ImageRgb8(RgbImage::new(1, 6000)),
                            ImageFormat::Png,
                        ),
                    ),
                    ("bomb.png", png_header_bomb(100_000, 100_000)),
                ],
            ),
            ("skipped bomb.png: 100000x100000 is over", false),
            "`bomb.png`: 100000x100000 is over",
        ),
    ]
}

// --- measuring ------------------------------------------------------------------------------

/// The command's exit code, stdout + stderr, and peak resident memory in MB: the child's own
/// high-water mark (`VmHWM`), read until it exits. (The `ru_maxrss` of `wait4` would not do:
/// a child spawned from this large process starts with this process's peak.)
fn run_measured(mut command: Command, dir: &Path) -> (Option<i32>, String, f64) {
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = command
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("toonbot runs");
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0.0f64;
    let status = loop {
        if let Some(mb) = std::fs::read_to_string(&status_file)
            .ok()
            .as_deref()
            .and_then(|s| vm_mb(s, "VmHWM:"))
        {
            peak = peak.max(mb);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let text = std::fs::read_to_string(&out).unwrap() + &std::fs::read_to_string(&err).unwrap();
    std::fs::remove_file(out).unwrap();
    std::fs::remove_file(err).unwrap();
    (status.code(), text, peak)
}

fn toonbot(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_toonbot"));
    command
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TOONBOT_STYLEPACKS__MIN_FACE_SHARE", "0");
    command
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flat_map(|e| {
            let path = e.unwrap().path();
            if path.is_dir() {
                files_under(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

fn report(table: &mut Vec<String>, via: &str, case: &str, peak: f64, bound: f64) {
    println!("{via:<4} {peak:>7.0} MB  {case}");
    table.push(format!("| {case} | {via} | {peak:.0} |"));
    assert!(
        peak < bound,
        "{case} via {via}: peak {peak:.0} MB over {bound} MB"
    );
}

// --- the command line -----------------------------------------------------------------------

/// Every case through `toonbot cartoonize` and `toonbot check-pack`.
fn command_line_cases(data: &Path, table: &mut Vec<String>) {
    let tmp = tempfile::tempdir().unwrap();
    for case in photo_cases(data) {
        let input = tmp.path().join(case.photo.filename);
        std::fs::write(&input, &case.photo.bytes).unwrap();
        let out = tmp.path().join("out");
        let (code, text, peak) = run_measured(
            toonbot(&[
                "cartoonize",
                input.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ]),
            tmp.path(),
        );
        assert!(!text.contains("panicked"), "{}: {text}", case.name);
        let stickers = files_under(&out)
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(".sticker.png"))
            .count();
        match case.cli {
            Expect::Faces(n) => {
                assert_eq!(code, Some(0), "{}: {text}", case.name);
                assert_eq!(stickers, n, "{}: {text}", case.name);
            }
            Expect::Says(needle) => {
                assert_eq!(code, Some(2), "{}: {text}", case.name);
                assert!(text.contains(needle), "{}: {needle:?} in {text}", case.name);
                assert_eq!(files_under(&out), Vec::<PathBuf>::new(), "{}", case.name);
            }
        }
        std::fs::remove_dir_all(&out).ok();
        std::fs::remove_file(&input).unwrap();
        report(table, "cli", case.name, peak, CLI_PEAK_MB);
    }

    let photo = tmp.path().join("face.jpg");
    std::fs::copy(data.join("samples/groups/sample1.jpg"), &photo).unwrap();
    let out = tmp.path().join("out");
    for style in ["../../etc", "p2c/../../models", "/etc/passwd"] {
        let (code, text, peak) = run_measured(
            toonbot(&[
                "cartoonize",
                photo.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--style",
                style,
            ]),
            tmp.path(),
        );
        assert!(!text.contains("panicked"), "{text}");
        assert_ne!(code, Some(0), "{style}: {text}");
        assert!(text.contains("not a valid style name"), "{style}: {text}");
        assert_eq!(files_under(&out), Vec::<PathBuf>::new(), "{style}");
        report(table, "cli", &format!("style `{style}`"), peak, CLI_PEAK_MB);
    }
    std::fs::remove_file(&photo).unwrap();

    for case in pack_cases() {
        let input = tmp.path().join("pack.zip");
        std::fs::write(&input, &case.zip).unwrap();
        let (code, text, peak) = run_measured(
            toonbot(&["check-pack", "--images", input.to_str().unwrap()]),
            tmp.path(),
        );
        assert!(!text.contains("panicked"), "{}: {text}", case.name);
        let (needle, refused) = case.cli;
        assert_eq!(
            code,
            Some(if refused { 1 } else { 0 }),
            "{}: {text}",
            case.name
        );
        assert!(text.contains(needle), "{}: {needle:?} in {text}", case.name);
        std::fs::remove_file(&input).unwrap();
        assert_eq!(
            files_under(tmp.path()),
            Vec::<PathBuf>::new(),
            "{}",
            case.name
        );
        report(table, "cli", case.name, peak, CLI_PEAK_MB);
    }
}

// --- the bot --------------------------------------------------------------------------------

/// The final answer to a `/cartoon`: (files, text, ephemeral). A result's files come in
/// messages of at most ten: the edit of the reply, then follow-ups, counted until there are
/// `files` of them (or a few seconds pass).
async fn cartoon_answer(fake: &FakeDiscord, token: &str, files: usize) -> (usize, String, bool) {
    let callback = format!("/{token}/callback");
    let cb = fake
        .wait_for("the callback", RENDER_TIMEOUT, |r| {
            r.method == "POST" && r.path.ends_with(&callback)
        })
        .await;
    if cb.callback_type() == Some(4) {
        return (cb.files.len(), cb.content(), cb.flags() & 64 != 0);
    }
    let original = format!("/webhooks/{APP_ID}/{token}/messages/@original");
    let followup = format!("/webhooks/{APP_ID}/{token}");
    let answer = fake
        .wait_for("the answer", RENDER_TIMEOUT, |r| {
            (r.is("PATCH", &original) && !r.files.is_empty()) || r.is("POST", &followup)
        })
        .await;
    let ephemeral = answer.flags() & 64 != 0;
    let sent = || -> usize {
        fake.requests()
            .iter()
            .filter(|r| r.is("PATCH", &original) || r.is("POST", &followup))
            .map(|r| r.files.len())
            .sum()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ephemeral && sent() < files && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (sent(), answer.content(), ephemeral)
}

fn send_cartoon(fake: &FakeDiscord, attachment: &Value, style: Option<&str>) -> String {
    let token = format!("tok{}", fake.next_id());
    fake.dispatch(
        "INTERACTION_CREATE",
        fake.command(
            &token,
            USER,
            Some(PERM_ALL_TEXT),
            FakeDiscord::cartoon_data(attachment, style, None),
        ),
    );
    token
}

/// One test for both, run one after the other: the bot's peak is this process's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_case_gets_a_clear_answer_from_the_command_line_and_the_bot() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let (data, mut table) = tokio::task::spawn_blocking(move || {
        let mut table = Vec::new();
        command_line_cases(&data, &mut table);
        (data, table)
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (fake, bot) = real_pipeline_bot(dir.path()).await;
    let files_before = files_under(dir.path());

    for case in photo_cases(&data) {
        let Photo {
            filename,
            content_type,
            bytes,
        } = case.photo;
        let attachment = fake.attachment(filename, content_type, bytes, None);
        reset_peak();
        let token = send_cartoon(&fake, &attachment, None);
        let expected = match case.bot {
            Expect::Faces(n) => 2 * n,
            Expect::Says(_) => 0,
        };
        let (files, text, ephemeral) = cartoon_answer(&fake, &token, expected).await;
        let peak = own_mb("VmHWM:");
        match case.bot {
            Expect::Faces(n) => {
                assert_eq!(
                    files,
                    2 * n,
                    "{}: a sticker and an avatar per face; {text}",
                    case.name
                )
            }
            Expect::Says(needle) => {
                assert!(ephemeral, "{}: ephemeral", case.name);
                assert!(
                    text.contains(needle),
                    "{}: {needle:?} in {text:?}",
                    case.name
                );
            }
        }
        report(&mut table, "bot", case.name, peak, BOT_PEAK_MB);
    }

    // Requests that only the bot gets.
    let ok_photo = std::fs::read(data.join("samples/groups/sample1.jpg")).unwrap();
    let mut off_host = fake.attachment("x.jpg", "image/jpeg", ok_photo.clone(), None);
    off_host["url"] = json!("https://example.com/x.jpg");
    let mut redirecting = fake.attachment("y.jpg", "image/jpeg", ok_photo.clone(), None);
    redirecting["url"] = json!(fake.host_redirect("y.jpg", "https://example.com/y.jpg"));
    let liar = fake.attachment(
        "liar.jpg",
        "image/jpeg",
        vec![0xFF; 30_000_000],
        Some(50_000),
    );
    let photo = fake.attachment("me.jpg", "image/jpeg", ok_photo, None);
    let requests = [
        (
            "photo off the allowed hosts",
            &off_host,
            None,
            "uploaded to Discord",
        ),
        (
            "photo redirecting off the allowed hosts",
            &redirecting,
            None,
            "couldn't download",
        ),
        ("declared 50 KB, really 30 MB", &liar, None, "too large"),
        (
            "style `../../etc`",
            &photo,
            Some("../../etc"),
            "no style called",
        ),
        (
            "style `p2c/../../models`",
            &photo,
            Some("p2c/../../models"),
            "no style called",
        ),
    ];
    for (name, attachment, style, needle) in requests {
        reset_peak();
        let token = send_cartoon(&fake, attachment, style);
        let (files, text, ephemeral) = cartoon_answer(&fake, &token, 0).await;
        let peak = own_mb("VmHWM:");
        assert_eq!(files, 0, "{name}");
        assert!(ephemeral, "{name}: ephemeral");
        assert!(text.contains(needle), "{name}: {needle:?} in {text:?}");
        report(&mut table, "bot", name, peak, BOT_PEAK_MB);
    }
    bot.shutdown().await;
    let mut left = files_under(dir.path());
    left.retain(|p| !files_before.contains(p) && !p.to_string_lossy().contains("toonbot.sqlite"));
    assert_eq!(left, Vec::<PathBuf>::new(), "no file left behind");

    // Style packs: a bot with packs (the test trainer), every bad upload refused or
    // trained without the bad entries, nothing left behind by a refusal.
    let p = Packs::start(TestTrainer::default(), |_| {}).await;
    for case in pack_cases() {
        let before = p.leftovers().await;
        let starts = p.trainer.starts().len();
        reset_peak();
        let token = p.upload(ADMIN_PERMS, case.zip, "pack", None);
        let answer = p.upload_answer(&token, case.bot).await;
        let peak = own_mb("VmHWM:");
        if answer.contains("images accepted") {
            p.wait_post("the evaluation", |r| {
                r.content().contains("**pack** is ready")
            })
            .await;
            // The run ends just after its "ready" post.
            let mut deleted = String::new();
            for _ in 0..100 {
                deleted =
                    p.h.callback(&p.admin("delete", Some("pack")))
                        .await
                        .content();
                if !deleted.contains("is training") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(deleted.contains("Deleted the style pack"), "{deleted}");
            assert_eq!(
                p.leftovers().await.0,
                before.0,
                "{}: files deleted",
                case.name
            );
        } else {
            assert_eq!(
                p.leftovers().await,
                before,
                "{}: no file, no row",
                case.name
            );
            assert_eq!(
                p.trainer.starts().len(),
                starts,
                "{}: no training",
                case.name
            );
        }
        report(&mut table, "bot", case.name, peak, BOT_PEAK_MB);
    }
    let before = p.leftovers().await;
    let starts = p.trainer.starts().len();
    let token = p.upload(MEMBER, pack_zip(12, &[]), "mine", None);
    assert_immediate_ephemeral(&p.h, &token, "Manage Server").await;
    for sub in ["publish", "delete"] {
        let options = json!([{ "name": "name", "type": 3, "value": "mine" }]);
        let token = p.h.command(
            USER,
            MEMBER,
            FakeDiscord::sub_command_data("stylepack", sub, options),
        );
        assert_immediate_ephemeral(&p.h, &token, "Manage Server").await;
    }
    assert_eq!(p.leftovers().await, before, "no file, no row");
    assert_eq!(p.trainer.starts().len(), starts, "no training");
    for name in ["../evil", "a/b", "..", "nul\0byte", "p2c\\..\\x", "ünïcode"] {
        let token = p.upload(ADMIN_PERMS, pack_zip(12, &[]), name, None);
        assert_immediate_ephemeral(&p.h, &token, "can't be a style name").await;
    }
    let liar = {
        let mut i = p.upload_interaction(ADMIN_PERMS, vec![0; 60_000_000], "liar", None);
        let id = i["data"]["options"][0]["options"][0]["value"]
            .as_str()
            .unwrap()
            .to_string();
        i["data"]["resolved"]["attachments"][&id]["size"] = json!(1000);
        i
    };
    let token = liar["token"].as_str().unwrap().to_string();
    p.h.fake.dispatch("INTERACTION_CREATE", liar);
    p.upload_answer(&token, "too large").await;
    assert_eq!(p.leftovers().await, before, "no file, no row");
    assert_eq!(p.trainer.starts().len(), starts, "no training");
    println!("{}", table.join("\n"));
}
