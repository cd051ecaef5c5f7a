//! Times the photo2cartoon generator (random weights, 256x256) on the CPU fast path and with
//! plain candle ops, interleaved run by run; prints one JSON line of median ms per image.
//!
//! `cargo run --release --example gen_bench [runs] [batches, e.g. 1,4] [fast|candle|both|profile]`

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use toonbot::kernels::cpu_ops;
use toonbot::nets::generator::{Config, Generator};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let batches: Vec<usize> = args
        .get(2)
        .map(|s| s.split(',').filter_map(|b| b.parse().ok()).collect())
        .unwrap_or_else(|| vec![1]);
    let mode = args.get(3).map(String::as_str).unwrap_or("both");
    let dev = Device::Cpu;
    let vm = VarMap::new();
    Generator::new(
        Config::default(),
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )?;
    let weights = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let gen = Generator::new(
        Config::default(),
        VarBuilder::from_tensors(weights, DType::F32, &dev),
    )?;
    if mode == "profile" {
        // Median ms of each stage on the fast path, batch 1.
        let x = Tensor::randn(0f32, 0.5, (1, 3, 256, 256), &dev)?;
        gen.forward(&x)?;
        let mut stages: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
        for _ in 0..runs {
            let (_, times) = gen.forward_profiled(&x)?;
            for (i, t) in times.into_iter().enumerate() {
                if stages.len() <= i {
                    stages.push((t.stage, Vec::new(), Vec::new()));
                }
                stages[i].1.push(t.wall_ms);
                stages[i].2.push(t.cpu_ms);
            }
        }
        let (mut total, mut total_cpu) = (0.0, 0.0);
        println!("{:<14} {:>8} {:>8}", "stage", "wall ms", "cpu ms");
        for (name, wall, cpu) in stages {
            let (w, c) = (median(wall), median(cpu));
            total += w;
            total_cpu += c;
            println!("{name:<14} {w:8.1} {c:8.1}");
        }
        println!("{:<14} {total:8.1} {total_cpu:8.1}", "sum");
        return Ok(());
    }
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for &b in &batches {
        let x = Tensor::randn(0f32, 0.5, (b, 3, 256, 256), &dev)?;
        let paths: &[bool] = match mode {
            "fast" => &[true],
            "candle" => &[false],
            _ => &[true, false],
        };
        let mut times: BTreeMap<bool, Vec<f64>> = BTreeMap::new();
        for &fast in paths {
            cpu_ops::set_enabled(fast);
            gen.forward(&x)?; // warm-up
        }
        for _ in 0..runs {
            for &fast in paths {
                cpu_ops::set_enabled(fast);
                let t = Instant::now();
                gen.forward(&x)?;
                times
                    .entry(fast)
                    .or_default()
                    .push(t.elapsed().as_secs_f64() * 1e3 / b as f64);
            }
        }
        for (fast, v) in times {
            let name = if fast { "fast" } else { "candle" };
            out.insert(format!("{name}_b{b}"), median(v));
        }
    }
    cpu_ops::set_enabled(true);
    println!("{}", serde_json::to_string(&out).unwrap());
    Ok(())
}
