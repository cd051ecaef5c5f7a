//! Parity of the candle FaceLandmark68Net with face-api 1.7.15 on tfjs 4.22.0 (cpu backend).
//! Regenerate the fixture with `tools/import/landmarks68.py --fixture`.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use toonbot::nets::landmarks68::{
    decode, normalize, pad_and_resize, preprocess, Config, FaceLandmark68Net, INPUT_SIZE,
};

/// Raw outputs are fractions of the input side (about 0.07..0.92 here).
const RAW_TOL: f32 = 1e-5;
/// Pixel values 0..255 after face-api's pad + bilinear resize.
const RESIZE_TOL: f32 = 1e-4;

fn load(name: &str) -> Result<HashMap<String, Tensor>> {
    let path = format!("{}/{name}", env!("CARGO_MANIFEST_DIR"));
    candle_core::safetensors::load(path, &Device::Cpu)
}

fn model() -> Result<FaceLandmark68Net> {
    let weights = load("models/landmarks68.safetensors")?;
    let params: usize = weights.values().map(Tensor::elem_count).sum();
    println!("parameters: {params}");
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    FaceLandmark68Net::new(&Config::default(), vb)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn to_f32(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// Anatomical sanity of 68 iBUG points `(x, y)` (image left = subject's right).
fn assert_plausible(points: &[Vec<f32>]) {
    let p = |i: usize| (points[i][0], points[i][1]);
    let eye = |r: std::ops::Range<usize>| {
        let n = r.len() as f32;
        r.fold((0.0, 0.0), |(x, y), i| (x + p(i).0 / n, y + p(i).1 / n))
    };
    let (right_eye, left_eye) = (eye(36..42), eye(42..48));
    assert!(
        p(36).0 < p(39).0 && p(39).0 < p(42).0 && p(42).0 < p(45).0,
        "eye corners"
    );
    assert!(right_eye.0 < left_eye.0, "eyes left to right");
    assert!(p(0).0 < p(8).0 && p(8).0 < p(16).0, "jaw left to right");
    assert!(p(48).0 < p(54).0, "mouth corners");
    let eyes_y = right_eye.1.max(left_eye.1);
    assert!(p(19).1 < eyes_y && p(24).1 < eyes_y, "brows above eyes");
    assert!(eyes_y < p(30).1, "nose tip below eyes");
    assert!(p(30).1 < p(51).1 && p(51).1 < p(57).1, "mouth below nose");
    assert!(p(57).1 < p(8).1, "chin below mouth");
}

fn rows(t: &Tensor) -> Result<Vec<Vec<Vec<f32>>>> {
    let n = t.dim(0)?;
    t.reshape((n, 68, 2))?.to_vec3::<f32>()
}

#[test]
fn raw_outputs_match_face_api() -> Result<()> {
    let fx = load("tests/fixtures/landmarks68.safetensors")?;
    let net = model()?;
    let x = normalize(&to_f32(&fx["input"])?)?;
    net.forward(&x)?; // warm-up
    let start = Instant::now();
    let out = net.forward(&x.narrow(0, 0, 1)?)?;
    println!(
        "forward, batch 1: {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    let out_batch = net.forward(&x)?;
    assert_eq!(out_batch.dims(), &[2, 136]);

    let reference = &fx["raw"];
    let diff = max_abs_diff(&out_batch, reference)?;
    println!("raw max abs diff (batch 2): {diff:e}");
    assert!(diff < RAW_TOL, "raw diff {diff}");
    let diff1 = max_abs_diff(&out, &reference.narrow(0, 0, 1)?)?;
    assert!(diff1 < RAW_TOL, "batch-1 raw diff {diff1}");

    let in_unit = reference.flatten_all()?.to_vec1::<f32>()?;
    assert!(
        in_unit.iter().all(|v| (0.0..=1.0).contains(v)),
        "raw outside [0, 1]"
    );
    let side = INPUT_SIZE as f32;
    let positions = decode(&out_batch, &[(INPUT_SIZE, INPUT_SIZE); 2])?;
    let direct = (out_batch.reshape((2, 68, 2))? * f64::from(side))?;
    assert!(max_abs_diff(&positions, &direct)? < 1e-4);
    for face in rows(&positions)?
        .iter()
        .chain(&rows(&(reference * 112.0)?)?)
    {
        assert_plausible(face);
    }
    Ok(())
}

#[test]
fn crop_preprocessing_and_decoding_match_face_api() -> Result<()> {
    let fx = load("tests/fixtures/landmarks68.safetensors")?;
    let net = model()?;
    let crop = to_f32(&fx["crop"])?;
    let (_, _, h, w) = crop.dims4()?;

    let resized = pad_and_resize(&crop)?;
    let diff = max_abs_diff(&resized, &fx["crop_input"])?;
    println!("pad + resize max abs diff (0..255): {diff:e}");
    assert!(diff < RESIZE_TOL, "resize diff {diff}");

    let out = net.forward(&preprocess(&crop)?)?;
    let diff = max_abs_diff(&out, &fx["crop_raw"])?;
    println!("crop raw max abs diff: {diff:e}");
    assert!(diff < RAW_TOL, "crop raw diff {diff}");

    let positions = decode(&out, &[(w, h)])?;
    let diff = max_abs_diff(&positions, &fx["crop_positions"])?;
    println!("crop positions max abs diff (px): {diff:e}");
    assert!(diff < RAW_TOL * h.max(w) as f32, "positions diff {diff}");
    let points = &rows(&positions)?[0];
    assert_plausible(points);
    Ok(())
}

#[test]
fn rejects_wrong_input_size() -> Result<()> {
    let net = model()?;
    let x = Tensor::zeros((1, 3, 96, 96), DType::F32, &Device::Cpu)?;
    assert!(net.forward(&x).is_err());
    Ok(())
}
