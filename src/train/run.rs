//! The training loop: batches in the seeded order, one [`Step`] each, a JSON-lines log,
//! sample grids and checkpoints every N steps, and a clean stop (with a checkpoint) when
//! asked to, when a time limit passes or at the last step.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use super::adam::{Adam, AdamConfig};
use super::checkpoint;
use super::data::{ImageFolder, TrainData};
use super::face_id::FaceIdLoss;
use super::grid::sample_grid;
use super::model::Ugatit;
use super::step::{Losses, Step};
use super::RunSpec;

/// The full checkpoint's file name in the output directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The JSON-lines log's file name in the output directory.
pub const LOG_FILE: &str = "train.jsonl";
/// Sample grids go to this subdirectory, one PNG per step.
pub const SAMPLES_DIR: &str = "samples";
/// Photos in a sample grid.
const PREVIEW_PHOTOS: usize = 4;

/// How a run is carried out (not part of its results).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Output directory: checkpoint, log, sample grids.
    pub out: PathBuf,
    /// Also keep a compact checkpoint here (replaced at every save).
    pub compact: Option<PathBuf>,
    /// The compact checkpoint holds the generators alone ([`checkpoint::Kind::Generators`]).
    pub compact_generators_only: bool,
    /// Write the checkpoint every this many steps.
    pub save_every: u64,
    /// Write a sample grid every this many steps.
    pub sample_every: u64,
    /// Append the mean losses to the log every this many steps.
    pub log_every: u64,
    /// Stop (with a checkpoint) once this much time has passed.
    pub time_limit: Option<Duration>,
    /// Directory holding `face_embedder.safetensors`.
    pub models_dir: PathBuf,
}

impl RunOptions {
    /// Why a run ends before its next step, if it does: all steps `done`, `stop` set, or
    /// the time limit since `started` reached.
    pub(crate) fn finish_before_step(
        &self,
        done: bool,
        stop: &AtomicBool,
        started: Instant,
    ) -> Option<Finish> {
        if done {
            Some(Finish::Completed)
        } else if stop.load(Ordering::SeqCst) {
            Some(Finish::Interrupted)
        } else if self.time_limit.is_some_and(|t| started.elapsed() >= t) {
            Some(Finish::TimeLimit)
        } else {
            None
        }
    }
}

/// Where the networks' weights come from.
pub enum Start {
    /// Fresh, seeded initialisation.
    Fresh,
    /// The named networks from these tensors (keys `genA2B.<param>`, ...), the others fresh.
    Weights {
        /// Weights by `network.param` name.
        tensors: HashMap<String, Tensor>,
        /// The networks to take from `tensors` (names from [`NETWORKS`](super::model::NETWORKS)).
        networks: Vec<&'static str>,
    },
    /// Continue from a checkpoint file.
    Resume(PathBuf),
}

/// What one step reports to a progress display.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// Completed steps.
    pub step: u64,
    /// Steps the run will take in all.
    pub steps: u64,
    /// The learning rate of this step.
    pub lr: f64,
    /// This step's losses by name.
    pub losses: Losses,
    /// Training pairs per second since this process started training.
    pub images_per_s: f64,
    /// Seconds left of a run with a time budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_left: Option<f64>,
}

/// Why a run returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The last step is done.
    Completed,
    /// The stop flag was set (Ctrl-C, SIGTERM, a cancel).
    Interrupted,
    /// The time limit passed.
    TimeLimit,
}

/// A prepared run.
pub struct Trainer {
    /// The run's settings (a resumed run's own).
    pub spec: RunSpec,
    /// Where and how often it writes checkpoints, logs and samples.
    pub options: RunOptions,
    /// The six networks being trained.
    pub model: Ugatit,
    face_id: FaceIdLoss,
    data: TrainData,
    g_optim: Adam,
    d_optim: Adam,
    /// Completed steps.
    step: u64,
    preview: Tensor,
    device: Device,
}

impl Trainer {
    /// Sets up a run: `spec` for a fresh start or from weights; for [`Start::Resume`] the
    /// checkpoint's own spec is used and `spec` is ignored.
    pub fn new(spec: RunSpec, options: RunOptions, start: Start, device: &Device) -> Result<Self> {
        let resumed = match start {
            Start::Resume(ref path) => Some(checkpoint::load(path, device)?),
            _ => None,
        };
        let spec = resumed.as_ref().map_or(spec, |c| c.state.spec.clone());
        spec.net.check_size(spec.size)?;
        anyhow::ensure!(
            spec.batch > 0 && spec.steps > 0,
            "batch and steps must be positive"
        );
        let data = TrainData {
            photos: ImageFolder::open(&spec.photos)?,
            cartoons: ImageFolder::open(&spec.cartoons)?,
            size: spec.size,
            batch: spec.batch,
            seed: spec.seed,
        };
        let model = Ugatit::new(spec.net, spec.freeze, spec.seed, device)?;
        match &start {
            Start::Fresh => {}
            Start::Weights { tensors, networks } => model.load(tensors, networks)?,
            Start::Resume(_) => {}
        }
        if let Some(c) = &resumed {
            model.load(&c.tensors, c.state.kind.networks())?;
        }
        let adam = AdamConfig::photo2cartoon();
        let mut g_optim = Adam::new(model.generator_vars(), adam)?;
        let mut d_optim = Adam::new(model.discriminator_vars(), adam)?;
        if let Some(c) = &resumed {
            c.restore_optimisers(&mut g_optim, &mut d_optim)?;
        }
        Ok(Self {
            face_id: FaceIdLoss::load(&options.models_dir, spec.size, device)?,
            preview: data.preview_photos(PREVIEW_PHOTOS, device)?,
            step: resumed.map_or(0, |c| c.state.step),
            spec,
            options,
            model,
            data,
            g_optim,
            d_optim,
            device: device.clone(),
        })
    }

    /// Completed steps.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Where the run's full checkpoint is written: `checkpoint.safetensors` in the output folder.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.options.out.join(CHECKPOINT_FILE)
    }

    /// Trains until the last step, `stop` is set, or the time limit passes; checkpoints
    /// before returning. `on_step` sees every step's losses.
    pub fn run(&mut self, stop: &AtomicBool, mut on_step: impl FnMut(&Progress)) -> Result<Finish> {
        std::fs::create_dir_all(&self.options.out)
            .with_context(|| format!("creating {}", self.options.out.display()))?;
        let mut log = LossLog::open(&self.options.out.join(LOG_FILE))?;
        let started = Instant::now();
        let first_step = self.step;
        let finish = loop {
            let done = self.step >= self.spec.steps;
            if let Some(finish) = self.options.finish_before_step(done, stop, started) {
                break finish;
            }
            let losses = self.train_one()?;
            let elapsed = started.elapsed().as_secs_f64();
            let progress = Progress {
                step: self.step,
                steps: self.spec.steps,
                lr: self.spec.learning_rate(self.step),
                images_per_s: ((self.step - first_step) * self.spec.batch as u64) as f64 / elapsed,
                losses,
                seconds_left: None,
            };
            log.add(&progress);
            if self.step.is_multiple_of(self.options.log_every) {
                log.flush(&progress, elapsed)?;
            }
            if self.step.is_multiple_of(self.options.sample_every) {
                self.write_samples()?;
            }
            if self.step.is_multiple_of(self.options.save_every) {
                self.save()?;
            }
            on_step(&progress);
        };
        if !self.step.is_multiple_of(self.options.save_every) || self.step == first_step {
            self.save()?;
        }
        Ok(finish)
    }

    fn train_one(&mut self) -> Result<Losses> {
        let (real_a, real_b) = self.data.batch(self.step, &self.device)?;
        let lr = self.spec.learning_rate(self.step + 1);
        let step = Step {
            model: &self.model,
            face_id: &self.face_id,
            weights: self.spec.weights,
        };
        let losses = step.run(&real_a, &real_b, &mut self.d_optim, &mut self.g_optim, lr)?;
        self.step += 1;
        Ok(losses)
    }

    /// Writes the full checkpoint (and the compact one when configured).
    pub fn save(&self) -> Result<()> {
        let optimisers = Some((&self.g_optim, &self.d_optim));
        checkpoint::save(
            &self.checkpoint_path(),
            self.step,
            &self.spec,
            &self.model,
            checkpoint::Kind::Full,
            optimisers,
        )?;
        if let Some(compact) = &self.options.compact {
            let kind = if self.options.compact_generators_only {
                checkpoint::Kind::Generators
            } else {
                checkpoint::Kind::Compact
            };
            checkpoint::save(compact, self.step, &self.spec, &self.model, kind, None)?;
        }
        Ok(())
    }

    /// Writes `samples/step-NNNNNNN.png` and returns its path.
    pub fn write_samples(&self) -> Result<PathBuf> {
        let grid = sample_grid(&self.model, &self.preview)?;
        let path = sample_path(&self.options.out, self.step);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        grid.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// The sample grid of `step` in the run directory `out`.
pub fn sample_path(out: &Path, step: u64) -> PathBuf {
    out.join(SAMPLES_DIR).join(format!("step-{step:07}.png"))
}

/// Loss means over each logging interval, appended to the JSON-lines log. Each value is
/// the mean over the steps that reported it: a term of every 4th step, or a check of every
/// 100th, is not diluted by the steps without it.
pub(crate) struct LossLog {
    file: std::fs::File,
    /// Sum and count of each value since the previous line.
    sums: BTreeMap<String, (f64, u64)>,
}

#[derive(Serialize)]
struct LogLine<'a> {
    step: u64,
    lr: f64,
    images_per_s: f64,
    elapsed_s: f64,
    /// Means over the steps since the previous line that reported each.
    losses: &'a Losses,
}

impl LossLog {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            file,
            sums: BTreeMap::new(),
        })
    }

    pub(crate) fn add(&mut self, p: &Progress) {
        for (name, value) in &p.losses {
            let (sum, count) = self.sums.entry(name.clone()).or_default();
            *sum += value;
            *count += 1;
        }
    }

    pub(crate) fn flush(&mut self, p: &Progress, elapsed_s: f64) -> Result<()> {
        let means: Losses = self
            .sums
            .iter()
            .map(|(k, &(sum, count))| (k.clone(), sum / count as f64))
            .collect();
        let line = LogLine {
            step: p.step,
            lr: p.lr,
            images_per_s: p.images_per_s,
            elapsed_s,
            losses: &means,
        };
        writeln!(self.file, "{}", serde_json::to_string(&line)?)?;
        self.file.flush()?;
        self.sums.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_logged_value_is_the_mean_of_the_steps_that_reported_it() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("train.jsonl");
        let mut log = LossLog::open(&path)?;
        let progress = |step: u64, losses: &[(&str, f64)]| Progress {
            step,
            steps: 10,
            lr: 1e-4,
            losses: losses.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
            images_per_s: 1.0,
            seconds_left: None,
        };
        log.add(&progress(1, &[("L", 1.0)]));
        log.add(&progress(2, &[("L", 2.0), ("psnr", 22.0)]));
        let last = progress(3, &[("L", 6.0)]);
        log.add(&last);
        log.flush(&last, 3.0)?;
        log.add(&progress(4, &[("L", 5.0)]));
        log.flush(&progress(4, &[]), 4.0)?;
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)?
            .lines()
            .map(serde_json::from_str)
            .collect::<std::result::Result<_, _>>()?;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["losses"]["L"], 3.0);
        assert_eq!(lines[0]["losses"]["psnr"], 22.0);
        assert_eq!(lines[1]["losses"]["L"], 5.0);
        assert!(lines[1]["losses"].get("psnr").is_none());
        Ok(())
    }
}
