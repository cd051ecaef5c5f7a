//! Times the fused CPU convolution (`kernels::cpu_ops`) against candle's `conv2d` (after a
//! reflection pad) on the generator's convolution shapes, and checks they agree.
//!
//! `cargo run --release --example conv_bench [runs]`

use std::time::Instant;

use candle_core::{DType, Device, Module, Result, Tensor};
use toonbot::kernels::cpu_ops::{self, InputTransform, PackedConv, Padding};
use toonbot::kernels::train_ops::reflection_pad2d;
use toonbot::nets::layers::upsample_nearest2x;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU time (s) used so far by all threads of this process; the machine is shared, so CPU
/// time says more about a kernel than wall time does.
fn cpu_time() -> f64 {
    toonbot::nets::generator::process_cpu_ms() / 1e3
}

/// Median wall and CPU seconds of `runs` calls.
fn time(runs: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<(f64, f64)> {
    f()?;
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (t, c) = (Instant::now(), cpu_time());
        f()?;
        wall.push(t.elapsed().as_secs_f64());
        cpu.push(cpu_time() - c);
    }
    Ok((median(wall), median(cpu)))
}

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let dev = Device::Cpu;
    println!(
        "isa {:?}, rayon threads {}",
        cpu_ops::isa(),
        rayon::current_num_threads()
    );
    // (label, cin, cout, k, stride, size, upsample)
    let shapes = [
        ("hg 32->16 3x3 @256", 32, 16, 3, 1, 256, false),
        ("hg 16->8 3x3 @256", 16, 8, 3, 1, 256, false),
        ("hg 8->8 3x3 @256", 8, 8, 3, 1, 256, false),
        ("hg 32->16 3x3 @64", 32, 16, 3, 1, 64, false),
        ("res 128->128 3x3 @64", 128, 128, 3, 1, 64, false),
        ("1x1 32->32 @256", 32, 32, 1, 1, 256, false),
        ("in 3->32 7x7 @256", 3, 32, 7, 1, 256, false),
        ("down 32->64 3x3/2 @256", 32, 64, 3, 2, 256, false),
        ("down 64->128 3x3/2 @128", 64, 128, 3, 2, 128, false),
        ("up 128->64 3x3 @64x2", 128, 64, 3, 1, 64, true),
        ("up 64->32 3x3 @128x2", 64, 32, 3, 1, 128, true),
        ("out 3->3 7x7 @256", 3, 3, 7, 1, 256, false),
    ];
    println!(
        "{:<26} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9}",
        "conv (GF/s per CPU-second)",
        "candle ms",
        "fast ms",
        "speedup",
        "cand GF/s",
        "fast GF/s",
        "max diff"
    );
    for (label, cin, cout, k, stride, size, up) in shapes {
        let x = Tensor::randn(0f32, 1.0, (1, cin, size, size), &dev)?;
        let w =
            (Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev)? / ((cin * k * k) as f64).sqrt())?;
        let pad = k / 2;
        let candle_conv = candle_nn::Conv2d::new(
            w.clone(),
            None,
            candle_nn::Conv2dConfig {
                stride,
                ..Default::default()
            },
        );
        let slow = || -> Result<Tensor> {
            let x = if up {
                upsample_nearest2x(&x)?
            } else {
                x.clone()
            };
            candle_conv.forward(&reflection_pad2d(&x, pad)?)
        };
        let packed = PackedConv::new(&w, None, stride, Padding::Reflect(pad))?;
        let input = InputTransform {
            upsample: up,
            ..Default::default()
        };
        let fast = || cpu_ops::conv2d(&x, &packed, &input, None, false);
        let diff = (slow()? - fast()?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let (ts, cs) = time(runs, slow)?;
        let (tf, cf) = time(runs, fast)?;
        let out = slow()?;
        let flops = 2.0 * out.elem_count() as f64 * (cin * k * k) as f64;
        println!(
            "{label:<26} {:>9.2} {:>9.2} {:>6.2}x {:>9.1} {:>9.1} {:>9.1e}",
            ts * 1e3,
            tf * 1e3,
            ts / tf,
            flops / cs / 1e9,
            flops / cf / 1e9,
            diff
        );
    }
    Ok(())
}
