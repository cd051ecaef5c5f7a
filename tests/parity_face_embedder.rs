//! Parity of the candle MobileFaceNet with the TFLite reference (ai_edge_litert Interpreter).
//!
//! Fixture (tools/import/face_embedder.py --fixture): `input` u8 (3, 3, 112, 112) RGB = face A,
//! face B, face A mirrored; `embeddings` f32 (3, 192) raw reference outputs.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use toonbot::nets::face_embedder::{cosine_similarity, normalize, Config, FaceEmbedder};

/// Raw embedding entries reach ~26 (norms ~70); measured 4.0e-5.
const TOLERANCE: f32 = 2e-4;

fn load() -> Result<(FaceEmbedder, Tensor, Tensor)> {
    let dev = Device::Cpu;
    let root = env!("CARGO_MANIFEST_DIR");
    let weights = format!("{root}/models/face_embedder.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &dev)? };
    let model = FaceEmbedder::new(&Config::default(), vb)?;
    let fixture = candle_core::safetensors::load(
        format!("{root}/tests/fixtures/face_embedder.safetensors"),
        &dev,
    )?;
    let input = normalize(&fixture["input"].to_dtype(DType::F32)?)?;
    Ok((model, input, fixture["embeddings"].clone()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
}

#[test]
fn matches_tflite_reference() -> Result<()> {
    let (model, input, reference) = load()?;

    let start = Instant::now();
    let single = model.forward(&input.narrow(0, 0, 1)?)?;
    println!("forward, batch 1: {:?}", start.elapsed());
    assert_eq!(single.dims(), &[1, 192]);

    let out = model.forward(&input)?;
    assert_eq!(out.dims(), &[3, 192]);
    let diff = max_abs_diff(&out, &reference)?;
    let batch_diff = max_abs_diff(&single, &out.narrow(0, 0, 1)?)?;
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("max |candle - tflite| = {diff:e} (max |ref| = {scale}), batch-1 vs batch-3: {batch_diff:e}");
    assert!(diff < TOLERANCE, "max abs diff {diff}");
    assert!(batch_diff < 1e-5, "batch dependence {batch_diff}");

    let a = out.narrow(0, 0, 1)?;
    let cos = |i: usize| -> Result<f32> {
        cosine_similarity(&a, &out.narrow(0, i, 1)?)?
            .squeeze(0)?
            .to_scalar::<f32>()
    };
    let (other, mirrored) = (cos(1)?, cos(2)?);
    println!("cos(A, B) = {other:.4}, cos(A, mirrored A) = {mirrored:.4}");
    assert!(
        mirrored > other + 0.5,
        "mirrored {mirrored} vs other {other}"
    );
    Ok(())
}

#[test]
fn gradient_reaches_the_input() -> Result<()> {
    let (model, input, reference) = load()?;
    let target = reference.narrow(0, 1, 1)?;
    let id_loss = |x: &Tensor| -> Result<Tensor> {
        (1.0 - cosine_similarity(&model.forward(x)?, &target)?)?.sum_all()
    };
    let x = Var::from_tensor(&input.narrow(0, 0, 1)?)?;
    let loss = id_loss(x.as_tensor())?;
    let grads = loss.backward()?;
    let g = grads.get(x.as_tensor()).expect("input gradient");
    assert_eq!(g.dims(), &[1, 3, 112, 112]);
    let norm = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");

    // Central difference along the gradient direction should recover |grad|.
    let eps = 1e-2;
    let step = (g / norm as f64)?.affine(eps, 0.0)?;
    let plus = id_loss(&(x.as_tensor() + &step)?)?.to_scalar::<f32>()?;
    let minus = id_loss(&(x.as_tensor() - &step)?)?.to_scalar::<f32>()?;
    let numeric = (plus - minus) / (2.0 * eps as f32);
    let loss = loss.to_scalar::<f32>()?;
    println!("loss {loss}, |grad| = {norm}, finite difference {numeric}");
    assert!((numeric - norm).abs() < 0.1 * norm, "{numeric} vs {norm}");
    Ok(())
}
