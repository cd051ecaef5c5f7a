//! Parity of the candle photo2cartoon generator and discriminators with PyTorch.
//!
//! Fixtures come from `tools/reference/p2c_reference.py` (torch 2.15.0, CPU):
//! - `p2c_reference_outputs.safetensors`: outputs of the full-size networks whose weights and
//!   inputs are a deterministic formula (`formula` below, mirrored bit-for-bit in the script),
//!   so the 3.8 M + 14 M parameters need not be committed.
//! - `p2c_tiny.pt`: a photo2cartoon-format checkpoint (`{'genA2B': state_dict, ...}`) of a tiny
//!   configuration, and `p2c_tiny_outputs.safetensors`: its outputs and gradients.
//! - `TOONBOT_P2C_CHECKPOINT=path`: a full-size checkpoint written by the script's
//!   `--checkpoint` (the formula weights), loaded through the `.pt` path.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use toonbot::kernels::cpu_ops;
use toonbot::nets::discriminator::{self, Discriminator};
use toonbot::nets::generator::{self, Generator};
use toonbot::nets::layers::is_buffer;

/// Generator parameters at ngf 32 (PyTorch's `sum(p.numel())`, incl. the unused ConvBlock4s).
const GENERATOR_PARAMS: usize = 3_831_079;
/// Max abs difference allowed between candle and PyTorch generator outputs.
const GEN_TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load_fixture(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).expect("fixture")
}

// ---- The deterministic weights / inputs shared with p2c_reference.py -------------------

fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xCBF29CE484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001B3)
    })
}

/// splitmix64 outputs for seed + k * golden, k = 1..=n, as doubles in [0, 1).
fn uniform01(name: &str, n: usize) -> impl Iterator<Item = f64> {
    let seed = fnv1a64(name);
    (1..=n as u64).map(move |k| {
        let mut z = seed.wrapping_add(k.wrapping_mul(0x9E3779B97F4A7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    })
}

fn value_range(name: &str, shape: &[usize]) -> (f64, f64) {
    match name.rsplit('.').next().unwrap_or(name) {
        "rho" | "w_gamma" | "w_beta" => (0.0, 1.0),
        "gamma" => (0.5, 1.5),
        "beta" => (-0.5, 0.5),
        "weight_u" | "weight_v" | "input" => (-1.0, 1.0),
        "bias" => (-0.1, 0.1),
        "weight" | "weight_orig" => {
            let fan_in: usize = shape[1..].iter().product();
            let b = 1.0 / (fan_in as f64).sqrt();
            (-b, b)
        }
        _ => panic!("no formula for {name}"),
    }
}

fn formula(name: &str, shape: &[usize]) -> Result<Tensor> {
    let (lo, hi) = value_range(name, shape);
    let n = shape.iter().product();
    let v: Vec<f32> = uniform01(name, n)
        .map(|u| (lo + (hi - lo) * u) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Builds a network on a fresh `VarMap` (trainable variables) under `prefix`, then sets every
/// variable with `fill(name, shape)`.
fn build_on_varmap<T>(
    prefix: &str,
    dtype: DType,
    build: impl FnOnce(VarBuilder) -> Result<T>,
    fill: impl Fn(&str, &[usize]) -> Result<Tensor>,
) -> Result<(T, VarMap)> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    let net = build(if prefix.is_empty() { vb } else { vb.pp(prefix) })?;
    for (name, var) in vm.data().lock().unwrap().iter() {
        var.set(&fill(name, var.dims())?)?;
    }
    Ok((net, vm))
}

/// A network with formula weights as plain tensors (no autograd graph is recorded, as for
/// weights loaded from a file). Names and shapes come from a throw-away `VarMap` build.
fn formula_net<T>(prefix: &str, build: impl Fn(VarBuilder) -> Result<T>) -> Result<T> {
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp(prefix))?;
    let tensors = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| Ok((name.clone(), formula(name, var.dims())?)))
        .collect::<Result<HashMap<_, _>>>()?;
    build(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu).pp(prefix))
}

// ---- Comparison helpers -----------------------------------------------------------------

fn max_abs(t: &Tensor) -> Result<f64> {
    t.abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar()
}

/// Asserts equal shapes and `max|got - want| <= tol_abs + tol_rel * max|want|`; returns the
/// difference.
fn check(label: &str, got: &Tensor, want: &Tensor, tol_abs: f64, tol_rel: f64) -> Result<f64> {
    assert_eq!(got.dims(), want.dims(), "{label}: shape");
    let diff = max_abs(&(got.to_dtype(DType::F64)? - want.to_dtype(DType::F64)?)?)?;
    let scale = max_abs(want)?;
    println!("{label:<44} max abs diff {diff:.2e} (max |ref| {scale:.2e})");
    assert!(
        diff <= tol_abs + tol_rel * scale,
        "{label}: max abs diff {diff} > {tol_abs} + {tol_rel} * {scale}"
    );
    Ok(diff)
}

fn check_triplet(
    label: &str,
    got: &(Tensor, Tensor, Tensor),
    want: &HashMap<String, Tensor>,
    key: &str,
    tol: f64,
) -> Result<()> {
    check(
        &format!("{label} image/out"),
        &got.0,
        out(want, key, &["image", "out"]),
        tol,
        0.0,
    )?;
    check(
        &format!("{label} cam_logit"),
        &got.1,
        out(want, key, &["cam"]),
        tol,
        0.0,
    )?;
    // The heatmap sums every channel (values up to about 20): its f32 rounding depends on
    // the GEMM's summation order, which differs between AVX2 and AVX-512 machines.
    check(
        &format!("{label} heatmap"),
        &got.2,
        out(want, key, &["heatmap"]),
        tol,
        1e-6,
    )?;
    Ok(())
}

fn out<'a>(want: &'a HashMap<String, Tensor>, key: &str, leaves: &[&str]) -> &'a Tensor {
    leaves
        .iter()
        .find_map(|l| want.get(&format!("{key}.{l}")))
        .unwrap_or_else(|| panic!("fixture has no {key}.{leaves:?}"))
}

// ---- Full-size networks with formula weights ------------------------------------------------

fn formula_generator() -> Result<Generator> {
    formula_net("genA2B", |vb| {
        Generator::new(generator::Config::default(), vb)
    })
}

#[test]
fn generator_matches_pytorch_64() -> Result<()> {
    let want = load_fixture("p2c_reference_outputs.safetensors");
    let gen = formula_generator()?;
    let x = formula("input64.input", &[1, 3, 64, 64])?;
    // Plain (untracked) weights: the CPU fast path runs where the CPU has one.
    assert_eq!(gen.uses_cpu_fast_path(&x), cpu_ops::isa().is_some());
    let got = gen.forward(&x)?;
    check_triplet("generator 64x64", &got, &want, "gen64", GEN_TOL)?;
    // In a batch, each sample is processed independently (per-sample norms and CAM).
    let batch = Tensor::cat(&[&x.flip(&[3])?, &x], 0)?;
    let (img, cam, heat) = gen.forward(&batch)?;
    let second = (
        img.get(1)?.unsqueeze(0)?,
        cam.get(1)?.unsqueeze(0)?,
        heat.get(1)?.unsqueeze(0)?,
    );
    check_triplet(
        "generator 64x64, 2nd of a batch of 2",
        &second,
        &want,
        "gen64",
        GEN_TOL,
    )
}

#[test]
fn generator_matches_pytorch_256() -> Result<()> {
    let want = load_fixture("p2c_reference_outputs.safetensors");
    let gen = formula_generator()?;
    let x = formula("input256.input", &[1, 3, 256, 256])?;
    let t0 = Instant::now();
    let got = gen.forward(&x)?;
    let first = t0.elapsed();
    let t0 = Instant::now();
    gen.forward(&x)?;
    println!(
        "candle CPU forward 256x256 batch 1: {:.0} ms (first call {:.0} ms)",
        t0.elapsed().as_secs_f64() * 1e3,
        first.as_secs_f64() * 1e3
    );
    check_triplet("generator 256x256", &got, &want, "gen256", GEN_TOL)
}

#[test]
fn generator_parameters_are_trainable_vars() -> Result<()> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    Generator::new(generator::Config::default(), vb)?;
    let vars = vm.all_vars();
    // A trainable generator never takes the (gradient-less) CPU fast path.
    let gen = Generator::new(
        generator::Config::default(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    let x = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu)?;
    assert!(!gen.uses_cpu_fast_path(&x));
    let count: usize = vars.iter().map(|v| v.elem_count()).sum();
    println!("generator: {count} parameters in {} variables", vars.len());
    assert_eq!(count, GENERATOR_PARAMS);
    // Initial values as PyTorch's: adaLIN rho 0.9, LIN rho 0 / gamma 1, w 0.
    let data = vm.data().lock().unwrap();
    let first =
        |name: &str| -> Result<f32> { data[name].as_tensor().flatten_all()?.get(0)?.to_scalar() };
    assert_eq!(first("DecodeBlock2.norm1.norm.rho")?, 0.9);
    assert_eq!(first("DecodeBlock2.norm1.w_gamma")?, 0.0);
    assert_eq!(first("UpBlock1.3.rho")?, 0.0);
    assert_eq!(first("UpBlock1.3.gamma")?, 1.0);
    drop(data);
    // photo2cartoon's clipper keeps rho and w in [0, 1].
    vm.data().lock().unwrap()["UpBlock2.3.rho"].set(&Tensor::full(
        1.5f32,
        (1, 32, 1, 1),
        &Device::Cpu,
    )?)?;
    generator::clip_rho_w(&vm)?;
    assert_eq!(first_of(&vm, "UpBlock2.3.rho")?, 1.0);
    Ok(())
}

fn first_of(vm: &VarMap, name: &str) -> Result<f32> {
    vm.data().lock().unwrap()[name]
        .as_tensor()
        .flatten_all()?
        .get(0)?
        .to_scalar()
}

#[test]
fn discriminators_match_pytorch() -> Result<()> {
    let want = load_fixture("p2c_reference_outputs.safetensors");
    let x = formula("input96.input", &[1, 3, 96, 96])?;
    for (tag, cfg) in [
        ("disGA", discriminator::Config::global()),
        ("disLA", discriminator::Config::local()),
    ] {
        let d = formula_net(tag, |vb| Discriminator::new(cfg, vb))?;
        // PyTorch training mode: one power iteration per spectral norm, u and v updated ...
        let got = d.forward_t(&x, true)?;
        check_triplet(
            &format!("{tag} train 96x96"),
            &got,
            &want,
            &format!("{tag}.train"),
            1e-5,
        )?;
        // ... and eval mode then uses the updated u and v.
        let got = d.forward(&x)?;
        check_triplet(
            &format!("{tag} eval 96x96"),
            &got,
            &want,
            &format!("{tag}.eval"),
            1e-5,
        )?;
    }
    Ok(())
}

#[test]
fn discriminator_patch_sizes_at_256() -> Result<()> {
    let x = Tensor::zeros((1, 3, 256, 256), DType::F32, &Device::Cpu)?;
    for (cfg, patch) in [
        (discriminator::Config::global(), 6),
        (discriminator::Config::local(), 30),
    ] {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let (out, cam, heat) = Discriminator::new(cfg, vb)?.forward(&x)?;
        assert_eq!(out.dims(), &[1, 1, patch, patch]);
        assert_eq!(cam.dims(), &[1, 2]);
        assert_eq!(heat.dims(), &[1, 1, patch + 1, patch + 1]);
    }
    assert_eq!(discriminator::Config::global().min_input_size(), 96);
    Ok(())
}

// ---- The committed tiny photo2cartoon-format checkpoint ------------------------------------

const TINY_GEN: generator::Config = generator::Config {
    ngf: 4,
    img_size: 256,
    light: true,
    n_blocks: 4,
};

fn tiny_disc(n_layers: usize) -> discriminator::Config {
    discriminator::Config {
        input_nc: 3,
        ndf: 2,
        n_layers,
    }
}

/// Builds a network on a `VarMap` and fills it from one entry of a photo2cartoon checkpoint.
fn tiny_on_varmap<T>(
    key: &str,
    dtype: DType,
    build: impl FnOnce(VarBuilder) -> Result<T>,
) -> Result<(T, VarMap)> {
    let pth = PthTensors::new(fixture("p2c_tiny.pt"), Some(key))?;
    build_on_varmap("", dtype, build, |name, _| {
        pth.get(name)?
            .unwrap_or_else(|| panic!("{key} has no {name}"))
            .to_dtype(dtype)
    })
}

fn grad_key(prefix: &str, name: &str) -> String {
    format!("{prefix}.grad.{name}")
}

#[test]
fn tiny_checkpoint_loads_every_network() -> Result<()> {
    let path = fixture("p2c_tiny.pt");
    let dev = Device::Cpu;
    for key in ["genA2B", "genB2A"] {
        let vb = VarBuilder::from_pth_with_state(&path, DType::F32, key, &dev)?;
        Generator::new(TINY_GEN, vb)?;
    }
    for (key, n_layers) in [("disGA", 7), ("disGB", 7), ("disLA", 5), ("disLB", 5)] {
        let vb = VarBuilder::from_pth_with_state(&path, DType::F32, key, &dev)?;
        Discriminator::new(tiny_disc(n_layers), vb)?;
    }
    // Every tensor of the checkpoint is used (no name is missed or misspelt).
    let vm_names = |build: &dyn Fn(VarBuilder) -> Result<()>| -> Result<Vec<String>> {
        let vm = VarMap::new();
        build(VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        let mut names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        Ok(names)
    };
    let file_names = |key: &str| -> Result<Vec<String>> {
        let mut names: Vec<String> = PthTensors::new(&path, Some(key))?
            .tensor_infos()
            .keys()
            .cloned()
            .collect();
        names.sort();
        Ok(names)
    };
    assert_eq!(
        vm_names(&|vb| Generator::new(TINY_GEN, vb).map(|_| ()))?,
        file_names("genA2B")?
    );
    assert_eq!(
        vm_names(&|vb| Discriminator::new(tiny_disc(7), vb).map(|_| ()))?,
        file_names("disGA")?
    );
    Ok(())
}

#[test]
fn tiny_generator_outputs_and_gradients_match_pytorch() -> Result<()> {
    let want = load_fixture("p2c_tiny_outputs.safetensors");
    let x = formula("tiny64.input", &[1, 3, 64, 64])?;
    let (gen, vm) = tiny_on_varmap("genA2B", DType::F32, |vb| Generator::new(TINY_GEN, vb))?;
    // This tiny network amplifies f32 rounding: the trainable one (kernels::train_ops'
    // convolutions, summed by bands) is 1.7e-5 from PyTorch, hence 2e-5 here and below.
    let got = gen.forward(&x)?;
    check_triplet("tiny generator 64x64", &got, &want, "gen", 2e-5)?;

    // Our own safetensors with the same names give the same network. Loaded as plain
    // tensors, it takes the CPU fast path where there is one (kernels::cpu_ops: fused ops that
    // round differently from the trainable network above), so it is held to the PyTorch
    // outputs.
    let file = std::env::temp_dir().join(format!(
        "toonbot_p2c_tiny_{}.safetensors",
        std::process::id()
    ));
    vm.save(&file)?;
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, &Device::Cpu)? };
    let again_gen = Generator::new(TINY_GEN, vb)?;
    let again = again_gen.forward(&x)?;
    std::fs::remove_file(&file)?;
    println!(
        "safetensors generator on the CPU fast path: {}",
        again_gen.uses_cpu_fast_path(&x)
    );
    check_triplet("tiny generator via safetensors", &again, &want, "gen", 2e-5)?;

    // The encoder and decoder sides run apart give the same image, also when the fast
    // path encodes and the trainable network decodes (the pack recipe's cache).
    let encoded = again_gen.encode(&x)?;
    check(
        "tiny generator encode + decode",
        &again_gen.decode(&encoded)?,
        &again.0,
        0.0,
        0.0,
    )?;
    check(
        "tiny fast-path encoding, trainable decode",
        &gen.decode(&encoded)?,
        &got.0,
        2e-5,
        0.0,
    )?;
    check(
        "tiny encoding's CAM logits",
        &encoded.cam_logit,
        &again.1,
        0.0,
        0.0,
    )?;

    // Gradients, in f64 on both sides: this tiny network's input gradient is ill-conditioned
    // (PyTorch's own f32 and f64 results differ by 0.7 %).
    let (gen, vm) = tiny_on_varmap("genA2B", DType::F64, |vb| Generator::new(TINY_GEN, vb))?;
    let x = Var::from_tensor(&x.to_dtype(DType::F64)?)?;
    let (img, cam, heat) = gen.forward(x.as_tensor())?;
    let r = |name: &str, t: &Tensor| formula(name, t.dims())?.to_dtype(DType::F64);
    let loss = ((&img * r("tiny.r_image.input", &img)?)?.sum_all()?
        + (&cam * r("tiny.r_cam.input", &cam)?)?.sum_all()?)?;
    let loss = (loss + ((&heat * r("tiny.r_heat.input", &heat)?)?.sum_all()? * 0.01)?)?;
    check(
        "tiny generator f64 loss",
        &loss.reshape(1)?,
        &want["gen.f64.loss"],
        0.0,
        1e-12,
    )?;
    let grads = loss.backward()?;
    let g = grads.get(&x).expect("input gradient");
    check(
        "tiny generator f64 d/d input",
        g,
        &want["gen.f64.grad.input"],
        0.0,
        1e-6,
    )?;
    let mut compared = 0;
    for (name, var) in vm.data().lock().unwrap().iter() {
        let grad = grads.get(var);
        if name.ends_with("ConvBlock4.2.weight") {
            // Unused when the widths match, as in PyTorch (whose .grad stays None).
            assert!(grad.is_none(), "{name} should get no gradient");
            continue;
        }
        let grad = grad.unwrap_or_else(|| panic!("no gradient for {name}"));
        if let Some(w) = want.get(&grad_key("gen.f64", name)) {
            // Some are exactly 0 in exact arithmetic (biases cancelled by a following norm).
            check(
                &format!("tiny generator f64 d/d {name}"),
                grad,
                w,
                1e-9,
                1e-6,
            )?;
            compared += 1;
        }
    }
    println!("compared {compared} parameter gradients");
    assert!(compared > 100);
    Ok(())
}

#[test]
fn tiny_discriminators_eval_train_and_gradients_match_pytorch() -> Result<()> {
    let want = load_fixture("p2c_tiny_outputs.safetensors");
    for (tag, n_layers, size) in [("disGA", 7, 96), ("disLA", 5, 64)] {
        let (d, vm) = tiny_on_varmap(tag, DType::F32, |vb| {
            Discriminator::new(tiny_disc(n_layers), vb)
        })?;
        let x = formula(&format!("tiny{size}.input"), &[1, 3, size, size])?;
        let got = d.forward(&x)?;
        check_triplet(
            &format!("tiny {tag} eval"),
            &got,
            &want,
            &format!("{tag}.eval"),
            1e-5,
        )?;

        let (o, c, h) = d.forward_t(&x, true)?;
        let t = (o.clone(), c.clone(), h.clone());
        check_triplet(
            &format!("tiny {tag} train"),
            &t,
            &want,
            &format!("{tag}.train"),
            1e-5,
        )?;
        let data = vm.data().lock().unwrap();
        for (name, var) in data.iter().filter(|(n, _)| is_buffer(n)) {
            let w = &want[&format!("{tag}.train.{name}")];
            check(
                &format!("tiny {tag} updated {name}"),
                var.as_tensor(),
                w,
                1e-6,
                0.0,
            )?;
        }
        let loss = ((o.sqr()?.mean_all()? + c.sqr()?.mean_all()?)? + (h.mean_all()? * 0.01)?)?;
        check(
            &format!("tiny {tag} loss"),
            &loss.reshape(1)?,
            &want[&format!("{tag}.loss")],
            0.0,
            1e-5,
        )?;
        let grads = loss.backward()?;
        for (name, var) in data.iter() {
            let grad = grads.get(var);
            if is_buffer(name) {
                assert!(grad.is_none(), "buffer {name} got a gradient");
            } else if let Some(w) = want.get(&grad_key(tag, name)) {
                let grad = grad.unwrap_or_else(|| panic!("no gradient for {name}"));
                check(&format!("tiny {tag} d/d {name}"), grad, w, 0.0, 1e-4)?;
            }
        }
    }
    Ok(())
}

// ---- A full-size photo2cartoon-format checkpoint, when one is given ------------------------

#[test]
fn full_checkpoint_from_env() -> Result<()> {
    let Ok(path) = std::env::var("TOONBOT_P2C_CHECKPOINT") else {
        println!(
            "skipped: set TOONBOT_P2C_CHECKPOINT to a checkpoint written by \
             `tools/reference/p2c_reference.py --checkpoint PATH` to run this test"
        );
        return Ok(());
    };
    let want = load_fixture("p2c_reference_outputs.safetensors");
    let dev = Device::Cpu;
    let vb = VarBuilder::from_pth_with_state(&path, DType::F32, "genA2B", &dev)?;
    let gen = Generator::new(generator::Config::default(), vb)?;
    let got = gen.forward(&formula("input64.input", &[1, 3, 64, 64])?)?;
    check_triplet("checkpoint genA2B 64x64", &got, &want, "gen64", GEN_TOL)?;
    let x = formula("input96.input", &[1, 3, 96, 96])?;
    for (tag, cfg) in [
        ("disGA", discriminator::Config::global()),
        ("disLA", discriminator::Config::local()),
    ] {
        let vb = VarBuilder::from_pth_with_state(&path, DType::F32, tag, &dev)?;
        let got = Discriminator::new(cfg, vb)?.forward(&x)?;
        check_triplet(
            &format!("checkpoint {tag} eval"),
            &got,
            &want,
            &format!("{tag}.eval"),
            1e-5,
        )?;
    }
    Ok(())
}
