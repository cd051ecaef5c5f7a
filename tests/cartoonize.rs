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
use toonbot::face::ALIGNED_SIZE;
use toonbot::imageops::{load_photo, rgb_batch};
use toonbot::nets::generator::normalize;
use toonbot::train::eval::{square, with_scored};
use toonbot::train::face_id::FaceIdLoss;

fn toonbot(args: &[&str], styles_dir: &Path, default_style: &str) -> std::process::Output {
    toonbot_command(args, styles_dir, default_style)
        .output()
        .unwrap()
}

fn toonbot_command(args: &[&str], styles_dir: &Path, default_style: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_toonbot"));
    command
        .args(args)
        .env("TOONBOT_STYLES__DIR", styles_dir)
        .env("TOONBOT_STYLES__DEFAULT", default_style)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

/// `toonbot` on a host whose models folder ships no style.
fn toonbot_without_shipped_styles(
    args: &[&str],
    styles_dir: &Path,
    default_style: &str,
) -> std::process::Output {
    let models = common::models_without_styles(styles_dir.parent().unwrap());
    toonbot_command(args, styles_dir, default_style)
        .env("TOONBOT_MODELS__DIR", models)
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
fn without_any_style_cartoonize_says_how_to_get_one() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let host = tempfile::tempdir().unwrap();
    let styles = host.path().join("styles");
    std::fs::create_dir(&styles).unwrap();
    let out = tempfile::tempdir().unwrap();
    let photo = data.join("photos/celeba/000127.jpg");
    let run = toonbot_without_shipped_styles(
        &[
            "cartoonize",
            photo.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
        ],
        &styles,
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

    common::install_random_style(&styles, "test");
    let run = toonbot(
        &[
            "cartoonize",
            photo.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
            "--style",
            "sketch",
        ],
        &styles,
        "test",
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        stderr.contains("there is no style called \"sketch\"; installed styles: p2c, test"),
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

/// Held-out CelebA faces (in no training set): five men, four of them over 50, and two
/// women with darker skin.
const HELD_OUT_FACES: [&str; 8] = [
    "001252", "004150", "009125", "050368", "052723", "015021", "026265", "063129",
];

#[test]
fn the_shipped_p2c_draws_held_out_faces_and_keeps_them_recognisable() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let styles = tempfile::tempdir().unwrap();
    let config = common::config_with_styles(styles.path(), "p2c");
    let device = candle_core::Device::Cpu;
    let crops: Vec<image::RgbImage> = HELD_OUT_FACES
        .iter()
        .map(|f| {
            let photo = image::open(data.join(format!("photos/celeba/{f}.jpg"))).unwrap();
            square(&photo.to_rgb8())
        })
        .collect();
    let face_id = FaceIdLoss::load(&config.models.dir, ALIGNED_SIZE as usize, &device).unwrap();
    let (identity, change) = with_scored(&config, &device, None, false, |scored| {
        assert_eq!(scored.name, "p2c", "the default style is the shipped one");
        let (input, cartoons) = scored.cartoons_on_white(&crops, &device)?;
        let cartoons = normalize(&rgb_batch(&cartoons, &device)?)?;
        let distance = face_id.cosine_distance(&input, &cartoons)?;
        let change = (&input - &cartoons)?.abs()?.mean_all()?;
        Ok((
            1.0 - distance.to_scalar::<f32>()?,
            change.to_scalar::<f32>()?,
        ))
    })
    .unwrap();
    eprintln!("identity {identity:.3}, mean change {change:.3} (of 2)");
    assert!(identity >= 0.5, "faces lost their identity: {identity}");
    assert!(
        change >= 0.1,
        "the cartoons are nearly the photos: {change}"
    );
}

/// The README's first command, on a fresh clone (nothing but the repo): the shipped sample
/// group photo, cartoonised in the default style, which is the shipped `p2c`.
#[test]
fn the_readme_first_command_cartoonizes_the_sample_photo_in_p2c() {
    let styles = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let args = [
        "cartoonize",
        "samples/group.jpg",
        "--out",
        out.path().to_str().unwrap(),
        "--json",
    ];
    let run = toonbot_command(&args, styles.path(), "p2c")
        .env_remove("TOONBOT_STYLES__DEFAULT")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["style"], "p2c");
    let faces = report["faces"].as_array().unwrap().len();
    assert!(faces >= 3, "{faces} faces");
    for i in 1..=faces {
        let sticker = out.path().join(format!("group.face{i}.sticker.png"));
        assert!(sticker.is_file(), "{}", sticker.display());
    }
}
