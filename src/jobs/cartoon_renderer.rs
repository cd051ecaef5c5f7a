//! The real [`Renderer`]: the cartoon pipeline behind the job queue.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{
    FileKind, OutputKind, RenderError, RenderOutput, RenderRequest, RenderedFile, Renderer,
    StyleInfo,
};
use crate::cartoon::compose::{encode_png, ComposeOptions};
use crate::cartoon::styles::StyleError;
use crate::cartoon::{CartoonError, Cartoonizer};
use crate::config::Limits;
use crate::imageops::DecodeError;

/// How long a snapshot of the installed styles is reused (`styles` is called from async code).
const STYLES_TTL: Duration = Duration::from_secs(10);

/// Runs render requests through a [`Cartoonizer`] and encodes the results as PNG files; caches
/// the style list for 10 seconds.
pub struct CartoonRenderer {
    cartoonizer: Cartoonizer,
    limits: Limits,
    default_style: String,
    styles: Mutex<Option<(Instant, Vec<StyleInfo>)>>,
}

impl CartoonRenderer {
    /// `limits` bounds the photos it decodes; `default_style` is used when a request names none.
    pub fn new(cartoonizer: Cartoonizer, limits: Limits, default_style: String) -> Self {
        Self {
            cartoonizer,
            limits,
            default_style,
            styles: Mutex::new(None),
        }
    }

    fn scan_styles(&self) -> Vec<StyleInfo> {
        self.cartoonizer
            .styles()
            .into_iter()
            .map(|s| StyleInfo {
                is_default: s.name == self.default_style,
                preview_png: s.preview().and_then(|p| std::fs::read(p).ok()),
                name: s.name,
                description: s.description,
            })
            .collect()
    }

    fn available(&self) -> Vec<String> {
        self.styles().into_iter().map(|s| s.name).collect()
    }

    fn to_render_error(&self, error: CartoonError) -> RenderError {
        match error {
            CartoonError::Decode(
                DecodeError::TooManyBytes { .. } | DecodeError::TooManyPixels { .. },
            ) => RenderError::TooLarge(error.to_string()),
            CartoonError::Decode(DecodeError::Io(e)) => RenderError::Internal(e.to_string()),
            CartoonError::Decode(_) => RenderError::NotAnImage,
            CartoonError::Style(StyleError::NoneInstalled { .. }) => RenderError::NoStyleInstalled,
            CartoonError::Style(StyleError::NotFound { name, available }) => {
                RenderError::StyleMissing { name, available }
            }
            CartoonError::Style(StyleError::InvalidName(name)) => RenderError::StyleMissing {
                name,
                available: self.available(),
            },
            CartoonError::NoFace => RenderError::NoFace,
            CartoonError::Internal(e) => RenderError::Internal(format!("{e:#}")),
        }
    }
}

impl Renderer for CartoonRenderer {
    fn render(&self, request: &RenderRequest) -> Result<RenderOutput, RenderError> {
        let options = ComposeOptions {
            outline: request.outline,
            round_avatar: request.round_avatar,
        };
        let result = self
            .cartoonizer
            .cartoonize_bytes(
                &request.image,
                &self.limits,
                request.style.as_deref(),
                options,
            )
            .map_err(|e| self.to_render_error(e))?;
        let started = Instant::now();
        let mut files = Vec::new();
        for (i, face) in result.faces.iter().enumerate() {
            let n = i + 1;
            if matches!(request.output, OutputKind::Sticker | OutputKind::Both) {
                files.push(RenderedFile {
                    name: format!("face{n}-sticker.png"),
                    kind: FileKind::Sticker,
                    png: encode_png(&face.sticker),
                });
            }
            if matches!(request.output, OutputKind::Avatar | OutputKind::Both) {
                files.push(RenderedFile {
                    name: format!("face{n}-avatar.png"),
                    kind: FileKind::Avatar,
                    png: encode_png(&face.avatar),
                });
            }
        }
        if request.output == OutputKind::Photo {
            files.push(RenderedFile {
                name: "photo.png".into(),
                kind: FileKind::Photo,
                png: encode_png(&result.photo),
            });
        }
        let mut timings: HashMap<String, f64> = result
            .timings
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        timings.insert("encode".into(), started.elapsed().as_secs_f64() * 1e3);
        let mut timings_ms: Vec<(String, f64)> = timings.into_iter().collect();
        timings_ms.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(RenderOutput {
            files,
            faces: result.faces.len(),
            faces_found: result.faces_found,
            style: result.style,
            timings_ms,
        })
    }

    fn style_version(&self, style: Option<&str>) -> Option<String> {
        self.cartoonizer.style_version(style).ok()
    }

    fn styles(&self) -> Vec<StyleInfo> {
        let mut cached = self.styles.lock().expect("styles cache lock");
        match cached.as_ref() {
            Some((at, styles)) if at.elapsed() < STYLES_TTL => styles.clone(),
            _ => {
                let styles = self.scan_styles();
                *cached = Some((Instant::now(), styles.clone()));
                styles
            }
        }
    }
}
