//! Checkpoints: one safetensors file holding every network's weights and spectral-norm
//! buffers (`genA2B.<param>`, ...), optionally both optimisers' moments
//! (`adam_g.m.genA2B.<param>`, `adam_d.v.disGA.<param>`, ...), and the run's state as JSON
//! in the header metadata (`toonbot_training`).
//!
//! - full: f32 weights and buffers, Adam moments: resuming from it continues the run
//!   exactly.
//! - compact: f16 weights, f32 buffers, no moments (they restart at zero on resume, which
//!   perturbs the first few hundred steps); small enough to keep in a repository (72 MB).
//! - generators: the compact form of the two generators alone (15 MB, under the GPU
//!   machine's 16 MiB per returned file); on resume the discriminators start afresh.
//!
//! Files are written to `<path>.tmp` and renamed over `path`, so a crash mid-write leaves
//! the previous checkpoint intact.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::adam::Adam;
use super::model::{Ugatit, NETWORKS};
use super::RunSpec;
use crate::nets::layers::is_buffer;

const METADATA_KEY: &str = "toonbot_training";
const G_OPTIM: &str = "adam_g.";
const D_OPTIM: &str = "adam_d.";

/// Which form a checkpoint takes (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// f32 weights, buffers and Adam moments: resumes exactly.
    Full,
    /// f16 weights, f32 buffers, no moments (72 MB).
    Compact,
    /// The compact form of the two generators alone (15 MB).
    Generators,
}

impl Kind {
    /// The networks a checkpoint of this kind holds.
    pub fn networks(self) -> &'static [&'static str] {
        match self {
            Self::Full | Self::Compact => &NETWORKS,
            Self::Generators => &NETWORKS[..2],
        }
    }
}

/// What a checkpoint's header says about the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Which form the file takes.
    pub kind: Kind,
    /// Completed training steps; the next batch is batch `step` of the data order.
    pub step: u64,
    /// The run's settings.
    pub spec: RunSpec,
}

/// A checkpoint read back: its state, the weights and (full ones) the optimiser moments.
pub struct Loaded {
    /// The run's state from the header.
    pub state: State,
    /// Every tensor in the file by name: weights, buffers and (full checkpoints) moments with their
    /// `adam_g.` / `adam_d.` prefixes.
    pub tensors: HashMap<String, Tensor>,
}

impl Loaded {
    /// Restores both optimisers (full checkpoints); compact ones leave them at zero.
    pub fn restore_optimisers(&self, g: &mut Adam, d: &mut Adam) -> candle_core::Result<()> {
        if self.state.kind != Kind::Full {
            return Ok(());
        }
        for (prefix, optim) in [(G_OPTIM, g), (D_OPTIM, d)] {
            let moments: HashMap<String, Tensor> = self
                .tensors
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
                .collect();
            optim.load_state(&moments, self.state.step)?;
        }
        Ok(())
    }
}

/// `path` with `.tmp` appended.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = temp_path(path);
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Serialises named tensors (moved to the CPU) with `metadata` into safetensors bytes.
pub fn to_safetensors(
    tensors: Vec<(String, Tensor)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(safetensors::serialize(tensors, metadata)?)
}

/// The tensors of the safetensors file in `bytes` (read from `path`) and the JSON state
/// stored under metadata `key`; `None` when its header has no such key (another kind of
/// checkpoint).
pub fn parse_with_state<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
    key: &str,
    device: &Device,
) -> Result<Option<(T, HashMap<String, Tensor>)>> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let Some(json) = header.metadata().as_ref().and_then(|m| m.get(key)) else {
        return Ok(None);
    };
    let state: T = serde_json::from_str(json)
        .with_context(|| format!("reading the training state of {}", path.display()))?;
    let tensors = candle_core::safetensors::load_buffer(bytes, device)
        .with_context(|| format!("loading tensors from {}", path.display()))?;
    Ok(Some((state, tensors)))
}

/// Saves the networks at `step`: a full checkpoint with the generator and discriminator
/// optimisers (`kind` [`Kind::Full`] needs them), else a compact one of `kind`'s networks.
pub fn save(
    path: &Path,
    step: u64,
    spec: &RunSpec,
    model: &Ugatit,
    kind: Kind,
    optimisers: Option<(&Adam, &Adam)>,
) -> Result<()> {
    anyhow::ensure!(
        (kind == Kind::Full) == optimisers.is_some(),
        "a full checkpoint, and only a full one, holds the optimisers"
    );
    let mut tensors: Vec<(String, Tensor)> = model
        .named_tensors(kind.networks())
        .into_iter()
        .map(|(name, t)| {
            let t = match kind {
                Kind::Full => t,
                _ if is_buffer(&name) => t,
                _ => t.to_dtype(DType::F16)?,
            };
            Ok((name, t))
        })
        .collect::<candle_core::Result<_>>()?;
    if let Some((g, d)) = optimisers {
        for (prefix, optim) in [(G_OPTIM, g), (D_OPTIM, d)] {
            tensors.extend(
                optim
                    .state()
                    .into_iter()
                    .map(|(k, t)| (format!("{prefix}{k}"), t)),
            );
        }
    }
    let state = State {
        kind,
        step,
        spec: spec.clone(),
    };
    let metadata = HashMap::from([(METADATA_KEY.to_string(), serde_json::to_string(&state)?)]);
    write_atomically(path, &to_safetensors(tensors, Some(metadata))?)
}

/// Reads a checkpoint's state and tensors (in their stored dtypes) onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<Loaded> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let state = read_state(&bytes).with_context(|| format!("reading {}", path.display()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("loading tensors from {}", path.display()))?;
    Ok(Loaded { state, tensors })
}

fn read_state(bytes: &[u8]) -> Result<State> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .context("not a toonbot training checkpoint (no training state in its header)")?;
    Ok(serde_json::from_str(json)?)
}
