//! The [`StyleTrainer`] of `toonbot serve`: a fine-tune of [`crate::train`] on the pack's
//! images against the configured photos (the fast pack recipe of [`crate::train::pack`] by
//! default, photo2cartoon's step where `[stylepacks] recipe` says so), and its evaluation (KID
//! against the held-out pack images, identity cosine).

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;

use super::trainer::{
    EvalReport, FinetuneJob, FinetuneOutcome, StyleTrainer, TrainError, TrainEvent, TrainProgress,
};
use crate::cartoon::load_generator;
use crate::config::{Config, PackRecipe};
use crate::face::FacePipeline;
use crate::train::data::ImageFolder;
use crate::train::eval::{self, Scored};
use crate::train::finetune::{self, Finetune};
use crate::train::model::NetConfig;
use crate::train::pack::run::{base_sha256, checkpointed_spec, PackTrainer};
use crate::train::pack::PackSpec;
use crate::train::params::Freeze;
use crate::train::run::{self, Finish, Progress, RunOptions};
use crate::train::style::WeightsDtype;
use crate::train::RunSpec;

/// Losses shown while a pack trains with photo2cartoon's recipe: (name in the bot, the
/// training loop's name).
const SHOWN_LOSSES: [(&str, &str); 4] = [
    ("G", "Generator_loss"),
    ("D", "Discriminator_loss"),
    ("cycle", "G_recon_loss_A"),
    ("face-id", "G_id_loss_A"),
];

/// Losses shown while a pack trains with the fast recipe.
const SHOWN_FAST_LOSSES: [(&str, &str); 4] = [
    ("G", "G_loss"),
    ("D", "D_loss"),
    ("face-id", "G_face_id"),
    ("anchor", "G_anchor_colour"),
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

    /// The fast recipe: the decoder side of the base within `[stylepacks] minutes` (capped at
    /// the job's steps); a checkpoint in the work folder is resumed with its own settings.
    fn run_fast(
        &self,
        job: &FinetuneJob,
        report: &dyn Fn(TrainEvent),
        cancel: &AtomicBool,
    ) -> anyhow::Result<FinetuneOutcome> {
        let packs = &self.config.stylepacks;
        let checkpointed = checkpointed_spec(&job.work_dir)?;
        let resume = checkpointed.is_some();
        let spec = match checkpointed {
            Some(spec) => spec,
            None => PackSpec {
                size: packs.size,
                max_steps: u64::from(job.steps),
                ..PackSpec::new(
                    (dir_name(&job.base_dir), base_sha256(&job.base_dir)?),
                    packs.photos.clone(),
                    job.images_dir.clone(),
                    NetConfig::photo2cartoon(),
                    packs.budget_minutes(ImageFolder::open(&job.images_dir)?.len()),
                )
            },
        };
        let Some(mut trainer) = PackTrainer::new(
            spec,
            &job.base_dir,
            self.options(job),
            resume,
            cancel,
            &self.device,
        )?
        else {
            return Ok(FinetuneOutcome::Cancelled { step: 0 });
        };
        let (out, preview_every) = (trainer.options.out.clone(), trainer.options.sample_every);
        let finish = trainer.run(cancel, |p| {
            report_step(report, p, &SHOWN_FAST_LOSSES);
            report_preview(report, p, &out, preview_every);
        })?;
        let step = trainer.state.steps as u32;
        if finish != Finish::Completed {
            return Ok(FinetuneOutcome::Cancelled { step });
        }
        trainer.install(&job.out_dir, job.description.clone())?;
        Ok(FinetuneOutcome::Completed { steps: step })
    }

    /// photo2cartoon's recipe: its full step for the job's steps.
    fn run_photo2cartoon(
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
            report_step(report, p, &SHOWN_LOSSES);
            report_preview(report, p, &out, preview_every);
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

/// Reports a training loop's progress, with `shown` losses (name in the bot, loop's name).
fn report_step(report: &dyn Fn(TrainEvent), p: &Progress, shown: &[(&str, &str)]) {
    report(TrainEvent::Step(TrainProgress {
        step: p.step as u32,
        total: p.steps as u32,
        losses: shown
            .iter()
            .filter_map(|(shown, name)| Some((shown.to_string(), *p.losses.get(*name)? as f32)))
            .collect(),
        images_per_sec: p.images_per_s as f32,
        time_left: p.seconds_left.map(Duration::from_secs_f64),
    }));
}

/// Reports the sample grid the loop wrote at this step (after the first step and every
/// `every` steps), so that the first preview comes within a minute or two of the start.
fn report_preview(report: &dyn Fn(TrainEvent), p: &Progress, out: &Path, every: u64) {
    if p.step.is_multiple_of(every) || p.step == 1 {
        if let Ok(png) = std::fs::read(run::sample_path(out, p.step)) {
            report(TrainEvent::Preview {
                step: p.step as u32,
                png,
            });
        }
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
        match self.config.stylepacks.recipe {
            PackRecipe::Fast => self.run_fast(job, report, cancel),
            PackRecipe::Photo2cartoon => self.run_photo2cartoon(job, report, cancel),
        }
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
                (&photos, held_out),
                None,
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
