//! The pack recipe's training loop: the cache, then steps until the time budget or the step
//! cap is spent; a JSON-lines log, sample grids (photo | base style | new style),
//! checkpoints that resume, and the installation of the new style.
//!
//! Checkpoints hold `genA2B.*`, `disP.*`, `disLB.*`, the optimisers' moments (`adam_g.*`,
//! `adam_d.*`) and [`PackState`] as JSON under `toonbot_pack_training`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::cache::{CacheInputs, PhotoCache};
use super::step::PackStep;
use super::PackSpec;
use crate::cartoon::styles::{StyleManifest, WEIGHTS_FILE};
use crate::nets::projected_discriminator;
use crate::rng::SplitMix64;
use crate::train::adam::Adam;
use crate::train::checkpoint::{self, to_safetensors, write_atomically};
use crate::train::data::{ImageFolder, TrainData};
use crate::train::face_id::FaceIdLoss;
use crate::train::fast::augment::AdaptiveProbability;
use crate::train::fast::model::{load_backbone, Discriminators, FastNets, NETWORKS};
use crate::train::fast::run::check_folder;
use crate::train::grid::{columns_grid, to_rgb_images};
use crate::train::params::Freeze;
use crate::train::run::{
    sample_path, Finish, LossLog, Progress, RunOptions, CHECKPOINT_FILE, LOG_FILE,
};
use crate::train::step::Losses;
use crate::train::style::{self, WeightsDtype};

const METADATA_KEY: &str = "toonbot_pack_training";
/// Photos in a sample grid (cache entries 0, 2, 4, ...: the unmirrored ones).
const GRID_PHOTOS: usize = 4;
/// The networks a pack run trains and checkpoints (no photo2cartoon global discriminator).
const TRAINED: [&str; 3] = ["genA2B", "disP", "disLB"];

/// Where a pack run stands; stored in its checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackState {
    /// The run's settings.
    pub spec: PackSpec,
    /// Steps done.
    pub steps: u64,
    /// Wall time spent so far, setup included, in seconds: what the budget counts.
    pub elapsed_s: f64,
    /// ADA's controller of the augmentation probability.
    pub ada: AdaptiveProbability,
}

/// The SHA-256 of a style's generator weights, as [`PackSpec::base_sha256`] records it.
pub fn base_sha256(style_dir: &Path) -> Result<String> {
    let path = style_dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(crate::sha256_hex(&bytes))
}

/// The spec of the run checkpointed in `out`, if there is one.
pub fn checkpointed_spec(out: &Path) -> Result<Option<PackSpec>> {
    let path = out.join(CHECKPOINT_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let state = header.metadata().as_ref().and_then(|m| m.get(METADATA_KEY));
    let state: PackState = serde_json::from_str(
        state.with_context(|| format!("{} is not a pack training checkpoint", path.display()))?,
    )?;
    Ok(Some(state.spec))
}

/// A pack run ready to step: its networks, optimisers, cache and state.
pub struct PackTrainer {
    /// The run's settings.
    pub spec: PackSpec,
    /// Where and how often it writes checkpoints, logs and samples (`time_limit` stops the
    /// process's part of the run early; the budget is in the spec).
    pub options: RunOptions,
    /// The networks being trained.
    pub nets: FastNets,
    /// Where the run stands.
    pub state: PackState,
    g_optim: Adam,
    d_optim: Adam,
    cache: PhotoCache,
    cartoons: TrainData,
    face_id: FaceIdLoss,
    device: Device,
    /// When the time not yet added to `state.elapsed_s` began.
    counted_until: Instant,
}

impl PackTrainer {
    /// Sets up the run of `spec` from the base style in `base_dir`, or, with `resume`,
    /// continues the one checkpointed in `options.out` (whose spec must be `spec`), and
    /// builds the cache. `None` when `cancel` was set meanwhile.
    pub fn new(
        spec: PackSpec,
        base_dir: &Path,
        options: RunOptions,
        resume: bool,
        cancel: &AtomicBool,
        device: &Device,
    ) -> Result<Option<Self>> {
        let counted_until = Instant::now();
        anyhow::ensure!(
            spec.batch > 0 && spec.minutes > 0.0 && spec.max_steps > 0,
            "batch, minutes and steps must be positive"
        );
        projected_discriminator::check_size(spec.size)?;
        anyhow::ensure!(
            matches!(spec.freeze, Freeze::Decoder | Freeze::Branches),
            "a pack trains the decoder side or the branches of its base, not all of it"
        );
        let sha = base_sha256(base_dir)?;
        anyhow::ensure!(
            sha == spec.base_sha256,
            "the base style {:?} is not the one the run started from (its weights changed)",
            spec.base
        );
        let cartoons = check_folder("the pack's cartoons", &spec.cartoons)?;
        let photos = ImageFolder::open(&spec.photos).context("the photos to fine-tune on")?;

        let nets = FastNets::new(
            spec.net,
            Discriminators::Projected,
            (spec.seed, spec.freeze),
            load_backbone(&options.models_dir, device)?,
            device,
        )?;
        let (mut g_optim, mut d_optim) = nets.optimisers()?;
        let base_weights = base_dir.join(WEIGHTS_FILE);
        let state = if resume {
            let path = options.out.join(CHECKPOINT_FILE);
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let (state, tensors) =
                checkpoint::parse_with_state::<PackState>(&bytes, &path, METADATA_KEY, device)?
                    .with_context(|| {
                        format!("{} is not a pack training checkpoint", path.display())
                    })?;
            anyhow::ensure!(
                state.spec == spec,
                "the run in {} was started with other settings",
                options.out.display()
            );
            nets.load(&tensors, &TRAINED)?;
            g_optim.load_prefixed(&tensors, "adam_g.", state.steps)?;
            d_optim.load_prefixed(&tensors, "adam_d.", state.steps)?;
            state
        } else {
            let tensors: HashMap<String, Tensor> =
                candle_core::safetensors::load(&base_weights, device)
                    .with_context(|| format!("loading {}", base_weights.display()))?
                    .into_iter()
                    .map(|(k, v)| (format!("{}.{k}", NETWORKS[0]), v))
                    .collect();
            nets.load(&tensors, &NETWORKS[..1])?;
            let mut ada = AdaptiveProbability::new(spec.ada_target, spec.ada_speed_images);
            ada.p = spec.ada_start;
            PackState {
                spec: spec.clone(),
                steps: 0,
                elapsed_s: 0.0,
                ada,
            }
        };

        let face_id = FaceIdLoss::load(&options.models_dir, spec.size, device)?;
        let base = crate::cartoon::load_generator(base_dir, device)?;
        let inputs = CacheInputs {
            base: &base,
            backbone: &nets.backbone,
            face_id: &face_id,
        };
        let keep_encoded = spec.freeze == Freeze::Decoder;
        let Some(cache) = PhotoCache::build(
            &inputs,
            &photos,
            (spec.cached_photos, spec.size),
            keep_encoded,
            cancel,
            device,
        )?
        else {
            return Ok(None);
        };
        let cartoons = TrainData {
            photos: cartoons.clone(),
            cartoons,
            size: spec.size,
            batch: spec.batch,
            seed: spec.seed,
        };
        Ok(Some(Self {
            spec,
            options,
            nets,
            state,
            g_optim,
            d_optim,
            cache,
            cartoons,
            face_id,
            device: device.clone(),
            counted_until,
        }))
    }

    /// Where the run's checkpoint is written: `checkpoint.safetensors` in the output folder.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.options.out.join(CHECKPOINT_FILE)
    }

    /// How much of the run is done, in [0, 1].
    pub fn fraction_done(&self) -> f64 {
        self.spec
            .fraction_done(self.state.steps, self.state.elapsed_s)
    }

    fn count_time(&mut self) {
        let now = Instant::now();
        self.state.elapsed_s += (now - self.counted_until).as_secs_f64();
        self.counted_until = now;
    }

    /// Trains until the budget or the step cap is spent, `stop`, or the options' time limit;
    /// checkpoints before returning.
    pub fn run(&mut self, stop: &AtomicBool, mut on_step: impl FnMut(&Progress)) -> Result<Finish> {
        std::fs::create_dir_all(&self.options.out)
            .with_context(|| format!("creating {}", self.options.out.display()))?;
        let mut log = LossLog::open(&self.options.out.join(LOG_FILE))?;
        let started = Instant::now();
        let first = self.state.steps;
        let finish = loop {
            self.count_time();
            let done = self.fraction_done() >= 1.0;
            if let Some(finish) = self.options.finish_before_step(done, stop, started) {
                break finish;
            }
            let (losses, lr) = self.train_one()?;
            let step = self.state.steps;
            if step.is_multiple_of(self.options.sample_every) || step == 1 {
                self.write_samples()?;
            }
            if step.is_multiple_of(self.options.save_every) {
                self.save()?;
            }
            self.count_time();
            let fraction = self.fraction_done();
            let progress = Progress {
                step,
                steps: ((step as f64 / fraction.max(1e-9)).round() as u64)
                    .clamp(step, self.spec.max_steps),
                lr,
                images_per_s: ((step - first) * self.spec.batch as u64) as f64
                    / started.elapsed().as_secs_f64(),
                losses,
                seconds_left: Some((self.spec.minutes * 60.0 - self.state.elapsed_s).max(0.0)),
            };
            log.add(&progress);
            if step.is_multiple_of(self.options.log_every) {
                log.flush(&progress, started.elapsed().as_secs_f64())?;
            }
            on_step(&progress);
        };
        self.save()?;
        Ok(finish)
    }

    /// The cache entries of step `step` (0-based): a seeded permutation per epoch.
    fn batch_indices(&self, step: u64) -> Vec<usize> {
        let n = self.cache.len() as u64;
        let first = step * self.spec.batch as u64;
        (first..first + self.spec.batch as u64)
            .map(|k| {
                let key = format!("order.cache.{}", k / n);
                SplitMix64::keyed(self.spec.seed, &key).permutation(n as usize)[(k % n) as usize]
                    as usize
            })
            .collect()
    }

    fn train_one(&mut self) -> Result<(Losses, f64)> {
        let step = self.state.steps;
        let batch = self.cache.batch(&self.batch_indices(step))?;
        let cartoons = self.cartoons.cartoon_batch(step, &self.device)?;
        let factor = self.spec.lr_factor(self.fraction_done());
        let lrs = (self.spec.lr_g * factor, self.spec.lr_d * factor);
        let pack_step = PackStep {
            nets: &self.nets,
            face_id: &self.face_id,
            spec: &self.spec,
        };
        let losses = pack_step.run(
            (&batch, &cartoons),
            step + 1,
            &mut self.state.ada,
            (&mut self.g_optim, &mut self.d_optim),
            lrs,
        )?;
        self.state.steps = step + 1;
        Ok((losses, lrs.0))
    }

    /// The sample grid: photo | base style | new style, one row per photo.
    pub fn sample_grid(&self) -> Result<image::RgbImage> {
        let picked: Vec<usize> = (0..GRID_PHOTOS.min(self.cache.len().div_ceil(2)))
            .map(|i| 2 * i)
            .collect();
        let batch = self.cache.batch(&picked)?;
        let step = PackStep {
            nets: &self.nets,
            face_id: &self.face_id,
            spec: &self.spec,
        };
        let new = step.translate(&batch)?.detach();
        Ok(columns_grid(&[
            to_rgb_images(&batch.photos)?,
            to_rgb_images(&batch.base)?,
            to_rgb_images(&new)?,
        ]))
    }

    /// Writes `samples/step-NNNNNNN.png` ([`PackTrainer::sample_grid`]).
    pub fn write_samples(&self) -> Result<PathBuf> {
        let path = sample_path(&self.options.out, self.state.steps);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        self.sample_grid()?
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Writes the checkpoint.
    pub fn save(&self) -> Result<()> {
        let mut tensors = self.nets.named_tensors(&TRAINED);
        tensors.extend(self.g_optim.prefixed_state("adam_g."));
        tensors.extend(self.d_optim.prefixed_state("adam_d."));
        let metadata = HashMap::from([(
            METADATA_KEY.to_string(),
            serde_json::to_string(&self.state)?,
        )]);
        write_atomically(
            &self.checkpoint_path(),
            &to_safetensors(tensors, Some(metadata))?,
        )
    }

    /// Installs the generator as a style in `dir` (f16 weights) with `description`.
    pub fn install(&self, dir: &Path, description: String) -> Result<()> {
        let prefix = format!("{}.", NETWORKS[0]);
        let generator = self
            .nets
            .named_tensors(&NETWORKS[..1])
            .into_iter()
            .filter_map(|(k, t)| Some((k.strip_prefix(&prefix)?.to_string(), t)))
            .collect();
        let manifest = StyleManifest {
            description,
            base: Some(self.spec.base.clone()),
            steps: Some(self.state.steps),
        };
        style::install_generator(dir, generator, WeightsDtype::F16, &manifest)
    }
}
