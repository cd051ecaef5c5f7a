//! Photos to stickers, avatars and cartoonised photos, with a randomly initialised
//! generator (the real network; its weights are not trained).

mod common;

use std::path::Path;
use std::process::Command;

use toonbot::cartoon::compose::{
    encode_png, ComposeOptions, AVATAR_SIZE, STICKER_MAX_BYTES, STICKER_SIZE,
};
use toonbot::cartoon::styles::StyleError;
use toonbot::cartoon::{CartoonError, Cartoonizer};
use toonbot::imageops::load_photo;

fn toonbot(args: &[&str], styles_dir: &Path, default_style: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_toonbot"))
        .args(args)
        .env("TOONBOT_STYLES__DIR", styles_dir)
        .env("TOONBOT_STYLES__DEFAULT", default_style)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

#[test]
fn every_face_of_the_group_photos_becomes_a_sticker_and_an_avatar() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let styles = tempfile::tempdir().unwrap();
    common::install_random_style(styles.path(), "test");
    let config = common::config_with_styles(styles.path(), "test");
    let cartoonizer = Cartoonizer::load(&config, &candle_core::Device::Cpu).unwrap();
    let options = ComposeOptions {
        outline: true,
        round_avatar: true,
    };
    let mut faces = 0;
    for entry in std::fs::read_dir(data.join("samples/groups")).unwrap() {
        let path = entry.unwrap().path();
        let photo = load_photo(&path, &config.limits).unwrap();
        let result = cartoonizer.cartoonize(&photo, None, options).unwrap();
        assert_eq!(result.style, "test");
        assert!(!result.faces.is_empty());
        assert_eq!(result.photo.dimensions(), photo.dimensions());
        assert_ne!(
            result.photo,
            photo,
            "{}: faces were pasted back",
            path.display()
        );
        for face in &result.faces {
            assert_eq!(face.sticker.dimensions(), (STICKER_SIZE, STICKER_SIZE));
            let png = encode_png(&face.sticker);
            assert!(
                png.len() < STICKER_MAX_BYTES,
                "sticker of {} bytes",
                png.len()
            );
            let decoded = image::load_from_memory(&png).unwrap();
            assert!(matches!(decoded, image::DynamicImage::ImageRgba8(_)));
            assert_eq!(
                face.sticker.get_pixel(0, 0).0[3],
                0,
                "sticker corners are transparent"
            );
            assert_eq!(face.avatar.dimensions(), (AVATAR_SIZE, AVATAR_SIZE));
            assert_eq!(face.avatar.get_pixel(0, 0).0[3], 0, "round avatar");
            assert_eq!(face.avatar.get_pixel(256, 256).0[3], 255);
        }
        faces += result.faces.len();
        for stage in [
            "detect",
            "landmarks",
            "align",
            "segment",
            "generator",
            "compose",
        ] {
            assert!(result.timings.contains_key(stage), "{stage}");
        }
    }
    assert_eq!(faces, 22);
}

#[test]
fn cartoonize_cli_writes_files_and_json() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let styles = tempfile::tempdir().unwrap();
    common::install_random_style(styles.path(), "test");
    let out = tempfile::tempdir().unwrap();
    let photo = data.join("photos/celeba/000127.jpg");
    let run = toonbot(
        &[
            "cartoonize",
            photo.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
            "--json",
        ],
        styles.path(),
        "test",
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["style"], "test");
    assert_eq!(report["faces"].as_array().unwrap().len(), 1);
    assert!(report["timings_ms"]["generator"].as_f64().unwrap() > 0.0);
    let sticker = image::open(out.path().join("000127.face1.sticker.png")).unwrap();
    assert_eq!((sticker.width(), sticker.height()), (320, 320));
    let avatar = image::open(out.path().join("000127.face1.avatar.png")).unwrap();
    assert_eq!((avatar.width(), avatar.height()), (512, 512));
    let cartoon = image::open(out.path().join("000127.cartoon.png")).unwrap();
    assert_eq!((cartoon.width(), cartoon.height()), (256, 256));
}

#[test]
fn without_a_trained_style_cartoonize_says_how_to_get_one() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let styles = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let photo = data.join("photos/celeba/000127.jpg");
    let run = toonbot(
        &[
            "cartoonize",
            photo.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
        ],
        styles.path(),
        "p2c",
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        stderr.contains("no cartoon style is installed yet: train one with `toonbot train base`"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "nothing written"
    );

    common::install_random_style(styles.path(), "test");
    let run = toonbot(
        &[
            "cartoonize",
            photo.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
            "--style",
            "sketch",
        ],
        styles.path(),
        "test",
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        stderr.contains("there is no style called \"sketch\"; installed styles: test"),
        "{stderr}"
    );
}

#[test]
fn bad_photos_get_clear_errors_and_the_rest_are_still_done() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let styles = tempfile::tempdir().unwrap();
    common::install_random_style(styles.path(), "test");
    let config = common::config_with_styles(styles.path(), "test");
    let cartoonizer = Cartoonizer::load(&config, &candle_core::Device::Cpu).unwrap();
    let options = ComposeOptions::default();
    let street = std::fs::read(data.join("samples/no-face/prague.jpg")).unwrap();
    assert!(matches!(
        cartoonizer.cartoonize_bytes(&street, &config.limits, None, options),
        Err(CartoonError::NoFace)
    ));
    let text = b"GIF89a but not really".to_vec();
    assert!(matches!(
        cartoonizer.cartoonize_bytes(&text, &config.limits, None, options),
        Err(CartoonError::Decode(_))
    ));
    let mut small = config.limits.clone();
    small.max_pixels = 10_000;
    let face = std::fs::read(data.join("photos/celeba/000127.jpg")).unwrap();
    let err = cartoonizer
        .cartoonize_bytes(&face, &small, None, options)
        .unwrap_err();
    assert!(
        err.to_string().contains("over the limit of 10000 pixels"),
        "{err}"
    );
    assert!(matches!(
        cartoonizer.cartoonize_bytes(&face, &config.limits, Some("../../etc"), options),
        Err(CartoonError::Style(StyleError::InvalidName(_)))
    ));

    let out = tempfile::tempdir().unwrap();
    let fake = out.path().join("fake.png");
    std::fs::write(&fake, "not a png").unwrap();
    let photo = data.join("photos/celeba/000127.jpg");
    let run = toonbot(
        &[
            "cartoonize",
            fake.to_str().unwrap(),
            photo.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
        ],
        styles.path(),
        "test",
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("fake.png: not a PNG, JPEG or WebP image"),
        "{stderr}"
    );
    assert!(out.path().join("000127.face1.sticker.png").is_file());
}
