//! `toonbot bench`: the median time of each pipeline stage on this machine, per face, the
//! whole photo against the generator alone on the same faces, and the generator at batch 1
//! and 4 (or the batch sizes asked for).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::cartoon::compose::{self, ComposeOptions};
use crate::cartoon::{self, Cartoonizer};
use crate::config::Config;
use crate::face::Face;
use crate::imageops;
use crate::nets::generator::{self, Generator};

/// What `toonbot bench` measured; printed as JSON with `--json`, else as [`BenchReport::table`].
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The device the networks ran on, as candle prints it.
    pub device: String,
    /// The photo timed.
    pub photo: String,
    /// Faces found in the photo (the per-face times divide by it).
    pub faces: usize,
    /// Timed runs behind each median (after one warm-up run).
    pub runs: usize,
    /// Where the generator's weights came from (timings do not depend on their values).
    pub generator_weights: String,
    /// Median milliseconds per face for each stage of a whole-photo run.
    pub stages_ms_per_face: BTreeMap<String, f64>,
    /// Median milliseconds per face of a whole-photo run (decode to encoded PNGs: the sum
    /// of the stages).
    pub end_to_end_ms_per_face: f64,
    /// Median milliseconds per face of the generator alone on the run's own faces (the
    /// pipeline's generator input), timed right after each whole-photo run.
    pub generator_alone_ms_per_face: f64,
    /// Median over runs of (whole-photo time / generator-alone time) within the run: the
    /// pairing cancels the machine's drift, which moves both alike.
    pub end_to_end_ratio: f64,
    /// Median milliseconds per image of the generator alone, by batch size.
    pub generator_ms_per_image: BTreeMap<usize, f64>,
    /// The PyTorch reference's CPU time for the same generator, when measured.
    pub reference: Option<ReferenceTiming>,
    /// With `--profile`: median ms of each generator stage at batch 1.
    pub profile: Option<StageProfile>,
}

/// `--profile`: the generator's time per stage at batch 1, with and without the CPU fast path.
#[derive(Debug, Serialize)]
pub struct StageProfile {
    /// Whether the default path is the CPU fast path (`kernels::cpu_ops`).
    pub cpu_fast_path: bool,
    /// Median times of each stage in forward order, on the default path.
    pub stages: Vec<StageMs>,
    /// The same with the fast path turned off (plain candle ops), when it was on.
    pub candle_stages: Option<Vec<StageMs>>,
}

/// One generator stage's median time.
#[derive(Debug, Serialize)]
pub struct StageMs {
    /// The stage's name, as the generator's profiled forward pass reports it.
    pub stage: String,
    /// Wall-clock milliseconds.
    pub wall_ms: f64,
    /// CPU time of all threads (steadier than wall time on a shared machine).
    pub cpu_ms: f64,
}

/// The PyTorch reference generator's CPU times, as `tools/reference/p2c_reference.py
/// --bench-json` prints them.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ReferenceTiming {
    /// What ran it, e.g. `pytorch-2.3.1-cpu-2t` (version, device, threads).
    pub runtime: String,
    /// Median milliseconds per image, by batch size.
    pub ms_per_image: BTreeMap<usize, f64>,
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn generator_for_bench(
    cartoonizer: &Cartoonizer,
    style: Option<&str>,
    device: &Device,
) -> Result<(String, std::sync::Arc<Generator>)> {
    match cartoonizer.generator(style) {
        Ok((info, g)) => Ok((format!("style {}", info.name), g)),
        Err(e) if style.is_none() => {
            tracing::warn!("{e}; timing a generator with freshly initialised weights");
            let varmap = candle_nn::VarMap::new();
            Generator::new(
                generator::Config::default(),
                candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, device),
            )?;
            // Rebuilt from detached copies: a generator on trainable variables keeps every
            // forward pass's autograd graph alive.
            let weights = varmap
                .data()
                .lock()
                .expect("varmap lock")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                .collect();
            let g = Generator::new(
                generator::Config::default(),
                candle_nn::VarBuilder::from_tensors(weights, DType::F32, device),
            )?;
            Ok((
                "random (no style installed)".to_string(),
                std::sync::Arc::new(g),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Median per-stage times of `runs` batch-1 generator passes.
fn stage_medians(generator: &Generator, input: &Tensor, runs: usize) -> Result<Vec<StageMs>> {
    generator.forward(input)?; // warm-up
    let mut per_stage: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    for _ in 0..runs {
        let (_, times) = generator.forward_profiled(input)?;
        for (i, t) in times.into_iter().enumerate() {
            if per_stage.len() <= i {
                per_stage.push((t.stage, Vec::new(), Vec::new()));
            }
            per_stage[i].1.push(t.wall_ms);
            per_stage[i].2.push(t.cpu_ms);
        }
    }
    Ok(per_stage
        .into_iter()
        .map(|(stage, wall, cpu)| StageMs {
            stage,
            wall_ms: median(wall),
            cpu_ms: median(cpu),
        })
        .collect())
}

/// Per-stage profile of the generator at batch 1 (interleaving the fast and candle paths
/// run by run when the fast path is on, so that both see the same machine load).
fn profile(generator: &Generator, device: &Device, runs: usize) -> Result<StageProfile> {
    let input = Tensor::randn(0f32, 0.5, (1, 3, 256, 256), device)?;
    let fast = generator.uses_cpu_fast_path(&input);
    if !fast {
        return Ok(StageProfile {
            cpu_fast_path: false,
            stages: stage_medians(generator, &input, runs)?,
            candle_stages: None,
        });
    }
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        on.push(stage_medians(generator, &input, 1)?);
        crate::kernels::cpu_ops::set_enabled(false);
        let r = stage_medians(generator, &input, 1);
        crate::kernels::cpu_ops::set_enabled(true);
        off.push(r?);
    }
    let merge = |runs: Vec<Vec<StageMs>>| -> Vec<StageMs> {
        (0..runs[0].len())
            .map(|i| StageMs {
                stage: runs[0][i].stage.clone(),
                wall_ms: median(runs.iter().map(|r| r[i].wall_ms).collect()),
                cpu_ms: median(runs.iter().map(|r| r[i].cpu_ms).collect()),
            })
            .collect()
    };
    Ok(StageProfile {
        cpu_fast_path: true,
        stages: merge(on),
        candle_stages: Some(merge(off)),
    })
}

/// Times every stage `runs` times on `photo` and the generator alone at each of
/// `generator_batches` (on random faces); with `with_profile`, also each generator stage.
pub fn run(
    config: &Config,
    device: &Device,
    photo_path: &Path,
    style: Option<&str>,
    (runs, generator_batches): (usize, &[usize]),
    with_profile: bool,
) -> Result<BenchReport> {
    let runs = runs.max(1);
    let cartoonizer = Cartoonizer::load(config, device)?;
    let (generator_weights, generator) = generator_for_bench(&cartoonizer, style, device)?;
    let bytes =
        std::fs::read(photo_path).with_context(|| format!("reading {}", photo_path.display()))?;

    let mut stage_runs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut faces = 0;
    let mut end_to_end = Vec::with_capacity(runs);
    let mut generator_alone = Vec::with_capacity(runs);
    for run in 0..=runs {
        let started = Instant::now();
        let photo = imageops::decode_photo(&bytes, &config.limits)?;
        let decode_ms = started.elapsed().as_secs_f64() * 1e3;
        let result = cartoonizer
            .cartoonize_with(
                generator_weights.clone(),
                &generator,
                &photo,
                ComposeOptions::default(),
            )
            .with_context(|| photo_path.display().to_string())?;
        faces = result.faces.len();
        let mut timings = result.timings;
        timings.insert("decode", decode_ms);

        // Stickers as they are sent: the PNGs are part of the compose stage.
        let started = Instant::now();
        for face in &result.faces {
            rayon::join(
                || compose::encode_png(&face.sticker),
                || compose::encode_png(&face.avatar),
            );
        }
        *timings.entry("compose").or_default() += started.elapsed().as_secs_f64() * 1e3;

        let faces_alone: Vec<Face> = result.faces.into_iter().map(|f| f.face).collect();
        let started = Instant::now();
        cartoon::generate(&generator, &faces_alone, device)?;
        let alone_ms = started.elapsed().as_secs_f64() * 1e3;
        if run == 0 {
            continue; // warm-up
        }
        end_to_end.push(timings.values().sum::<f64>() / faces as f64);
        generator_alone.push(alone_ms / faces as f64);
        for (stage, ms) in timings {
            stage_runs
                .entry(stage.to_string())
                .or_default()
                .push(ms / faces as f64);
        }
    }

    let mut generator_ms_per_image = BTreeMap::new();
    for &batch in generator_batches {
        let input = Tensor::randn(0f32, 0.5, (batch, 3, 256, 256), device)?;
        generator.forward(&input)?.0.to_device(&Device::Cpu)?; // warm-up
        let times = (0..runs)
            .map(|_| {
                let started = Instant::now();
                generator.forward(&input)?.0.to_device(&Device::Cpu)?;
                Ok(started.elapsed().as_secs_f64() * 1e3 / batch as f64)
            })
            .collect::<Result<Vec<f64>>>()?;
        generator_ms_per_image.insert(batch, median(times));
    }
    let profile = if with_profile {
        Some(profile(&generator, device, runs)?)
    } else {
        None
    };
    Ok(BenchReport {
        device: format!("{device:?}"),
        photo: photo_path.display().to_string(),
        faces,
        runs,
        generator_weights,
        stages_ms_per_face: stage_runs
            .into_iter()
            .map(|(k, v)| (k, median(v)))
            .collect(),
        end_to_end_ratio: median(
            end_to_end
                .iter()
                .zip(&generator_alone)
                .map(|(whole, alone)| whole / alone)
                .collect(),
        ),
        end_to_end_ms_per_face: median(end_to_end),
        generator_alone_ms_per_face: median(generator_alone),
        generator_ms_per_image,
        reference: None,
        profile,
    })
}

/// Runs `python tools/reference/p2c_reference.py --bench-json` (PyTorch on the CPU, same
/// architecture) and reads its timing line.
pub fn reference_timing(python: &Path, runs: usize) -> Result<ReferenceTiming> {
    let runs = runs.to_string();
    run_reference(
        python,
        &[
            "tools/reference/p2c_reference.py",
            "--bench-json",
            "--runs",
            &runs,
        ],
    )
}

/// Runs a reference script (from the repository root) and parses the JSON of its last line.
pub fn run_reference<T: serde::de::DeserializeOwned>(python: &Path, args: &[&str]) -> Result<T> {
    let output = std::process::Command::new(python)
        .args(args)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "the PyTorch reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .last()
        .context("the PyTorch reference printed nothing")?;
    serde_json::from_str(line)
        .with_context(|| format!("parsing the reference's timing line {line:?}"))
}

impl BenchReport {
    /// A plain-text table, with candle / reference ratios when the reference was timed.
    pub fn table(&self) -> String {
        let mut out = format!(
            "device {} | photo {} ({} faces) | median of {} runs | generator weights: {}\n\nstage        ms/face\n",
            self.device, self.photo, self.faces, self.runs, self.generator_weights
        );
        for (stage, ms) in &self.stages_ms_per_face {
            out += &format!("{stage:<12} {ms:>8.1}\n");
        }
        out += &format!(
            "{:<12} {:>8.1}   {:.2}x the generator alone on the same faces ({:.1} ms/face; median of per-run ratios)",
            "end to end",
            self.end_to_end_ms_per_face,
            self.end_to_end_ratio,
            self.generator_alone_ms_per_face
        );
        out += "\n\ngenerator    ms/image";
        if let Some(r) = &self.reference {
            out += &format!("   {} ms/image   candle/{}", r.runtime, r.runtime);
        }
        out += "\n";
        for (batch, ms) in &self.generator_ms_per_image {
            out += &format!("batch {batch:<6} {ms:>8.1}");
            if let Some(reference) = self
                .reference
                .as_ref()
                .and_then(|r| r.ms_per_image.get(batch))
            {
                out += &format!("   {reference:>10.1}   {:>6.2}x", ms / reference);
            }
            out += "\n";
        }
        if let Some(p) = &self.profile {
            let path = if p.cpu_fast_path {
                "cpu fast path"
            } else {
                "candle ops"
            };
            out += &format!("\ngenerator stage (batch 1)   {path}: wall ms  cpu ms");
            if p.candle_stages.is_some() {
                out += "   candle ops: wall ms  cpu ms   speed-up (cpu)";
            }
            out += "\n";
            let sum = |s: &[StageMs]| -> (f64, f64) {
                (
                    s.iter().map(|t| t.wall_ms).sum(),
                    s.iter().map(|t| t.cpu_ms).sum(),
                )
            };
            let line = |name: &str, (w, c): (f64, f64), other: Option<(f64, f64)>| -> String {
                let mut l = format!("{name:<26} {:>20.1} {c:>7.1}", w);
                if let Some((ow, oc)) = other {
                    l += &format!("   {ow:>19.1} {oc:>7.1}   {:>13.2}x", oc / c);
                }
                l + "\n"
            };
            for (i, t) in p.stages.iter().enumerate() {
                let other = p
                    .candle_stages
                    .as_ref()
                    .map(|c| (c[i].wall_ms, c[i].cpu_ms));
                out += &line(&t.stage, (t.wall_ms, t.cpu_ms), other);
            }
            let other = p.candle_stages.as_deref().map(sum);
            out += &line("sum", sum(&p.stages), other);
        }
        out
    }
}
