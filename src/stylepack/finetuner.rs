//! The [`StyleTrainer`] of `toonbot serve`: the candle fine-tune of [`crate::train`] on the
//! pack's images against the configured photos, and its evaluation (KID against the
//! held-out pack images, identity cosine).

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;

use super::trainer::{
    EvalReport, FinetuneJob, FinetuneOutcome, StyleTrainer, TrainError, TrainEvent, TrainProgress,
};
use crate::cartoon::load_generator;
use crate::config::Config;
use crate::face::FacePipeline;
use crate::train::data::ImageFolder;
use crate::train::eval::{self, Scored};
use crate::train::finetune::{self, Finetune};
use crate::train::params::Freeze;
use crate::train::run::{self, Finish, RunOptions};
use crate::train::style::WeightsDtype;
use crate::train::RunSpec;

/// Losses shown while a pack trains: (name in the bot, the training loop's name).
const SHOWN_LOSSES: [(&str, &str); 4] = [
    ("G", "Generator_loss"),
    ("D", "Discriminator_loss"),
    ("cycle", "G_recon_loss_A"),
    ("face-id", "G_id_loss_A"),
];

/// Fine-tunes with [`crate::train`] on `device`.
pub struct CandleTrainer {
    config: Config,
    faces: Arc<FacePipeline>,
    device: Device,
}

impl CandleTrainer {
    /// The trainer of `toonbot serve`: `[stylepacks]` photos and size and the models folder
    /// from `config`, the shared face pipeline, training on `device`.
    pub fn new(config: &Config, faces: Arc<FacePipeline>, device: &Device) -> Self {
        Self {
            config: config.clone(),
            faces,
            device: device.clone(),
        }
    }

    fn options(&self, job: &FinetuneJob) -> RunOptions {
        let every = u64::from(job.preview_every.max(1));
        RunOptions {
            out: job.work_dir.clone(),
            compact: None,
            compact_generators_only: false,
            save_every: every,
            sample_every: every,
            log_every: every.min(10),
            time_limit: None,
            models_dir: self.config.models.dir.clone(),
        }
    }

    fn run(
        &self,
        job: &FinetuneJob,
        report: &dyn Fn(TrainEvent),
        cancel: &AtomicBool,
    ) -> anyhow::Result<FinetuneOutcome> {
        let packs = &self.config.stylepacks;
        let resume = job.work_dir.join(run::CHECKPOINT_FILE).is_file();
        // Branches alone train where the base keeps its other networks (the few-shot
        // setting, and much cheaper on a CPU); a generator-only base trains everything.
        let freeze = if finetune::has_training_state(&job.base_dir) {
            Freeze::Branches
        } else {
            Freeze::None
        };
        let finetune = Finetune {
            base_name: dir_name(&job.base_dir),
            base_dir: job.base_dir.clone(),
            photos: Some(packs.photos.clone()),
            cartoons: job.images_dir.clone(),
            freeze,
        };
        let template = RunSpec {
            size: packs.size,
            ..RunSpec::photo2cartoon(
                packs.photos.clone(),
                job.images_dir.clone(),
                u64::from(job.steps),
            )
        };
        let mut trainer = finetune.trainer(&template, self.options(job), resume, &self.device)?;
        let (out, preview_every) = (trainer.options.out.clone(), trainer.options.sample_every);
        let finish = trainer.run(cancel, |p| {
            report(TrainEvent::Step(TrainProgress {
                step: p.step as u32,
                total: p.steps as u32,
                losses: SHOWN_LOSSES
                    .iter()
                    .filter_map(|(shown, name)| {
                        Some((shown.to_string(), *p.losses.get(*name)? as f32))
                    })
                    .collect(),
                images_per_sec: p.images_per_s as f32,
            }));
            if p.step.is_multiple_of(preview_every) {
                if let Ok(png) = std::fs::read(run::sample_path(&out, p.step)) {
                    report(TrainEvent::Preview {
                        step: p.step as u32,
                        png,
                    });
                }
            }
        })?;
        let step = trainer.step() as u32;
        if finish != Finish::Completed {
            return Ok(FinetuneOutcome::Cancelled { step });
        }
        finetune::install(
            &trainer,
            &job.out_dir,
            WeightsDtype::F16,
            job.description.clone(),
        )?;
        Ok(FinetuneOutcome::Completed { steps: step })
    }
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

impl StyleTrainer for CandleTrainer {
    fn finetune(
        &self,
        job: &FinetuneJob,
        report: &dyn Fn(TrainEvent),
        cancel: &AtomicBool,
    ) -> Result<FinetuneOutcome, TrainError> {
        if !job
            .base_dir
            .join(crate::cartoon::styles::WEIGHTS_FILE)
            .is_file()
        {
            return Err(TrainError::Base(format!(
                "{} has no generator weights",
                job.base_dir.display()
            )));
        }
        self.run(job, report, cancel)
            .map_err(|e| TrainError::Internal(format!("{e:#}")))
    }

    fn evaluate(&self, style_dir: &Path, held_out: &Path) -> Result<EvalReport, TrainError> {
        let evaluate = || -> anyhow::Result<EvalReport> {
            let inception = eval::load_inception(&self.config, &self.device)?;
            let generator = load_generator(style_dir, &self.device)?;
            let mut photos = ImageFolder::open(&self.config.stylepacks.photos)?;
            photos
                .paths
                .truncate(self.config.stylepacks.eval_photos.max(1));
            let scored = Scored {
                name: &dir_name(style_dir),
                generator: Some(&generator),
                faces: &self.faces,
            };
            let report = scored.evaluate(
                &self.config,
                &self.device,
                &inception,
                &photos,
                held_out,
                || {},
            )?;
            Ok(EvalReport {
                kid_x100_mean: report.kid_x100,
                kid_x100_std: report.kid_std_x100,
                identity_cosine: report.identity_cosine,
            })
        };
        evaluate().map_err(|e| TrainError::Internal(format!("{e:#}")))
    }
}
