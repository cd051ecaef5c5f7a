//! Attachments (photos, style-pack archives): checks before downloading, and a download that
//! stops at the byte limit.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::Url;

/// An attachment as Discord describes it (before downloading).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhotoRef {
    /// Where Discord serves the file.
    pub url: String,
    /// The file's name as uploaded.
    pub filename: String,
    /// Declared size in bytes.
    pub size: u64,
    /// MIME type Discord declared, if any.
    pub content_type: Option<String>,
}

impl PhotoRef {
    /// The reference to a message attachment.
    pub fn from_attachment(a: &serenity::all::Attachment) -> Self {
        Self {
            url: a.url.clone(),
            filename: a.filename.clone(),
            size: u64::from(a.size),
            content_type: a.content_type.clone(),
        }
    }

    /// Whether it looks like a photo we accept (by content type, else by file name).
    pub fn is_supported_image(&self) -> bool {
        match &self.content_type {
            Some(ct) => {
                let ct = ct
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                matches!(
                    ct.as_str(),
                    "image/png" | "image/jpeg" | "image/jpg" | "image/webp"
                )
            }
            None => {
                let name = self.filename.to_ascii_lowercase();
                [".png", ".jpg", ".jpeg", ".webp"]
                    .iter()
                    .any(|ext| name.ends_with(ext))
            }
        }
    }

    /// Whether it is an image at all (for picking the photo among a message's attachments).
    pub fn is_image(&self) -> bool {
        self.content_type
            .as_deref()
            .is_some_and(|ct| ct.starts_with("image/"))
            || self.is_supported_image()
    }
}

/// Why a photo could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhotoError {
    /// The declared type (or the file name) is not PNG, JPEG or WebP; holds what was declared.
    #[error("not a supported image type ({0})")]
    NotAnImage(String),
    /// The file is over the byte limit.
    #[error("the photo is {size} bytes, over the {max} byte limit")]
    TooLarge {
        /// The declared size, or the bytes received when the download went past `max`.
        size: u64,
        /// The byte limit.
        max: u64,
    },
    /// The URL is not https on an allowed host; holds the host (or the URL when it did not
    /// parse).
    #[error("downloads from {0} are not allowed")]
    HostNotAllowed(String),
    /// The request failed or the server answered with an error status.
    #[error("download failed: {0}")]
    Download(String),
}

impl PhotoError {
    /// A short stable code for logs and the jobs table.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotAnImage(_) => "not_an_image",
            Self::TooLarge { .. } => "too_large",
            Self::HostNotAllowed(_) => "host_not_allowed",
            Self::Download(_) => "download",
        }
    }
}

/// Downloads photos from the allowed hosts only, within the byte limit.
#[derive(Debug, Clone)]
pub struct Downloader {
    client: reqwest::Client,
    allowed_hosts: Vec<String>,
    max_bytes: u64,
}

impl Downloader {
    /// A client that follows no redirects, downloads only from `allowed_hosts` (compared
    /// case-insensitively) and gives up after `timeout`; `max_bytes` bounds photos.
    pub fn new(
        allowed_hosts: &[String],
        max_bytes: u64,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            // A redirect could leave the allowed hosts.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .build()?;
        let allowed_hosts = allowed_hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        Ok(Self {
            client,
            allowed_hosts,
            max_bytes,
        })
    }

    /// Checks what Discord declared (type, size, host) without downloading anything.
    pub fn check(&self, photo: &PhotoRef) -> Result<(), PhotoError> {
        if !photo.is_supported_image() {
            let what = photo
                .content_type
                .clone()
                .unwrap_or_else(|| photo.filename.clone());
            return Err(PhotoError::NotAnImage(what));
        }
        self.check_file(photo, self.max_bytes)
    }

    /// Checks a file of any type: its declared size against `max_bytes`, and its host.
    pub fn check_file(&self, file: &PhotoRef, max_bytes: u64) -> Result<(), PhotoError> {
        if file.size > max_bytes {
            return Err(PhotoError::TooLarge {
                size: file.size,
                max: max_bytes,
            });
        }
        self.check_url(&file.url).map(|_| ())
    }

    fn check_url(&self, url: &str) -> Result<Url, PhotoError> {
        let parsed = Url::parse(url).map_err(|_| PhotoError::HostNotAllowed(url.to_string()))?;
        let host = parsed.host_str().unwrap_or("").to_ascii_lowercase();
        let loopback = host == "localhost"
            || host
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let scheme_ok = parsed.scheme() == "https" || (loopback && parsed.scheme() == "http");
        if !scheme_ok || !self.allowed_hosts.contains(&host) {
            return Err(PhotoError::HostNotAllowed(host));
        }
        Ok(parsed)
    }

    /// Downloads the photo, stopping as soon as it exceeds the byte limit.
    pub async fn fetch(&self, photo: &PhotoRef) -> Result<Vec<u8>, PhotoError> {
        self.check(photo)?;
        self.download(photo, self.max_bytes).await
    }

    /// Downloads a file of any type, stopping as soon as it exceeds `max_bytes`.
    pub async fn fetch_file(&self, file: &PhotoRef, max_bytes: u64) -> Result<Vec<u8>, PhotoError> {
        self.check_file(file, max_bytes)?;
        self.download(file, max_bytes).await
    }

    async fn download(&self, file: &PhotoRef, max_bytes: u64) -> Result<Vec<u8>, PhotoError> {
        let url = self.check_url(&file.url)?;
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| PhotoError::Download(e.without_url().to_string()))?;
        if !response.status().is_success() {
            return Err(PhotoError::Download(format!("HTTP {}", response.status())));
        }
        if let Some(len) = response.content_length().filter(|&n| n > max_bytes) {
            return Err(PhotoError::TooLarge {
                size: len,
                max: max_bytes,
            });
        }
        let mut bytes = Vec::with_capacity(file.size.min(max_bytes) as usize);
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| PhotoError::Download(e.without_url().to_string()))?
        {
            if (bytes.len() + chunk.len()) as u64 > max_bytes {
                return Err(PhotoError::TooLarge {
                    size: (bytes.len() + chunk.len()) as u64,
                    max: max_bytes,
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo(url: &str, size: u64, ct: Option<&str>) -> PhotoRef {
        PhotoRef {
            url: url.into(),
            filename: "me.jpg".into(),
            size,
            content_type: ct.map(String::from),
        }
    }

    #[test]
    fn checks_type_size_and_host_before_downloading() {
        let hosts = vec!["cdn.discordapp.com".to_string(), "127.0.0.1".to_string()];
        let d = Downloader::new(&hosts, 1000, Duration::from_secs(1)).unwrap();
        let ok = "https://cdn.discordapp.com/attachments/1/2/me.jpg";
        assert_eq!(d.check(&photo(ok, 10, Some("image/jpeg"))), Ok(()));
        assert_eq!(d.check(&photo(ok, 10, None)), Ok(()));
        assert!(matches!(
            d.check(&photo(ok, 10, Some("image/gif"))),
            Err(PhotoError::NotAnImage(_))
        ));
        assert!(matches!(
            d.check(&photo(ok, 1001, Some("image/png"))),
            Err(PhotoError::TooLarge { .. })
        ));
        for bad in [
            "http://cdn.discordapp.com/a.jpg",
            "https://evil.example/a.jpg",
            "https://cdn.discordapp.com.evil.example/a.jpg",
            "file:///etc/passwd",
            "not a url",
        ] {
            assert!(
                matches!(
                    d.check(&photo(bad, 10, Some("image/png"))),
                    Err(PhotoError::HostNotAllowed(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(
            d.check(&photo("http://127.0.0.1:9/a.png", 10, Some("image/png"))),
            Ok(())
        );
    }
}
