//! What the bot reads from a Discord attachment before downloading it (URL, file name,
//! declared size and type) and from command options (style names, the output kind): the
//! checks must never panic, and what they let through must be what they promise.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use toonbot::bot::download::{Downloader, PhotoRef};
use toonbot::cartoon::styles::is_valid_name;
use toonbot::jobs::OutputKind;

#[derive(Debug, Arbitrary)]
struct Attachment {
    url: String,
    filename: String,
    size: u64,
    content_type: Option<String>,
    option: String,
}

const MAX_BYTES: u64 = 20_000_000;

fuzz_target!(|a: Attachment| {
    let hosts = ["cdn.discordapp.com".to_string(), "127.0.0.1".to_string()];
    let downloader = Downloader::new(&hosts, MAX_BYTES, Duration::from_secs(1)).unwrap();
    let photo = PhotoRef {
        url: a.url,
        filename: a.filename,
        size: a.size,
        content_type: a.content_type,
    };
    if downloader.check(&photo).is_ok() {
        assert!(photo.size <= MAX_BYTES);
        assert!(photo.is_supported_image() && photo.is_image());
        let url = url::Url::parse(&photo.url).expect("a checked URL parses");
        let host = url.host_str().unwrap_or("").to_ascii_lowercase();
        assert!(hosts.contains(&host), "{host} let through");
        assert!(url.scheme() == "https" || (host == "127.0.0.1" && url.scheme() == "http"));
    }
    if is_valid_name(&a.option) {
        let dir = std::path::Path::new("/styles").join(&a.option);
        assert_eq!(dir.parent(), Some(std::path::Path::new("/styles")));
        assert!(!a.option.starts_with('.'), "{:?}", a.option);
    }
    if let Ok(kind) = a.option.parse::<OutputKind>() {
        assert_eq!(kind.to_string().parse::<OutputKind>().ok(), Some(kind));
    }
});
