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
    /// Turn a folder of raw photos into an aligned, whitened training set (largest face each).
    Prepare {
        #[arg(long)]
        photos: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
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
        Command::Prepare { photos, out } => cli::prepare(&config, &device, &photos, &out),
    }
}
