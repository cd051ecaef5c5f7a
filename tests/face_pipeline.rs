//! The face pipeline on real photos from ../shared/data (skipped where it is absent).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use toonbot::config::Config;
use toonbot::face::{FacePipeline, ALIGNED_SIZE};
use toonbot::imageops::load_photo;

fn pipeline() -> &'static FacePipeline {
    static PIPELINE: OnceLock<FacePipeline> = OnceLock::new();
    PIPELINE.get_or_init(|| {
        let mut config = Config::default();
        config.models.dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        FacePipeline::load(&config, &candle_core::Device::Cpu).expect("models load")
    })
}

fn limits() -> toonbot::config::Limits {
    Config::default().limits
}

fn sorted_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Faces counted by eye in each group photo (every face is frontal or three-quarter and
/// at least ~170 px wide).
const GROUP_FACES: [(&str, usize); 6] = [
    ("sample1.jpg", 3),
    ("sample2.jpg", 3),
    ("sample3.jpg", 3),
    ("sample4.jpg", 4),
    ("sample5.jpg", 5),
    ("sample6.jpg", 4),
];

#[test]
fn every_face_in_the_group_photos_is_found() {
    let Some(data) = common::shared_data() else {
        return;
    };
    for (name, expected) in GROUP_FACES {
        let photo = load_photo(&data.join("samples/groups").join(name), &limits()).unwrap();
        let found = pipeline().find_faces(&photo).unwrap();
        assert_eq!(found.faces.len(), expected, "{name}");
        let areas: Vec<f32> = found
            .faces
            .iter()
            .map(|f| f.detection.bbox[2] * f.detection.bbox[3])
            .collect();
        assert!(
            areas.windows(2).all(|w| w[0] >= w[1]),
            "{name}: faces not largest first"
        );
        for face in &found.faces {
            let [x, y, w, h] = face.detection.bbox;
            let inside = face
                .landmarks
                .0
                .iter()
                .filter(|[px, py]| {
                    *px > x - 0.25 * w
                        && *px < x + 1.25 * w
                        && *py > y - 0.25 * h
                        && *py < y + 1.25 * h
                })
                .count();
            assert!(
                inside >= 64,
                "{name}: only {inside} of 68 landmarks near the face box"
            );
            assert_eq!(face.aligned.dimensions(), (ALIGNED_SIZE, ALIGNED_SIZE));
            assert_eq!(face.mask.dimensions(), (ALIGNED_SIZE, ALIGNED_SIZE));
        }
    }
}

#[test]
fn a_street_scene_has_no_face() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let photo = load_photo(&data.join("samples/no-face/prague.jpg"), &limits()).unwrap();
    assert!(pipeline().find_faces(&photo).unwrap().faces.is_empty());
}

#[test]
fn nearly_every_portrait_gives_a_face() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let photos = sorted_files(&data.join("photos/p2c-women"));
    assert!(photos.len() >= 500);
    let missed: Vec<&PathBuf> = photos
        .iter()
        .filter(|p| {
            let photo = load_photo(p, &limits()).unwrap();
            pipeline().find_faces(&photo).unwrap().faces.is_empty()
        })
        .collect();
    let rate = 1.0 - missed.len() as f64 / photos.len() as f64;
    eprintln!(
        "faces found in {:.2}% of {} photos; missed {missed:?}",
        rate * 100.0,
        photos.len()
    );
    assert!(
        rate >= 0.98,
        "only {:.2}% of portraits gave a face",
        rate * 100.0
    );
}

/// Close-ups whose face runs past the photo's edges: the whole-photo window sees them
/// only partly, and the zoomed-out search (run just for such photos) finds them.
#[test]
fn faces_running_past_the_edges_are_found() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let mut found = 0;
    let photos = sorted_files(&data.join("photos/celeba"));
    for path in photos.iter().take(20) {
        let photo = load_photo(path, &limits()).unwrap();
        let (w, h) = photo.dimensions();
        // The middle half: forehead, chin and cheeks are cut off.
        let close_up =
            image::imageops::crop_imm(&photo, w / 4, h / 4 + h / 16, w / 2, h / 2).to_image();
        let faces = pipeline().detect(&close_up).unwrap();
        if let Some(face) = faces.first() {
            assert!(
                toonbot::face::windows::reaches_edge(face.bbox, w / 2, h / 2),
                "{}: a face cut by the edges framed inside them: {:?}",
                path.display(),
                face.bbox
            );
            found += 1;
        }
    }
    assert!(found >= 16, "only {found} of 20 close-ups gave a face");
}

/// Aligned crops, looked at again by the detector and landmark net, have level eyes at a
/// steady place; the mask keeps the face and drops the corners.
#[test]
fn aligned_crops_have_level_eyes_in_a_fixed_place() {
    let Some(data) = common::shared_data() else {
        return;
    };
    let mut rolls = Vec::new();
    let mut eye_centres = Vec::new();
    for path in sorted_files(&data.join("photos/celeba")).iter().take(60) {
        let photo = load_photo(path, &limits()).unwrap();
        let Some(face) = pipeline()
            .find_faces(&photo)
            .unwrap()
            .faces
            .into_iter()
            .next()
        else {
            continue;
        };
        let mapped = face.landmarks.map(&face.alignment.to_crop);
        assert!(mapped.eye_line_angle().to_degrees().abs() < 0.01);
        let [l, r] = mapped.eye_centres();
        eye_centres.push([(l[0] + r[0]) / 2.0, (l[1] + r[1]) / 2.0]);
        let centre_mask = face.mask.get_pixel(128, 128).0[0];
        assert!(
            centre_mask > 200,
            "{}: face centre masked out ({centre_mask})",
            path.display()
        );

        let again = pipeline().find_faces(&face.crop).unwrap();
        let redetected = again.faces.first().expect("the aligned crop shows a face");
        rolls.push(redetected.landmarks.eye_line_angle().to_degrees().abs());
    }
    assert!(
        rolls.len() >= 55,
        "only {} of 60 celeba photos aligned",
        rolls.len()
    );
    rolls.sort_by(f32::total_cmp);
    let median = rolls[rolls.len() / 2];
    let p90 = rolls[rolls.len() * 9 / 10];
    let n = eye_centres.len() as f32;
    let mean = eye_centres
        .iter()
        .fold([0.0, 0.0], |a, c| [a[0] + c[0] / n, a[1] + c[1] / n]);
    let spread = eye_centres
        .iter()
        .fold([0.0f32, 0.0], |a, c| {
            [
                a[0] + (c[0] - mean[0]).powi(2) / n,
                a[1] + (c[1] - mean[1]).powi(2) / n,
            ]
        })
        .map(f32::sqrt);
    eprintln!(
        "re-detected roll on {} aligned crops: median {median:.2}°, p90 {p90:.2}°, max {:.2}°; \
         eye centre mean ({:.1}, {:.1}) px, std ({:.1}, {:.1}) px",
        rolls.len(),
        rolls[rolls.len() - 1],
        mean[0],
        mean[1],
        spread[0],
        spread[1]
    );
    assert!(median < 1.0, "median roll {median}°");
    assert!(p90 < 2.0, "90th percentile roll {p90}°");
    assert!((mean[0] - 128.0).abs() < 8.0, "eyes off-centre: {mean:?}");
    // Vertically the crop is pinned to the eyes-to-chin height; horizontally it centres the
    // landmark box, so head yaw moves the eyes sideways (photo2cartoon's geometry).
    assert!(
        spread[0] < 18.0 && spread[1] < 5.0,
        "eye centre spread {spread:?}"
    );
}
