//! `imageops::decode_photo` (format sniffing, the pixel limit before decoding, EXIF
//! orientation) on arbitrary bytes: an image within the limit or a clear error, never a panic,
//! and never an allocation far past what the limit allows (run with `-malloc_limit_mb`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use toonbot::config::Limits;
use toonbot::imageops::decode_photo;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_bytes: 1 << 20,
        max_pixels: 1 << 20,
    };
    if let Ok(image) = decode_photo(data, &limits) {
        let (w, h) = image.dimensions();
        assert!(u64::from(w) * u64::from(h) <= limits.max_pixels);
    }
});
