//! `toonbot bench --train`: the time of a full training step (both updates, every loss,
//! photo2cartoon's networks) at a given size and batch sizes, on seeded random images; the
//! process's peak memory; and on CUDA, how far the CUDA generator's output is from the
//! CPU's for the same weights and input.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;

use super::adam::{Adam, AdamConfig};
use super::face_id::FaceIdLoss;
use super::losses::LossWeights;
use super::model::{NetConfig, Ugatit};
use super::params::Freeze;
use super::step::Step;
use crate::rng::SplitMix64;

#[derive(Debug, Serialize)]
pub struct TrainBenchReport {
    pub device: String,
    pub size: usize,
    /// Median milliseconds per training step, by batch size.
    pub ms_per_step: BTreeMap<usize, f64>,
    /// Training pairs per second, by batch size.
    pub images_per_s: BTreeMap<usize, f64>,
    /// Peak resident memory of the process (host memory), MiB.
    pub peak_rss_mib: Option<f64>,
    /// Max |CUDA - CPU| of generator A->B's output (same weights and input), on CUDA only.
    pub cuda_vs_cpu_max_abs_diff: Option<f64>,
    /// The PyTorch reference step (`tools/reference/p2c_train_step.py`), when timed.
    pub reference: Option<ReferenceStep>,
}

/// The PyTorch reference's training step times.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ReferenceStep {
    pub runtime: String,
    pub ms_per_step: BTreeMap<usize, f64>,
}

/// Times the PyTorch reference step with `python` at the same size and batch sizes, on
/// the CPU.
pub fn reference_step(
    python: &Path,
    size: usize,
    batches: &[usize],
    steps: usize,
) -> Result<ReferenceStep> {
    let (size, steps) = (size.to_string(), steps.to_string());
    let batches: Vec<String> = batches.iter().map(ToString::to_string).collect();
    let mut args = vec![
        "tools/reference/p2c_train_step.py",
        "--size",
        &size,
        "--steps",
        &steps,
    ];
    args.push("--batch");
    args.extend(batches.iter().map(String::as_str));
    crate::bench::run_reference(python, &args)
}

/// `(n, 3, size, size)` seeded values in [-1, 1].
fn images(seed: u64, n: usize, size: usize, device: &Device) -> Result<Tensor> {
    let mut rng = SplitMix64::keyed(seed, "bench.images");
    let v: Vec<f32> = (0..n * 3 * size * size)
        .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
        .collect();
    Ok(Tensor::from_vec(v, (n, 3, size, size), device)?)
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn sync(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

/// Max |a - b| of generator A->B's output on `device` and on the CPU, same seeded weights.
fn cuda_vs_cpu(size: usize, device: &Device) -> Result<f64> {
    let x = images(1, 1, size, &Device::Cpu)?;
    let run = |d: &Device| -> Result<Tensor> {
        let model = Ugatit::new(NetConfig::photo2cartoon(), Freeze::None, 0, d)?;
        Ok(model
            .gen_a2b
            .forward(&x.to_device(d)?)?
            .0
            .to_device(&Device::Cpu)?)
    };
    let diff = (run(device)? - run(&Device::Cpu)?)?.abs()?.max_all()?;
    Ok(f64::from(diff.to_scalar::<f32>()?))
}

/// Times `steps` training steps (after one warm-up) per batch size.
pub fn run(
    device: &Device,
    models_dir: &Path,
    size: usize,
    batches: &[usize],
    steps: usize,
) -> Result<TrainBenchReport> {
    let net = NetConfig::photo2cartoon();
    net.check_size(size)?;
    let model = Ugatit::new(net, Freeze::None, 0, device)?;
    let face_id = FaceIdLoss::load(models_dir, size, device)?;
    let adam = AdamConfig::photo2cartoon();
    let mut g_optim = Adam::new(model.generator_vars(), adam)?;
    let mut d_optim = Adam::new(model.discriminator_vars(), adam)?;
    let step = Step {
        model: &model,
        face_id: &face_id,
        weights: LossWeights::default(),
    };
    let mut ms_per_step = BTreeMap::new();
    for &batch in batches {
        let (a, b) = (
            images(2, batch, size, device)?,
            images(3, batch, size, device)?,
        );
        let mut times = Vec::with_capacity(steps);
        for i in 0..=steps {
            sync(device)?;
            let started = Instant::now();
            step.run(&a, &b, &mut d_optim, &mut g_optim, 1e-4)?;
            sync(device)?;
            if i > 0 {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        ms_per_step.insert(batch, times[times.len() / 2]);
    }
    Ok(TrainBenchReport {
        device: format!("{device:?}"),
        size,
        images_per_s: ms_per_step
            .iter()
            .map(|(&b, &ms)| (b, b as f64 * 1e3 / ms))
            .collect(),
        ms_per_step,
        peak_rss_mib: peak_rss_mib(),
        reference: None,
        cuda_vs_cpu_max_abs_diff: if device.is_cuda() {
            Some(cuda_vs_cpu(size, device)?)
        } else {
            None
        },
    })
}
