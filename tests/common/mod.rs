//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use toonbot::config::Config;
use toonbot::nets::generator::{self, Generator};

pub mod postgres;

/// `../shared/data`, or `None` (with a message) where it is absent.
pub fn shared_data() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipping: {} is absent", dir.display());
        None
    }
}

/// The built-in config with the repo's models and trained styles under `styles_dir`.
pub fn config_with_styles(styles_dir: &Path, default_style: &str) -> Config {
    let mut config = Config::default();
    config.models.dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    config.styles.dir = styles_dir.to_path_buf();
    config.styles.default = default_style.to_string();
    config
}

/// Installs a style whose generator has freshly initialised (random) weights: the real
/// network, for tests of everything around it.
pub fn install_random_style(styles_dir: &Path, name: &str) {
    let dir = styles_dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let varmap = VarMap::new();
    Generator::new(
        generator::Config::default(),
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    varmap.save(dir.join("generator.safetensors")).unwrap();
    std::fs::write(
        dir.join("style.toml"),
        "description = \"random weights, for tests\"\n",
    )
    .unwrap();
}

/// A models folder in `dir` with the repo's networks (linked) but no shipped styles, for
/// what happens on a host where no style is installed.
pub fn models_without_styles(dir: &Path) -> PathBuf {
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let repo_models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    for entry in std::fs::read_dir(&repo_models).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::os::unix::fs::symlink(&path, models.join(path.file_name().unwrap())).unwrap();
        }
    }
    models
}
