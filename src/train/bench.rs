//! `toonbot bench --train`: the time of a full training step of each recipe at a given
//! size and batch sizes, on seeded random images: photo2cartoon's (both updates, every
//! loss, both generators and four discriminators) and the fast recipe's adversarial step
//! (generator A->B, projected and local discriminators, DiffAugment, every loss; timed
//! over a whole identity cycle, so that the every-k-th identity term is counted once per
//! k steps). Also the process's peak memory, and on CUDA how far the CUDA generator's
//! output is from the CPU's for the same weights and input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;

use super::adam::{Adam, AdamConfig};
use super::face_id::FaceIdLoss;
use super::fast::augment::{edge_smoothed, AdaptiveProbability};
use super::fast::model::{load_backbone, Discriminators, FastNets};
use super::fast::step::{AdversarialBatch, FastStep};
use super::fast::FastSpec;
use super::losses::LossWeights;
use super::model::{NetConfig, Ugatit};
use super::params::Freeze;
use super::step::Step;
use crate::bench::median;
use crate::rng::SplitMix64;

/// A training recipe the bench can time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchRecipe {
    /// photo2cartoon's full step: both generators and all four discriminators.
    Photo2cartoon,
    /// The fast recipe's adversarial step: generator A->B and its two discriminators.
    Fast,
}

impl BenchRecipe {
    /// The batch size the recipe trains with by default.
    pub fn default_batch(self) -> usize {
        match self {
            Self::Photo2cartoon => 1,
            Self::Fast => 4,
        }
    }
}

/// One recipe's step times over the batch sizes timed.
#[derive(Debug, Serialize)]
pub struct RecipeTimes {
    /// Median milliseconds per training step, by batch size.
    pub ms_per_step: BTreeMap<usize, f64>,
    /// Photos (training pairs for photo2cartoon) per second, by batch size.
    pub images_per_s: BTreeMap<usize, f64>,
    /// The batch size with the most images per second.
    pub best_batch: usize,
}

/// What `toonbot bench --train` measured; printed as JSON with `--json`.
#[derive(Debug, Serialize)]
pub struct TrainBenchReport {
    /// The device the steps ran on, as candle prints it.
    pub device: String,
    /// Training image side, in pixels.
    pub size: usize,
    /// Each timed recipe's step times.
    pub recipes: BTreeMap<BenchRecipe, RecipeTimes>,
    /// With both recipes: the median over the runs of the fast recipe's seconds per image
    /// (at its best batch) over photo2cartoon's (at its best batch) in the same run.
    pub fast_over_photo2cartoon: Option<f64>,
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
    /// What ran it, e.g. `pytorch-2.3.1-cpu-2t` (version, device, threads).
    pub runtime: String,
    /// Median milliseconds per training step, by batch size.
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

/// One recipe's networks and optimisers, ready to take steps.
enum Trainer {
    Photo2cartoon {
        model: Box<Ugatit>,
        face_id: FaceIdLoss,
        g_optim: Adam,
        d_optim: Adam,
    },
    Fast {
        nets: Box<FastNets>,
        spec: Box<FastSpec>,
        face_id: FaceIdLoss,
        ada: AdaptiveProbability,
        g_optim: Adam,
        d_optim: Adam,
        step: u64,
    },
}

impl Trainer {
    fn new(recipe: BenchRecipe, device: &Device, models_dir: &Path, size: usize) -> Result<Self> {
        let net = NetConfig::photo2cartoon();
        let face_id = FaceIdLoss::load(models_dir, size, device)?;
        Ok(match recipe {
            BenchRecipe::Photo2cartoon => {
                net.check_size(size)?;
                let model = Ugatit::new(net, Freeze::None, 0, device)?;
                let adam = AdamConfig::photo2cartoon();
                Self::Photo2cartoon {
                    g_optim: Adam::new(model.generator_vars(), adam)?,
                    d_optim: Adam::new(model.discriminator_vars(), adam)?,
                    model: Box::new(model),
                    face_id,
                }
            }
            BenchRecipe::Fast => {
                let none = PathBuf::new();
                let spec = FastSpec::new(none.clone(), none.clone(), none, 1);
                let nets = FastNets::new(
                    net,
                    Discriminators::Projected,
                    (0, Freeze::None),
                    load_backbone(models_dir, device)?,
                    device,
                )?;
                let (g_optim, d_optim) = nets.optimisers()?;
                let mut ada = AdaptiveProbability::new(spec.ada_target, spec.ada_speed_images);
                // Mid-run augmentation, not the first steps' none.
                ada.p = 0.5;
                Self::Fast {
                    g_optim,
                    d_optim,
                    nets: Box::new(nets),
                    spec: Box::new(spec),
                    face_id,
                    ada,
                    step: 0,
                }
            }
        })
    }

    /// Steps timed together: the fast recipe's identity cycle, photo2cartoon's one.
    fn steps_per_run(&self) -> u64 {
        match self {
            Self::Photo2cartoon { .. } => 1,
            Self::Fast { spec, .. } => spec.weights.identity_every.max(1),
        }
    }

    fn step(&mut self, photos: &Tensor, cartoons: &Tensor) -> Result<()> {
        match self {
            Self::Photo2cartoon {
                model,
                face_id,
                g_optim,
                d_optim,
            } => {
                let step = Step {
                    model,
                    face_id,
                    weights: LossWeights::default(),
                };
                step.run(photos, cartoons, d_optim, g_optim, 1e-4)?;
            }
            Self::Fast {
                nets,
                spec,
                face_id,
                ada,
                g_optim,
                d_optim,
                step,
            } => {
                *step += 1;
                let smoothed = edge_smoothed(cartoons, spec.edge_threshold)?;
                let batch = AdversarialBatch {
                    photos,
                    cartoons,
                    smoothed: &smoothed,
                };
                let fast = FastStep {
                    nets,
                    face_id,
                    spec,
                };
                fast.adversarial(&batch, *step, ada, (g_optim, d_optim), (1e-4, 1e-4))?;
            }
        }
        Ok(())
    }
}

/// Times `runs` runs (after one warm-up step) of each recipe at each batch size (each
/// recipe's default batch when `batches` is empty), the recipes taking turns in every run.
pub fn run(
    device: &Device,
    models_dir: &Path,
    size: usize,
    recipes: &[BenchRecipe],
    batches: &[usize],
    runs: usize,
) -> Result<TrainBenchReport> {
    let mut recipes = recipes.to_vec();
    recipes.sort();
    recipes.dedup();
    let mut trainers = recipes
        .iter()
        .map(|&r| Ok((r, Trainer::new(r, device, models_dir, size)?)))
        .collect::<Result<Vec<_>>>()?;
    let batches_of = |r: BenchRecipe| match batches {
        [] => vec![r.default_batch()],
        b => b.to_vec(),
    };
    let inputs = |batch: usize| -> Result<(Tensor, Tensor)> {
        Ok((
            images(2, batch, size, device)?,
            images(3, batch, size, device)?,
        ))
    };
    // Milliseconds per step of each run, by recipe and batch.
    let mut times: BTreeMap<(BenchRecipe, usize), Vec<f64>> = BTreeMap::new();
    for run in 0..=runs {
        for (recipe, trainer) in &mut trainers {
            for batch in batches_of(*recipe) {
                let (photos, cartoons) = inputs(batch)?;
                let steps = if run == 0 { 1 } else { trainer.steps_per_run() };
                sync(device)?;
                let started = Instant::now();
                for _ in 0..steps {
                    trainer.step(&photos, &cartoons)?;
                }
                sync(device)?;
                if run > 0 {
                    let ms = started.elapsed().as_secs_f64() * 1e3 / steps as f64;
                    times.entry((*recipe, batch)).or_default().push(ms);
                }
            }
        }
    }
    let mut report = TrainBenchReport {
        device: format!("{device:?}"),
        size,
        recipes: BTreeMap::new(),
        fast_over_photo2cartoon: None,
        peak_rss_mib: peak_rss_mib(),
        reference: None,
        cuda_vs_cpu_max_abs_diff: if device.is_cuda() {
            Some(cuda_vs_cpu(size, device)?)
        } else {
            None
        },
    };
    for &recipe in &recipes {
        let ms_per_step: BTreeMap<usize, f64> = batches_of(recipe)
            .into_iter()
            .map(|b| (b, median(times[&(recipe, b)].clone())))
            .collect();
        let images_per_s: BTreeMap<usize, f64> = ms_per_step
            .iter()
            .map(|(&b, &ms)| (b, b as f64 * 1e3 / ms))
            .collect();
        let best_batch = images_per_s
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(&b, _)| b)
            .expect("at least one batch size");
        let times = RecipeTimes {
            ms_per_step,
            images_per_s,
            best_batch,
        };
        report.recipes.insert(recipe, times);
    }
    let per_image = |r: BenchRecipe| -> Option<Vec<f64>> {
        let batch = report.recipes.get(&r)?.best_batch;
        Some(
            times[&(r, batch)]
                .iter()
                .map(|ms| ms / batch as f64)
                .collect(),
        )
    };
    if let (Some(fast), Some(p2c)) = (
        per_image(BenchRecipe::Fast),
        per_image(BenchRecipe::Photo2cartoon),
    ) {
        let ratios: Vec<f64> = fast.iter().zip(&p2c).map(|(f, p)| f / p).collect();
        report.fast_over_photo2cartoon = Some(median(ratios));
    }
    Ok(report)
}
