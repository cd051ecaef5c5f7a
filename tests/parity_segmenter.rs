//! Parity of the candle selfie segmenter with the TFLite reference (ai_edge_litert Interpreter,
//! its custom transposed convolution rewritten to the builtin TRANSPOSE_CONV).
//!
//! Fixture (tools/import/segmenter.py --fixture): `input_u8` u8 (1, 3, 256, 256) RGB CelebA
//! face; `mask` f32 (1, 1, 256, 256) the reference output (after the sigmoid).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use toonbot::nets::segmenter::{conv_transpose_same, normalize, Config, SelfieSegmenter};

/// Measured 1.0e-5 (the logits reach |966|, so most pixels saturate to exactly 0 or 1; the
/// difference comes from the ~3000 boundary pixels).
const TOLERANCE: f32 = 2e-5;

fn load() -> Result<(SelfieSegmenter, Tensor, Tensor)> {
    let dev = Device::Cpu;
    let root = env!("CARGO_MANIFEST_DIR");
    let weights = format!("{root}/models/segmenter.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &dev)? };
    let model = SelfieSegmenter::new(&Config::default(), vb)?;
    let fixture = candle_core::safetensors::load(
        format!("{root}/tests/fixtures/segmenter.safetensors"),
        &dev,
    )?;
    let input = normalize(&fixture["input_u8"].to_dtype(DType::F32)?)?;
    Ok((model, input, fixture["mask"].clone()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
}

fn at(mask: &Tensor, y: usize, x: usize) -> Result<f32> {
    mask.flatten_all()?.get(y * 256 + x)?.to_scalar::<f32>()
}

#[test]
fn matches_tflite_reference() -> Result<()> {
    let (model, input, reference) = load()?;

    let start = Instant::now();
    let mask = model.forward(&input)?;
    println!("forward, batch 1: {:?}", start.elapsed());
    assert_eq!(mask.dims(), &[1, 1, 256, 256]);

    let diff = max_abs_diff(&mask, &reference)?;
    println!("max |candle - tflite| = {diff:e}");
    assert!(diff < TOLERANCE, "max abs diff {diff}");

    let (centre, corner) = (at(&mask, 128, 128)?, at(&mask, 4, 4)?);
    println!("mask at face centre {centre:.4}, at top-left corner {corner:.4}");
    assert!(centre > 0.9 && corner < 0.1);
    Ok(())
}

#[test]
fn batch_is_independent() -> Result<()> {
    let (model, input, _) = load()?;
    let mirrored = input.flip(&[3])?;
    let batch = model.forward(&Tensor::cat(&[&input, &mirrored], 0)?)?;
    assert_eq!(batch.dims(), &[2, 1, 256, 256]);
    let single = model.forward(&input)?;
    let diff = max_abs_diff(&batch.narrow(0, 0, 1)?, &single)?;
    assert!(diff < 1e-6, "batch dependence {diff}");
    // A mirrored face gives a roughly mirrored mask.
    let back = batch.narrow(0, 1, 1)?.flip(&[3])?;
    let disagreement = (back - &single)?.abs()?.mean_all()?.to_scalar::<f32>()?;
    assert!(
        disagreement < 0.05,
        "mean |mask - unmirrored mask| {disagreement}"
    );
    Ok(())
}

#[test]
fn transposed_conv_crops_like_mediapipe_same() -> Result<()> {
    // k = 3, stride 2 on 2x2 ones: full output 5x5 with row/col coverage [1, 1, 2, 1, 1];
    // SAME keeps 4 = 2 * 2 of them, dropping the last.
    let dev = Device::Cpu;
    let x = Tensor::ones((1, 1, 2, 2), DType::F32, &dev)?;
    let w = Tensor::ones((1, 1, 3, 3), DType::F32, &dev)?;
    let y = conv_transpose_same(&x, &w, 2)?;
    assert_eq!(y.dims(), &[1, 1, 4, 4]);
    let cover = Tensor::new(&[1f32, 1.0, 2.0, 1.0], &dev)?;
    let expected = cover
        .reshape((4, 1))?
        .broadcast_mul(&cover.reshape((1, 4))?)?
        .reshape((1, 1, 4, 4))?;
    assert_eq!(max_abs_diff(&y, &expected)?, 0.0);
    // k == stride (the shipped model): no overlap, no cropping. The same as candle's
    // transposed convolution on random values, and on ones every output is one input.
    let xr = Tensor::randn(0f32, 1.0, (2, 5, 3, 4), &dev)?;
    let wr = Tensor::randn(0f32, 1.0, (5, 3, 2, 2), &dev)?;
    let want = xr.conv_transpose2d(&wr, 0, 0, 2, 1)?;
    let got = conv_transpose_same(&xr, &wr, 2)?;
    assert_eq!(got.dims(), want.dims());
    assert!(max_abs_diff(&got, &want)? < 1e-5);
    let w = Tensor::ones((1, 1, 2, 2), DType::F32, &dev)?;
    let y = conv_transpose_same(&x, &w, 2)?;
    assert_eq!(y.dims(), &[1, 1, 4, 4]);
    assert_eq!(y.sum_all()?.to_scalar::<f32>()?, 16.0);
    assert_eq!(
        y.max(D::Minus1)?
            .max(D::Minus1)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        [1.0]
    );
    Ok(())
}
