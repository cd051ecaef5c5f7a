//! Times the parts of the fast recipe's adversarial step, each forward then backward on its
//! own, at batch 4: where a step's time goes, part by part (the step itself is
//! `toonbot bench --train --recipe fast`).
//!
//! `cargo run --release --example train_step_parts [size] [runs] [part]` (default 128 px,
//! 3 runs, every part whose name starts with `part`; the medians are printed).

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use toonbot::train::face_id::FaceIdLoss;
use toonbot::train::fast::augment::diff_augment;
use toonbot::train::fast::model::{load_backbone, Discriminators, FastNets, GlobalDiscriminator};
use toonbot::train::model::NetConfig;
use toonbot::train::params::Freeze;

const BATCH: usize = 4;

/// One part's forward, whose output's sum is differentiated.
type Part<'a> = (&'a str, Box<dyn Fn() -> Result<Tensor> + 'a>);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds of `forward` and of the backward of its output's sum, over `runs`
/// calls after a warm-up.
fn time(runs: usize, forward: impl Fn() -> Result<Tensor>) -> Result<(f64, f64)> {
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        let t = Instant::now();
        let loss = forward()?.sum_all()?;
        let f = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        loss.backward()?;
        let b = t.elapsed().as_secs_f64() * 1e3;
        if run > 0 {
            fwd.push(f);
            bwd.push(b);
        }
    }
    Ok((median(fwd), median(bwd)))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = args.first().map_or(Ok(128), |a| a.parse())?;
    let runs = args.get(1).map_or(Ok(3), |a| a.parse())?;
    let only = args.get(2).map_or("", String::as_str);
    let device = Device::Cpu;
    let models = Path::new("models");
    let nets = FastNets::new(
        NetConfig::photo2cartoon(),
        Discriminators::Projected,
        (0, Freeze::None),
        load_backbone(models, &device)?,
        &device,
    )?;
    let face_id = FaceIdLoss::load(models, size, &device)?;
    let photos = Tensor::rand(-1f32, 1f32, (BATCH, 3, size, size), &device)?;
    let image = Var::rand(-1f32, 1f32, (BATCH, 3, size, size), &device)?;
    let x = image.as_tensor();
    let GlobalDiscriminator::Projected(projected) = &nets.global else {
        anyhow::bail!("the recipe's discriminator is the projected one")
    };
    let parts: Vec<Part> = vec![
        ("generator", Box::new(|| Ok(nets.gen.forward(&photos)?.0))),
        (
            "DiffAugment (p 0.5)",
            Box::new(|| diff_augment(x, 0.5, 0, "parts")),
        ),
        (
            "projected D, image without gradient",
            Box::new(|| projected.forward_t(&nets.backbone, &photos, true)),
        ),
        (
            "projected D, image with gradient",
            Box::new(|| projected.forward_t(&nets.backbone, x, true)),
        ),
        (
            "backbone, low level",
            Box::new(|| nets.backbone.low_level(x)),
        ),
        (
            "local discriminator",
            Box::new(|| {
                let (logit, cam, _) = nets.local.forward_t(x, true)?;
                logit.sum_all()? + cam.sum_all()?
            }),
        ),
        ("face-ID", Box::new(|| face_id.cosine_distance(&photos, x))),
    ];
    println!("part (batch {BATCH}, {size} px)          forward ms   backward ms");
    for (name, forward) in parts.iter().filter(|(name, _)| name.starts_with(only)) {
        let (f, b) = time(runs, forward)?;
        println!("{name:<36} {f:>10.0} {b:>13.0}");
    }
    Ok(())
}
