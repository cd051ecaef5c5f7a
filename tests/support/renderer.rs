//! A [`Renderer`] for tests: real PNGs of the right sizes, call counting, a gate and a delay
//! for queue tests, and each [`RenderError`] on a trigger input.
//!
//! Test photos come from [`photo`]: a small PNG whose first pixels say how many faces it has,
//! which behaviour to trigger, and a tag identifying it.
//!
//! Besides its two built-in styles, it can offer the styles installed in a folder (as the
//! style registry sees them), checking that their generator weights load.

use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use image::{ImageFormat, Rgba, RgbaImage};
use toonbot::cartoon::styles::StyleRegistry;
use toonbot::jobs::{
    FileKind, OutputKind, RenderError, RenderOutput, RenderRequest, RenderedFile, Renderer,
    StyleInfo,
};

pub const STICKER_SIZE: u32 = 320;
pub const AVATAR_SIZE: u32 = 512;
pub const STYLES: [&str; 2] = ["classic", "ink"];

/// What a test photo makes the renderer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Normal = 0,
    Internal = 1,
    Panic = 2,
    TooLarge = 3,
}

/// A 16x16 PNG: pixel (0,0) = (faces, trigger, 0), pixel (1,0) = the tag's three bytes.
pub fn photo(faces: u8, trigger: Trigger, tag: u32) -> Vec<u8> {
    let mut img = RgbaImage::from_pixel(16, 16, Rgba([200, 180, 160, 255]));
    img.put_pixel(0, 0, Rgba([faces, trigger as u8, 0, 255]));
    let [_, a, b, c] = tag.to_be_bytes();
    img.put_pixel(1, 0, Rgba([a, b, c, 255]));
    png(&img)
}

pub fn png(img: &RgbaImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)
        .expect("encoding a PNG");
    out.into_inner()
}

/// The tag of a test photo (for checking the order of renders).
pub fn tag_of(image: &[u8]) -> Option<u32> {
    let img = image::load_from_memory(image).ok()?.to_rgba8();
    let p = img.get_pixel(1, 0).0;
    Some(u32::from_be_bytes([0, p[0], p[1], p[2]]))
}

#[derive(Debug, Clone)]
pub struct RenderCall {
    pub tag: Option<u32>,
    pub style: Option<String>,
    pub output: OutputKind,
    pub outline: bool,
    pub round_avatar: bool,
    pub thread: String,
    pub started: Instant,
    pub finished: Instant,
}

pub struct TestRenderer {
    calls: AtomicUsize,
    log: Mutex<Vec<RenderCall>>,
    delay: Mutex<Duration>,
    gate: Mutex<bool>,
    gate_changed: Condvar,
    /// Renders currently blocked on the gate or running.
    active: AtomicUsize,
    /// Installed styles offered besides the built-in ones.
    registry: Option<StyleRegistry>,
}

impl Default for TestRenderer {
    fn default() -> Self {
        Self {
            calls: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            delay: Mutex::new(Duration::ZERO),
            gate: Mutex::new(true),
            gate_changed: Condvar::new(),
            active: AtomicUsize::new(0),
            registry: None,
        }
    }
}

impl TestRenderer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also offers the styles installed in `dir` (trained styles, as in `styles.dir`).
    pub fn with_styles_dir(dir: &Path) -> Self {
        Self {
            registry: Some(StyleRegistry::new(dir, dir)),
            ..Self::default()
        }
    }

    /// An installed style's generator weights, loaded (a real safetensors file, not empty).
    fn check_installed(&self, name: &str) -> Option<()> {
        let style = self.registry.as_ref()?.find(name).ok()?;
        let tensors =
            candle_core::safetensors::load(style.weights(), &candle_core::Device::Cpu).ok()?;
        (!tensors.is_empty()).then_some(())
    }

    /// Renders started so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Renders currently in `render` (blocked on the gate or sleeping).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Finished renders, in order.
    pub fn log(&self) -> Vec<RenderCall> {
        self.log.lock().unwrap().clone()
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    /// While closed, every render waits (at most 10 s) before doing anything.
    pub fn close_gate(&self) {
        *self.gate.lock().unwrap() = false;
    }

    pub fn open_gate(&self) {
        *self.gate.lock().unwrap() = true;
        self.gate_changed.notify_all();
    }

    fn wait_gate(&self) {
        let guard = self.gate.lock().unwrap();
        let _ = self
            .gate_changed
            .wait_timeout_while(guard, Duration::from_secs(10), |open| !*open)
            .unwrap();
    }

    fn render_inner(&self, request: &RenderRequest) -> Result<RenderOutput, RenderError> {
        self.wait_gate();
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let style = request
            .style
            .clone()
            .unwrap_or_else(|| STYLES[0].to_string());
        if !STYLES.contains(&style.as_str()) && self.check_installed(&style).is_none() {
            return Err(RenderError::StyleMissing {
                name: style,
                available: self.styles().into_iter().map(|s| s.name).collect(),
            });
        }
        let img = image::load_from_memory(&request.image)
            .map_err(|_| RenderError::NotAnImage)?
            .to_rgba8();
        let p = img.get_pixel(0, 0).0;
        let (faces, trigger) = (p[0] as usize, p[1]);
        match trigger {
            1 => return Err(RenderError::Internal("test trigger".into())),
            2 => panic!("test renderer panic"),
            3 => {
                return Err(RenderError::TooLarge(
                    "40000001 pixels, limit 40000000".into(),
                ))
            }
            _ => {}
        }
        if faces == 0 {
            return Err(RenderError::NoFace);
        }
        let mut files = Vec::new();
        let t = Instant::now();
        for face in 1..=faces {
            let shade = (face * 40) as u8;
            if request.output != OutputKind::Avatar && request.output != OutputKind::Photo {
                let mut sticker =
                    RgbaImage::from_pixel(STICKER_SIZE, STICKER_SIZE, Rgba([0, 0, 0, 0]));
                for y in 60..260 {
                    for x in 60..260 {
                        sticker.put_pixel(x, y, Rgba([shade, 100, 200, 255]));
                    }
                }
                files.push(RenderedFile {
                    name: format!("face{face}-sticker.png"),
                    kind: FileKind::Sticker,
                    png: png(&sticker),
                });
            }
            if request.output == OutputKind::Avatar || request.output == OutputKind::Both {
                let avatar =
                    RgbaImage::from_pixel(AVATAR_SIZE, AVATAR_SIZE, Rgba([shade, 150, 90, 255]));
                files.push(RenderedFile {
                    name: format!("face{face}-avatar.png"),
                    kind: FileKind::Avatar,
                    png: png(&avatar),
                });
            }
        }
        if request.output == OutputKind::Photo {
            let photo =
                RgbaImage::from_pixel(img.width() * 4, img.height() * 4, Rgba([9, 9, 9, 255]));
            files.push(RenderedFile {
                name: "photo.png".into(),
                kind: FileKind::Photo,
                png: png(&photo),
            });
        }
        Ok(RenderOutput {
            files,
            faces,
            faces_found: faces,
            style,
            timings_ms: vec![("draw".into(), t.elapsed().as_secs_f64() * 1000.0)],
        })
    }
}

impl Renderer for TestRenderer {
    fn render(&self, request: &RenderRequest) -> Result<RenderOutput, RenderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.active.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        // Record even when the render panics.
        struct Record<'a>(&'a TestRenderer, &'a RenderRequest, Instant);
        impl Drop for Record<'_> {
            fn drop(&mut self) {
                let (r, request) = (self.0, self.1);
                r.active.fetch_sub(1, Ordering::SeqCst);
                r.log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(RenderCall {
                        tag: tag_of(&request.image),
                        style: request.style.clone(),
                        output: request.output,
                        outline: request.outline,
                        round_avatar: request.round_avatar,
                        thread: std::thread::current().name().unwrap_or("").to_string(),
                        started: self.2,
                        finished: Instant::now(),
                    });
            }
        }
        let _record = Record(self, request, started);
        self.render_inner(request)
    }

    fn styles(&self) -> Vec<StyleInfo> {
        let installed = self
            .registry
            .iter()
            .flat_map(|r| r.list())
            .map(|s| StyleInfo {
                preview_png: s.preview().and_then(|p| std::fs::read(p).ok()),
                name: s.name,
                description: s.description,
                is_default: false,
            });
        STYLES
            .iter()
            .enumerate()
            .map(|(i, name)| StyleInfo {
                name: name.to_string(),
                description: format!("the {name} look"),
                is_default: i == 0,
                preview_png: (i == 0)
                    .then(|| png(&RgbaImage::from_pixel(64, 64, Rgba([1, 2, 3, 255])))),
            })
            .chain(installed)
            .collect()
    }

    /// A built-in style is its name; an installed one the hash of its weights, as the real
    /// renderer's.
    fn style_version(&self, style: Option<&str>) -> Option<String> {
        let name = style.unwrap_or(STYLES[0]);
        if STYLES.contains(&name) {
            return Some(name.to_string());
        }
        let info = self.registry.as_ref()?.find(name).ok()?;
        std::fs::read(info.weights())
            .ok()
            .map(|weights| toonbot::sha256_hex(&weights))
    }
}
