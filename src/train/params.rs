//! Trainable variables with reproducible initialisation, and freezing.
//!
//! [`SeededInit`] is a `VarBuilder` backend over a `VarMap`: a variable requested for the
//! first time is created from its `Init` hint (PyTorch's default init, as the networks ask
//! for it) with values drawn from a [`SplitMix64`] stream keyed by the seed and the
//! variable's full name, so the same seed gives the same networks whatever the build order.
//! Variables that a [`Freeze`] policy holds fixed are handed to the network detached: their
//! weight gradients are never computed and no optimiser sees them.

use candle_core::{bail, DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::nets::layers::is_buffer;
use crate::rng::SplitMix64;

/// Which generator parameters train (discriminators always train).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Freeze {
    /// Everything trains.
    #[default]
    None,
    /// Only the input and output branches of both generators train (ConvBlock1 +
    /// HourGlass1, HourGlass4 + ConvBlock2: the group-specific parts of few-shot
    /// face2cartoon); the shared middle stays as the base model has it.
    Branches,
    /// The decoder side trains (the DecodeBlocks with their Soft-AdaLIN MLPs, UpBlocks,
    /// HourGlass3, HourGlass4, ConvBlock2); the encoder side (ConvBlock1 to the CAM and the
    /// style MLP `FC`) stays as the base model has it, so its outputs can be cached.
    Decoder,
}

/// Generator parameter prefixes that train under [`Freeze::Branches`].
const BRANCHES: [&str; 4] = ["ConvBlock1.", "HourGlass1.", "HourGlass4.", "ConvBlock2."];
/// Generator parameter prefixes that train under [`Freeze::Decoder`].
const DECODER: [&str; 5] = [
    "DecodeBlock",
    "UpBlock",
    "HourGlass3.",
    "HourGlass4.",
    "ConvBlock2.",
];

impl Freeze {
    /// Whether the generator parameter `name` (without the network prefix) trains.
    pub fn trains_generator_param(self, name: &str) -> bool {
        match self {
            Self::None => true,
            Self::Branches => BRANCHES.iter().any(|p| name.starts_with(p)),
            Self::Decoder => DECODER.iter().any(|p| name.starts_with(p)),
        }
    }
}

/// The `VarBuilder` backend described in the module docs.
struct SeededInit {
    vars: VarMap,
    /// Seed stream key prefix: the network's name (`genA2B`, ...).
    key: String,
    seed: u64,
    freeze: Freeze,
}

/// A builder creating the variables of network `key` in `vars` (or reusing those present),
/// seeded by `seed`. Parameters that `freeze` holds fixed come back detached (discriminators:
/// pass [`Freeze::None`]).
pub fn var_builder(
    vars: &VarMap,
    key: &str,
    seed: u64,
    freeze: Freeze,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededInit {
        vars: vars.clone(),
        key: key.to_string(),
        seed,
        freeze,
    };
    VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
}

/// Values for a fresh variable from its init hint.
fn init_values(init: Init, n: usize, rng: &mut SplitMix64) -> Result<Vec<f32>> {
    Ok(match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => (0..n)
            .map(|_| (lo + (up - lo) * rng.next_f64()) as f32)
            .collect(),
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| (mean + stdev * rng.next_normal()) as f32)
            .collect(),
        Init::Kaiming { .. } => bail!("seeded init: Kaiming init is not used by these networks"),
    })
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self.vars.data().lock().expect("varmap lock");
        let tensor = match vars.get(name) {
            Some(var) => {
                if var.shape() != &s {
                    bail!(
                        "{}.{name}: shape {:?}, expected {s:?}",
                        self.key,
                        var.shape()
                    )
                }
                var.as_tensor().clone()
            }
            None => {
                let mut rng = SplitMix64::keyed(self.seed, &format!("{}.{name}", self.key));
                let values = init_values(h, s.elem_count(), &mut rng)?;
                let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
                let tensor = var.as_tensor().clone();
                vars.insert(name.to_string(), var);
                tensor
            }
        };
        Ok(if self.freeze.trains_generator_param(name) {
            tensor
        } else {
            tensor.detach()
        })
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        bail!("seeded init: {}.{name} requested without a shape", self.key)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars
            .data()
            .lock()
            .expect("varmap lock")
            .contains_key(name)
    }
}

/// The variables of `vars` an optimiser updates: not buffers, and trained under `freeze`;
/// sorted by name, each prefixed with `key.`.
pub fn trainable_vars(vars: &VarMap, key: &str, freeze: Freeze) -> Vec<(String, Var)> {
    let data = vars.data().lock().expect("varmap lock");
    let mut out: Vec<(String, Var)> = data
        .iter()
        .filter(|(name, _)| !is_buffer(name) && freeze.trains_generator_param(name))
        .map(|(name, var)| (format!("{key}.{name}"), var.clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every variable and buffer of the named networks, `network.param`, sorted.
pub fn named_tensors<'a>(
    networks: impl IntoIterator<Item = (&'a str, &'a VarMap)>,
) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = networks
        .into_iter()
        .flat_map(|(net, vars)| {
            let data = vars.data().lock().expect("varmap lock");
            data.iter()
                .map(|(name, var)| (format!("{net}.{name}"), var.as_tensor().detach()))
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The networks named in `wanted`, of `all` (the names beside their variables).
pub fn select<'a>(
    all: &'a [&'a str],
    vars: &'a [VarMap],
    wanted: &'a [&str],
) -> impl Iterator<Item = (&'a str, &'a VarMap)> {
    all.iter()
        .zip(vars)
        .filter(move |(net, _)| wanted.contains(net))
        .map(|(net, vars)| (*net, vars))
}

/// Sets the networks' variables from `tensors` (keys `network.param`, any float dtype);
/// every variable must be present with its shape.
pub fn load_named<'a>(
    networks: impl IntoIterator<Item = (&'a str, &'a VarMap)>,
    tensors: &std::collections::HashMap<String, Tensor>,
) -> Result<()> {
    for (net, vars) in networks {
        for (name, var) in vars.data().lock().expect("varmap lock").iter() {
            let key = format!("{net}.{name}");
            let Some(t) = tensors.get(&key) else {
                bail!("{key} is missing")
            };
            if t.shape() != var.shape() {
                bail!("{key}: shape {:?}, expected {:?}", t.shape(), var.shape())
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(seed: u64) -> Result<(VarMap, Tensor)> {
        let vars = VarMap::new();
        let vb = var_builder(&vars, "net", seed, Freeze::None, &Device::Cpu);
        let w = vb.get_with_hints((3, 4), "w", Init::Uniform { lo: -1.0, up: 1.0 })?;
        vb.get_with_hints(5, "c", Init::Const(0.9))?;
        Ok((vars, w))
    }

    #[test]
    fn same_seed_same_values() -> Result<()> {
        let (_, a) = build(1)?;
        let (_, b) = build(1)?;
        let (_, c) = build(2)?;
        let diff = |x: &Tensor, y: &Tensor| -> Result<f32> {
            (x - y)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert_eq!(diff(&a, &b)?, 0.0);
        assert!(diff(&a, &c)? > 0.0);
        let v: Vec<f32> = a.flatten_all()?.to_vec1()?;
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        Ok(())
    }

    #[test]
    fn frozen_parameters_come_back_detached_and_are_not_trainable() -> Result<()> {
        let vars = VarMap::new();
        let vb = var_builder(&vars, "g", 0, Freeze::Branches, &Device::Cpu);
        let a = vb.get_with_hints(2, "ConvBlock1.w", Init::Const(1.0))?;
        let b = vb.get_with_hints(2, "HourGlass2.w", Init::Const(1.0))?;
        vb.get_with_hints(2, "ConvBlock1.weight_u", Init::Const(1.0))?;
        let loss = (a + b)?.sum_all()?;
        let grads = loss.backward()?;
        let names: Vec<String> = trainable_vars(&vars, "g", Freeze::Branches)
            .into_iter()
            .map(|(n, v)| {
                assert!(grads.get(v.as_tensor()).is_some());
                n
            })
            .collect();
        assert_eq!(names, ["g.ConvBlock1.w"]);
        let data = vars.data().lock().unwrap();
        assert!(grads.get(data["HourGlass2.w"].as_tensor()).is_none());
        Ok(())
    }

    #[test]
    fn branches_policy() {
        let f = Freeze::Branches;
        assert!(f.trains_generator_param("ConvBlock1.1.weight"));
        assert!(f.trains_generator_param("HourGlass4.HG.0.ConvBlock5.ConvBlock1.3.weight"));
        assert!(!f.trains_generator_param("HourGlass2.Conv1.weight"));
        assert!(!f.trains_generator_param("DecodeBlock1.norm1.rho"));
        assert!(Freeze::None.trains_generator_param("DecodeBlock1.norm1.rho"));
        let d = Freeze::Decoder;
        for trained in [
            "DecodeBlock1.norm1.c_gamma.0.weight",
            "DecodeBlock4.conv2.weight",
            "UpBlock2.3.rho",
            "HourGlass3.HG.0.Conv1.weight",
            "HourGlass4.Conv1.weight",
            "ConvBlock2.1.weight",
        ] {
            assert!(d.trains_generator_param(trained), "{trained}");
        }
        for frozen in [
            "ConvBlock1.1.weight",
            "HourGlass1.Conv1.weight",
            "HourGlass2.Conv1.weight",
            "DownBlock2.1.weight",
            "EncodeBlock4.conv_block.1.weight",
            "gap_fc.weight",
            "conv1x1.weight",
            "FC.2.weight",
        ] {
            assert!(!d.trains_generator_param(frozen), "{frozen}");
        }
    }
}
