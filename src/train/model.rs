//! The six networks of photo2cartoon training (generators A->B and B->A, global and local
//! discriminators for each domain) and their variables.

use std::collections::HashMap;

use candle_core::{Device, Result, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::params::{self, trainable_vars, var_builder, Freeze};
use crate::nets::discriminator::{self, Discriminator};
use crate::nets::generator::{self, clip_rho_w, Generator};

/// Network widths and depths; [`NetConfig::photo2cartoon`] is the reference, smaller ones
/// serve tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Generator base width (32).
    pub ngf: usize,
    /// Generator encoder/decoder residual blocks (4).
    pub n_blocks: usize,
    /// Discriminator base width (32).
    pub ndf: usize,
    /// Global discriminator depth (7).
    pub global_layers: usize,
    /// Local discriminator depth (5).
    pub local_layers: usize,
}

impl NetConfig {
    /// photo2cartoon's networks: widths 32, 4 residual blocks, discriminators of 7 and 5 layers.
    pub fn photo2cartoon() -> Self {
        Self {
            ngf: 32,
            n_blocks: 4,
            ndf: 32,
            global_layers: 7,
            local_layers: 5,
        }
    }

    /// The generators' configuration: photo2cartoon's light generator at these width and depth.
    pub fn generator(&self) -> generator::Config {
        generator::Config {
            ngf: self.ngf,
            n_blocks: self.n_blocks,
            light: true,
            ..Default::default()
        }
    }

    /// The configuration of a discriminator of `n_layers` layers on RGB images (global or
    /// local).
    pub fn discriminator(&self, n_layers: usize) -> discriminator::Config {
        discriminator::Config {
            input_nc: 3,
            ndf: self.ndf,
            n_layers,
        }
    }

    /// Checks that square images of `size` pixels fit every network.
    pub fn check_size(&self, size: usize) -> anyhow::Result<()> {
        let global = self.discriminator(self.global_layers).min_input_size();
        anyhow::ensure!(
            size.is_multiple_of(16) && size >= 32 && size >= global,
            "image size {size} must be a multiple of 16, at least 32 and at least {global} \
             (the global discriminator's smallest input)"
        );
        Ok(())
    }
}

/// Names of the networks, as photo2cartoon's checkpoints key them.
pub const NETWORKS: [&str; 6] = ["genA2B", "genB2A", "disGA", "disGB", "disLA", "disLB"];

/// The networks on one device, with one `VarMap` each.
pub struct Ugatit {
    /// Widths and depths of the networks.
    pub cfg: NetConfig,
    /// Which generator parameters train.
    pub freeze: Freeze,
    /// Generator photo -> cartoon (`genA2B`): the one installed as a style.
    pub gen_a2b: Generator,
    /// Generator cartoon -> photo (`genB2A`), for the cycle loss.
    pub gen_b2a: Generator,
    /// Global discriminator of photos (`disGA`).
    pub dis_ga: Discriminator,
    /// Global discriminator of cartoons (`disGB`).
    pub dis_gb: Discriminator,
    /// Local discriminator of photos (`disLA`).
    pub dis_la: Discriminator,
    /// Local discriminator of cartoons (`disLB`).
    pub dis_lb: Discriminator,
    /// In [`NETWORKS`] order.
    vars: [VarMap; 6],
}

impl Ugatit {
    /// Fresh networks with PyTorch's default initialisation drawn from `seed`. Load weights
    /// with [`Ugatit::load`] afterwards to start from a checkpoint or a style.
    pub fn new(cfg: NetConfig, freeze: Freeze, seed: u64, device: &Device) -> Result<Self> {
        let vars: [VarMap; 6] = std::array::from_fn(|_| VarMap::new());
        let vb = |i: usize, f: Freeze| var_builder(&vars[i], NETWORKS[i], seed, f, device);
        let gen = |i| Generator::new(cfg.generator(), vb(i, freeze));
        let dis = |i, layers| Discriminator::new(cfg.discriminator(layers), vb(i, Freeze::None));
        Ok(Self {
            cfg,
            freeze,
            gen_a2b: gen(0)?,
            gen_b2a: gen(1)?,
            dis_ga: dis(2, cfg.global_layers)?,
            dis_gb: dis(3, cfg.global_layers)?,
            dis_la: dis(4, cfg.local_layers)?,
            dis_lb: dis(5, cfg.local_layers)?,
            vars,
        })
    }

    fn freeze_of(&self, network: usize) -> Freeze {
        if network < 2 {
            self.freeze
        } else {
            Freeze::None
        }
    }

    /// The variables the generators' optimiser updates, named `genA2B.<param>`.
    pub fn generator_vars(&self) -> Vec<(String, Var)> {
        (0..2)
            .flat_map(|i| trainable_vars(&self.vars[i], NETWORKS[i], self.freeze_of(i)))
            .collect()
    }

    /// The variables the discriminators' optimiser updates (not the spectral-norm buffers).
    pub fn discriminator_vars(&self) -> Vec<(String, Var)> {
        (2..6)
            .flat_map(|i| trainable_vars(&self.vars[i], NETWORKS[i], Freeze::None))
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

    /// Generator A->B's weights alone, named as in a style's `generator.safetensors`.
    pub fn generator_a2b_tensors(&self) -> HashMap<String, Tensor> {
        let data = self.vars[0].data().lock().expect("varmap lock");
        data.iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect()
    }

    /// Clamps both generators' rho and w to [0, 1] (after every generator step).
    pub fn clip_rho_w(&self) -> Result<()> {
        clip_rho_w(&self.vars[0])?;
        clip_rho_w(&self.vars[1])
    }
}
