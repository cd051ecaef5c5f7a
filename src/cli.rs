//! The CLI subcommands' work: read inputs, call the pipeline, write files and reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::Device;
use serde::Serialize;

use crate::cartoon::compose::{self, ComposeOptions};
use crate::cartoon::styles::{StyleError, StyleManifest, StyleRegistry};
use crate::cartoon::{CartoonError, Cartoonizer};
use crate::config::Config;
use crate::face::{FacePipeline, PhotoFaces};
use crate::imageops;
use crate::train;

/// `--device`: where the networks run.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    /// Run on the CPU.
    Cpu,
    /// Run on CUDA device 0 (needs a build with `--features cuda`).
    Cuda,
}

impl DeviceArg {
    /// The candle device to run on; fails on CUDA when the build has no CUDA support.
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
    /// The photo's path, as given.
    pub input: PathBuf,
    /// Photo width in pixels.
    pub width: u32,
    /// Photo height in pixels.
    pub height: u32,
    /// Every face found, largest first.
    pub faces: Vec<FaceReport>,
    /// Milliseconds per stage (`decode`, `detect`, `landmarks`, `align`, `segment`).
    pub timings_ms: BTreeMap<&'static str, f64>,
}

/// One face in a [`PhotoReport`], in photo pixel coordinates.
#[derive(Debug, Serialize)]
pub struct FaceReport {
    /// Detector confidence, in [0, 1].
    pub score: f32,
    /// The detector's box `[x, y, width, height]`, written as `box`.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    /// The 68 landmarks `[x, y]`, in iBUG order.
    pub landmarks: Vec<[f32; 2]>,
    /// Tilt of the eye line, in degrees (what the alignment rotates away).
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
    /// The photo's path, as given.
    pub input: PathBuf,
    /// Name of the style used.
    pub style: String,
    /// Every face, largest first, with the files written for it.
    pub faces: Vec<CartoonFaceReport>,
    /// Faces found: more than `faces` when the photo has over `faces.max_faces`.
    pub faces_found: usize,
    /// Where the photo with every face replaced was written.
    pub photo: PathBuf,
    /// Milliseconds per stage, decoding, face stages, generator and composition.
    pub timings_ms: BTreeMap<&'static str, f64>,
}

/// One face in a [`CartoonReport`].
#[derive(Debug, Serialize)]
pub struct CartoonFaceReport {
    /// The detector's box `[x, y, width, height]` in photo pixels, written as `box`.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    /// Where the 320x320 sticker was written.
    pub sticker: PathBuf,
    /// Where the 512x512 avatar was written.
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
        let result = crate::imageops::read_photo_file(path, &config.limits)
            .map_err(CartoonError::Decode)
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
        if result.faces_found > result.faces.len() {
            eprintln!(
                "{}: {} faces found; cartoonized the {} largest (faces.max_faces)",
                path.display(),
                result.faces_found,
                result.faces.len()
            );
        }
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
                faces_found: result.faces_found,
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

/// `toonbot serve`: the Discord bot with the cartoon pipeline behind its queue, and style
/// packs (whose uploads are refused until a trainer is plugged in here).
pub fn serve(config: &Config, device: &Device) -> Result<ExitCode> {
    let token = crate::bot::load_token(&config.bot)?;
    let cartoonizer = Cartoonizer::load(config, device)?;
    let renderer = crate::jobs::CartoonRenderer::new(
        cartoonizer,
        config.limits.clone(),
        config.styles.default.clone(),
    );
    let faces = std::sync::Arc::new(FacePipeline::load(config, device)?);
    let trainer: Option<std::sync::Arc<dyn crate::stylepack::StyleTrainer>> =
        match config.stylepacks.check_training() {
            Ok(()) => Some(std::sync::Arc::new(
                crate::stylepack::finetuner::CandleTrainer::new(config, faces.clone(), device),
            )),
            Err(e) => {
                tracing::warn!("style packs cannot train, uploads will be refused: {e:#}");
                None
            }
        };
    let stylepacks = crate::stylepack::PackSetup::new(config, faces, trainer);
    let backend = crate::bot::Backend::InProcess {
        renderer: std::sync::Arc::new(renderer),
        stylepacks: Some(stylepacks),
    };
    tokio::runtime::Runtime::new()?.block_on(crate::bot::serve(
        config.bot.clone(),
        token,
        backend,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `toonbot serve --role gateway`: the Discord gateway for `shards` (all of them when
/// `None`), queueing jobs on the broker at `nats` (default `broker.url`) for the workers and
/// handing the replies to the responders. Loads no models: the styles are those the workers
/// publish.
pub fn serve_gateway(
    config: &Config,
    nats: Option<&str>,
    shards: Option<crate::bot::ShardRange>,
) -> Result<ExitCode> {
    let token = crate::bot::load_token(&config.bot)?;
    let broker = config.broker.jetstream(nats, config.bot.queue_config())?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let catalog = crate::jobs::StyleCatalog::follow(&broker).await?;
        let queue = crate::jobs::JetStreamQueue::connect(&broker, catalog.style_version()).await?;
        let stylepacks = crate::stylepack::GatewayPacks {
            queue: crate::jobs::TrainingQueue::connect(&broker).await?,
            config: config.stylepacks.clone(),
            default_base: config.styles.default.clone(),
        };
        let backend = crate::bot::Backend::Gateway {
            queue,
            catalog,
            shards,
            stylepacks: Some(stylepacks),
        };
        crate::bot::serve(config.bot.clone(), token, backend).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `toonbot serve --role responder`: answers the requests the gateways handed over, from the
/// broker at `nats` (default `broker.url`), until Ctrl-C or SIGTERM.
pub fn serve_responder(config: &Config, nats: Option<&str>) -> Result<ExitCode> {
    let token = crate::bot::load_token(&config.bot)?;
    let broker = config.broker.jetstream(nats, config.bot.queue_config())?;
    tokio::runtime::Runtime::new()?.block_on(async {
        // It follows jobs by key and submits none: no style versions needed.
        let queue = crate::jobs::JetStreamQueue::connect(&broker, Arc::new(|_| None)).await?;
        let training = crate::jobs::TrainingQueue::connect(&broker).await?;
        crate::bot::respond(
            config.bot.clone(),
            token,
            queue,
            training,
            crate::bot::shutdown_signal(),
        )
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// What a `serve --role worker` process takes from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Work {
    /// Render jobs (`bot.workers` at a time).
    Render,
    /// Style-pack trainings, one at a time (needs the bot's database).
    Train,
    /// Both: trainings on their own thread beside the renders.
    Both,
}

/// `toonbot serve --role worker`: takes render jobs (`bot.workers` at a time) and/or style-pack
/// trainings (one at a time) from the JetStream broker at `nats` (default `broker.url`) until
/// Ctrl-C or SIGTERM. Holds no bot token; a trainer records its runs in the bot's database.
pub fn serve_worker(
    config: &Config,
    device: &Device,
    nats: Option<&str>,
    work: Work,
) -> Result<ExitCode> {
    let queue = config.bot.queue_config();
    let broker = config.broker.jetstream(nats, queue)?;
    let renderer = match work {
        Work::Train => None,
        Work::Render | Work::Both => Some(crate::jobs::CartoonRenderer::new(
            Cartoonizer::load(config, device)?,
            config.limits.clone(),
            config.styles.default.clone(),
        )),
    };
    let packs = match work {
        Work::Render => None,
        Work::Train | Work::Both => {
            config.stylepacks.check_training()?;
            let faces = std::sync::Arc::new(FacePipeline::load(config, device)?);
            let trainer =
                crate::stylepack::finetuner::CandleTrainer::new(config, faces.clone(), device);
            Some(crate::stylepack::PackSetup::new(
                config,
                faces,
                Some(std::sync::Arc::new(trainer)),
            ))
        }
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            crate::bot::shutdown_signal().await;
            tracing::info!("stopping after the jobs in hand");
            stop.send_replace(true);
        });
        let mut tasks = tokio::task::JoinSet::new();
        // Renders use the published style packs, and so do trainings (as bases).
        let training = crate::jobs::TrainingQueue::connect(&broker).await?;
        let installer = crate::stylepack::install_published_styles(
            training.clone(),
            StyleRegistry::from_config(config),
            stopped.clone(),
        );
        tasks.spawn(async move {
            installer.await;
            Ok(())
        });
        if let Some(renderer) = renderer {
            let (broker, render_stop) = (broker.clone(), stopped.clone());
            tasks.spawn(async move {
                crate::jobs::run_workers(&broker, Arc::new(renderer), queue.workers, render_stop)
                    .await
            });
        }
        if let Some(setup) = packs {
            let store = crate::store::Store::connect(&config.bot.database).await?;
            let packs = crate::stylepack::StylePacks::new(setup, store);
            let every = Duration::from_millis(config.bot.progress_interval_ms);
            tasks.spawn(crate::stylepack::train_from_queue(
                packs, training, every, stopped,
            ));
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `toonbot loadtest`: every round of `plan`, a line per round on stderr and the report as
/// one JSON line.
pub fn loadtest(plan: &crate::jobs::loadtest::LoadPlan) -> Result<ExitCode> {
    let report = tokio::runtime::Runtime::new()?.block_on(crate::jobs::loadtest::run(plan))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// `toonbot loadtest --worker`: one stub worker process of the load test.
pub fn loadtest_worker(nats: &str, stub: std::time::Duration) -> Result<ExitCode> {
    tokio::runtime::Runtime::new()?
        .block_on(crate::jobs::loadtest::serve_stub_workers(nats, stub, 1))?;
    Ok(ExitCode::SUCCESS)
}

/// `toonbot bench`: prints the stage table (or JSON).
#[allow(clippy::too_many_arguments)]
pub fn bench(
    config: &Config,
    device: &Device,
    photo: &Path,
    style: Option<&str>,
    (runs, generator_batches): (usize, &[usize]),
    reference_python: Option<&Path>,
    json: bool,
    profile: bool,
) -> Result<ExitCode> {
    let mut report = crate::bench::run(
        config,
        device,
        photo,
        style,
        (runs, generator_batches),
        profile,
    )?;
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

/// `toonbot bench --train`: training step times at each size (JSON or a short table).
pub fn bench_train(
    config: &Config,
    device: &Device,
    plan: &train::bench::TrainBenchPlan,
    json: bool,
) -> Result<ExitCode> {
    let reports = train::bench::run_plan(device, &config.models.dir, plan)?;
    if json {
        println!("{}", train::bench::json_line(&reports)?);
    } else {
        for report in &reports {
            print!("{}", report.table());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `toonbot styles`: one line per installed style.
pub fn styles(config: &Config) -> Result<ExitCode> {
    let registry = StyleRegistry::from_config(config);
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

/// Settings shared by `train base` and `train finetune`.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    /// Training image side, in pixels.
    pub size: usize,
    /// Images per domain and step.
    pub batch: usize,
    /// Total steps (the fast recipe: its adversarial steps).
    pub steps: u64,
    /// Seed of the weight initialisation, data order and augmentation.
    pub seed: u64,
    /// Adam learning rate (the fast recipe: of the generator and the discriminators).
    pub lr: f64,
    /// Write the checkpoint every this many steps.
    pub save_every: u64,
    /// Write a sample grid every this many steps.
    pub sample_every: u64,
    /// Append mean losses to `train.jsonl` every this many steps.
    pub log_every: u64,
    /// Stop with a checkpoint after this many seconds.
    pub time_limit_s: Option<u64>,
    /// Also keep a compact checkpoint (f16, no optimiser state) at this path.
    pub compact: Option<PathBuf>,
    /// The compact checkpoint holds the generators alone (a run resumed from it starts its
    /// discriminators afresh).
    pub compact_generators: bool,
}

impl TrainArgs {
    fn options(&self, config: &Config, out: &Path) -> train::run::RunOptions {
        train::run::RunOptions {
            out: out.to_path_buf(),
            compact: self.compact.clone(),
            compact_generators_only: self.compact_generators,
            save_every: self.save_every.max(1),
            sample_every: self.sample_every.max(1),
            log_every: self.log_every.max(1),
            time_limit: self.time_limit_s.map(std::time::Duration::from_secs),
            models_dir: config.models.dir.clone(),
        }
    }

    fn spec(&self, photos: PathBuf, cartoons: PathBuf) -> train::RunSpec {
        train::RunSpec {
            size: self.size,
            batch: self.batch,
            seed: self.seed,
            lr: self.lr,
            ..train::RunSpec::photo2cartoon(photos, cartoons, self.steps)
        }
    }
}

/// Ctrl-C / SIGTERM set the returned flag (the run checkpoints and stops after the current
/// step); a second one exits at once.
fn stop_on_signal() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step and saving a checkpoint (again to quit at once)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

/// Runs a training loop with a progress bar (steps, `message` of the losses, images/s,
/// ETA); Ctrl-C / SIGTERM stop it with a checkpoint.
fn with_progress(
    position: u64,
    length: u64,
    message: impl Fn(&train::run::Progress) -> String,
    run: impl FnOnce(&AtomicBool, &mut dyn FnMut(&train::run::Progress)) -> Result<train::run::Finish>,
) -> Result<train::run::Finish> {
    let stop = stop_on_signal()?;
    let bar = indicatif::ProgressBar::new(length)
        .with_position(position)
        .with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} eta {eta} ({elapsed})",
            )
            .expect("valid template"),
        );
    let finish = run(&stop, &mut |p| {
        bar.set_length(p.steps);
        bar.set_position(p.step);
        bar.set_message(format!(
            "{} | {:.2} img/s lr {:.1e}",
            message(p),
            p.images_per_s,
            p.lr
        ));
    })?;
    bar.finish_and_clear();
    Ok(finish)
}

fn finish_line(finish: train::run::Finish, step: u64, steps: u64, checkpoint: &Path, out: &Path) {
    eprintln!(
        "{} at step {step}/{steps}: checkpoint {}, log {}, samples in {}",
        match finish {
            train::run::Finish::Completed => "finished",
            train::run::Finish::Interrupted => "interrupted",
            train::run::Finish::TimeLimit => "time limit reached",
        },
        checkpoint.display(),
        out.join(train::run::LOG_FILE).display(),
        out.join(train::run::SAMPLES_DIR).display(),
    );
}

/// A loss of `p` by name, NaN when absent.
fn loss(p: &train::run::Progress, name: &str) -> f64 {
    p.losses.get(name).copied().unwrap_or(f64::NAN)
}

/// Runs a photo2cartoon `trainer` with a progress bar.
fn run_with_progress(trainer: &mut train::run::Trainer) -> Result<train::run::Finish> {
    let message = |p: &train::run::Progress| {
        format!(
            "G {:.3} D {:.3} cycle {:.3} id {:.3}",
            loss(p, "Generator_loss"),
            loss(p, "Discriminator_loss"),
            loss(p, "G_recon_loss_A"),
            loss(p, "G_id_loss_A"),
        )
    };
    let (step, steps) = (trainer.step(), trainer.spec.steps);
    let finish = with_progress(step, steps, message, |stop, on_step| {
        trainer.run(stop, on_step)
    })?;
    let out = &trainer.options.out;
    finish_line(
        finish,
        trainer.step(),
        trainer.spec.steps,
        &trainer.checkpoint_path(),
        out,
    );
    Ok(finish)
}

/// How `train base --recipe fast` starts.
pub struct FastStartArgs {
    /// Continue the run in the output folder (its checkpoint, else the `--compact` one).
    pub resume: bool,
    /// A fast checkpoint whose generator has done the reconstruction phase.
    pub init: Option<PathBuf>,
}

/// `toonbot train base --recipe fast`: the one-sided CPU recipe (or resumes the run in
/// `out`).
pub fn train_base_fast(
    config: &Config,
    device: &Device,
    spec: train::fast::FastSpec,
    out: &Path,
    args: &TrainArgs,
    start: FastStartArgs,
) -> Result<ExitCode> {
    use train::fast::run::{FastStart, FastTrainer};
    let start = match (start.resume, start.init) {
        (true, _) => FastStart::Resume(resume_checkpoint(out, args)?),
        (false, Some(init)) => FastStart::FromReconstruction(init),
        (false, None) => FastStart::Fresh,
    };
    let mut trainer = FastTrainer::new(spec, args.options(config, out), start, device)?;
    let message = |p: &train::run::Progress| {
        if p.losses.contains_key("R_loss") {
            format!(
                "reconstruct L1 {:.4} feat {:.4}",
                loss(p, "R_pixel"),
                loss(p, "R_feature")
            )
        } else {
            format!(
                "G {:.3} D {:.3} id {:.3} p {:.2}",
                loss(p, "G_loss"),
                loss(p, "D_loss"),
                loss(p, "G_face_id"),
                loss(p, "ada_p"),
            )
        }
    };
    let length = trainer.state.recon_steps + trainer.spec.steps;
    let finish = with_progress(trainer.total_steps(), length, message, |stop, on_step| {
        trainer.run(stop, on_step)
    })?;
    let steps = trainer.state.recon_steps + trainer.spec.steps;
    let (checkpoint, out) = (trainer.checkpoint_path(), &trainer.options.out);
    finish_line(finish, trainer.total_steps(), steps, &checkpoint, out);
    Ok(ExitCode::SUCCESS)
}

/// The checkpoint `--resume` continues: the run's own in `out`, else the `--compact` one.
fn resume_checkpoint(out: &Path, args: &TrainArgs) -> Result<PathBuf> {
    let path = [
        Some(out.join(train::run::CHECKPOINT_FILE)),
        args.compact.clone(),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file())
    .with_context(|| {
        format!(
            "--resume: no checkpoint in {} (nor --compact)",
            out.display()
        )
    })?;
    eprintln!("resuming from {}", path.display());
    Ok(path)
}

/// `toonbot train base`: trains all six networks from scratch (or resumes the run in `out`).
pub fn train_base(
    config: &Config,
    device: &Device,
    photos: PathBuf,
    cartoons: PathBuf,
    out: &Path,
    args: &TrainArgs,
    resume: bool,
) -> Result<ExitCode> {
    let options = args.options(config, out);
    let start = if resume {
        train::run::Start::Resume(resume_checkpoint(out, args)?)
    } else {
        train::run::Start::Fresh
    };
    let mut trainer =
        train::run::Trainer::new(args.spec(photos, cartoons), options, start, device)?;
    run_with_progress(&mut trainer)?;
    Ok(ExitCode::SUCCESS)
}

/// What `train finetune` fine-tunes, from what, and where the result goes.
#[derive(Debug, Clone)]
pub struct FinetuneArgs {
    /// The base style.
    pub from: String,
    /// Folder of the cartoon faces to fine-tune on.
    pub cartoons: PathBuf,
    /// The new style's name.
    pub name: String,
    /// Default: the photos the base was trained on.
    pub photos: Option<PathBuf>,
    /// Which generator parts train.
    pub freeze: train::params::Freeze,
    /// Run directory (default `<styles.dir>/../runs/<name>`).
    pub out: Option<PathBuf>,
    /// Precision of the installed generator's weights.
    pub dtype: train::style::WeightsDtype,
    /// Continue the run in the run directory.
    pub resume: bool,
}

/// `toonbot train finetune`: starts from an installed style and installs the result as
/// style `name`.
pub fn train_finetune(
    config: &Config,
    device: &Device,
    ft: &FinetuneArgs,
    args: &TrainArgs,
) -> Result<ExitCode> {
    let (from, name) = (ft.from.as_str(), ft.name.as_str());
    let (base_style, target, out) = finetune_places(config, ft)?;
    let finetune = train::finetune::Finetune {
        base_name: from.to_string(),
        base_dir: base_style.dir,
        photos: ft.photos.clone(),
        cartoons: ft.cartoons.clone(),
        freeze: ft.freeze,
    };
    let template = args.spec(PathBuf::new(), PathBuf::new());
    let mut trainer = finetune.trainer(&template, args.options(config, &out), ft.resume, device)?;
    if run_with_progress(&mut trainer)? != train::run::Finish::Completed {
        eprintln!(
            "not installing style {name:?} yet: the fine-tune did not finish (continue it with \
             --resume)"
        );
        return Ok(ExitCode::from(2));
    }
    let description = format!(
        "fine-tuned from {from} on {}",
        trainer.spec.cartoons.display()
    );
    train::finetune::install(&trainer, &target, ft.dtype, description)?;
    eprintln!("installed style {name:?} in {}", target.display());
    Ok(ExitCode::SUCCESS)
}

/// A fine-tune's base style, the new style's folder and the run folder (`--out`, else
/// `<styles.dir>/../runs/<name>`).
fn finetune_places(
    config: &Config,
    ft: &FinetuneArgs,
) -> Result<(crate::cartoon::styles::StyleInfo, PathBuf, PathBuf)> {
    let registry = StyleRegistry::from_config(config);
    let target = registry
        .trained_dir(&ft.name)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let out = (ft.out.clone())
        .unwrap_or_else(|| config.styles.dir.join("..").join("runs").join(&ft.name));
    Ok((find_base(&registry, &ft.from)?, target, out))
}

/// The style `from` to fine-tune, or an error that says how to make one.
fn find_base(registry: &StyleRegistry, from: &str) -> Result<crate::cartoon::styles::StyleInfo> {
    registry.find(from).map_err(|e| match e {
        StyleError::NoneInstalled { .. } => anyhow::anyhow!(
            "no base style is installed to fine-tune from: train one with `toonbot train base` \
             and install it with `toonbot train export --finetunable` ({e})"
        ),
        e => anyhow::anyhow!("{e}"),
    })
}

/// `toonbot train finetune --recipe fast`: fine-tunes the decoder side of an installed style
/// within `minutes` (default: the pack budget for its number of cartoons) and installs the
/// result as style `ft.name`.
pub fn train_finetune_fast(
    config: &Config,
    device: &Device,
    ft: &FinetuneArgs,
    args: &TrainArgs,
    minutes: Option<f64>,
) -> Result<ExitCode> {
    let (from, name) = (ft.from.as_str(), ft.name.as_str());
    let (base, target, out) = finetune_places(config, ft)?;
    let spec = match train::pack::run::checkpointed_spec(&out)? {
        Some(spec) if ft.resume => spec,
        None if ft.resume => anyhow::bail!("no pack run to resume in {}", out.display()),
        _ => train::pack::PackSpec {
            seed: args.seed,
            freeze: ft.freeze,
            batch: args.batch,
            size: args.size,
            max_steps: args.steps,
            lr_g: args.lr,
            lr_d: args.lr,
            ..train::pack::PackSpec::new(
                (from.to_string(), train::pack::run::base_sha256(&base.dir)?),
                ft.photos
                    .clone()
                    .unwrap_or(config.stylepacks.photos.clone()),
                ft.cartoons.clone(),
                train::model::NetConfig::photo2cartoon(),
                match minutes {
                    Some(minutes) => minutes,
                    None => config
                        .stylepacks
                        .budget_minutes(train::data::ImageFolder::open(&ft.cartoons)?.len()),
                },
            )
        },
    };
    let stop = stop_on_signal()?;
    let options = args.options(config, &out);
    let Some(mut trainer) =
        train::pack::run::PackTrainer::new(spec, &base.dir, options, ft.resume, &stop, device)?
    else {
        eprintln!("interrupted while caching the photos");
        return Ok(ExitCode::from(2));
    };
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(1000).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {msg} ({elapsed})")
            .expect("valid template"),
    );
    let finish = trainer.run(&stop, |p| {
        bar.set_position((trainer_fraction(p) * 1000.0) as u64);
        bar.set_message(format!(
            "step {}/~{} | G {:.3} D {:.3} face-id {:.3} anchor {:.3} | {:.0} s left",
            p.step,
            p.steps,
            loss(p, "G_loss"),
            loss(p, "D_loss"),
            loss(p, "G_face_id"),
            loss(p, "G_anchor_colour"),
            p.seconds_left.unwrap_or(0.0),
        ));
    })?;
    bar.finish_and_clear();
    let steps = trainer.state.steps;
    finish_line(finish, steps, steps, &trainer.checkpoint_path(), &out);
    if finish != train::run::Finish::Completed {
        eprintln!(
            "not installing style {name:?} yet: the fine-tune did not finish (continue it with \
             --resume)"
        );
        return Ok(ExitCode::from(2));
    }
    let description = format!(
        "fine-tuned from {from} on {} ({} steps in {:.1} minutes)",
        trainer.spec.cartoons.display(),
        steps,
        trainer.state.elapsed_s / 60.0
    );
    trainer.install(&target, description)?;
    eprintln!(
        "installed style {name:?} in {} ({:.1} s in this process)",
        target.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// How far a run with a time budget is, from its progress report.
fn trainer_fraction(p: &train::run::Progress) -> f64 {
    p.step as f64 / p.steps.max(1) as f64
}

/// `toonbot train export`: installs generator A->B of a checkpoint as style `name`.
pub fn train_export(
    config: &Config,
    device: &Device,
    checkpoint: &Path,
    name: &str,
    description: Option<String>,
    dtype: train::style::WeightsDtype,
    finetunable: bool,
) -> Result<ExitCode> {
    let path = if checkpoint.is_dir() {
        checkpoint.join(train::run::CHECKPOINT_FILE)
    } else {
        checkpoint.to_path_buf()
    };
    let registry = StyleRegistry::from_config(config);
    let dir = registry
        .trained_dir(name)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(trained) = train::fast::run::read_generator(&path, device)? {
        anyhow::ensure!(
            !finetunable,
            "--finetunable: {} is a fast-recipe checkpoint, whose styles are fine-tuned from \
             their generator alone; export it without --finetunable",
            path.display()
        );
        let (state, steps) = (
            &trained.state,
            trained.state.recon_steps + trained.state.adv_steps,
        );
        let manifest = StyleManifest {
            description: description.unwrap_or_else(|| {
                format!(
                    "trained on {} with the fast recipe ({} reconstruction and {} adversarial \
                     steps)",
                    state.spec.cartoons.display(),
                    state.recon_steps,
                    state.adv_steps
                )
            }),
            base: None,
            steps: Some(steps),
        };
        train::style::install_generator(&dir, trained.tensors, dtype, &manifest)?;
        eprintln!("installed style {name:?} in {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let loaded = train::checkpoint::load(&path, device)?;
    let spec = &loaded.state.spec;
    let model = train::model::Ugatit::new(spec.net, spec.freeze, spec.seed, device)?;
    model.load(&loaded.tensors, loaded.state.kind.networks())?;
    let manifest = StyleManifest {
        description: description.unwrap_or_else(|| {
            format!(
                "trained on {} ({} steps)",
                spec.cartoons.display(),
                loaded.state.step
            )
        }),
        base: spec.base.clone(),
        steps: Some(loaded.state.step),
    };
    let training = finetunable.then_some((loaded.state.step, spec));
    train::style::install(&dir, &model, dtype, &manifest, training)?;
    eprintln!("installed style {name:?} in {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// `toonbot panel`: photos beside their cartoons, one PNG.
pub fn panel(
    config: &Config,
    device: &Device,
    style: Option<&str>,
    baseline: bool,
    photos: &[PathBuf],
    layout: train::panel::Layout,
    out: &Path,
) -> Result<ExitCode> {
    let photos = train::panel::photo_paths(photos)?;
    let panel = train::eval::with_scored(config, device, style, baseline, |scored| {
        train::panel::panel(scored, &photos, layout, device)
    })?;
    panel
        .save(out)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} ({} faces)", out.display(), photos.len());
    Ok(ExitCode::SUCCESS)
}

/// `toonbot check-pack`: a folder of cartoon faces, or a pack's .zip, through the checks a
/// style pack passes before it trains. Exit status 1 when the pack would be refused.
pub fn check_pack(config: &Config, device: &Device, images: &Path, json: bool) -> Result<ExitCode> {
    use crate::stylepack::{archive::ArchiveError, check};
    let packs = &config.stylepacks;
    let refused = |why: ArchiveError| {
        eprintln!("refused: {why}");
        Ok(ExitCode::from(1))
    };
    let check = if images.is_dir() {
        check::check_folder(images, &FacePipeline::load(config, device)?, packs)?
    } else {
        let read = || format!("reading {}", images.display());
        let bytes = std::fs::metadata(images).with_context(read)?.len();
        if bytes > packs.max_zip_bytes {
            return refused(ArchiveError::TooLarge {
                bytes,
                max: packs.max_zip_bytes,
            });
        }
        let zip = std::fs::read(images).with_context(read)?;
        match check::check_archive(&zip, &FacePipeline::load(config, device)?, packs)? {
            Ok(check) => check,
            Err(why) => return refused(why),
        }
    };
    if json {
        println!("{}", serde_json::to_string(&check)?);
    } else {
        for skipped in &check.skipped {
            println!("skipped {skipped}");
        }
        println!(
            "{} images, a face found in {}; style spread {:.2} (warned over {:.2})",
            check.images, check.faces_found, check.style_spread, packs.max_style_spread
        );
        match &check.refusal {
            Some(why) => println!("refused: {why}"),
            None if check.mixed_styles => println!("would train, with the mixed-styles warning"),
            None => println!("would train"),
        }
    }
    Ok(match check.refusal {
        Some(_) => ExitCode::from(1),
        None => ExitCode::SUCCESS,
    })
}

/// `toonbot eval`: KID x100 and identity cosine of a style (JSON or a short table).
pub fn eval(
    config: &Config,
    device: &Device,
    (style, baseline): (Option<&str>, bool),
    (photos, cartoons, training_cartoons): (&Path, &Path, Option<&Path>),
    json: bool,
) -> Result<ExitCode> {
    let bar = indicatif::ProgressBar::new_spinner();
    let report = train::eval::evaluate(
        config,
        device,
        style,
        baseline,
        photos,
        cartoons,
        training_cartoons,
        || bar.inc(1),
    )?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "style {}: KID x100 {:.2} ± {:.2} ({} photos vs {} cartoons, subsets of {}), \
             identity cosine {:.3}",
            report.style,
            report.kid_x100,
            report.kid_std_x100,
            report.photos,
            report.cartoons,
            report.kid_subset_size,
            report.identity_cosine
        );
        if let Some(c) = &report.copies {
            println!(
                "nearest training image (1 - cos in backbone features, {} images): cartoons min                  {:.3}, median {:.3}; held-out cartoons min {:.3}, median {:.3}",
                c.training_images,
                c.nearest_min,
                c.nearest_median,
                c.held_out_nearest_min,
                c.held_out_nearest_median
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
