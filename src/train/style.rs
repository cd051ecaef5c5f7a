//! Trained generators as styles: installing generator A->B (f32 or f16) with its
//! `style.toml`, optionally with the run's compact checkpoint so that the style can be
//! fine-tuned from; and reading a style back as the starting point of a fine-tune.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::checkpoint;
use super::model::Ugatit;
use super::RunSpec;
use crate::cartoon::styles::{StyleManifest, MANIFEST_FILE, WEIGHTS_FILE};

/// A style's training state (a compact checkpoint of all six networks), when it has one.
pub const TRAINING_FILE: &str = "training.safetensors";

/// Precision of an installed generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightsDtype {
    /// 32-bit floats, as trained.
    F32,
    /// 16-bit floats: half the file size.
    F16,
}

impl WeightsDtype {
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
        }
    }
}

/// Installs `model`'s generator A->B into `dir` (created or replaced file by file) with
/// `manifest`; with `training_state`, also the compact checkpoint at `step`.
pub fn install(
    dir: &Path,
    model: &Ugatit,
    dtype: WeightsDtype,
    manifest: &StyleManifest,
    training_state: Option<(u64, &RunSpec)>,
) -> Result<()> {
    write_generator(dir, model.generator_a2b_tensors(), dtype)?;
    if let Some((step, spec)) = training_state {
        let kind = checkpoint::Kind::Compact;
        checkpoint::save(&dir.join(TRAINING_FILE), step, spec, model, kind, None)?;
    }
    write_manifest(dir, manifest)
}

/// Installs a generator A->B given by its weights (keys as in `generator.safetensors`)
/// into `dir` with `manifest`.
pub fn install_generator(
    dir: &Path,
    generator: HashMap<String, Tensor>,
    dtype: WeightsDtype,
    manifest: &StyleManifest,
) -> Result<()> {
    write_generator(dir, generator, dtype)?;
    write_manifest(dir, manifest)
}

fn write_generator(
    dir: &Path,
    generator: HashMap<String, Tensor>,
    dtype: WeightsDtype,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors: Vec<(String, Tensor)> = generator
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype.dtype())?)))
        .collect::<candle_core::Result<_>>()?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    checkpoint::write_atomically(
        &dir.join(WEIGHTS_FILE),
        &checkpoint::to_safetensors(tensors, None)?,
    )
}

fn write_manifest(dir: &Path, manifest: &StyleManifest) -> Result<()> {
    checkpoint::write_atomically(
        &dir.join(MANIFEST_FILE),
        toml::to_string(manifest)?.as_bytes(),
    )
}

/// Where a fine-tune starts: the base style's networks and the spec it was trained with.
pub struct Base {
    /// Weights by `network.param` name.
    pub tensors: HashMap<String, Tensor>,
    /// The networks present in `tensors`.
    pub networks: Vec<&'static str>,
    /// The base run's spec, when the style has its training state.
    pub spec: Option<RunSpec>,
}

/// Reads the style in `dir` as a fine-tuning base: all six networks from its training
/// state, or generator A->B alone when it has none.
pub fn load_base(dir: &Path, device: &Device) -> Result<Base> {
    let training = dir.join(TRAINING_FILE);
    if training.is_file() {
        let loaded = checkpoint::load(&training, device)?;
        return Ok(Base {
            tensors: loaded.tensors,
            networks: loaded.state.kind.networks().to_vec(),
            spec: Some(loaded.state.spec),
        });
    }
    let path = dir.join(WEIGHTS_FILE);
    let weights = candle_core::safetensors::load(&path, device)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(Base {
        tensors: weights
            .into_iter()
            .map(|(k, v)| (format!("genA2B.{k}"), v))
            .collect(),
        networks: vec!["genA2B"],
        spec: None,
    })
}
