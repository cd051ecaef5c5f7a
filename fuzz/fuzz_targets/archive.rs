//! `stylepack::archive::read_pack` on arbitrary bytes, with small limits so that the limit
//! paths are reached: it must answer (accept or refuse) without panicking, and whatever it
//! accepts must respect the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toonbot::config::StylePackConfig;
use toonbot::stylepack::archive::read_pack;

fuzz_target!(|data: &[u8]| {
    let limits = StylePackConfig {
        max_zip_bytes: 1 << 20,
        max_entries: 64,
        max_entry_bytes: 1 << 20,
        max_total_bytes: 4 << 20,
        max_image_pixels: 512 * 512,
        min_images: 1,
        max_images: 16,
        min_image_side: 1,
        ..StylePackConfig::default()
    };
    if let Ok(pack) = read_pack(data, &limits) {
        assert!(!pack.images.is_empty() && pack.images.len() <= limits.max_images);
        let total: usize = pack.images.iter().map(|i| i.bytes.len()).sum();
        assert!(total as u64 <= limits.max_total_bytes);
        for image in &pack.images {
            assert!(image.bytes.len() as u64 <= limits.max_entry_bytes);
            assert!(!image.entry.starts_with('/') && !image.entry.contains('\\'));
            assert!(image.entry.split('/').all(|part| part != ".."));
        }
    }
});
