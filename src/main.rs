use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use toonbot::cli;
use toonbot::config::Config;
use toonbot::train::bench::{BenchRecipe, TrainBenchPlan};

/// toonbot: turns the faces in photos into cartoons (CLI and Discord bot).
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (default: ./config.toml if present, else built-in defaults).
    #[arg(long, global = true, env = "TOONBOT_CONFIG")]
    config: Option<PathBuf>,
    /// Where the networks run.
    #[arg(long, global = true, default_value = "cpu")]
    device: cli::DeviceArg,
    #[command(subcommand)]
    command: Command,
}

/// `serve --role`: which part of the bot this process runs.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Role {
    /// Everything in one process, with the in-process queue.
    All,
    /// Renders jobs from the JetStream broker; holds no bot token.
    Worker,
    /// The Discord gateway (a shard range): queues jobs on the broker, loads no models.
    Gateway,
    /// Answers the jobs the gateways queued: progress, results, late replies.
    Responder,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Discord bot (token from DISCORD_TOKEN or `bot.token_file`), or one role of it.
    Serve {
        /// `all`: the whole bot in one process (the default). Past one machine, through the
        /// JetStream broker (`[broker]`, or --nats): `gateway` takes requests from Discord
        /// and queues them, `worker` renders them (no bot token), `responder` answers them.
        #[arg(long, value_enum, default_value = "all")]
        role: Role,
        /// The NATS server with JetStream, e.g. nats://127.0.0.1:4222 (for the roles other
        /// than `all`; default `broker.url`).
        #[arg(long, env = "TOONBOT_NATS")]
        nats: Option<String>,
        /// For --role gateway: the shards this process connects, START..END/TOTAL (e.g.
        /// 0..2/4: shards 0 and 1 of 4); default, the bot's only shard.
        #[arg(long)]
        shards: Option<toonbot::bot::ShardRange>,
        /// For --role worker: render jobs, style-pack trainings (one at a time; needs the
        /// bot's database), or both.
        #[arg(long, value_enum)]
        work: Option<cli::Work>,
    },
    /// Find every face in each photo and write its aligned, whitened crop and soft mask.
    Faces {
        /// Photos (PNG, JPEG or WebP).
        #[arg(required = true)]
        photos: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Print one JSON object per photo on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Cartoonize every face of each photo: a sticker and an avatar per face, and the
    /// photo with its faces replaced.
    Cartoonize {
        /// Photos (PNG, JPEG or WebP).
        #[arg(required = true)]
        photos: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Style name (default: the configured default style).
        #[arg(long)]
        style: Option<String>,
        /// Draw a white outline around the sticker.
        #[arg(long)]
        outline: bool,
        /// Cut the avatar to a circle.
        #[arg(long)]
        round: bool,
        /// Print one JSON object per photo on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Load-test the JetStream render queue with a stub renderer: 1, 2, 4 and 8 worker
    /// processes on loopback, each round on its own nats-server; the last line is JSON.
    Loadtest {
        /// Worker process counts, one round each.
        #[arg(long, num_args = 1.., default_values_t = [1, 2, 4, 8])]
        workers: Vec<usize>,
        /// Jobs per round.
        #[arg(long, default_value_t = 500)]
        jobs: usize,
        /// Users the jobs come from, in turn.
        #[arg(long, default_value_t = 50)]
        users: usize,
        /// The stub renderer's milliseconds per job.
        #[arg(long, default_value_t = 50)]
        stub_ms: u64,
        /// The nats-server binary.
        #[arg(long, default_value = "nats-server")]
        nats_server: PathBuf,
        /// Worker processes in the flood round (0: no flood round): one user floods 1,000
        /// jobs through the per-user cap while 10 others send one each. Fewer workers than
        /// the cap would leave one idle for the light users.
        #[arg(long, default_value_t = 2)]
        flood_workers: usize,
        /// In rounds of 2 workers or more, kill a worker process (SIGKILL) halfway through
        /// the submissions and restart the broker at three quarters; lost and duplicated
        /// count the jobs.
        #[arg(long)]
        chaos: bool,
        /// Run as one of the test's worker processes (on the broker given by --nats).
        #[arg(long, hide = true)]
        worker: bool,
        /// The broker, for --worker.
        #[arg(long, hide = true)]
        nats: Option<String>,
    },
    /// Time each pipeline stage per face, and the generator at batch 1 and 4 (or --batch).
    Bench {
        /// The photo to time (default: a 3-face group photo from ../shared/data).
        #[arg(long, default_value = "../shared/data/samples/groups/sample1.jpg")]
        photo: PathBuf,
        /// Style whose generator is timed (default style, or random weights if none).
        #[arg(long)]
        style: Option<String>,
        /// Runs per measurement (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Also time the PyTorch reference generator with this Python (needs torch); with
        /// --train, each recipe's reference step (tools/reference/), and candle_over_pytorch.
        #[arg(long)]
        reference_python: Option<PathBuf>,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Time training steps instead (seeded random images); on CUDA also compares the
        /// generator's output with the CPU's.
        #[arg(long)]
        train: bool,
        /// Recipes whose steps --train times, taking turns (repeat it; default
        /// photo2cartoon). With both, the report has fast_over_photo2cartoon.
        #[arg(long, value_enum)]
        recipe: Vec<Recipe>,
        /// Training image sides for --train (default 256, or 128 and 256 with
        /// --reference-python; several are timed one after the other, and --json prints them
        /// in one line).
        #[arg(long, num_args = 1..)]
        size: Vec<usize>,
        /// Batch sizes: of the generator alone (default 1 and 4), or with --train of the
        /// training steps (default: each recipe's own, 1 for photo2cartoon and 4 for fast).
        #[arg(long, num_args = 1..)]
        batch: Vec<usize>,
        /// Also time each generator stage (and, when the CPU fast path is on, the same
        /// stages with plain candle ops).
        #[arg(long)]
        profile: bool,
    },
    /// List the installed cartoon styles.
    Styles,
    /// Turn a folder of raw photos into an aligned, whitened training set (largest face each).
    Prepare {
        #[arg(long)]
        photos: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a folder of cartoon faces, or a pack's .zip, as a style-pack upload is checked
    /// before it trains: the archive's limits, faces found, and how differently the images
    /// are drawn (exit status 1 when the pack would be refused).
    CheckPack {
        /// The pack's images: a folder, or a .zip as uploaded with `/stylepack upload`.
        #[arg(long)]
        images: PathBuf,
        /// Print the figures as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Train cartoon generators (photo2cartoon's U-GAT-IT with face-ID loss).
    Train {
        #[command(subcommand)]
        command: Box<TrainCommand>,
    },
    /// Each aligned photo beside its cartoon, in rows, as one PNG (judge a style by eye).
    Panel {
        /// Style name (default: the configured default style).
        #[arg(long)]
        style: Option<String>,
        /// The photos unchanged (segmented and composited only), to see what goes in.
        #[arg(long, conflicts_with = "style")]
        baseline: bool,
        /// Aligned face crops: files, or folders taken whole in name order.
        #[arg(long, num_args = 1.., required = true)]
        photos: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Photo/cartoon pairs per row.
        #[arg(long, default_value_t = 4)]
        columns: u32,
        /// Side of each image in the panel.
        #[arg(long, default_value_t = 160)]
        size: u32,
    },
    /// Score a style: KID x100 against a cartoon set and photo/cartoon identity cosine.
    Eval {
        /// Style name (default: the configured default style).
        #[arg(long)]
        style: Option<String>,
        /// Score the do-nothing baseline instead: the photos themselves, segmented and
        /// composited as the cartoons would be.
        #[arg(long, conflicts_with = "style")]
        baseline: bool,
        /// Aligned face crops (e.g. `toonbot prepare` output).
        #[arg(long)]
        photos: PathBuf,
        /// Reference cartoons (held out from training).
        #[arg(long)]
        cartoons: PathBuf,
        /// The cartoons the style was trained on (e.g. a style pack's): reports how close
        /// each cartoon comes to copying one of them.
        #[arg(long)]
        training_cartoons: Option<PathBuf>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TrainCommand {
    /// Train all six networks from scratch; checkpoints, log and sample grids go to --out.
    Base {
        /// Aligned photos (`toonbot prepare` output).
        #[arg(long)]
        photos: PathBuf,
        #[arg(long)]
        cartoons: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Continue the run in --out (its checkpoint, else the --compact one) exactly.
        #[arg(long)]
        resume: bool,
        /// `fast`: the one-sided CPU recipe (default on the CPU); `photo2cartoon`: the
        /// reference's six networks (default on CUDA).
        #[arg(long, value_enum)]
        recipe: Option<Recipe>,
        /// Held-out aligned photos (fast recipe): the reconstruction check and the samples.
        #[arg(long)]
        val_photos: Option<PathBuf>,
        /// Start the adversarial phase from this fast checkpoint, whose reconstruction phase
        /// is done: its generator, and its discriminators when it has trained adversarially
        /// (a new schedule after a finished run; fast recipe).
        #[arg(long, conflicts_with = "resume")]
        init: Option<PathBuf>,
        /// Side of the last 15% of the steps, at most 256 (fast recipe; --size is the side of
        /// the rest).
        #[arg(long, default_value_t = 256)]
        high_size: usize,
        /// What judges whole cartoons beside the local discriminator (fast recipe).
        #[arg(long, value_enum, default_value = "projected")]
        discriminators: toonbot::train::fast::model::Discriminators,
        /// Weight of the content term on 8x8-block luminance, photo against cartoon (fast
        /// recipe; default 10).
        #[arg(long)]
        content_luma: Option<f64>,
        /// Weight of the content term on the backbone's low-level features (fast recipe;
        /// default 0.1).
        #[arg(long)]
        content_feature: Option<f64>,
        /// Weight of the content term on 8x8-block colour, photo against cartoon (fast
        /// recipe; default 0).
        #[arg(long)]
        content_colour: Option<f64>,
        /// Weight of the whole-image discriminator's adversarial term (fast recipe; default
        /// 1).
        #[arg(long)]
        adv_global: Option<f64>,
        /// Weight of the face-ID term, photo against cartoon (fast recipe; default 1).
        #[arg(long)]
        face_id: Option<f64>,
        /// Adversarial steps over which the adversarial terms ramp up from 0 (fast recipe;
        /// default 200; 0 when --init brings trained discriminators).
        #[arg(long)]
        adv_ramp: Option<u64>,
        #[command(flatten)]
        common: TrainFlags,
    },
    /// Fine-tune an installed style on a few cartoons and install the result as a new style.
    Finetune {
        /// The base style.
        #[arg(long)]
        from: String,
        #[arg(long)]
        cartoons: PathBuf,
        /// Name of the new style.
        #[arg(long)]
        name: String,
        /// Aligned photos (default: those the base was trained on; the fast recipe:
        /// `[stylepacks] photos` when the base does not record them).
        #[arg(long)]
        photos: Option<PathBuf>,
        /// fast: the decoder side against projected discriminators within a time budget
        /// (--minutes); photo2cartoon: the full photo2cartoon step for --steps.
        #[arg(long, value_enum, default_value = "fast")]
        recipe: Recipe,
        /// The fast recipe's time budget in minutes, setup included (default: `[stylepacks]`
        /// minutes_per_image for each cartoon, at least `min_minutes`, at most `minutes`).
        #[arg(long)]
        minutes: Option<f64>,
        /// Which generator parts train (default: decoder for the fast recipe, branches for
        /// photo2cartoon's).
        #[arg(long, value_enum)]
        freeze: Option<toonbot::train::params::Freeze>,
        /// Run directory (default: <styles.dir>/../runs/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Precision of the installed generator.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: toonbot::train::style::WeightsDtype,
        /// Continue an interrupted fine-tune from the checkpoint in its run directory.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        common: TrainFlags,
    },
    /// Plot KID and identity against CPU-hours from evaluation results (JSON lines, as
    /// tools/compare-fast.sh writes them) into a PNG.
    Plot {
        #[arg(long)]
        results: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// TrueType font for the labels.
        #[arg(
            long,
            default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
        )]
        font: PathBuf,
    },
    /// Install generator A->B of a training checkpoint as a style.
    Export {
        /// A checkpoint file, or a run directory holding checkpoint.safetensors.
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long, value_enum, default_value = "f16")]
        dtype: toonbot::train::style::WeightsDtype,
        /// Also install the compact training state, so the style can be fine-tuned from.
        #[arg(long)]
        finetunable: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Recipe {
    Fast,
    Photo2cartoon,
}

#[derive(clap::Args)]
struct TrainFlags {
    /// Training image side (multiple of 16; default 256, or 128 for the fast recipe).
    #[arg(long)]
    size: Option<usize>,
    /// Images per domain and step (default 1; 4 for the fast base recipe, 2 for the fast
    /// pack recipe).
    #[arg(long)]
    batch: Option<usize>,
    /// Total steps; photo2cartoon's learning rate decays linearly over the second half
    /// (default: 200000 for base, as photo2cartoon's schedule; 2000 for finetune); the fast
    /// recipe counts its adversarial steps (default 2000).
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Adam learning rate (default 1e-4: photo2cartoon's, and the fast pack recipe's as the
    /// bot trains packs).
    #[arg(long)]
    lr: Option<f64>,
    /// Write the checkpoint every this many steps (and on Ctrl-C / SIGTERM).
    #[arg(long, default_value_t = 1000)]
    save_every: u64,
    /// Write a sample grid every this many steps.
    #[arg(long, default_value_t = 1000)]
    sample_every: u64,
    /// Append mean losses to train.jsonl every this many steps.
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Stop (with a checkpoint) after this many seconds.
    #[arg(long)]
    time_limit: Option<u64>,
    /// Also keep a compact checkpoint (f16, no optimiser state) at this path.
    #[arg(long)]
    compact: Option<PathBuf>,
    /// The compact checkpoint holds the two generators alone (15 MB instead of 72 MB); a run
    /// resumed from it starts its discriminators afresh.
    #[arg(long, requires = "compact")]
    compact_generators: bool,
}

impl TrainFlags {
    /// The settings, with `(size, batch, steps, lr)` defaults for those not given.
    fn args(self, (size, batch, steps, lr): (usize, usize, u64, f64)) -> cli::TrainArgs {
        cli::TrainArgs {
            size: self.size.unwrap_or(size),
            batch: self.batch.unwrap_or(batch),
            steps: self.steps.unwrap_or(steps),
            seed: self.seed,
            lr: self.lr.unwrap_or(lr),
            save_every: self.save_every,
            sample_every: self.sample_every,
            log_every: self.log_every,
            time_limit_s: self.time_limit,
            compact: self.compact,
            compact_generators: self.compact_generators,
        }
    }
}

fn main() -> ExitCode {
    toonbot::settle_thread_count();
    // The websocket library logs whole frames at TRACE, IDENTIFY (with the token) included.
    let filter = toonbot::bot::LOG_DIRECTIVES.iter().fold(
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        |filter, directive| filter.add_directive(directive.parse().expect("valid directive")),
    );
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode> {
    let config = Config::load(args.config.as_deref())?;
    let device = args.device.open()?;
    match args.command {
        Command::Faces { photos, out, json } => cli::faces(&config, &device, &photos, &out, json),
        Command::Cartoonize {
            photos,
            out,
            style,
            outline,
            round,
            json,
        } => {
            let options = toonbot::cartoon::compose::ComposeOptions {
                outline,
                round_avatar: round,
            };
            cli::cartoonize(
                &config,
                &device,
                &photos,
                &out,
                style.as_deref(),
                options,
                json,
            )
        }
        Command::Bench {
            runs,
            json,
            train: true,
            recipe,
            size,
            batch,
            reference_python,
            ..
        } => {
            let recipes: Vec<BenchRecipe> = recipe
                .iter()
                .map(|r| match r {
                    Recipe::Fast => BenchRecipe::Fast,
                    Recipe::Photo2cartoon => BenchRecipe::Photo2cartoon,
                })
                .collect();
            let recipes = if recipes.is_empty() {
                vec![BenchRecipe::Photo2cartoon]
            } else {
                recipes
            };
            let plan = TrainBenchPlan {
                sizes: match (size.is_empty(), &reference_python) {
                    (false, _) => size,
                    (true, Some(_)) => vec![128, 256],
                    (true, None) => vec![256],
                },
                recipes,
                batches: batch,
                runs,
                reference_python,
            };
            cli::bench_train(&config, &device, &plan, json)
        }
        Command::Bench {
            photo,
            style,
            runs,
            reference_python,
            json,
            batch,
            profile,
            ..
        } => cli::bench(
            &config,
            &device,
            &photo,
            style.as_deref(),
            (runs, if batch.is_empty() { &[1, 4] } else { &batch }),
            reference_python.as_deref(),
            json,
            profile,
        ),
        Command::Loadtest {
            workers,
            jobs,
            users,
            stub_ms,
            nats_server,
            flood_workers,
            chaos,
            worker,
            nats,
        } => {
            let stub = std::time::Duration::from_millis(stub_ms);
            if worker {
                let nats = nats.context("loadtest --worker needs --nats")?;
                return cli::loadtest_worker(&nats, stub);
            }
            let plan = toonbot::jobs::loadtest::LoadPlan {
                workers,
                jobs,
                users,
                stub,
                nats_server,
                worker_exe: std::env::current_exe()?,
                flood: (flood_workers > 0).then_some(toonbot::jobs::loadtest::FloodPlan {
                    workers: flood_workers,
                    per_user_limit: config.bot.per_user_limit,
                    heavy_jobs: 1000,
                    light_users: 10,
                }),
                chaos,
            };
            cli::loadtest(&plan)
        }
        Command::Serve {
            role,
            nats,
            shards,
            work,
        } => match role {
            _ if shards.is_some() && !matches!(role, Role::Gateway) => {
                anyhow::bail!("--shards is for --role gateway only")
            }
            _ if work.is_some() && !matches!(role, Role::Worker) => {
                anyhow::bail!("--work is for --role worker only")
            }
            Role::All => cli::serve(&config, &device),
            Role::Worker => cli::serve_worker(
                &config,
                &device,
                nats.as_deref(),
                work.unwrap_or(cli::Work::Render),
            ),
            Role::Gateway => cli::serve_gateway(&config, nats.as_deref(), shards),
            Role::Responder => cli::serve_responder(&config, nats.as_deref()),
        },
        Command::Styles => cli::styles(&config),
        Command::Prepare { photos, out } => cli::prepare(&config, &device, &photos, &out),
        Command::CheckPack { images, json } => cli::check_pack(&config, &device, &images, json),
        Command::Train { command } => train(&config, &device, *command),
        Command::Panel {
            style,
            baseline,
            photos,
            out,
            columns,
            size,
        } => {
            let layout = toonbot::train::panel::Layout { columns, size };
            cli::panel(
                &config,
                &device,
                style.as_deref(),
                baseline,
                &photos,
                layout,
                &out,
            )
        }
        Command::Eval {
            style,
            photos,
            cartoons,
            training_cartoons,
            baseline,
            json,
        } => cli::eval(
            &config,
            &device,
            (style.as_deref(), baseline),
            (&photos, &cartoons, training_cartoons.as_deref()),
            json,
        ),
    }
}

fn train(config: &Config, device: &candle_core::Device, command: TrainCommand) -> Result<ExitCode> {
    match command {
        TrainCommand::Base {
            photos,
            cartoons,
            out,
            resume,
            recipe,
            val_photos,
            init,
            high_size,
            discriminators,
            content_luma,
            content_feature,
            content_colour,
            adv_global,
            face_id,
            adv_ramp,
            common,
        } => {
            // The run spec records the folders: absolute, a run resumes from any directory.
            let [photos, cartoons] =
                [photos, cartoons].map(|p| std::path::absolute(&p).unwrap_or(p));
            let val_photos = val_photos.map(|p| std::path::absolute(&p).unwrap_or(p));
            let recipe = recipe.unwrap_or(if device.is_cuda() {
                Recipe::Photo2cartoon
            } else {
                Recipe::Fast
            });
            if recipe == Recipe::Photo2cartoon {
                anyhow::ensure!(
                    val_photos.is_none() && init.is_none(),
                    "--val-photos and --init belong to the fast recipe"
                );
                return cli::train_base(
                    config,
                    device,
                    photos,
                    cartoons,
                    &out,
                    &common.args((256, 1, 200_000, 1e-4)),
                    resume,
                );
            }
            let val_photos = val_photos.context(
                "the fast recipe needs --val-photos: held-out aligned photos for its \
                 reconstruction check and sample grids",
            )?;
            let args = common.args((128, 4, 2_000, 1e-4));
            let defaults = toonbot::train::fast::FastWeights::default();
            let weights = toonbot::train::fast::FastWeights {
                content_luma: content_luma.unwrap_or(defaults.content_luma),
                content_feature: content_feature.unwrap_or(defaults.content_feature),
                content_colour: content_colour.unwrap_or(defaults.content_colour),
                adv_global: adv_global.unwrap_or(defaults.adv_global),
                face_id: face_id.unwrap_or(defaults.face_id),
                adv_ramp_steps: adv_ramp.unwrap_or(defaults.adv_ramp_steps),
                ..defaults
            };
            let spec = toonbot::train::fast::FastSpec {
                discriminators,
                weights,
                seed: args.seed,
                batch: args.batch,
                low_size: args.size,
                high_size,
                lr_g: args.lr,
                lr_d: args.lr,
                ..toonbot::train::fast::FastSpec::new(photos, cartoons, val_photos, args.steps)
            };
            let start = cli::FastStartArgs { resume, init };
            cli::train_base_fast(config, device, spec, &out, &args, start)
        }
        TrainCommand::Finetune {
            from,
            cartoons,
            name,
            photos,
            recipe,
            minutes,
            freeze,
            out,
            dtype,
            resume,
            common,
        } => {
            use toonbot::train::params::Freeze;
            let fast = recipe == Recipe::Fast;
            let ft = cli::FinetuneArgs {
                from,
                cartoons,
                name,
                photos,
                freeze: freeze.unwrap_or(if fast {
                    Freeze::Decoder
                } else {
                    Freeze::Branches
                }),
                out,
                dtype,
                resume,
            };
            if fast {
                let args = common.args((
                    256,
                    toonbot::train::pack::PACK_BATCH,
                    100_000,
                    toonbot::train::pack::PACK_LR,
                ));
                cli::train_finetune_fast(config, device, &ft, &args, minutes)
            } else {
                cli::train_finetune(config, device, &ft, &common.args((256, 1, 2_000, 1e-4)))
            }
        }
        TrainCommand::Plot { results, out, font } => {
            let rows = toonbot::train::plot::read_rows(&results)?;
            let (curves, baseline) = toonbot::train::plot::curves(&rows);
            toonbot::train::plot::plot(&curves, baseline, &font, &out)?;
            eprintln!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        TrainCommand::Export {
            checkpoint,
            name,
            description,
            dtype,
            finetunable,
        } => cli::train_export(
            config,
            device,
            &checkpoint,
            &name,
            description,
            dtype,
            finetunable,
        ),
    }
}
