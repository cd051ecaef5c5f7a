//! The fast recipe at 128 px with narrow networks on the CPU: the reconstruction phase and
//! its held-out check, the adversarial phase, the size switch, exact resume, and the clear
//! errors for bad inputs. Uses the real backbone and face embedder in models/.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};
use image::{Rgb, RgbImage};
use toonbot::train::fast::model::{Discriminators, NETWORKS};
use toonbot::train::fast::run::{FastStart, FastTrainer};
use toonbot::train::fast::FastSpec;
use toonbot::train::model::NetConfig;
use toonbot::train::run::{Finish, RunOptions, CHECKPOINT_FILE, LOG_FILE};
use toonbot::train::step::Losses;

fn tiny_net() -> NetConfig {
    NetConfig {
        ngf: 4,
        n_blocks: 1,
        ndf: 4,
        global_layers: 4,
        local_layers: 3,
    }
}

/// `n` soft gradients ("photos") or flat discs on white ("cartoons") in `dir`.
fn images(dir: &Path, n: u32, cartoon: bool) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let img = RgbImage::from_fn(48, 48, |x, y| {
            if !cartoon {
                let t = (x + y + 5 * i) as f32 / 120.0;
                Rgb([
                    (200.0 * t) as u8 + 30,
                    100 + (i * 10) as u8,
                    (255.0 * (1.0 - t)) as u8,
                ])
            } else if (x as i32 - 24).pow(2) + (y as i32 - 24).pow(2) > 350 {
                Rgb([255, 255, 255])
            } else {
                Rgb([((x + 6 * i) / 12 * 60) as u8, 90, 200])
            }
        });
        img.save(dir.join(format!("{i:02}.png"))).unwrap();
    }
    dir.to_path_buf()
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    spec: FastSpec,
}

/// Two reconstruction steps (the check at step 2 ends the phase), then `adv_steps`
/// adversarial ones, the last third at 160 px.
fn setup(adv_steps: u64) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let mut spec = FastSpec::new(
        images(&root.join("photos"), 8, false),
        images(&root.join("cartoons"), 8, true),
        images(&root.join("val"), 8, false),
        adv_steps,
    );
    spec.net = tiny_net();
    spec.batch = 1;
    spec.high_size = 160;
    spec.high_fraction = 0.34;
    spec.recon.check_every = 2;
    spec.recon.max_steps = 2;
    spec.weights.adv_ramp_steps = 2;
    spec.weights.identity_every = 2;
    spec.seed = 5;
    Setup {
        _tmp: tmp,
        root,
        spec,
    }
}

fn options(out: &Path) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        compact: Some(out.join("compact.safetensors")),
        compact_generators_only: false,
        save_every: 1000,
        sample_every: 2,
        log_every: 1,
        time_limit: None,
        models_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
    }
}

fn trainer(spec: &FastSpec, out: &Path, start: FastStart) -> anyhow::Result<FastTrainer> {
    FastTrainer::new(spec.clone(), options(out), start, &Device::Cpu)
}

/// Continues the run in `out` from its checkpoint.
fn resume(spec: &FastSpec, out: &Path) -> anyhow::Result<FastTrainer> {
    trainer(spec, out, FastStart::Resume(out.join(CHECKPOINT_FILE)))
}

fn run(t: &mut FastTrainer, stop_at: Option<u64>) -> (Finish, Vec<Losses>) {
    let stop = AtomicBool::new(false);
    let mut seen = Vec::new();
    let finish = t
        .run(&stop, |p| {
            seen.push(p.losses.clone());
            if Some(p.step) == stop_at {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
    (finish, seen)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn tensors(t: &FastTrainer) -> Vec<(String, Vec<u32>)> {
    t.nets
        .named_tensors(&NETWORKS)
        .into_iter()
        .map(|(k, v)| (k, bits(&v)))
        .collect()
}

#[test]
fn reconstruction_then_adversarial_steps_train_every_network() {
    let s = setup(3);
    let out = s.root.join("run");
    let mut t = trainer(&s.spec, &out, FastStart::Fresh).unwrap();
    let before = tensors(&t);
    let (finish, seen) = run(&mut t, None);
    assert_eq!(finish, Finish::Completed);
    assert_eq!(seen.len(), 5);
    assert!(t.state.recon_done && t.state.recon_steps == 2 && t.state.adv_steps == 3);
    // Reconstruction steps, the check at step 2 (short of its targets: the cap ended it).
    for name in ["R_pixel", "R_feature", "R_loss"] {
        assert!(seen[0][name].is_finite() && seen[0][name] > 0.0, "{name}");
    }
    assert!(seen[1]["recon_psnr_db"].is_finite());
    assert!((-1.0..=1.0).contains(&seen[1]["recon_identity"]));
    assert_eq!(seen[1]["recon_target_met"], 0.0);
    // Adversarial steps: every term, the identity term on even steps only.
    let adversarial = [
        "D_projected",
        "D_local",
        "D_loss",
        "G_projected",
        "G_local",
        "G_face_id",
        "G_content_luma",
        "G_content_colour",
        "G_content_feature",
        "G_cam",
        "G_loss",
        "ada_p",
    ];
    for losses in &seen[2..] {
        for name in adversarial {
            assert!(losses[name].is_finite(), "{name}: {losses:?}");
        }
        assert!(!losses.contains_key("R_loss"));
    }
    assert!(seen[3].contains_key("G_identity") && !seen[2].contains_key("G_identity"));

    let after = tensors(&t);
    let changed: BTreeSet<String> = before
        .iter()
        .zip(&after)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, _)| a.0.clone())
        .collect();
    for net in ["genA2B", "disP", "disLB"] {
        assert!(
            changed.iter().any(|k| k.starts_with(&format!("{net}."))),
            "{net} did not train"
        );
    }
    assert!(
        !after.iter().any(|(k, _)| k.starts_with("disGB.")),
        "the projected recipe has no global discriminator"
    );
    assert!(
        !changed.iter().any(|k| k.starts_with("disP.scratch.")),
        "the random mixing must stay fixed"
    );

    let log = std::fs::read_to_string(out.join(LOG_FILE)).unwrap();
    assert_eq!(log.lines().count(), 5);
    assert!(out.join(CHECKPOINT_FILE).is_file() && out.join("compact.safetensors").is_file());
    // Samples at steps 2 (128 px: two columns) and 4 (the last step is at 160 px).
    let grid = image::open(out.join("samples/step-0000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (256, 8 * 128));
    let grid = image::open(out.join("samples/step-0000004.png")).unwrap();
    assert_eq!(grid.width(), 320);
}

#[test]
fn the_photo2cartoon_discriminators_variant_trains_a_global_one_instead() {
    let mut s = setup(2);
    s.spec.discriminators = Discriminators::Photo2cartoon;
    let out = s.root.join("run");
    let mut t = trainer(&s.spec, &out, FastStart::Fresh).unwrap();
    let before = tensors(&t);
    let (finish, seen) = run(&mut t, None);
    assert_eq!(finish, Finish::Completed);
    for name in ["D_global", "D_local", "G_global", "G_local", "ada_p"] {
        assert!(seen[3][name].is_finite(), "{name}: {:?}", seen[3]);
    }
    assert!(!seen[3].contains_key("D_projected") && !seen[3].contains_key("G_projected"));
    let after = tensors(&t);
    assert!(!after.iter().any(|(k, _)| k.starts_with("disP.")));
    for net in ["genA2B", "disLB", "disGB"] {
        assert!(
            before
                .iter()
                .zip(&after)
                .any(|(a, b)| a.0.starts_with(&format!("{net}.")) && a.1 != b.1),
            "{net} did not train"
        );
    }
    // It resumes as itself, and a projected spec is refused for its run.
    let resumed = resume(&s.spec, &out).unwrap();
    assert_eq!(tensors(&resumed), after);
    let projected = FastSpec {
        discriminators: Discriminators::Projected,
        ..s.spec.clone()
    };
    let err = resume(&projected, &out)
        .err()
        .expect("a differing spec is refused");
    assert!(format!("{err:#}").contains("other settings"), "{err:#}");
}

#[test]
fn an_interrupted_run_resumes_exactly() {
    let s = setup(2);
    let whole = s.root.join("whole");
    let mut t = trainer(&s.spec, &whole, FastStart::Fresh).unwrap();
    run(&mut t, None);
    let expected = tensors(&t);

    let parts = s.root.join("parts");
    let mut t = trainer(&s.spec, &parts, FastStart::Fresh).unwrap();
    let (finish, _) = run(&mut t, Some(3));
    assert_eq!(finish, Finish::Interrupted);
    drop(t);
    let mut t = resume(&s.spec, &parts).unwrap();
    assert_eq!(t.total_steps(), 3);
    let (finish, _) = run(&mut t, None);
    assert_eq!(finish, Finish::Completed);
    assert!(
        tensors(&t) == expected,
        "resumed run differs from the uninterrupted one"
    );

    // Other settings are refused, with both written out.
    let mut other = s.spec.clone();
    other.lr_g = 5e-5;
    let err = resume(&other, &parts).err().expect("refused");
    assert!(format!("{err:#}").contains("other settings"), "{err:#}");

    // A new run starts its adversarial phase from the reconstruction of this one.
    let from = s.root.join("from");
    let t = trainer(
        &s.spec,
        &from,
        FastStart::FromReconstruction(whole.join("compact.safetensors")),
    )
    .unwrap();
    assert!(t.state.recon_done && t.state.adv_steps == 0);
}

#[test]
fn a_new_schedule_continues_a_finished_run_with_its_discriminators() {
    let s = setup(2);
    let finished = s.root.join("finished");
    let mut t = trainer(&s.spec, &finished, FastStart::Fresh).unwrap();
    run(&mut t, None);
    let (trained, ada_p) = (tensors(&t), t.state.ada.p);
    drop(t);

    // All at the larger size, no ramp: the networks and ADA's p carry over, the step count
    // and the optimisers start afresh.
    let mut spec = s.spec.clone();
    spec.low_size = 160;
    spec.weights.adv_ramp_steps = 0;
    let next = s.root.join("next");
    let init = FastStart::FromReconstruction(finished.join(CHECKPOINT_FILE));
    let mut t = trainer(&spec, &next, init).unwrap();
    assert!(t.state.recon_done && t.state.adv_steps == 0);
    assert_eq!(t.state.ada.p, ada_p);
    assert!(
        tensors(&t) == trained,
        "every network as the finished run left it"
    );
    let (finish, losses) = run(&mut t, None);
    assert_eq!(finish, Finish::Completed);
    assert!(losses.iter().all(|l| l.contains_key("G_projected")));

    // Networks of other shapes cannot carry over.
    let mut other = spec.clone();
    other.net.ndf *= 2;
    let init = FastStart::FromReconstruction(finished.join(CHECKPOINT_FILE));
    let err = trainer(&other, &s.root.join("other"), init)
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("other shapes"), "{err:#}");
}

#[test]
fn bad_training_folders_get_clear_errors() {
    let s = setup(1);
    let out = s.root.join("run");
    let message = |spec: &FastSpec| {
        format!(
            "{:#}",
            trainer(spec, &out, FastStart::Fresh)
                .err()
                .expect("refused")
        )
    };

    let mut spec = s.spec.clone();
    spec.cartoons = s.root.join("missing");
    assert!(message(&spec).contains("--cartoons"), "{}", message(&spec));

    let few = images(&s.root.join("few"), 3, true);
    spec.cartoons = few;
    assert!(
        message(&spec).contains("fewer than the 8"),
        "{}",
        message(&spec)
    );

    let broken = images(&s.root.join("broken"), 8, true);
    std::fs::write(broken.join("notes.png"), b"not an image").unwrap();
    spec.cartoons = broken;
    assert!(
        message(&spec).contains("not readable images"),
        "{}",
        message(&spec)
    );

    let empty = s.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    spec.cartoons = s.spec.cartoons.clone();
    spec.photos = empty;
    assert!(message(&spec).contains("--photos"), "{}", message(&spec));
}
