//! The vendored candle-core's one change (vendor/candle-core/PATCH.md): a tensor's first
//! gradient is stored instead of added to zeros. Gradients must be those of the formulas,
//! for tensors used once and several times, through subtraction, broadcasts and reductions.

use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{i}: {g} != {w}");
    }
}

#[test]
fn gradients_are_the_formulas_when_first_gradients_are_stored() {
    let dev = Device::Cpu;
    let xs: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let ys: Vec<f32> = (0..6).map(|i| 2.0 - i as f32 * 0.3).collect();
    let x = Var::from_vec(xs.clone(), (2, 3), &dev).unwrap();
    let y = Var::from_vec(ys.clone(), (2, 3), &dev).unwrap();
    let b = Var::from_vec(vec![0.5f32, -1.0, 2.0], (1, 3), &dev).unwrap();
    // f = Σ (x - y) x + Σ_rows (Σ_cols x)² + Σ (x + b) + Σ max_cols(y)
    let diff = (x.as_tensor() - y.as_tensor()).unwrap();
    let product = (&diff * x.as_tensor()).unwrap();
    let row_sums = x.as_tensor().sum_keepdim(1).unwrap();
    let shifted = x.as_tensor().broadcast_add(b.as_tensor()).unwrap();
    let row_max = y.as_tensor().max_keepdim(1).unwrap();
    let f = (product.sum_all().unwrap()
        + row_sums.sqr().unwrap().sum_all().unwrap()
        + shifted.sum_all().unwrap()
        + row_max.sum_all().unwrap())
    .unwrap();
    let grads = f.backward().unwrap();

    let row_sum = |r: usize| xs[3 * r..3 * r + 3].iter().sum::<f32>();
    let want_x: Vec<f32> = (0..6)
        .map(|i| 2.0 * xs[i] - ys[i] + 2.0 * row_sum(i / 3) + 1.0)
        .collect();
    let want_y: Vec<f32> = (0..6)
        .map(|i| {
            let row = &ys[3 * (i / 3)..3 * (i / 3) + 3];
            let is_max = ys[i] == row.iter().copied().fold(f32::MIN, f32::max);
            -xs[i] + if is_max { 1.0 } else { 0.0 }
        })
        .collect();
    assert_close(&values(grads.get(x.as_tensor()).unwrap()), &want_x);
    assert_close(&values(grads.get(y.as_tensor()).unwrap()), &want_y);
    assert_close(&values(grads.get(b.as_tensor()).unwrap()), &[2.0, 2.0, 2.0]);
    // Every stored gradient has its tensor's shape and is contiguous, as zeros + g was.
    for v in [&x, &y, &b] {
        let g = grads.get(v.as_tensor()).unwrap();
        assert_eq!(g.dims(), v.dims());
        assert!(g.is_contiguous());
    }
}
