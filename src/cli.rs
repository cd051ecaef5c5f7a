//! The CLI subcommands' work: read inputs, call the pipeline, write files and reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use serde::Serialize;

use crate::cartoon::compose::{self, ComposeOptions};
use crate::cartoon::{CartoonError, Cartoonizer};
use crate::config::Config;
use crate::face::{FacePipeline, PhotoFaces};
use crate::imageops;

/// `--device`: where the networks run.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

impl DeviceArg {
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => Device::new_cuda(0)
                .context("opening CUDA device 0 (is this build made with --features cuda?)"),
        }
    }
}

/// One line of `faces --json`.
#[derive(Debug, Serialize)]
pub struct PhotoReport {
    pub input: PathBuf,
    pub width: u32,
    pub height: u32,
    pub faces: Vec<FaceReport>,
    pub timings_ms: BTreeMap<&'static str, f64>,
}

#[derive(Debug, Serialize)]
pub struct FaceReport {
    pub score: f32,
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    pub landmarks: Vec<[f32; 2]>,
    pub roll_degrees: f32,
}

impl PhotoReport {
    fn new(input: &Path, found: &PhotoFaces, decode_ms: f64) -> Self {
        let mut timings_ms = found.timings.as_map();
        timings_ms.insert("decode", decode_ms);
        Self {
            input: input.to_path_buf(),
            width: found.width,
            height: found.height,
            faces: found
                .faces
                .iter()
                .map(|f| FaceReport {
                    score: f.detection.score,
                    bbox: f.detection.bbox,
                    landmarks: f.landmarks.0.to_vec(),
                    roll_degrees: f.alignment.roll_degrees,
                })
                .collect(),
            timings_ms,
        }
    }
}

/// `toonbot faces`: exit 0 when every photo gave a face, 2 when some photo had none or
/// could not be read (each named on stderr); the other photos are still processed.
pub fn faces(
    config: &Config,
    device: &Device,
    photos: &[PathBuf],
    out: &Path,
    json: bool,
) -> Result<ExitCode> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let pipeline = FacePipeline::load(config, device)?;
    let mut all_ok = true;
    for path in photos {
        let started = Instant::now();
        let photo = match imageops::load_photo(path, &config.limits) {
            Ok(photo) => photo,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                all_ok = false;
                continue;
            }
        };
        let decode_ms = started.elapsed().as_secs_f64() * 1e3;
        let found = pipeline.find_faces(&photo)?;
        if found.faces.is_empty() {
            eprintln!("{}: no face found", path.display());
            all_ok = false;
        }
        let stem = file_stem(path);
        for (i, face) in found.faces.iter().enumerate() {
            let n = i + 1;
            face.aligned
                .save(out.join(format!("{stem}.face{n}.aligned.png")))?;
            face.mask
                .save(out.join(format!("{stem}.face{n}.mask.png")))?;
        }
        if json {
            println!(
                "{}",
                serde_json::to_string(&PhotoReport::new(path, &found, decode_ms))?
            );
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// `toonbot prepare`: the largest face of every photo in `photos`, aligned and whitened,
/// as `out/{stem}.png`; prints what was skipped and why.
pub fn prepare(config: &Config, device: &Device, photos: &Path, out: &Path) -> Result<ExitCode> {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(photos)
        .with_context(|| format!("reading {}", photos.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    inputs.sort();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let pipeline = FacePipeline::load(config, device)?;
    let bar = indicatif::ProgressBar::new(inputs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}")
            .expect("valid template"),
    );
    let mut skipped: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut written = 0usize;
    for path in &inputs {
        bar.inc(1);
        let reason = match imageops::load_photo(path, &config.limits) {
            Err(e) => Some(e.to_string()),
            Ok(photo) => match pipeline.find_faces(&photo)?.faces.into_iter().next() {
                None => Some("no face found".to_string()),
                Some(face) => {
                    face.aligned
                        .save(out.join(format!("{}.png", file_stem(path))))?;
                    written += 1;
                    None
                }
            },
        };
        if let Some(reason) = reason {
            bar.println(format!("skipped {}: {reason}", path.display()));
            skipped.entry(reason).or_default().push(path.clone());
        }
    }
    bar.finish_and_clear();
    eprintln!(
        "prepared {written} of {} photos into {}",
        inputs.len(),
        out.display()
    );
    for (reason, paths) in &skipped {
        eprintln!("  skipped {} ({reason})", paths.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// One line of `cartoonize --json`.
#[derive(Debug, Serialize)]
pub struct CartoonReport {
    pub input: PathBuf,
    pub style: String,
    pub faces: Vec<CartoonFaceReport>,
    pub photo: PathBuf,
    pub timings_ms: BTreeMap<&'static str, f64>,
}

#[derive(Debug, Serialize)]
pub struct CartoonFaceReport {
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    pub sticker: PathBuf,
    pub avatar: PathBuf,
}

/// `toonbot cartoonize`: per face a sticker and an avatar, plus the whole photo with the
/// faces replaced. Exit 2 when some photo failed (named on stderr with the reason).
pub fn cartoonize(
    config: &Config,
    device: &Device,
    photos: &[PathBuf],
    out: &Path,
    style: Option<&str>,
    options: ComposeOptions,
    json: bool,
) -> Result<ExitCode> {
    let cartoonizer = Cartoonizer::load(config, device)?;
    // A missing style is the same for every photo: say it once, plainly.
    cartoonizer
        .generator(style)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut all_ok = true;
    for path in photos {
        let result = std::fs::read(path)
            .map_err(|e| CartoonError::Decode(e.into()))
            .and_then(|bytes| cartoonizer.cartoonize_bytes(&bytes, &config.limits, style, options));
        let result = match result {
            Ok(result) => result,
            Err(CartoonError::Internal(e)) => {
                return Err(e.context(format!("cartoonizing {}", path.display())))
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                all_ok = false;
                continue;
            }
        };
        let stem = file_stem(path);
        let mut faces = Vec::new();
        for (i, face) in result.faces.iter().enumerate() {
            let n = i + 1;
            let sticker = out.join(format!("{stem}.face{n}.sticker.png"));
            let avatar = out.join(format!("{stem}.face{n}.avatar.png"));
            std::fs::write(&sticker, compose::encode_png(&face.sticker))?;
            std::fs::write(&avatar, compose::encode_png(&face.avatar))?;
            faces.push(CartoonFaceReport {
                bbox: face.face.detection.bbox,
                sticker,
                avatar,
            });
        }
        let photo = out.join(format!("{stem}.cartoon.png"));
        std::fs::write(&photo, compose::encode_png(&result.photo))?;
        if json {
            let report = CartoonReport {
                input: path.clone(),
                style: result.style,
                faces,
                photo,
                timings_ms: result.timings,
            };
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// `toonbot serve`: the Discord bot with the cartoon pipeline behind its queue.
pub fn serve(config: &Config, device: &Device) -> Result<ExitCode> {
    let token = crate::bot::load_token(&config.bot)?;
    let cartoonizer = Cartoonizer::load(config, device)?;
    let renderer = crate::jobs::CartoonRenderer::new(
        cartoonizer,
        config.limits.clone(),
        config.styles.default.clone(),
    );
    tokio::runtime::Runtime::new()?.block_on(crate::bot::serve(
        config.bot.clone(),
        token,
        std::sync::Arc::new(renderer),
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `toonbot bench`: prints the stage table (or JSON).
#[allow(clippy::too_many_arguments)]
pub fn bench(
    config: &Config,
    device: &Device,
    photo: &Path,
    style: Option<&str>,
    runs: usize,
    reference_python: Option<&Path>,
    json: bool,
    profile: bool,
) -> Result<ExitCode> {
    let mut report = crate::bench::run(config, device, photo, style, runs, profile)?;
    if let Some(python) = reference_python {
        report.reference = Some(crate::bench::reference_timing(python, runs)?);
    }
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(ExitCode::SUCCESS)
}

/// `toonbot styles`: one line per installed style.
pub fn styles(config: &Config) -> Result<ExitCode> {
    let registry = crate::cartoon::styles::StyleRegistry::from_config(config);
    let styles = registry.list();
    if styles.is_empty() {
        println!("no styles installed (train one with `toonbot train base`)");
    }
    for s in styles {
        let origin = if s.shipped { "shipped" } else { "trained" };
        println!("{:<20} {origin:<8} {}", s.name, s.description);
    }
    Ok(ExitCode::SUCCESS)
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "photo".into())
}
