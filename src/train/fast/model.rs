//! The networks of a fast run: generator A->B (`genA2B`, photo2cartoon's keys), the
//! projected discriminator's mixing and heads (`disP`), photo2cartoon's local
//! discriminator for cartoons (`disLB`), and the frozen backbone.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Result, Tensor, Var};
use candle_nn::VarMap;

use crate::nets::backbone::{self, Backbone};
use crate::nets::discriminator::{self, Discriminator};
use crate::nets::generator::{clip_rho_w, Generator};
use crate::nets::projected_discriminator::{self, ProjectedDiscriminator};
use crate::train::model::NetConfig;
use crate::train::params::{self, trainable_vars, var_builder, Freeze};

/// Network names, as checkpoint key prefixes.
pub const NETWORKS: [&str; 3] = ["genA2B", "disP", "disLB"];

pub struct FastNets {
    pub gen: Generator,
    pub projected: ProjectedDiscriminator,
    pub local: Discriminator,
    pub backbone: Backbone,
    /// In [`NETWORKS`] order.
    vars: [VarMap; 3],
}

/// The frozen backbone from `models_dir/efficientnet_lite0.safetensors`.
pub fn load_backbone(models_dir: &Path, device: &Device) -> anyhow::Result<Backbone> {
    let vb = crate::face::load_weights(models_dir, "efficientnet_lite0", device)?;
    Ok(Backbone::new(backbone::Config::lite0(), vb)?)
}

impl FastNets {
    /// Fresh networks drawn from `seed` (photo2cartoon's generator and local discriminator).
    pub fn new(net: NetConfig, seed: u64, backbone: Backbone, device: &Device) -> Result<Self> {
        let vars: [VarMap; 3] = std::array::from_fn(|_| VarMap::new());
        let vb = |i: usize| var_builder(&vars[i], NETWORKS[i], seed, Freeze::None, device);
        let local = discriminator::Config {
            input_nc: 3,
            ndf: net.ndf,
            n_layers: net.local_layers,
        };
        Ok(Self {
            gen: Generator::new(net.generator(), vb(0))?,
            projected: ProjectedDiscriminator::new(
                projected_discriminator::Config::lite0(),
                vb(1),
            )?,
            local: Discriminator::new(local, vb(2))?,
            backbone,
            vars,
        })
    }

    pub fn generator_vars(&self) -> Vec<(String, Var)> {
        trainable_vars(&self.vars[0], NETWORKS[0], Freeze::None)
    }

    /// Both discriminators' trained variables (not the fixed mixing, not the spectral-norm
    /// buffers).
    pub fn discriminator_vars(&self) -> Vec<(String, Var)> {
        let prefix = format!("{}.", NETWORKS[1]);
        (1..3)
            .flat_map(|i| trainable_vars(&self.vars[i], NETWORKS[i], Freeze::None))
            .filter(|(name, _)| {
                name.strip_prefix(&prefix)
                    .is_none_or(|n| !ProjectedDiscriminator::is_fixed(n))
            })
            .collect()
    }

    /// Every variable and buffer of the named networks, `network.param`, sorted.
    pub fn named_tensors(&self, networks: &[&str]) -> Vec<(String, Tensor)> {
        params::named_tensors(params::select(&NETWORKS, &self.vars, networks))
    }

    /// Sets the named networks' variables from `tensors` (keys `network.param`, any float
    /// dtype). Every variable of each network in `networks` must be present.
    pub fn load(&self, tensors: &HashMap<String, Tensor>, networks: &[&str]) -> Result<()> {
        params::load_named(params::select(&NETWORKS, &self.vars, networks), tensors)
    }

    pub fn clip_rho_w(&self) -> Result<()> {
        clip_rho_w(&self.vars[0])
    }
}
