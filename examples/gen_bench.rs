//! Times the photo2cartoon generator (random weights, 256x256) on the CPU fast path and with
//! plain candle ops, interleaved run by run; prints one JSON line of median ms per image.
//!
//! `cargo run --release --example gen_bench [runs] [batches, e.g. 1,4] [fast|candle|both]`

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use toonbot::nets::cpu_ops;
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
