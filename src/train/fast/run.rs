//! The fast recipe's training loop: reconstruction steps until the held-out check passes
//! (or `recon.max_steps`), then the adversarial steps; a JSON-lines log, sample grids,
//! checkpoints, and a clean stop, as the photo2cartoon loop ([`crate::train::run`]).
//!
//! Checkpoints hold `genA2B.*`, `disP.*`, `disLB.*`, the optimisers' moments (`adam_g.*`,
//! `adam_d.*`, full ones only) and [`FastState`] as JSON under `toonbot_fast_training`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::augment::{edge_smoothed, AdaptiveProbability};
use super::model::{load_backbone, FastNets, NETWORKS};
use super::step::{AdversarialBatch, FastStep};
use super::FastSpec;
use crate::imageops;
use crate::nets::face_embedder::cosine_similarity;
use crate::nets::generator;
use crate::nets::layers::is_buffer;
use crate::nets::projected_discriminator::{self, ProjectedDiscriminator};
use crate::train::adam::Adam;
use crate::train::checkpoint::{self, to_safetensors, write_atomically};
use crate::train::data::{ImageFolder, TrainData};
use crate::train::face_id::FaceIdLoss;
use crate::train::grid::{columns_grid, to_rgb_images};
use crate::train::params::Freeze;
use crate::train::run::{
    sample_path, Finish, LossLog, Progress, RunOptions, CHECKPOINT_FILE, LOG_FILE,
};
use crate::train::step::Losses;

const METADATA_KEY: &str = "toonbot_fast_training";
/// Held-out photos in the reconstruction check and in the sample grids.
const CHECK_PHOTOS: usize = 16;
const GRID_PHOTOS: usize = 8;
/// Fewest usable images a training folder may have.
pub const MIN_IMAGES: usize = 8;

/// Where a run stands; stored in its checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FastState {
    /// The run's settings.
    pub spec: FastSpec,
    /// Whether the checkpoint holds the optimisers' moments.
    pub full: bool,
    /// Reconstruction steps done.
    pub recon_steps: u64,
    /// Set once the reconstruction phase is over.
    pub recon_done: bool,
    /// Adversarial steps done.
    pub adv_steps: u64,
    /// ADA's controller of the augmentation probability, with its running sums.
    pub ada: AdaptiveProbability,
    /// The last held-out reconstruction check: (PSNR dB, identity).
    pub last_check: Option<(f64, f64)>,
}

/// How a fast run starts.
pub enum FastStart {
    /// New networks drawn from the spec's seed.
    Fresh,
    /// Continue the run of this checkpoint; its spec must equal the requested one.
    Resume(PathBuf),
    /// The networks of this (fast) checkpoint, its reconstruction phase counted as done: its
    /// generator, and when it has trained adversarially also its discriminators and ADA's
    /// probability (a new schedule continuing a finished run). Optimisers start afresh.
    FromReconstruction(PathBuf),
}

/// A checkpoint read back.
struct Loaded {
    state: FastState,
    tensors: HashMap<String, Tensor>,
}

fn load_checkpoint(path: &Path, device: &Device) -> Result<Loaded> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_checkpoint(&bytes, path, device)?.with_context(|| {
        format!(
            "{} is not a fast-recipe training checkpoint",
            path.display()
        )
    })
}

/// The checkpoint in `bytes` (read from `path`); `None` when it is a safetensors file
/// without a fast run's state.
fn parse_checkpoint(bytes: &[u8], path: &Path, device: &Device) -> Result<Option<Loaded>> {
    let parsed = checkpoint::parse_with_state(bytes, path, METADATA_KEY, device)?;
    Ok(parsed.map(|(state, tensors)| Loaded { state, tensors }))
}

/// A fast checkpoint's generator A->B (keys as in a style's `generator.safetensors`) and
/// where its run stood.
pub struct TrainedGenerator {
    /// The generator's weights by name, without the `genA2B.` prefix.
    pub tensors: HashMap<String, Tensor>,
    /// The run's state from the checkpoint's header.
    pub state: FastState,
}

/// The generator of the fast checkpoint at `path`; `None` when the file is another kind of
/// checkpoint.
pub fn read_generator(path: &Path, device: &Device) -> Result<Option<TrainedGenerator>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(Loaded { state, tensors }) = parse_checkpoint(&bytes, path, device)? else {
        return Ok(None);
    };
    let prefix = format!("{}.", NETWORKS[0]);
    let tensors = tensors
        .into_iter()
        .filter_map(|(k, t)| Some((k.strip_prefix(&prefix)?.to_string(), t)))
        .collect();
    Ok(Some(TrainedGenerator { tensors, state }))
}

/// Fails unless `folder` holds at least [`MIN_IMAGES`] images that all decode.
pub(crate) fn check_folder(what: &str, dir: &Path) -> Result<ImageFolder> {
    let folder = ImageFolder::open(dir).with_context(|| what.to_string())?;
    let bad: Vec<String> = (0..folder.len())
        .filter_map(|i| folder.load(i).err().map(|e| format!("{e:#}")))
        .collect();
    anyhow::ensure!(
        bad.is_empty(),
        "{what}: {} of {} files are not readable images: {}",
        bad.len(),
        folder.len(),
        bad.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
    );
    anyhow::ensure!(
        folder.len() >= MIN_IMAGES,
        "{what}: {} holds {} images, fewer than the {MIN_IMAGES} training needs",
        dir.display(),
        folder.len()
    );
    Ok(folder)
}

/// The first `n` images of `folder`, resized to `size`, in [-1, 1].
fn fixed_images(folder: &ImageFolder, n: usize, size: usize, device: &Device) -> Result<Tensor> {
    let s = size as u32;
    let images = (0..n.min(folder.len()))
        .map(|i| Ok(imageops::resize_rgb(&folder.load(i)?, s, s)))
        .collect::<Result<Vec<RgbImage>>>()?;
    Ok(generator::normalize(&imageops::rgb_batch(
        &images, device,
    )?)?)
}

/// A fast run in progress: its networks, optimisers and state, ready to step, log and
/// checkpoint.
pub struct FastTrainer {
    /// The run's settings.
    pub spec: FastSpec,
    /// Where and how often it writes checkpoints, logs and samples.
    pub options: RunOptions,
    /// The networks being trained.
    pub nets: FastNets,
    /// Where the run stands (saved in each checkpoint).
    pub state: FastState,
    g_optim: Adam,
    d_optim: Adam,
    val: ImageFolder,
    device: Device,
    /// The face-ID loss at each training size, made on first use.
    face_ids: HashMap<usize, FaceIdLoss>,
}

impl FastTrainer {
    /// Checks the folders and sizes, builds the networks and optimisers, and restores them as
    /// `start` says (a resumed run's spec must equal `spec`).
    pub fn new(
        spec: FastSpec,
        options: RunOptions,
        start: FastStart,
        device: &Device,
    ) -> Result<Self> {
        let resumed = match &start {
            FastStart::Resume(path) => {
                let loaded = load_checkpoint(path, device)?;
                if loaded.state.spec != spec {
                    anyhow::bail!(
                        "--resume: the run in {} was started with other settings; resume it \
                         with the same ones, or train into another --out.\n  checkpoint: {}\n  \
                         requested:  {}",
                        path.display(),
                        serde_json::to_string(&loaded.state.spec)?,
                        serde_json::to_string(&spec)?
                    );
                }
                Some(loaded)
            }
            _ => None,
        };
        for size in [spec.low_size, spec.high_size] {
            projected_discriminator::check_size(size)?;
        }
        anyhow::ensure!(
            spec.batch > 0 && spec.steps > 0,
            "batch and steps must be positive"
        );
        check_folder("--photos", &spec.photos)?;
        check_folder("--cartoons", &spec.cartoons)?;
        let val = check_folder("--val-photos", &spec.val_photos)?;

        let nets = FastNets::new(
            spec.net,
            spec.discriminators,
            (spec.seed, Freeze::None),
            load_backbone(&options.models_dir, device)?,
            device,
        )?;
        let (mut g_optim, mut d_optim) = nets.optimisers()?;
        let fresh_state = FastState {
            spec: spec.clone(),
            full: true,
            recon_steps: 0,
            recon_done: false,
            adv_steps: 0,
            ada: AdaptiveProbability::new(spec.ada_target, spec.ada_speed_images),
            last_check: None,
        };
        let state = match (&start, resumed) {
            (_, Some(c)) => {
                nets.load(&c.tensors, &NETWORKS)?;
                if c.state.full {
                    // The generator's optimiser also took the reconstruction steps.
                    let g_steps = c.state.recon_steps + c.state.adv_steps;
                    g_optim.load_prefixed(&c.tensors, "adam_g.", g_steps)?;
                    d_optim.load_prefixed(&c.tensors, "adam_d.", c.state.adv_steps)?;
                }
                FastState {
                    full: true,
                    ..c.state
                }
            }
            (FastStart::FromReconstruction(path), None) => {
                let c = load_checkpoint(path, device)?;
                anyhow::ensure!(
                    c.state.recon_steps > 0,
                    "{} has no reconstruction steps",
                    path.display()
                );
                let adversarial = c.state.adv_steps > 0;
                if adversarial {
                    anyhow::ensure!(
                        c.state.spec.net == spec.net
                            && c.state.spec.discriminators == spec.discriminators,
                        "{}'s networks have other shapes than this run's",
                        path.display()
                    );
                }
                nets.load(
                    &c.tensors,
                    if adversarial {
                        &NETWORKS
                    } else {
                        &NETWORKS[..1]
                    },
                )?;
                let mut ada = fresh_state.ada;
                if adversarial {
                    ada.p = c.state.ada.p;
                }
                FastState {
                    recon_steps: c.state.recon_steps,
                    recon_done: true,
                    last_check: c.state.last_check,
                    ada,
                    ..fresh_state
                }
            }
            _ => fresh_state,
        };
        Ok(Self {
            spec,
            options,
            nets,
            state,
            g_optim,
            d_optim,
            val,
            device: device.clone(),
            face_ids: HashMap::new(),
        })
    }

    /// Where the run's full checkpoint is written: `checkpoint.safetensors` in the output folder.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.options.out.join(CHECKPOINT_FILE)
    }

    /// Steps of both phases done.
    pub fn total_steps(&self) -> u64 {
        self.state.recon_steps + self.state.adv_steps
    }

    fn face_id(&mut self, size: usize) -> Result<&FaceIdLoss> {
        if !self.face_ids.contains_key(&size) {
            let loss = FaceIdLoss::load(&self.options.models_dir, size, &self.device)?;
            self.face_ids.insert(size, loss);
        }
        Ok(&self.face_ids[&size])
    }

    fn data(&self, size: usize) -> Result<TrainData> {
        Ok(TrainData {
            photos: ImageFolder::open(&self.spec.photos)?,
            cartoons: ImageFolder::open(&self.spec.cartoons)?,
            size,
            batch: self.spec.batch,
            seed: self.spec.seed,
        })
    }

    /// Trains until the last step, `stop`, or the time limit; checkpoints before returning.
    pub fn run(&mut self, stop: &AtomicBool, mut on_step: impl FnMut(&Progress)) -> Result<Finish> {
        std::fs::create_dir_all(&self.options.out)
            .with_context(|| format!("creating {}", self.options.out.display()))?;
        let mut log = LossLog::open(&self.options.out.join(LOG_FILE))?;
        let started = Instant::now();
        let first = self.total_steps();
        let mut data = self.data(self.current_size())?;
        let finish =
            loop {
                let done = self.state.adv_steps >= self.spec.steps;
                if let Some(finish) = self.options.finish_before_step(done, stop, started) {
                    break finish;
                }
                let size = self.current_size();
                if data.size != size {
                    data = self.data(size)?;
                }
                let (mut losses, lr) = self.train_one(&data)?;
                if !self.state.recon_done
                    && self
                        .state
                        .recon_steps
                        .is_multiple_of(self.spec.recon.check_every)
                {
                    let (psnr, identity) = self.reconstruction_check()?;
                    losses.insert("recon_psnr_db".into(), psnr);
                    losses.insert("recon_identity".into(), identity);
                    self.state.last_check = Some((psnr, identity));
                    let target =
                        self.spec.recon.psnr_db <= psnr && self.spec.recon.identity <= identity;
                    if target || self.state.recon_steps >= self.spec.recon.max_steps {
                        self.state.recon_done = true;
                        losses.insert("recon_target_met".into(), f64::from(u8::from(target)));
                        tracing::info!(
                        "reconstruction phase over after {} steps: PSNR {psnr:.2} dB, identity \
                         {identity:.3}{}",
                        self.state.recon_steps,
                        if target { "" } else { " (step cap reached short of the targets)" }
                    );
                    }
                }
                let step = self.total_steps();
                let elapsed = started.elapsed().as_secs_f64();
                let progress = Progress {
                    step,
                    steps: self.state.recon_steps + self.spec.steps,
                    lr,
                    images_per_s: ((step - first) * self.spec.batch as u64) as f64 / elapsed,
                    losses,
                    seconds_left: None,
                };
                log.add(&progress);
                let flush = step.is_multiple_of(self.options.log_every)
                    || progress.losses.contains_key("recon_psnr_db");
                if flush {
                    log.flush(&progress, elapsed)?;
                }
                if step.is_multiple_of(self.options.sample_every) {
                    self.write_samples()?;
                }
                if step.is_multiple_of(self.options.save_every) {
                    self.save()?;
                }
                on_step(&progress);
            };
        self.save()?;
        Ok(finish)
    }

    fn current_size(&self) -> usize {
        if self.state.recon_done {
            self.spec.size_at(self.state.adv_steps + 1)
        } else {
            self.spec.low_size
        }
    }

    /// One step of the current phase; returns its losses and learning rate.
    fn train_one(&mut self, data: &TrainData) -> Result<(Losses, f64)> {
        let (photos, cartoons) = data.batch(self.total_steps(), &self.device)?;
        self.face_id(data.size)?;
        let face_id = &self.face_ids[&data.size];
        let step = FastStep {
            nets: &self.nets,
            face_id,
            spec: &self.spec,
        };
        if !self.state.recon_done {
            let lr = self.spec.lr_recon;
            let losses = step.reconstruct(&photos, &cartoons, &mut self.g_optim, lr)?;
            self.state.recon_steps += 1;
            return Ok((losses, lr));
        }
        let k = self.state.adv_steps + 1;
        let factor = self.spec.lr_factor(k);
        let smoothed = edge_smoothed(&cartoons, self.spec.edge_threshold)?;
        let batch = AdversarialBatch {
            photos: &photos,
            cartoons: &cartoons,
            smoothed: &smoothed,
        };
        let lrs = (self.spec.lr_g * factor, self.spec.lr_d * factor);
        let losses = step.adversarial(
            &batch,
            k,
            &mut self.state.ada,
            (&mut self.g_optim, &mut self.d_optim),
            lrs,
        )?;
        self.state.adv_steps = k;
        Ok((losses, lrs.0))
    }

    /// Mean PSNR (dB, on 0..255 values) and face-ID cosine of the generator's
    /// reconstructions of the held-out photos, at the low size.
    pub fn reconstruction_check(&mut self) -> Result<(f64, f64)> {
        let size = self.spec.low_size;
        let x = fixed_images(&self.val, CHECK_PHOTOS, size, &self.device)?;
        let y = self.nets.gen.forward(&x)?.0.detach().clamp(-1f32, 1f32)?;
        let mse: Vec<f32> = (&y - &x)?
            .sqr()?
            .flatten_from(1)?
            .mean(1)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let psnr = mse
            .iter()
            .map(|&m| 10.0 * (4.0 / f64::from(m).max(1e-12)).log10())
            .sum::<f64>()
            / mse.len() as f64;
        let face_id = self.face_id(size)?;
        let cos = cosine_similarity(&face_id.embed(&x)?, &face_id.embed(&y)?)?;
        let identity = f64::from(cos.mean_all()?.to_scalar::<f32>()?);
        Ok((psnr, identity))
    }

    /// `samples/step-NNNNNNN.png`: held-out photo | its cartoon, at the current size.
    pub fn write_samples(&self) -> Result<PathBuf> {
        let size = self.current_size();
        let x = fixed_images(&self.val, GRID_PHOTOS, size, &self.device)?;
        let y = self.nets.gen.forward(&x)?.0.detach();
        let grid = columns_grid(&[to_rgb_images(&x)?, to_rgb_images(&y)?]);
        let path = sample_path(&self.options.out, self.total_steps());
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        grid.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Writes the full checkpoint, and the compact one (f16 weights, no moments) when
    /// configured.
    pub fn save(&self) -> Result<()> {
        self.write_checkpoint(&self.checkpoint_path(), true)?;
        if let Some(compact) = &self.options.compact {
            self.write_checkpoint(compact, false)?;
        }
        Ok(())
    }

    fn write_checkpoint(&self, path: &Path, full: bool) -> Result<()> {
        let keep_f32 = |name: &str| {
            is_buffer(name)
                || name
                    .strip_prefix("disP.")
                    .is_some_and(ProjectedDiscriminator::is_fixed)
        };
        let mut tensors = self
            .nets
            .named_tensors(&NETWORKS)
            .into_iter()
            .map(|(name, t)| {
                let t = if full || keep_f32(&name) {
                    t
                } else {
                    t.to_dtype(DType::F16)?
                };
                Ok((name, t))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        if full {
            tensors.extend(self.g_optim.prefixed_state("adam_g."));
            tensors.extend(self.d_optim.prefixed_state("adam_d."));
        }
        let state = FastState {
            full,
            ..self.state.clone()
        };
        let metadata = HashMap::from([(METADATA_KEY.to_string(), serde_json::to_string(&state)?)]);
        write_atomically(path, &to_safetensors(tensors, Some(metadata))?)
    }
}
