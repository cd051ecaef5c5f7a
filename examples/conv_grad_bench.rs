//! Times a training convolution (forward, then backward to its input and weight) on the
//! shapes of a 128-px photo2cartoon training step: candle's `conv2d` against
//! `kernels::train_ops::conv2d`, and checks they agree.
//!
//! `cargo run --release --example conv_grad_bench [runs]`

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use toonbot::kernels::train_ops::Pad;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds of the forward and of the backward over `runs` calls.
fn time(
    runs: usize,
    x: &Var,
    w: &Var,
    conv: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<(f64, f64, Tensor, Tensor, Tensor)> {
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..=runs {
        let t = Instant::now();
        let y = conv(x.as_tensor(), w.as_tensor())?;
        let f = t.elapsed().as_secs_f64() * 1e3;
        let r = Tensor::ones_like(&y)?.affine(0.5, 0.0)?;
        let loss = (&y * &r)?.sum_all()?;
        let t = Instant::now();
        let grads = loss.backward()?;
        let b = t.elapsed().as_secs_f64() * 1e3;
        fwd.push(f);
        bwd.push(b);
        last = Some((
            y,
            grads.get(x.as_tensor()).unwrap().clone(),
            grads.get(w.as_tensor()).unwrap().clone(),
        ));
    }
    let (y, gx, gw) = last.unwrap();
    Ok((median(fwd), median(bwd), y, gx, gw))
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()
}

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dev = Device::Cpu;
    // (cin, cout, kernel, stride, padding, input side)
    let shapes = [
        (3, 32, 7, 1, 0, 134),
        (32, 16, 3, 1, 0, 130),
        (16, 8, 3, 1, 0, 130),
        (8, 8, 3, 1, 0, 66),
        (32, 64, 3, 2, 0, 130),
        (64, 128, 3, 2, 0, 66),
        (128, 128, 3, 1, 0, 34),
        (64, 32, 3, 1, 0, 130),
        (32, 3, 7, 1, 0, 134),
        (3, 64, 4, 2, 0, 130),
        (64, 128, 4, 2, 0, 66),
        (256, 512, 4, 1, 0, 10),
        (64, 64, 1, 1, 0, 64),
    ];
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9}",
        "shape", "cdl fwd", "cdl bwd", "new fwd", "new bwd", "bwd x", "max diff"
    );
    let (mut sum_old, mut sum_new) = (0.0, 0.0);
    for (i, &(cin, cout, k, stride, pad, side)) in shapes.iter().enumerate() {
        let x = Var::randn(0f32, 1f32, (1, cin, side, side), &dev)?;
        let w = Var::randn(0f32, 0.1f32, (cout, cin, k, k), &dev)?;
        let (f0, b0, y0, gx0, gw0) = time(runs, &x, &w, |x, w| x.conv2d(w, pad, stride, 1, 1))?;
        let (f1, b1, y1, gx1, gw1) = time(runs, &x, &w, |x, w| {
            toonbot::kernels::train_ops::conv2d(x, w, Pad::Zeros(pad), stride)
        })?;
        let diff = max_diff(&y0, &y1)?
            .max(max_diff(&gx0, &gx1)?)
            .max(max_diff(&gw0, &gw1)?);
        sum_old += f0 + b0;
        sum_new += f1 + b1;
        println!(
            "{:<26} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>6.1}x {:>9.2e}",
            format!("#{i} {cin}->{cout} k{k} s{stride} @{side}"),
            f0,
            b0,
            f1,
            b1,
            b0 / b1,
            diff
        );
    }
    println!(
        "total fwd+bwd: candle {sum_old:.1} ms, new {sum_new:.1} ms ({:.2}x)",
        sum_old / sum_new
    );
    Ok(())
}
