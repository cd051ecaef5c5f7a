use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use toonbot::cli;
use toonbot::config::Config;

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

#[derive(Subcommand)]
enum Command {
    /// Run the Discord bot (token from DISCORD_TOKEN or `bot.token_file`).
    Serve,
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
    /// Time each pipeline stage per face, and the generator at batch 1 and 4.
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
        /// Also time the PyTorch reference generator with this Python (needs torch).
        #[arg(long)]
        reference_python: Option<PathBuf>,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
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
}

fn main() -> ExitCode {
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
            photo,
            style,
            runs,
            reference_python,
            json,
            profile,
        } => cli::bench(
            &config,
            &device,
            &photo,
            style.as_deref(),
            runs,
            reference_python.as_deref(),
            json,
            profile,
        ),
        Command::Serve => cli::serve(&config, &device),
        Command::Styles => cli::styles(&config),
        Command::Prepare { photos, out } => cli::prepare(&config, &device, &photos, &out),
    }
}
