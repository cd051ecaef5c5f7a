//! Training at tiny size (32 px, narrow networks) on the CPU: losses, updates, checkpoints,
//! exact resume, freezing, sample grids. The face-ID loss uses the real embedder in models/.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};
use image::{Rgb, RgbImage};
use toonbot::train::model::{NetConfig, NETWORKS};
use toonbot::train::params::Freeze;
use toonbot::train::run::{Finish, RunOptions, Start, Trainer, CHECKPOINT_FILE, LOG_FILE};
use toonbot::train::step::Losses;
use toonbot::train::{checkpoint, RunSpec};

const SIZE: usize = 32;

fn tiny_net() -> NetConfig {
    NetConfig {
        ngf: 4,
        n_blocks: 1,
        ndf: 4,
        global_layers: 4,
        local_layers: 3,
    }
}

/// A toy task: "photos" are soft diagonal gradients, "cartoons" the same posterised into
/// flat bands on white.
fn write_data(root: &Path) -> (PathBuf, PathBuf) {
    let (photos, cartoons) = (root.join("photos"), root.join("cartoons"));
    std::fs::create_dir_all(&photos).unwrap();
    std::fs::create_dir_all(&cartoons).unwrap();
    for i in 0..4u32 {
        let photo = RgbImage::from_fn(40, 40, |x, y| {
            let t = (x + y + 7 * i) as f32 / 100.0;
            Rgb([
                (200.0 * t) as u8 + 30,
                120 + (i * 20) as u8,
                (255.0 * (1.0 - t)) as u8,
            ])
        });
        photo.save(photos.join(format!("p{i}.png"))).unwrap();
        let cartoon = RgbImage::from_fn(40, 40, |x, y| {
            if (x as i32 - 20).pow(2) + (y as i32 - 20).pow(2) > 300 {
                Rgb([255, 255, 255])
            } else {
                Rgb([((x + 10 * i) / 10 * 60) as u8, 90, 200])
            }
        });
        cartoon.save(cartoons.join(format!("c{i}.png"))).unwrap();
    }
    (photos, cartoons)
}

struct Setup {
    _tmp: tempfile::TempDir,
    spec: RunSpec,
    root: PathBuf,
}

fn setup(steps: u64) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let (photos, cartoons) = write_data(tmp.path());
    let mut spec = RunSpec::photo2cartoon(photos, cartoons, steps);
    spec.size = SIZE;
    spec.net = tiny_net();
    spec.seed = 3;
    Setup {
        root: tmp.path().to_path_buf(),
        _tmp: tmp,
        spec,
    }
}

fn options(out: &Path) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        compact: None,
        compact_generators_only: false,
        save_every: 1000,
        sample_every: 1000,
        log_every: 1,
        time_limit: None,
        models_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
    }
}

fn trainer(spec: &RunSpec, opts: RunOptions, start: Start) -> Trainer {
    Trainer::new(spec.clone(), opts, start, &Device::Cpu).unwrap()
}

/// Runs to the end (or until `stop_at` steps), collecting each step's losses.
fn run(t: &mut Trainer, stop_at: Option<u64>) -> (Finish, Vec<Losses>) {
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

fn tensors(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    t.model
        .named_tensors(&NETWORKS)
        .into_iter()
        .map(|(k, v)| (k, bits(&v)))
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

const LOSS_NAMES: [&str; 26] = [
    "D_ad_cam_loss_GA",
    "D_ad_cam_loss_GB",
    "D_ad_cam_loss_LA",
    "D_ad_cam_loss_LB",
    "D_ad_loss_GA",
    "D_ad_loss_GB",
    "D_ad_loss_LA",
    "D_ad_loss_LB",
    "Discriminator_loss",
    "G_ad_cam_loss_GA",
    "G_ad_cam_loss_GB",
    "G_ad_cam_loss_LA",
    "G_ad_cam_loss_LB",
    "G_ad_loss_GA",
    "G_ad_loss_GB",
    "G_ad_loss_LA",
    "G_ad_loss_LB",
    "G_cam_loss_A",
    "G_cam_loss_B",
    "G_id_loss_A",
    "G_id_loss_B",
    "G_identity_loss_A",
    "G_identity_loss_B",
    "G_recon_loss_A",
    "G_recon_loss_B",
    "Generator_loss",
];

#[test]
fn every_loss_is_finite_and_every_network_changes() {
    let s = setup(2);
    let mut t = trainer(&s.spec, options(&s.root.join("out")), Start::Fresh);
    let before = tensors(&t);
    let (finish, losses) = run(&mut t, None);
    assert_eq!(finish, Finish::Completed);
    assert_eq!(losses.len(), 2);
    for step in &losses {
        let names: Vec<&str> = step.keys().map(String::as_str).collect();
        assert_eq!(names, LOSS_NAMES);
        for (name, v) in step {
            assert!(v.is_finite(), "{name} = {v}");
        }
    }
    let after = tensors(&t);
    for net in toonbot::train::model::NETWORKS {
        let changed = before
            .iter()
            .zip(&after)
            .filter(|((k, a), (_, b))| k.starts_with(net) && a != b)
            .count();
        assert!(changed > 0, "{net} did not change");
    }
    // Spectral-norm buffers moved too; rho and w stayed in [0, 1].
    let changed = |suffix: &str| {
        before
            .iter()
            .zip(&after)
            .any(|((k, a), (_, b))| k.ends_with(suffix) && a != b)
    };
    assert!(changed("weight_u") && changed("weight_v"));
    for (k, v) in t.model.named_tensors(&NETWORKS) {
        if k.ends_with(".rho") || k.ends_with(".w_gamma") || k.ends_with(".w_beta") {
            let v: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| (0.0..=1.0).contains(x)), "{k}");
        }
    }
    // The log has one line per step with every loss.
    let log = std::fs::read_to_string(s.root.join("out").join(LOG_FILE)).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["step"], 2);
    assert!(lines[1]["losses"]["G_id_loss_A"]
        .as_f64()
        .unwrap()
        .is_finite());
}

#[test]
fn losses_fall_on_a_toy_task() {
    // Seeded and deterministic, but a GAN is chaotic: a last-bit change in any op's rounding
    // takes a seed down another path (max-pool and ReLU routing, Adam's sign-like first
    // updates). Over 10 seeds the 30-step fall of the objective was 0.51-0.69 and of the cycle
    // losses 0.72-1.01 (mean 0.80), and single terms wandered up to 1.23: so every seed's
    // objective must fall by a fifth, and the cycle losses on average over four seeds (the
    // mean of four has a spread of about 0.05).
    const SEEDS: [u64; 4] = [0, 1, 2, 3];
    let mut cycle_ratios = Vec::new();
    for seed in SEEDS {
        let mut s = setup(30);
        s.spec.seed = seed;
        s.spec.lr = 2e-3;
        // Without the face-ID term (it is not logged then): the embedder costs most of a tiny step.
        s.spec.weights.face_id = 0.0;
        let mut t = trainer(&s.spec, options(&s.root.join("out")), Start::Fresh);
        let (_, losses) = run(&mut t, None);
        assert!(!losses[0].contains_key("G_id_loss_A"));
        let mean = |range: std::ops::Range<usize>, name: &str| {
            losses[range.clone()].iter().map(|l| l[name]).sum::<f64>() / range.len() as f64
        };
        for name in ["G_recon_loss_A", "G_recon_loss_B", "Generator_loss"] {
            let trace: Vec<String> = losses.iter().map(|l| format!("{:.3}", l[name])).collect();
            println!("seed {seed} {name}: {}", trace.join(" "));
        }
        // 6-step means: the batches differ from step to step.
        let (first, last) = (mean(0..6, "Generator_loss"), mean(24..30, "Generator_loss"));
        assert!(
            last < 0.8 * first,
            "seed {seed}: Generator_loss {first} -> {last}"
        );
        let cycle = |range: std::ops::Range<usize>| {
            mean(range.clone(), "G_recon_loss_A") + mean(range, "G_recon_loss_B")
        };
        cycle_ratios.push(cycle(24..30) / cycle(0..6));
    }
    let mean_ratio = cycle_ratios.iter().sum::<f64>() / cycle_ratios.len() as f64;
    assert!(
        mean_ratio < 0.95,
        "cycle losses fell to {cycle_ratios:?} of their start (mean {mean_ratio})"
    );
}

#[test]
fn checkpoints_round_trip_and_resume_exactly() {
    let s = setup(4);
    // Uninterrupted.
    let mut straight = trainer(&s.spec, options(&s.root.join("a")), Start::Fresh);
    let (_, losses_straight) = run(&mut straight, None);

    // Interrupted after 2 steps (as Ctrl-C does), then resumed from the checkpoint.
    let out = s.root.join("b");
    let mut first = trainer(&s.spec, options(&out), Start::Fresh);
    let (finish, losses_first) = run(&mut first, Some(2));
    assert_eq!(finish, Finish::Interrupted);
    assert_eq!(first.step(), 2);
    let ckpt = out.join(CHECKPOINT_FILE);
    // Round trip: a trainer built from the checkpoint holds the same bits.
    let mut resumed = trainer(&s.spec, options(&out), Start::Resume(ckpt.clone()));
    assert_eq!(resumed.step(), 2);
    assert_eq!(tensors(&resumed), tensors(&first));
    let loaded = checkpoint::load(&ckpt, &Device::Cpu).unwrap();
    assert_eq!(loaded.state.kind, checkpoint::Kind::Full);
    assert_eq!(loaded.state.spec, s.spec);
    assert!(loaded
        .tensors
        .keys()
        .any(|k| k.starts_with("adam_g.m.genA2B.")));
    assert!(loaded
        .tensors
        .keys()
        .any(|k| k.starts_with("adam_d.v.disLB.")));
    drop(first);

    let (finish, losses_rest) = run(&mut resumed, None);
    assert_eq!(finish, Finish::Completed);
    let mut combined = losses_first;
    combined.extend(losses_rest);
    assert_eq!(combined, losses_straight, "losses differ after resuming");
    let (a, b) = (tensors(&straight), tensors(&resumed));
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs after resuming");
    }
    assert!(!out.join(format!("{CHECKPOINT_FILE}.tmp")).exists());
}

#[test]
fn compact_checkpoint_is_f16_without_moments_and_resumes() {
    let s = setup(2);
    let mut opts = options(&s.root.join("out"));
    let compact = s.root.join("compact.safetensors");
    opts.compact = Some(compact.clone());
    let mut t = trainer(&s.spec, opts.clone(), Start::Fresh);
    run(&mut t, None);
    let full_size = std::fs::metadata(s.root.join("out").join(CHECKPOINT_FILE))
        .unwrap()
        .len();
    let compact_size = std::fs::metadata(&compact).unwrap().len();
    println!("tiny checkpoints: full {full_size} bytes, compact {compact_size} bytes");
    assert!(compact_size * 4 < full_size);
    let loaded = checkpoint::load(&compact, &Device::Cpu).unwrap();
    assert_eq!(loaded.state.kind, checkpoint::Kind::Compact);
    assert_eq!(loaded.state.step, 2);
    assert!(!loaded.tensors.keys().any(|k| k.starts_with("adam_")));
    assert_eq!(
        loaded.tensors["genA2B.ConvBlock1.1.weight"].dtype(),
        candle_core::DType::F16
    );
    assert_eq!(
        loaded.tensors["disGA.conv.weight_u"].dtype(),
        candle_core::DType::F32
    );
    // Resuming from it continues at step 2 with the (rounded) weights.
    let mut more = s.spec.clone();
    more.steps = 3;
    let mut resumed = trainer(
        &more,
        options(&s.root.join("again")),
        Start::Resume(compact),
    );
    assert_eq!(resumed.step(), 2);
    let (finish, losses) = run(&mut resumed, None);
    assert_eq!(
        (finish, losses.len()),
        (Finish::Completed, 0),
        "the stored spec (2 steps) wins"
    );
}

#[test]
fn generators_only_compact_checkpoint_resumes_with_fresh_discriminators() {
    let s = setup(2);
    let mut opts = options(&s.root.join("out"));
    let compact = s.root.join("generators.safetensors");
    opts.compact = Some(compact.clone());
    opts.compact_generators_only = true;
    let mut t = trainer(&s.spec, opts, Start::Fresh);
    run(&mut t, None);
    let loaded = checkpoint::load(&compact, &Device::Cpu).unwrap();
    assert_eq!(loaded.state.kind, checkpoint::Kind::Generators);
    assert_eq!(loaded.state.step, 2);
    assert!(loaded
        .tensors
        .keys()
        .all(|k| k.starts_with("genA2B.") || k.starts_with("genB2A.")));
    assert_eq!(
        loaded.tensors["genB2A.ConvBlock1.1.weight"].dtype(),
        candle_core::DType::F16
    );
    let mut more = s.spec.clone();
    more.steps = 3;
    let resumed = trainer(
        &more,
        options(&s.root.join("again")),
        Start::Resume(compact),
    );
    assert_eq!(resumed.step(), 2);
    let fresh = trainer(&s.spec, options(&s.root.join("fresh")), Start::Fresh);
    let weights = |t: &Trainer, name: &str| {
        t.model
            .named_tensors(&NETWORKS)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, w)| {
                let rounded = w.to_dtype(candle_core::DType::F16).unwrap();
                bits(&rounded.to_dtype(candle_core::DType::F32).unwrap())
            })
            .unwrap()
    };
    let gen = "genA2B.ConvBlock1.1.weight";
    assert_eq!(
        weights(&resumed, gen),
        weights(&t, gen),
        "generators restored"
    );
    assert_ne!(weights(&resumed, gen), weights(&fresh, gen));
    let dis = "disGA.conv.weight_orig";
    assert_eq!(
        weights(&resumed, dis),
        weights(&fresh, dis),
        "discriminators afresh"
    );
    assert_ne!(weights(&resumed, dis), weights(&t, dis));
}

#[test]
fn freeze_branches_trains_only_the_branches() {
    let s = setup(2);
    let base = trainer(&s.spec, options(&s.root.join("base")), Start::Fresh);
    let weights: HashMap<String, Tensor> =
        base.model.named_tensors(&NETWORKS).into_iter().collect();
    let mut spec = s.spec.clone();
    spec.freeze = Freeze::Branches;
    let start = Start::Weights {
        tensors: weights.clone(),
        networks: toonbot::train::model::NETWORKS.to_vec(),
    };
    let mut t = trainer(&spec, options(&s.root.join("ft")), start);
    run(&mut t, None);
    let (mut branches_changed, mut shared) = (0, 0);
    for (name, after) in t.model.named_tensors(&NETWORKS) {
        let Some(param) = name
            .strip_prefix("genA2B.")
            .or(name.strip_prefix("genB2A."))
        else {
            continue;
        };
        let same = bits(&after) == bits(&weights[&name]);
        if Freeze::Branches.trains_generator_param(param) {
            branches_changed += usize::from(!same);
        } else {
            shared += 1;
            assert!(same, "{name} changed under --freeze branches");
        }
    }
    assert!(
        branches_changed > 0 && shared > 0,
        "{branches_changed} {shared}"
    );
}

#[test]
fn sample_grid_shows_photo_cartoon_cycle() {
    let s = setup(1);
    let mut opts = options(&s.root.join("out"));
    opts.sample_every = 1;
    let mut t = trainer(&s.spec, opts, Start::Fresh);
    run(&mut t, None);
    let grid = image::open(s.root.join("out/samples/step-0000001.png")).unwrap();
    // 4 preview photos: 4 rows; photo | cartoon | cycle: 3 columns.
    assert_eq!(
        (grid.width(), grid.height()),
        (3 * SIZE as u32, 4 * SIZE as u32)
    );
}
