//! `toonbot bench --train`: the time of a full training step of each recipe at a given
//! size and batch sizes, on seeded random images: photo2cartoon's (both updates, every
//! loss, both generators and four discriminators) and the fast recipe's adversarial step
//! (generator A->B, projected and local discriminators, DiffAugment, every loss; timed
//! over a whole identity cycle, so that the every-k-th identity term is counted once per
//! k steps). Also the process's peak memory, and on CUDA how far the CUDA generator's
//! output is from the CPU's for the same weights and input. With a Python that has torch,
//! each recipe's PyTorch reference step (`tools/reference/`) is timed at the same size and
//! batch sizes, and the report gives candle's time over PyTorch's.

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

    /// The batch sizes timed: `batches`, or the recipe's default when it is empty.
    pub fn batches(self, batches: &[usize]) -> Vec<usize> {
        match batches {
            [] => vec![self.default_batch()],
            b => b.to_vec(),
        }
    }

    /// The PyTorch script that times the same step, relative to the repository root.
    pub fn reference_script(self) -> &'static str {
        match self {
            Self::Photo2cartoon => "tools/reference/p2c_train_step.py",
            Self::Fast => "tools/reference/fast_train_step.py",
        }
    }

    /// The name the reports use (`photo2cartoon`, `fast`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Photo2cartoon => "photo2cartoon",
            Self::Fast => "fast",
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
    /// Each recipe's PyTorch reference step ([`BenchRecipe::reference_script`]), when timed.
    pub reference: BTreeMap<BenchRecipe, ReferenceStep>,
    /// Candle's milliseconds per step over the reference's, by recipe and batch size (the
    /// batch sizes both timed).
    pub candle_over_pytorch: BTreeMap<BenchRecipe, BTreeMap<usize, f64>>,
}

impl TrainBenchReport {
    /// Records `recipe`'s reference step and the ratios of candle's step times to it.
    pub fn set_reference(&mut self, recipe: BenchRecipe, reference: ReferenceStep) {
        if let Some(times) = self.recipes.get(&recipe) {
            let ratios = times
                .ms_per_step
                .iter()
                .filter_map(|(batch, ms)| Some((*batch, ms / reference.ms_per_step.get(batch)?)))
                .collect();
            self.candle_over_pytorch.insert(recipe, ratios);
        }
        self.reference.insert(recipe, reference);
    }

    /// A short plain-text table: each recipe's step per batch size (with the reference's
    /// and the ratio when timed), the recipes' ratio, peak memory, the CUDA difference.
    pub fn table(&self) -> String {
        let mut out = format!("training step at {0}x{0} on {1}\n", self.size, self.device);
        for (recipe, times) in &self.recipes {
            for (batch, ms) in &times.ms_per_step {
                out += &format!(
                    "{:<14} batch {batch:<4} {ms:>10.0} ms/step {:>8.2} images/s",
                    recipe.name(),
                    times.images_per_s[batch]
                );
                if let Some(r) = self.reference.get(recipe) {
                    let theirs = r.ms_per_step.get(batch).copied().unwrap_or(f64::NAN);
                    out += &format!(
                        " | {}: {theirs:.0} ms/step, candle/reference {:.2}",
                        r.runtime,
                        ms / theirs
                    );
                }
                out += "\n";
            }
        }
        if let Some(ratio) = self.fast_over_photo2cartoon {
            out += &format!(
                "fast / photo2cartoon seconds per image: {ratio:.3} (median of per-run ratios)\n"
            );
        }
        if let Some(mib) = self.peak_rss_mib {
            out += &format!("peak host memory {mib:.0} MiB\n");
        }
        if let Some(diff) = self.cuda_vs_cpu_max_abs_diff {
            out += &format!("generator output, max |CUDA - CPU| = {diff:.2e}\n");
        }
        out
    }
}

/// `--json`'s line for several sizes: every size's report, and the ratios by size.
#[derive(Debug, Serialize)]
struct SizesReport<'a> {
    /// Each size's report, smallest first.
    sizes: &'a [TrainBenchReport],
    /// [`TrainBenchReport::candle_over_pytorch`] by image side.
    candle_over_pytorch: BTreeMap<usize, &'a BTreeMap<BenchRecipe, BTreeMap<usize, f64>>>,
}

/// The JSON line `--json` prints: the report itself for one size; for several,
/// `{"sizes": [report, ...], "candle_over_pytorch": {size: {recipe: {batch: ratio}}}}`.
pub fn json_line(reports: &[TrainBenchReport]) -> Result<String> {
    Ok(match reports {
        [report] => serde_json::to_string(report)?,
        _ => serde_json::to_string(&SizesReport {
            sizes: reports,
            candle_over_pytorch: reports
                .iter()
                .map(|r| (r.size, &r.candle_over_pytorch))
                .collect(),
        })?,
    })
}

/// The PyTorch reference's training step times.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ReferenceStep {
    /// What ran it, e.g. `pytorch-2.3.1-cpu-2t` (version, device, threads).
    pub runtime: String,
    /// Median milliseconds per training step, by batch size.
    pub ms_per_step: BTreeMap<usize, f64>,
}

/// The reference script's arguments: `runs` timed runs (the fast recipe's: each a whole
/// identity cycle, as [`run`] times it) at `size` and `batches`; the fast recipe's backbone
/// weights from `models_dir`.
fn reference_args(
    recipe: BenchRecipe,
    size: usize,
    batches: &[usize],
    runs: usize,
    models_dir: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        recipe.reference_script().into(),
        "--size".into(),
        size.to_string(),
        "--steps".into(),
        runs.to_string(),
    ];
    if recipe == BenchRecipe::Fast {
        args.push("--models".into());
        args.push(models_dir.display().to_string());
    }
    args.push("--batch".into());
    args.extend(batches.iter().map(ToString::to_string));
    args
}

/// Times `recipe`'s PyTorch reference step with `python` at the same size and batch sizes,
/// on the CPU (run from the repository root).
pub fn reference_step(
    python: &Path,
    recipe: BenchRecipe,
    size: usize,
    (batches, runs): (&[usize], usize),
    models_dir: &Path,
) -> Result<ReferenceStep> {
    let args = reference_args(recipe, size, batches, runs, models_dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    crate::bench::run_reference(python, &args)
}

/// What `toonbot bench --train` times.
#[derive(Debug, Clone)]
pub struct TrainBenchPlan {
    /// Image sides, each timed in turn (smallest first).
    pub sizes: Vec<usize>,
    /// The recipes, taking turns in every run.
    pub recipes: Vec<BenchRecipe>,
    /// Batch sizes (empty: each recipe's default).
    pub batches: Vec<usize>,
    /// Timed runs per measurement.
    pub runs: usize,
    /// A Python with torch: also time each recipe's PyTorch reference step.
    pub reference_python: Option<PathBuf>,
}

/// Runs `plan`: for each size, [`run`], then each recipe's reference step when asked for.
/// Peak memory is the process's so far, so a size's includes the smaller sizes' runs.
pub fn run_plan(
    device: &Device,
    models_dir: &Path,
    plan: &TrainBenchPlan,
) -> Result<Vec<TrainBenchReport>> {
    let mut sizes = plan.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let runs = plan.runs.max(1);
    let mut reports = Vec::new();
    for size in sizes {
        let mut report = run(device, models_dir, size, &plan.recipes, &plan.batches, runs)?;
        if let Some(python) = &plan.reference_python {
            for recipe in report.recipes.keys().copied().collect::<Vec<_>>() {
                let batches = recipe.batches(&plan.batches);
                let reference = reference_step(python, recipe, size, (&batches, runs), models_dir)?;
                report.set_reference(recipe, reference);
            }
        }
        reports.push(report);
    }
    Ok(reports)
}

/// `(n, 3, size, size)` seeded values in [-1, 1].
fn images(seed: u64, n: usize, size: usize, device: &Device) -> Result<Tensor> {
    let mut rng = SplitMix64::keyed(seed, "bench.images");
    let v: Vec<f32> = (0..n * 3 * size * size)
        .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
        .collect();
    Ok(Tensor::from_vec(v, (n, 3, size, size), device)?)
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
    let batches_of = |r: BenchRecipe| r.batches(batches);
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
        peak_rss_mib: crate::peak_memory_mib("self"),
        reference: BTreeMap::new(),
        candle_over_pytorch: BTreeMap::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report(size: usize, fast_ms: &[(usize, f64)]) -> TrainBenchReport {
        let ms_per_step: BTreeMap<usize, f64> = fast_ms.iter().copied().collect();
        let times = RecipeTimes {
            images_per_s: ms_per_step
                .iter()
                .map(|(&b, &ms)| (b, b as f64 * 1e3 / ms))
                .collect(),
            best_batch: fast_ms[0].0,
            ms_per_step,
        };
        TrainBenchReport {
            device: "Cpu".into(),
            size,
            recipes: BTreeMap::from([(BenchRecipe::Fast, times)]),
            fast_over_photo2cartoon: None,
            peak_rss_mib: None,
            cuda_vs_cpu_max_abs_diff: None,
            reference: BTreeMap::new(),
            candle_over_pytorch: BTreeMap::new(),
        }
    }

    fn reference(ms: &[(usize, f64)]) -> ReferenceStep {
        ReferenceStep {
            runtime: "pytorch-2.15.0-cpu-2t".into(),
            ms_per_step: ms.iter().copied().collect(),
        }
    }

    #[test]
    fn ratios_cover_the_batches_both_timed() {
        let mut r = report(128, &[(4, 700.0), (8, 1500.0)]);
        r.set_reference(BenchRecipe::Fast, reference(&[(4, 1000.0)]));
        // A recipe the bench did not time gets its reference but no ratio.
        r.set_reference(BenchRecipe::Photo2cartoon, reference(&[(1, 10.0)]));
        assert_eq!(
            r.candle_over_pytorch,
            BTreeMap::from([(BenchRecipe::Fast, BTreeMap::from([(4, 0.7)]))])
        );
        assert_eq!(r.reference.len(), 2);
        assert!(r.table().contains("candle/reference 0.70"), "{}", r.table());
    }

    #[test]
    fn json_line_has_the_ratio_of_each_size() -> Result<()> {
        let mut small = report(128, &[(4, 600.0)]);
        small.set_reference(BenchRecipe::Fast, reference(&[(4, 1000.0)]));
        let mut large = report(256, &[(4, 1500.0)]);
        large.set_reference(BenchRecipe::Fast, reference(&[(4, 2000.0)]));
        let one: serde_json::Value = serde_json::from_str(&json_line(&[small])?)?;
        assert_eq!(one["size"], 128);
        assert_eq!(one["candle_over_pytorch"]["fast"]["4"], 0.6);
        assert_eq!(one["reference"]["fast"]["runtime"], "pytorch-2.15.0-cpu-2t");
        let small = report(128, &[(4, 600.0)]);
        let both: serde_json::Value = serde_json::from_str(&json_line(&[small, large])?)?;
        assert_eq!(both["sizes"].as_array().map(Vec::len), Some(2));
        assert_eq!(both["candle_over_pytorch"]["256"]["fast"]["4"], 0.75);
        assert_eq!(both["candle_over_pytorch"]["128"], serde_json::json!({}));
        Ok(())
    }

    #[test]
    fn reference_arguments() {
        let models = Path::new("models");
        let fast = reference_args(BenchRecipe::Fast, 128, &[4], 3, models);
        assert_eq!(
            fast,
            [
                "tools/reference/fast_train_step.py",
                "--size",
                "128",
                "--steps",
                "3",
                "--models",
                "models",
                "--batch",
                "4"
            ]
        );
        let p2c = reference_args(BenchRecipe::Photo2cartoon, 256, &[1, 8], 2, models);
        assert_eq!(p2c[0], "tools/reference/p2c_train_step.py");
        assert!(!p2c.iter().any(|a| a == "--models"));
        assert_eq!(p2c[p2c.len() - 3..], ["--batch", "1", "8"]);
        assert_eq!(BenchRecipe::Fast.batches(&[]), [4]);
        assert_eq!(BenchRecipe::Photo2cartoon.batches(&[2, 3]), [2, 3]);
    }
}
