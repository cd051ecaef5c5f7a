//! The networks of a fast run: generator A->B (`genA2B`, photo2cartoon's keys),
//! photo2cartoon's local discriminator for cartoons (`disLB`), the frozen backbone, and
//! either the projected discriminator's mixing and heads (`disP`, the recipe) or
//! photo2cartoon's global discriminator for cartoons (`disGB`, the comparison's
//! no-backbone variant).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Result, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::nets::backbone::{self, Backbone};
use crate::nets::discriminator::Discriminator;
use crate::nets::generator::{clip_rho_w, Generator};
use crate::nets::projected_discriminator::{self, ProjectedDiscriminator};
use crate::train::adam::{Adam, AdamConfig};
use crate::train::model::NetConfig;
use crate::train::params::{self, trainable_vars, var_builder, Freeze};

/// Network names, as checkpoint key prefixes. A run has `disP` or `disGB`, not both; the
/// other one's variables are empty.
pub const NETWORKS: [&str; 4] = ["genA2B", "disP", "disLB", "disGB"];

/// What judges the cartoons beside photo2cartoon's local discriminator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Discriminators {
    /// The projected discriminator on the frozen backbone's features (hinge loss).
    #[default]
    Projected,
    /// photo2cartoon's global discriminator (LSGAN on its logits and CAM logits), no
    /// backbone features.
    Photo2cartoon,
}

/// The discriminator that judges whole images.
pub enum GlobalDiscriminator {
    /// The projected discriminator on the backbone's features (`disP`).
    Projected(ProjectedDiscriminator),
    /// photo2cartoon's global discriminator (`disGB`).
    Photo2cartoon(Discriminator),
}

/// The networks a fast run trains, plus the frozen backbone, with their variables.
pub struct FastNets {
    /// Generator A->B, photo to cartoon (`genA2B`).
    pub gen: Generator,
    /// The discriminator of whole cartoons.
    pub global: GlobalDiscriminator,
    /// photo2cartoon's local discriminator for cartoons (`disLB`).
    pub local: Discriminator,
    /// The frozen EfficientNet-Lite0, for the projected discriminator and the feature losses.
    pub backbone: Backbone,
    /// In [`NETWORKS`] order.
    vars: [VarMap; 4],
    /// Which generator parameters train.
    freeze: Freeze,
}

/// The frozen backbone from `models_dir/efficientnet_lite0.safetensors`.
pub fn load_backbone(models_dir: &Path, device: &Device) -> anyhow::Result<Backbone> {
    let vb = crate::face::load_weights(models_dir, "efficientnet_lite0", device)?;
    Ok(Backbone::new(backbone::Config::lite0(), vb)?)
}

impl FastNets {
    /// Fresh networks drawn from `seed` (photo2cartoon's generator and discriminators); the
    /// generator's parameters that `freeze` holds fixed are detached and not trained.
    pub fn new(
        net: NetConfig,
        discriminators: Discriminators,
        (seed, freeze): (u64, Freeze),
        backbone: Backbone,
        device: &Device,
    ) -> Result<Self> {
        let vars: [VarMap; 4] = std::array::from_fn(|_| VarMap::new());
        let vb = |i: usize| {
            let freeze = if i == 0 { freeze } else { Freeze::None };
            var_builder(&vars[i], NETWORKS[i], seed, freeze, device)
        };
        let global = match discriminators {
            Discriminators::Projected => GlobalDiscriminator::Projected(
                ProjectedDiscriminator::new(projected_discriminator::Config::lite0(), vb(1))?,
            ),
            Discriminators::Photo2cartoon => GlobalDiscriminator::Photo2cartoon(
                Discriminator::new(net.discriminator(net.global_layers), vb(3))?,
            ),
        };
        Ok(Self {
            gen: Generator::new(net.generator(), vb(0))?,
            global,
            local: Discriminator::new(net.discriminator(net.local_layers), vb(2))?,
            backbone,
            vars,
            freeze,
        })
    }

    /// The generator's trained variables, `genA2B.param`, sorted: what its optimiser updates.
    pub fn generator_vars(&self) -> Vec<(String, Var)> {
        trainable_vars(&self.vars[0], NETWORKS[0], self.freeze)
    }

    /// Fresh Adam optimisers of the generator's and the discriminators' trained variables:
    /// photo2cartoon's settings without weight decay.
    pub fn optimisers(&self) -> Result<(Adam, Adam)> {
        let adam = AdamConfig {
            weight_decay: 0.0,
            ..AdamConfig::photo2cartoon()
        };
        Ok((
            Adam::new(self.generator_vars(), adam)?,
            Adam::new(self.discriminator_vars(), adam)?,
        ))
    }

    /// Both discriminators' trained variables (not the fixed mixing, not the spectral-norm
    /// buffers).
    pub fn discriminator_vars(&self) -> Vec<(String, Var)> {
        let prefix = format!("{}.", NETWORKS[1]);
        (1..4)
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

    /// Clamps the generator's `rho`, `w_gamma` and `w_beta` to [0, 1], as photo2cartoon does
    /// after every generator step.
    pub fn clip_rho_w(&self) -> Result<()> {
        clip_rho_w(&self.vars[0])
    }
}
