//! Reading an uploaded style-pack archive (.zip) without trusting it.
//!
//! [`read_pack`] refuses the whole archive when it is too large, declares too many entries,
//! names an entry that could escape a folder (`..`, absolute paths, backslashes, drive
//! letters), has an encrypted entry or a symbolic link, or expands past the per-entry or total limit. The
//! expanded size is counted while decompressing: the sizes the archive declares are never
//! trusted. Folders are ignored; macOS metadata, hidden files and entries that are not PNG,
//! JPEG or WebP images within the pixel limit are skipped and listed. Nothing is written to
//! disk.

use std::io::{Cursor, Read};

use crate::config::StylePackConfig;
use crate::imageops::{self, DecodeError};

/// An image from the archive, checked to decode within the limits (still encoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackImage {
    /// The entry's name in the archive.
    pub entry: String,
    /// The entry's bytes as decompressed (the encoded PNG, JPEG or WebP file).
    pub bytes: Vec<u8>,
}

/// Why an entry was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Under `__MACOSX/`: resource forks a Mac adds when zipping.
    MacMetadata,
    /// A file or folder whose name starts with a dot.
    Hidden,
    /// Not a PNG, JPEG or WebP image.
    NotAnImage,
    /// An image, but over the pixel limit.
    TooManyPixels {
        /// The image's width in pixels.
        width: u32,
        /// The image's height in pixels.
        height: u32,
        /// The most pixels an image may have (`max_image_pixels`).
        limit: u64,
    },
    /// Damaged: the image data or the archive entry cannot be read.
    Unreadable(String),
    /// Smaller than `min_image_side` on its short side.
    TooSmall {
        /// The image's width in pixels.
        width: u32,
        /// The image's height in pixels.
        height: u32,
        /// The shortest side allowed (`min_image_side`).
        min_side: u32,
    },
    /// Its long side is over `max_aspect_ratio` times its short side.
    Elongated {
        /// The image's width in pixels.
        width: u32,
        /// The image's height in pixels.
        height: u32,
    },
    /// The same picture as an earlier entry (resized or re-encoded copies included).
    Duplicate {
        /// The earlier entry it copies.
        of: String,
    },
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MacMetadata => write!(f, "macOS metadata"),
            Self::Hidden => write!(f, "hidden file"),
            Self::NotAnImage => write!(f, "not a PNG, JPEG or WebP image"),
            Self::TooManyPixels {
                width,
                height,
                limit,
            } => write!(
                f,
                "{width}x{height} is over the {:.1} megapixel limit",
                *limit as f64 / 1e6
            ),
            Self::Unreadable(_) => write!(f, "damaged, can't be read"),
            Self::TooSmall {
                width,
                height,
                min_side,
            } => write!(
                f,
                "too small ({width}x{height}; at least {min_side} px a side)"
            ),
            Self::Elongated { width, height } => {
                write!(f, "too long and narrow ({width}x{height}) to hold a face")
            }
            Self::Duplicate { of } => write!(f, "a copy of `{of}`"),
        }
    }
}

/// An entry that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The entry's name in the archive.
    pub entry: String,
    /// Why the entry was left out.
    pub reason: SkipReason,
}

/// The usable images of an archive, sorted by entry name, and what was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackArchive {
    /// The images that decode within the limits, sorted by entry name.
    pub images: Vec<PackImage>,
    /// The entries left out, each with its reason, shown to the uploader.
    pub skipped: Vec<Skipped>,
}

/// Why an archive was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    /// The upload is over `max_zip_bytes`; checked before anything is parsed.
    #[error("the archive is {bytes} bytes, over the {max} byte limit")]
    TooLarge {
        /// The upload's size in bytes.
        bytes: u64,
        /// The `max_zip_bytes` limit.
        max: u64,
    },
    /// No zip end-of-central-directory record was found, or the zip crate does not take it
    /// for an archive.
    #[error("not a zip archive")]
    NotAZip,
    /// The central directory or an entry's header cannot be read; holds the zip crate's message.
    #[error("the zip archive is damaged: {0}")]
    Corrupt(String),
    /// The archive declares or holds more entries than `max_entries`.
    #[error("the archive has {count} entries, over the limit of {max}")]
    TooManyEntries {
        /// The entry count the archive declares, or the one the zip crate found.
        count: u64,
        /// The `max_entries` limit.
        max: usize,
    },
    /// Two or more entries have the same name.
    #[error("the archive has several entries with the same name")]
    DuplicateNames,
    /// An entry's name could escape its folder (absolute path, `..`, backslash, drive letter
    /// or NUL); holds the name.
    #[error("the entry {0:?} has a path that could escape its folder")]
    UnsafePath(String),
    /// An entry is a symbolic link; holds its name.
    #[error("the entry {0:?} is a symbolic link")]
    Link(String),
    /// An entry is encrypted; holds its name.
    #[error("the entry {0:?} is encrypted")]
    Encrypted(String),
    /// One entry decompresses to more than `max_entry_bytes`.
    #[error("the entry {entry:?} expands to more than {max} bytes")]
    EntryExpandsTooMuch {
        /// The entry's name in the archive.
        entry: String,
        /// The `max_entry_bytes` limit.
        max: u64,
    },
    /// The entries together decompress to more than `max_total_bytes`.
    #[error("the archive expands to more than {max} bytes")]
    ArchiveExpandsTooMuch {
        /// The `max_total_bytes` limit.
        max: u64,
    },
    /// More than `max_images` entries decode as images.
    #[error("the archive has more than {max} images")]
    TooManyImages {
        /// The `max_images` limit.
        max: usize,
    },
    /// Fewer than `min_images` usable images remain once the skipped entries are left out.
    #[error("the archive has {found} usable images, fewer than {min}")]
    TooFewImages {
        /// The number of usable images found.
        found: usize,
        /// The `min_images` limit.
        min: usize,
        /// The entries left out, so that the uploader can see why so few images were usable.
        skipped: Vec<Skipped>,
    },
}

/// Reads and checks an uploaded archive against the `[stylepacks]` limits.
pub fn read_pack(bytes: &[u8], limits: &StylePackConfig) -> Result<PackArchive, ArchiveError> {
    if bytes.len() as u64 > limits.max_zip_bytes {
        return Err(ArchiveError::TooLarge {
            bytes: bytes.len() as u64,
            max: limits.max_zip_bytes,
        });
    }
    // The declared count is checked before the central directory is parsed, so that a small
    // archive of millions of empty entries is refused cheaply.
    let declared = declared_entries(bytes).ok_or(ArchiveError::NotAZip)?;
    if declared > limits.max_entries as u64 {
        return Err(ArchiveError::TooManyEntries {
            count: declared,
            max: limits.max_entries,
        });
    }
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| match e {
        zip::result::ZipError::InvalidArchive(_) => ArchiveError::Corrupt(e.to_string()),
        _ => ArchiveError::NotAZip,
    })?;
    if archive.has_duplicate_names() {
        return Err(ArchiveError::DuplicateNames);
    }
    if archive.len() > limits.max_entries {
        return Err(ArchiveError::TooManyEntries {
            count: archive.len() as u64,
            max: limits.max_entries,
        });
    }

    // Every entry's name and flags first: a dangerous entry refuses the archive before
    // anything is decompressed.
    let mut wanted = Vec::new();
    let mut skipped = Vec::new();
    for index in 0..archive.len() {
        let entry = archive
            .by_index_data(index)
            .map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
        let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
        if !is_safe_name(&name) || entry.enclosed_name().is_none() {
            return Err(ArchiveError::UnsafePath(name));
        }
        if entry.encrypted() {
            return Err(ArchiveError::Encrypted(name));
        }
        if entry.is_symlink() {
            return Err(ArchiveError::Link(name));
        }
        if entry.is_dir() {
            continue;
        }
        match name_skip_reason(&name) {
            Some(reason) => skipped.push(Skipped {
                entry: name,
                reason,
            }),
            None => wanted.push((index, name)),
        }
    }

    let decode_limits = limits.image_limits();
    let mut images = Vec::new();
    let mut hashes: Vec<(u64, String)> = Vec::new();
    let mut total = 0u64;
    for (index, name) in wanted {
        let room = limits.max_total_bytes.saturating_sub(total);
        let limit = limits.max_entry_bytes.min(room);
        let data = match read_entry(&mut archive, index, limit) {
            Ok(data) => data,
            Err(EntryError::OverLimit) if limit < limits.max_entry_bytes => {
                return Err(ArchiveError::ArchiveExpandsTooMuch {
                    max: limits.max_total_bytes,
                })
            }
            Err(EntryError::OverLimit) => {
                return Err(ArchiveError::EntryExpandsTooMuch {
                    entry: name,
                    max: limits.max_entry_bytes,
                })
            }
            Err(EntryError::Unreadable(why)) => {
                skipped.push(Skipped {
                    entry: name,
                    reason: SkipReason::Unreadable(why),
                });
                continue;
            }
        };
        total += data.len() as u64;
        match imageops::decode_photo(&data, &decode_limits) {
            Ok(image) => {
                if let Some(reason) = image_skip_reason(&image, limits, &mut hashes, &name) {
                    skipped.push(Skipped {
                        entry: name,
                        reason,
                    });
                    continue;
                }
                if images.len() == limits.max_images {
                    return Err(ArchiveError::TooManyImages {
                        max: limits.max_images,
                    });
                }
                images.push(PackImage {
                    entry: name,
                    bytes: data,
                });
            }
            Err(e) => skipped.push(Skipped {
                entry: name,
                reason: decode_skip_reason(e),
            }),
        }
    }
    if images.len() < limits.min_images {
        return Err(ArchiveError::TooFewImages {
            found: images.len(),
            min: limits.min_images,
            skipped,
        });
    }
    images.sort_by(|a, b| a.entry.cmp(&b.entry));
    Ok(PackArchive { images, skipped })
}

/// The entry count of the end-of-central-directory record; `None` when there is none (not a
/// zip). A Zip64 archive declares 0xFFFF here, which counts as that many entries.
fn declared_entries(bytes: &[u8]) -> Option<u64> {
    const SIGNATURE: [u8; 4] = [0x50, 0x4b, 0x05, 0x06];
    const RECORD_LEN: usize = 22;
    let last = bytes.len().checked_sub(RECORD_LEN)?;
    // The record ends the file, after a comment of at most 65535 bytes.
    let first = last.saturating_sub(usize::from(u16::MAX));
    (first..=last)
        .rev()
        .find(|&at| bytes[at..at + 4] == SIGNATURE)
        .map(|at| u64::from(u16::from_le_bytes([bytes[at + 10], bytes[at + 11]])))
}

/// Our own path checks, on top of the zip crate's `enclosed_name`: no absolute paths, no
/// backslashes (a Windows separator), no drive letters, no `..` component anywhere, no NUL.
fn is_safe_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    !name.is_empty()
        && !drive
        && !name.starts_with('/')
        && !name.contains(['\\', '\0'])
        && name.split('/').all(|part| part != "..")
}

fn name_skip_reason(name: &str) -> Option<SkipReason> {
    if name.starts_with("__MACOSX/") {
        Some(SkipReason::MacMetadata)
    } else if name.split('/').any(|part| part.starts_with('.')) {
        Some(SkipReason::Hidden)
    } else {
        None
    }
}

/// Hamming distance up to which two difference hashes are the same picture: resizing and
/// re-encoding flip a few bits; two different drawings differ in about half of them.
const DUPLICATE_HASH_BITS: u32 = 5;

/// Why a decoded image is no use to train on: too small, a strip, or a copy of one of the
/// earlier images (whose hashes are `seen`; this one's is added when it is kept).
fn image_skip_reason(
    image: &image::RgbImage,
    limits: &StylePackConfig,
    seen: &mut Vec<(u64, String)>,
    name: &str,
) -> Option<SkipReason> {
    let (width, height) = image.dimensions();
    let (short, long) = (width.min(height), width.max(height));
    if short < limits.min_image_side {
        return Some(SkipReason::TooSmall {
            width,
            height,
            min_side: limits.min_image_side,
        });
    }
    if long as f32 > short as f32 * limits.max_aspect_ratio {
        return Some(SkipReason::Elongated { width, height });
    }
    let hash = imageops::difference_hash(image);
    if let Some((_, of)) = seen
        .iter()
        .find(|(h, _)| (h ^ hash).count_ones() <= DUPLICATE_HASH_BITS)
    {
        return Some(SkipReason::Duplicate { of: of.clone() });
    }
    seen.push((hash, name.to_string()));
    None
}

fn decode_skip_reason(e: DecodeError) -> SkipReason {
    match e {
        DecodeError::NotAnImage | DecodeError::UnsupportedFormat(_) => SkipReason::NotAnImage,
        DecodeError::TooManyPixels {
            width,
            height,
            limit,
            ..
        } => SkipReason::TooManyPixels {
            width,
            height,
            limit,
        },
        other => SkipReason::Unreadable(other.to_string()),
    }
}

enum EntryError {
    OverLimit,
    Unreadable(String),
}

/// Decompresses one entry, stopping as soon as it passes `limit` bytes.
fn read_entry(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    index: usize,
    limit: u64,
) -> Result<Vec<u8>, EntryError> {
    let file = archive
        .by_index(index)
        .map_err(|e| EntryError::Unreadable(e.to_string()))?;
    let mut data = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| EntryError::Unreadable(e.to_string()))?;
    if data.len() as u64 > limit {
        return Err(EntryError::OverLimit);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use image::{Rgb, RgbImage};
    use zip::write::SimpleFileOptions;
    use zip::CompressionMethod;

    use super::*;

    fn limits() -> StylePackConfig {
        StylePackConfig {
            max_zip_bytes: 5_000_000,
            max_entries: 50,
            max_entry_bytes: 1_000_000,
            max_total_bytes: 3_000_000,
            max_image_pixels: 128 * 128,
            min_images: 3,
            max_images: 5,
            min_image_side: 12,
            ..StylePackConfig::default()
        }
    }

    /// A `side`-pixel square of noise drawn from `seed`: different seeds, different pictures.
    fn png(side: u32, seed: u8) -> Vec<u8> {
        png_sized(side, side, seed)
    }

    fn png_sized(width: u32, height: u32, seed: u8) -> Vec<u8> {
        let mut noise = crate::rng::SplitMix64(u64::from(seed));
        let img = RgbImage::from_fn(width, height, |_, _| {
            Rgb([(noise.next_u64() >> 56) as u8, 100, 200])
        });
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// A zip of (name, bytes) entries, deflated; names ending in `/` are folders.
    fn zip_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        for (name, bytes) in entries {
            if name.ends_with('/') {
                zip.add_directory(*name, options).unwrap();
            } else {
                zip.start_file(*name, options).unwrap();
                zip.write_all(bytes).unwrap();
            }
        }
        zip.finish().unwrap().into_inner()
    }

    fn faces(n: usize) -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| (format!("faces/{i:02}.png"), png(16, 100 + i as u8)))
            .collect()
    }

    fn with_faces(n: usize, extra: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let faces = faces(n);
        let mut entries: Vec<(&str, Vec<u8>)> = faces
            .iter()
            .map(|(name, bytes)| (name.as_str(), bytes.clone()))
            .collect();
        entries.extend(extra.iter().cloned());
        zip_of(&entries)
    }

    /// Offsets of every local header and central directory header (by signature).
    fn header_offsets(zip: &[u8], signature: [u8; 4]) -> Vec<usize> {
        (0..zip.len() - 4)
            .filter(|&i| zip[i..i + 4] == signature)
            .collect()
    }

    const LOCAL: [u8; 4] = [0x50, 0x4b, 0x03, 0x04];
    const CENTRAL: [u8; 4] = [0x50, 0x4b, 0x01, 0x02];

    #[test]
    fn a_good_pack_keeps_images_sorted_and_lists_what_it_skipped() {
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
        let zip = zip_of(&[
            ("faces/", vec![]),
            ("faces/b.png", png(16, 1)),
            ("faces/a.png", png(16, 2)),
            ("c.png", png(16, 3)),
            ("notes.txt", b"hello".to_vec()),
            ("__MACOSX/faces/._a.png", vec![0; 10]),
            (".DS_Store", vec![0; 10]),
            ("faces/big.png", png(200, 4)),
            ("faces/broken.png", b"\x89PNG\r\n\x1a\nnope".to_vec()),
            ("anim.gif", gif),
        ]);
        let pack = read_pack(&zip, &limits()).unwrap();
        let names: Vec<&str> = pack.images.iter().map(|i| i.entry.as_str()).collect();
        assert_eq!(names, ["c.png", "faces/a.png", "faces/b.png"]);
        assert_eq!(pack.images[0].bytes, png(16, 3));
        let skipped: Vec<(&str, &SkipReason)> = pack
            .skipped
            .iter()
            .map(|s| (s.entry.as_str(), &s.reason))
            .collect();
        assert_eq!(
            skipped[..3],
            [
                ("__MACOSX/faces/._a.png", &SkipReason::MacMetadata),
                (".DS_Store", &SkipReason::Hidden),
                ("notes.txt", &SkipReason::NotAnImage),
            ]
        );
        assert!(matches!(
            skipped[3],
            (
                "faces/big.png",
                SkipReason::TooManyPixels { width: 200, .. }
            )
        ));
        assert!(matches!(
            skipped[4],
            ("faces/broken.png", SkipReason::Unreadable(_))
        ));
        assert_eq!(skipped[5], ("anim.gif", &SkipReason::NotAnImage));
        assert_eq!(skipped.len(), 6);
    }

    #[test]
    fn anything_but_a_zip_is_refused() {
        for bytes in [b"".to_vec(), b"hello world".to_vec(), png(16, 0)] {
            assert_eq!(read_pack(&bytes, &limits()), Err(ArchiveError::NotAZip));
        }
        // A zip's end record with nothing before it.
        let mut fake = vec![0u8; 40];
        fake.extend_from_slice(&[0x50, 0x4b, 0x05, 0x06]);
        fake.extend_from_slice(&[0, 0, 0, 0, 1, 0, 1, 0, 46, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            read_pack(&fake, &limits()),
            Err(ArchiveError::Corrupt(_) | ArchiveError::NotAZip)
        ));
    }

    #[test]
    fn archives_over_the_size_limit_are_refused_before_reading() {
        let limits = StylePackConfig {
            max_zip_bytes: 100,
            ..limits()
        };
        assert_eq!(
            read_pack(&with_faces(3, &[]), &limits),
            Err(ArchiveError::TooLarge {
                bytes: with_faces(3, &[]).len() as u64,
                max: 100
            })
        );
    }

    #[test]
    fn paths_that_could_escape_refuse_the_archive() {
        for name in [
            "../evil.png",
            "faces/../../evil.png",
            "/etc/evil.png",
            "faces\\..\\evil.png",
            "C:/evil.png",
            "c:evil.png",
            "faces/..",
        ] {
            let zip = with_faces(3, &[(name, png(16, 9))]);
            assert_eq!(
                read_pack(&zip, &limits()),
                Err(ArchiveError::UnsafePath(name.to_string())),
                "{name}"
            );
        }
        // Dots inside a name are fine.
        assert!(read_pack(&with_faces(3, &[("a..b.png", png(16, 9))]), &limits()).is_ok());
    }

    #[test]
    fn an_encrypted_entry_refuses_the_archive() {
        let mut zip = with_faces(3, &[("secret.png", png(16, 9))]);
        // Set "encrypted" (general purpose bit 0) on the last entry, in both headers.
        let local = *header_offsets(&zip, LOCAL).last().unwrap();
        let central = *header_offsets(&zip, CENTRAL).last().unwrap();
        zip[local + 6] |= 1;
        zip[central + 8] |= 1;
        assert_eq!(
            read_pack(&zip, &limits()),
            Err(ArchiveError::Encrypted("secret.png".into()))
        );
    }

    #[test]
    fn a_zip_bomb_is_stopped_while_decompressing() {
        // 20 MB of zeros deflate to about 20 KB.
        let bomb = vec![0u8; 20_000_000];
        let zip = with_faces(3, &[("bomb.png", bomb.clone())]);
        assert!(zip.len() < 100_000, "{}", zip.len());
        assert_eq!(
            read_pack(&zip, &limits()),
            Err(ArchiveError::EntryExpandsTooMuch {
                entry: "bomb.png".into(),
                max: 1_000_000
            })
        );
        // Several entries under the per-entry limit, over the total.
        let parts: Vec<(String, Vec<u8>)> = (0..4)
            .map(|i| (format!("part{i}.bin"), vec![0u8; 900_000]))
            .collect();
        let entries: Vec<(&str, Vec<u8>)> =
            parts.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
        assert_eq!(
            read_pack(&zip_of(&entries), &limits()),
            Err(ArchiveError::ArchiveExpandsTooMuch { max: 3_000_000 })
        );
    }

    #[test]
    fn declared_sizes_are_not_trusted() {
        // A bomb that declares 100 bytes (in both headers) stops there and fails its checksum:
        // it is skipped as damaged, never expanded.
        let mut zip = with_faces(3, &[("liar.png", vec![0u8; 20_000_000])]);
        let local = *header_offsets(&zip, LOCAL).last().unwrap();
        let central = *header_offsets(&zip, CENTRAL).last().unwrap();
        zip[local + 22..local + 26].copy_from_slice(&100u32.to_le_bytes());
        zip[central + 24..central + 28].copy_from_slice(&100u32.to_le_bytes());
        let pack = read_pack(&zip, &limits()).unwrap();
        assert_eq!(pack.images.len(), 3);
        assert_eq!(pack.skipped[0].entry, "liar.png");
        assert!(matches!(pack.skipped[0].reason, SkipReason::Unreadable(_)));
        // One that declares more than it holds is cut at what it holds.
        let mut zip = with_faces(3, &[("short.png", png(16, 9))]);
        let local = *header_offsets(&zip, LOCAL).last().unwrap();
        let central = *header_offsets(&zip, CENTRAL).last().unwrap();
        zip[local + 22..local + 26].copy_from_slice(&50_000_000u32.to_le_bytes());
        zip[central + 24..central + 28].copy_from_slice(&50_000_000u32.to_le_bytes());
        let pack = read_pack(&zip, &limits()).unwrap();
        assert_eq!(pack.images.len(), 4, "{:?}", pack.skipped);
    }

    #[test]
    fn entry_and_image_counts_are_limited() {
        // Too many entries: refused from the end record, before parsing.
        let files: Vec<(String, Vec<u8>)> =
            (0..60).map(|i| (format!("{i}.txt"), vec![1])).collect();
        let entries: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
        assert_eq!(
            read_pack(&zip_of(&entries), &limits()),
            Err(ArchiveError::TooManyEntries { count: 60, max: 50 })
        );
        assert_eq!(
            read_pack(&with_faces(6, &[]), &limits()),
            Err(ArchiveError::TooManyImages { max: 5 })
        );
        assert!(read_pack(&with_faces(5, &[]), &limits()).is_ok());
    }

    #[test]
    fn too_few_images_are_refused_with_what_was_skipped() {
        assert_eq!(
            read_pack(&zip_of(&[]), &limits()),
            Err(ArchiveError::TooFewImages {
                found: 0,
                min: 3,
                skipped: vec![]
            })
        );
        match read_pack(&with_faces(2, &[("notes.txt", b"x".to_vec())]), &limits()) {
            Err(ArchiveError::TooFewImages {
                found: 2, skipped, ..
            }) => assert_eq!(
                skipped,
                [Skipped {
                    entry: "notes.txt".into(),
                    reason: SkipReason::NotAnImage
                }]
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn copies_tiny_images_and_strips_are_skipped() {
        // Resized and re-encoded copies: `imageops::difference_hash`'s test.
        let picture = png(64, 7);
        let zip = with_faces(
            3,
            &[
                ("a.png", picture.clone()),
                ("b.png", picture),
                ("tiny.png", png(8, 8)),
                ("strip.png", png_sized(100, 20, 9)),
            ],
        );
        let pack = read_pack(&zip, &limits()).unwrap();
        assert_eq!(pack.images.len(), 4);
        assert_eq!(
            pack.skipped,
            [
                Skipped {
                    entry: "b.png".into(),
                    reason: SkipReason::Duplicate { of: "a.png".into() }
                },
                Skipped {
                    entry: "tiny.png".into(),
                    reason: SkipReason::TooSmall {
                        width: 8,
                        height: 8,
                        min_side: 12
                    }
                },
                Skipped {
                    entry: "strip.png".into(),
                    reason: SkipReason::Elongated {
                        width: 100,
                        height: 20
                    }
                },
            ]
        );
    }

    #[test]
    fn ten_copies_of_one_image_are_refused() {
        let copies: Vec<(String, Vec<u8>)> = (0..10)
            .map(|i| (format!("copy{i}.png"), png(32, 5)))
            .collect();
        let entries: Vec<(&str, Vec<u8>)> = copies
            .iter()
            .map(|(n, b)| (n.as_str(), b.clone()))
            .collect();
        match read_pack(&zip_of(&entries), &limits()) {
            Err(ArchiveError::TooFewImages {
                found: 1, skipped, ..
            }) => {
                assert_eq!(skipped.len(), 9);
                assert!(skipped.iter().all(|s| s.reason
                    == SkipReason::Duplicate {
                        of: "copy0.png".into()
                    }));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut zip = with_faces(3, &[("aaaa.png", png(16, 1)), ("bbbb.png", png(16, 2))]);
        // Rename bbbb.png to aaaa.png in both headers.
        for offset in header_offsets(&zip, LOCAL)
            .into_iter()
            .chain(header_offsets(&zip, CENTRAL))
        {
            let name_at = if zip[offset + 2] == 3 { 30 } else { 46 };
            if zip[offset + name_at..offset + name_at + 8] == *b"bbbb.png" {
                zip[offset + name_at..offset + name_at + 4].copy_from_slice(b"aaaa");
            }
        }
        assert_eq!(
            read_pack(&zip, &limits()),
            Err(ArchiveError::DuplicateNames)
        );
    }
}
