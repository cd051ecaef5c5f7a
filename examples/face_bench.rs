//! Times the face pipeline's stages (median of runs) on one photo.
//!
//! `cargo run --release --example face_bench PHOTO [runs]`

use toonbot::imageops;

fn main() -> anyhow::Result<()> {
    let photo = std::env::args().nth(1).expect("photo path");
    let runs: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let config = toonbot::config::Config::load(None)?;
    let device = candle_core::Device::Cpu;
    let cartoonizer = toonbot::cartoon::Cartoonizer::load(&config, &device)?;
    let img = imageops::decode_photo(&std::fs::read(&photo)?, &config.limits)?;
    let mut stages: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    cartoonizer.faces().find_faces(&img)?;
    for _ in 0..runs {
        let found = cartoonizer.faces().find_faces(&img)?;
        for (k, v) in found.timings.as_map() {
            stages.entry(k).or_default().push(v);
        }
    }
    for (k, mut v) in stages {
        v.sort_by(f64::total_cmp);
        println!("{k:<10} {:8.1} ms", v[v.len() / 2]);
    }
    // The networks alone, on inputs of their size (2 detector windows, 1 face).
    let dir = &config.models.dir;
    let load = |name: &str| toonbot::face::load_weights(dir, name, &device);
    use toonbot::nets::{face_detector, landmarks68, segmenter};
    let det = face_detector::FaceDetector::new(&Default::default(), load("face_detector")?)?;
    let lm = landmarks68::FaceLandmark68Net::new(&Default::default(), load("landmarks68")?)?;
    let seg = segmenter::SelfieSegmenter::new(&Default::default(), load("segmenter")?)?;
    let time = |name: &str, f: &dyn Fn() -> candle_core::Result<()>| -> candle_core::Result<()> {
        f()?;
        let mut v = Vec::new();
        for _ in 0..runs {
            let t = std::time::Instant::now();
            f()?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        v.sort_by(f64::total_cmp);
        println!("{name:<22} {:8.1} ms", v[v.len() / 2]);
        Ok(())
    };
    let x = candle_core::Tensor::rand(-1f32, 1f32, (2, 3, 192, 192), &device)?;
    time("detector net x2", &|| det.forward(&x).map(|_| ()))?;
    time("detector detect x2", &|| det.detect(&x, 0.5).map(|_| ()))?;
    time("pipeline detect", &|| {
        cartoonizer
            .faces()
            .detect(&img)
            .map(|_| ())
            .map_err(candle_core::Error::wrap)
    })?;
    let x = candle_core::Tensor::rand(-1f32, 1f32, (1, 3, 112, 112), &device)?;
    time("landmarks net", &|| lm.forward(&x).map(|_| ()))?;
    let x = candle_core::Tensor::rand(0f32, 1f32, (1, 3, 256, 256), &device)?;
    time("segmenter net", &|| seg.forward(&x).map(|_| ()))?;
    Ok(())
}
