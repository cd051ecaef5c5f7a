//! `toonbot train ...` and `toonbot eval` end to end: export, fine-tune (at tiny size, from a
//! checkpoint the library wrote), and the plain errors for a missing base or Inception.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use image::{Rgb, RgbImage};
use toonbot::train::model::NetConfig;
use toonbot::train::run::{RunOptions, Start, Trainer};
use toonbot::train::RunSpec;

fn toonbot(args: &[&str], styles_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_toonbot"))
        .args(args)
        .env("TOONBOT_STYLES__DIR", styles_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("toonbot runs")
}

fn images(dir: &Path, n: u32, shade: u8) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        RgbImage::from_fn(36, 36, |x, y| {
            Rgb([shade, (x * 7) as u8, (y * 7 + i * 30) as u8])
        })
        .save(dir.join(format!("{i}.png")))
        .unwrap();
    }
}

fn tiny_net() -> NetConfig {
    NetConfig {
        ngf: 4,
        n_blocks: 1,
        ndf: 4,
        global_layers: 4,
        local_layers: 3,
    }
}

/// A run into `out` that checkpoints at its end (and every 100 steps), no samples.
fn run_options(out: &Path, compact: Option<std::path::PathBuf>) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        compact,
        compact_generators_only: false,
        save_every: 100,
        sample_every: 100,
        log_every: 1,
        time_limit: None,
        models_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
    }
}

/// A 1-step tiny training run's checkpoint in `root/run`.
fn tiny_checkpoint(root: &Path) -> std::path::PathBuf {
    let (photos, cartoons) = (root.join("photos"), root.join("cartoons"));
    images(&photos, 2, 40);
    images(&cartoons, 2, 220);
    let mut spec = RunSpec::photo2cartoon(photos, cartoons, 1);
    spec.size = 32;
    spec.net = tiny_net();
    let out = root.join("run");
    let options = RunOptions {
        save_every: 1,
        ..run_options(&out, None)
    };
    let mut t = Trainer::new(spec, options, Start::Fresh, &Device::Cpu).unwrap();
    t.run(&AtomicBool::new(false), |_| {}).unwrap();
    out
}

#[test]
fn export_then_finetune_installs_styles() {
    let tmp = tempfile::tempdir().unwrap();
    let styles = tmp.path().join("styles");
    let run = tiny_checkpoint(tmp.path());
    let out = toonbot(
        &[
            "train",
            "export",
            "--checkpoint",
            run.to_str().unwrap(),
            "--name",
            "tiny",
            "--finetunable",
        ],
        &styles,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "generator.safetensors",
        "style.toml",
        "training.safetensors",
    ] {
        assert!(styles.join("tiny").join(file).is_file(), "{file}");
    }
    let manifest = std::fs::read_to_string(styles.join("tiny/style.toml")).unwrap();
    assert!(manifest.contains("steps = 1"), "{manifest}");
    let listed = toonbot(&["styles"], &styles);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("tiny"));

    let cartoons = tmp.path().join("new-cartoons");
    images(&cartoons, 3, 160);
    let out = toonbot(
        &[
            "train",
            "finetune",
            "--from",
            "tiny",
            "--cartoons",
            cartoons.to_str().unwrap(),
            "--name",
            "tiny-ft",
            "--recipe",
            "photo2cartoon",
            "--size",
            "32",
            "--steps",
            "1",
            "--out",
            tmp.path().join("ft-run").to_str().unwrap(),
        ],
        &styles,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = std::fs::read_to_string(styles.join("tiny-ft/style.toml")).unwrap();
    assert!(
        manifest.contains("base = \"tiny\"") && manifest.contains("steps = 1"),
        "{manifest}"
    );
    assert!(styles.join("tiny-ft/generator.safetensors").is_file());
}

/// A fast run (two reconstruction steps, one adversarial) with tiny networks in `root/fast`.
fn tiny_fast_checkpoint(root: &Path) -> std::path::PathBuf {
    use toonbot::train::fast::run::{FastStart, FastTrainer};
    let dirs = ["fast-photos", "fast-cartoons", "fast-val"].map(|d| root.join(d));
    for (dir, shade) in dirs.iter().zip([40, 220, 90]) {
        images(dir, 8, shade);
    }
    let [photos, cartoons, val] = dirs;
    let mut spec = toonbot::train::fast::FastSpec::new(photos, cartoons, val, 1);
    spec.net = tiny_net();
    spec.batch = 1;
    spec.high_size = 128;
    spec.recon.check_every = 2;
    spec.recon.max_steps = 2;
    let out = root.join("fast");
    let options = run_options(&out, Some(root.join("fast-compact.safetensors")));
    let mut t = FastTrainer::new(spec, options, FastStart::Fresh, &Device::Cpu).unwrap();
    t.run(&AtomicBool::new(false), |_| {}).unwrap();
    out
}

#[test]
fn a_fast_checkpoint_exports_as_a_style() {
    let tmp = tempfile::tempdir().unwrap();
    let styles = tmp.path().join("styles");
    let run = tiny_fast_checkpoint(tmp.path());
    let export = |checkpoint: &Path, name: &str, extra: &[&str]| {
        let mut args = vec!["train", "export", "--checkpoint"];
        args.extend([checkpoint.to_str().unwrap(), "--name", name]);
        args.extend_from_slice(extra);
        toonbot(&args, &styles)
    };
    for (checkpoint, name) in [
        (run.clone(), "fast-full"),
        (tmp.path().join("fast-compact.safetensors"), "fast-compact"),
    ] {
        let out = export(&checkpoint, name, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let manifest = std::fs::read_to_string(styles.join(name).join("style.toml")).unwrap();
        assert!(
            manifest.contains("steps = 3")
                && manifest.contains("fast recipe (2 reconstruction and 1 adversarial steps)"),
            "{manifest}"
        );
        let weights = std::fs::read(styles.join(name).join("generator.safetensors")).unwrap();
        let weights = safetensors::SafeTensors::deserialize(&weights).unwrap();
        let names = weights.names();
        assert!(
            !names.is_empty()
                && names
                    .iter()
                    .all(|n| !n.contains("genA2B") && !n.starts_with("dis"))
        );
        assert!(weights
            .tensors()
            .iter()
            .all(|(_, t)| t.dtype() == safetensors::Dtype::F16));
        assert!(!styles.join(name).join("training.safetensors").exists());
    }
    let listed = toonbot(&["styles"], &styles);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("fast-compact"));

    let out = export(&run, "fast-ft", &["--finetunable"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fast-recipe checkpoint"), "{err}");
    assert!(!styles.join("fast-ft").exists());
}

#[test]
fn finetune_without_a_base_style_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_toonbot"))
        .args([
            "train",
            "finetune",
            "--from",
            "p2c",
            "--cartoons",
            "x",
            "--name",
            "mine",
        ])
        .env("TOONBOT_STYLES__DIR", tmp.path().join("styles"))
        .env(
            "TOONBOT_MODELS__DIR",
            common::models_without_styles(tmp.path()),
        )
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no base style is installed"), "{err}");
}

#[test]
fn eval_without_inception_weights_says_how_to_get_them() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    if models.join("inception.safetensors").is_file() {
        eprintln!("skipping: the Inception weights are installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = toonbot(
        &["eval", "--photos", "x", "--cartoons", "y"],
        &tmp.path().join("styles"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("inception.safetensors") && err.contains("tools/import/inception.py"),
        "{err}"
    );
}

#[test]
fn the_fast_recipe_asks_for_held_out_photos_and_refuses_bad_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let styles = tmp.path().join("styles");
    let (photos, cartoons) = (tmp.path().join("photos"), tmp.path().join("cartoons"));
    images(&photos, 8, 40);
    images(&cartoons, 3, 200);
    let base = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "base",
            "--photos",
            photos.to_str().unwrap(),
            "--cartoons",
            cartoons.to_str().unwrap(),
            "--out",
        ];
        let out = tmp.path().join("run");
        let out = out.to_str().unwrap().to_string();
        args.push(&out);
        args.extend_from_slice(extra);
        toonbot(&args, &styles)
    };
    let out = base(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--val-photos"), "{stderr}");

    let out = base(&["--val-photos", photos.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--cartoons") && stderr.contains("fewer than the 8"),
        "{stderr}"
    );
}

#[test]
fn plot_draws_kid_and_identity_curves_into_a_png() {
    let font = Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
    if !font.is_file() {
        eprintln!("skipping: no DejaVu Sans font at {}", font.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("compare.jsonl");
    let rows = [
        r#"{"variant":"baseline","cpu_s":0,"kid_x100":18.3,"kid_std_x100":0.7,"identity_cosine":1.0}"#,
        r#"{"variant":"init","cpu_s":0,"kid_x100":18.0,"kid_std_x100":0.7,"identity_cosine":0.98}"#,
        r#"{"variant":"projected","cpu_s":1800,"steps":120,"kid_x100":12.0,"kid_std_x100":0.8,"identity_cosine":0.8}"#,
    ];
    std::fs::write(&results, rows.join("\n")).unwrap();
    let png = tmp.path().join("curves.png");
    let styles = tmp.path().join("styles");
    let args = ["train", "plot", "--results", results.to_str().unwrap()];
    let out = toonbot(
        &[&args[..], &["--out", png.to_str().unwrap()]].concat(),
        &styles,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = image::open(&png).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (1200, 480));
    let coloured = image
        .pixels()
        .filter(|p| p[0] != p[1] || p[1] != p[2])
        .count();
    assert!(
        coloured > 500,
        "only {coloured} coloured pixels: no curves drawn"
    );

    std::fs::write(&results, rows[..2].join("\n")).unwrap();
    let out = toonbot(
        &[&args[..], &["--out", png.to_str().unwrap()]].concat(),
        &styles,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to plot"));
}

#[test]
fn panel_lays_photos_beside_their_cartoons() {
    let faces =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos/p2c-aligned/test");
    if !faces.is_dir() {
        eprintln!("skipping: ../shared/data is absent");
        return;
    }
    let mut photos: Vec<_> = std::fs::read_dir(&faces)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    photos.sort();
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("panel.png");
    let mut args = vec!["panel", "--baseline", "--columns", "2", "--size", "64"];
    args.extend(["--out", png.to_str().unwrap(), "--photos"]);
    args.extend(photos[..3].iter().map(|p| p.to_str().unwrap()));
    let out = toonbot(&args, &tmp.path().join("styles"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let panel = image::open(&png).unwrap().to_rgb8();
    // Two pairs a row (2 x 64 + 8 each, and the margin), two rows.
    assert_eq!(panel.dimensions(), (2 * 136 + 8, 2 * 72 + 8));
    // The third pair's cell is filled; the fourth is blank.
    let ink = |x0: u32, y0: u32| {
        (x0..x0 + 128)
            .flat_map(|x| (y0..y0 + 64).map(move |y| (x, y)))
            .filter(|&(x, y)| panel.get_pixel(x, y).0.iter().any(|&c| c < 200))
            .count()
    };
    assert!(ink(8, 80) > 1000 && ink(144, 80) == 0);

    let not_an_image = tmp.path().join("notes.png");
    std::fs::write(&not_an_image, "hello").unwrap();
    let args = [
        "panel",
        "--baseline",
        "--out",
        png.to_str().unwrap(),
        "--photos",
    ];
    let out = toonbot(
        &[&args[..], &[not_an_image.to_str().unwrap()]].concat(),
        &tmp.path().join("styles"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a readable image"), "{err}");
}
