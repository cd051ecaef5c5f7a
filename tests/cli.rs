//! The `toonbot` binary end to end: files written, JSON lines, exit codes and messages.

mod common;

use std::process::{Command, Output};

fn toonbot(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_toonbot"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("toonbot runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn faces_writes_crops_and_json_and_names_bad_inputs() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("fake.jpg");
    std::fs::write(&fake, "this is a text file, not a photo").unwrap();
    let group = data.join("samples/groups/sample1.jpg");
    let street = data.join("samples/no-face/prague.jpg");
    let out = tmp.path().join("out");
    let run = toonbot(
        &[
            "faces",
            fake.to_str().unwrap(),
            group.to_str().unwrap(),
            street.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("fake.jpg: not a PNG, JPEG or WebP image"),
        "{stderr}"
    );
    assert!(stderr.contains("prague.jpg: no face found"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let lines: Vec<serde_json::Value> = text(&run.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one JSON line per decoded photo");
    let report = &lines[0];
    assert_eq!(report["width"], 1920);
    assert_eq!(report["height"], 1280);
    let faces = report["faces"].as_array().unwrap();
    assert_eq!(faces.len(), 3);
    for face in faces {
        assert_eq!(face["box"].as_array().unwrap().len(), 4);
        assert_eq!(face["landmarks"].as_array().unwrap().len(), 68);
        assert!(face["score"].as_f64().unwrap() > 0.5);
        assert!(face["roll_degrees"].as_f64().unwrap().abs() < 90.0);
    }
    for stage in ["decode", "detect", "landmarks", "align", "segment"] {
        assert!(
            report["timings_ms"][stage].as_f64().unwrap() >= 0.0,
            "{stage}"
        );
    }
    assert_eq!(lines[1]["faces"].as_array().unwrap().len(), 0);

    for i in 1..=3 {
        let aligned = image::open(out.join(format!("sample1.face{i}.aligned.png"))).unwrap();
        assert_eq!((aligned.width(), aligned.height()), (256, 256));
        assert!(matches!(aligned, image::DynamicImage::ImageRgb8(_)));
        let mask = image::open(out.join(format!("sample1.face{i}.mask.png"))).unwrap();
        assert!(matches!(mask, image::DynamicImage::ImageLuma8(_)));
        // Whitened: the top corners of the crop are background.
        let rgb = aligned.to_rgb8();
        assert!(
            rgb.get_pixel(2, 2).0.iter().all(|&c| c > 240),
            "{:?}",
            rgb.get_pixel(2, 2)
        );
    }
    assert!(!out.join("sample1.face4.aligned.png").exists());
}

#[test]
fn photos_over_the_pixel_limit_are_refused_with_a_clear_message() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let group = data.join("samples/groups/sample1.jpg");
    let run = toonbot(
        &[
            "faces",
            group.to_str().unwrap(),
            "--out",
            tmp.path().to_str().unwrap(),
        ],
        &[("TOONBOT_LIMITS__MAX_PIXELS", "1000000")],
    );
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "sample1.jpg: image is 1920x1280 = 2457600 pixels, over the limit of 1000000 pixels"
        ),
        "{stderr}"
    );
}

#[test]
fn prepare_writes_the_largest_face_of_each_photo_and_lists_what_it_skipped() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for name in ["000127.jpg", "000164.jpg"] {
        std::fs::copy(data.join("photos/celeba").join(name), photos.join(name)).unwrap();
    }
    std::fs::copy(
        data.join("samples/groups/sample5.jpg"),
        photos.join("group.jpg"),
    )
    .unwrap();
    std::fs::copy(
        data.join("samples/no-face/prague.jpg"),
        photos.join("street.jpg"),
    )
    .unwrap();
    std::fs::write(photos.join("notes.txt"), "not an image").unwrap();
    let out = tmp.path().join("prepared");
    let run = toonbot(
        &[
            "prepare",
            "--photos",
            photos.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let stderr = text(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("prepared 3 of 5 photos"), "{stderr}");
    assert!(stderr.contains("skipped 1 (no face found)"), "{stderr}");
    assert!(
        stderr.contains("skipped 1 (not a PNG, JPEG or WebP image)"),
        "{stderr}"
    );
    let mut written: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(written, ["000127.png", "000164.png", "group.png"]);
    let face = image::open(out.join("group.png")).unwrap();
    assert_eq!((face.width(), face.height()), (256, 256));
}

#[test]
fn bench_times_the_generator_at_the_batch_sizes_asked_for() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let group = data.join("samples/groups/sample1.jpg");
    let run = toonbot(
        &[
            "bench",
            "--photo",
            group.to_str().unwrap(),
            "--batch",
            "1",
            "2",
            "--runs",
            "1",
            "--json",
        ],
        &[],
    );
    assert!(run.status.success(), "{}", text(&run.stderr));
    let report: serde_json::Value =
        serde_json::from_str(text(&run.stdout).lines().last().unwrap()).unwrap();
    let per_batch = report["generator_ms_per_image"].as_object().unwrap();
    assert_eq!(per_batch.keys().collect::<Vec<_>>(), ["1", "2"]);
    assert!(per_batch.values().all(|ms| ms.as_f64().unwrap() > 0.0));
    assert_eq!(report["faces"], 3);
}
