//! The face pipeline (DESIGN §3): photo -> detected faces -> 68 landmarks -> level-eyed,
//! expanded square crops -> soft portrait masks -> whitened 256x256 faces.

pub mod align;
pub mod windows;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use image::{GrayImage, Rgb, RgbImage};

use crate::config::{self, Config};
use crate::imageops::{self, Affine};
use crate::nets::face_detector::{self, keypoint, FaceDetector};
use crate::nets::landmarks68::{self, FaceLandmark68Net};
use crate::nets::segmenter::{self, SelfieSegmenter};
use align::{Alignment, Landmarks};
use windows::Window;

/// Side of the aligned face crops (the generator's input).
pub const ALIGNED_SIZE: u32 = 256;
/// Detections from different windows overlapping by more than this are one face.
const MERGE_IOU: f32 = 0.3;
/// The landmark net sees a square this many times the landmarks' extent (face-api's
/// detector boxes frame the face about this loosely).
const LANDMARK_CROP_SCALE: f32 = 1.25;
/// ... and the first look, framed from the detector's box, this many times its side.
const DETECTION_CROP_SCALE: f32 = 1.5;

/// A face found by the detector, in photo pixel coordinates.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectedFace {
    /// Detector confidence, in [0, 1].
    pub score: f32,
    /// `[x, y, width, height]`.
    pub bbox: [f32; 4],
    /// The detector's six keypoints, indexed by [`keypoint`].
    pub keypoints: [[f32; 2]; face_detector::NUM_KEYPOINTS],
}

impl DetectedFace {
    fn area(&self) -> f32 {
        self.bbox[2] * self.bbox[3]
    }
}

/// A face carried through the whole pipeline.
#[derive(Debug, Clone)]
pub struct Face {
    /// The detector's box and keypoints.
    pub detection: DetectedFace,
    /// In photo pixel coordinates.
    pub landmarks: Landmarks,
    /// How the aligned crop was cut from the photo.
    pub alignment: Alignment,
    /// The aligned crop before whitening.
    pub crop: RgbImage,
    /// Soft portrait mask of the crop (255 = person).
    pub mask: GrayImage,
    /// The crop composited over white with the mask: the generator's input.
    pub aligned: RgbImage,
}

/// Milliseconds spent in each stage for one photo.
#[derive(Debug, Clone, Default)]
pub struct StageTimings {
    /// Face detection over every window.
    pub detect: f64,
    /// The 68-landmark net.
    pub landmarks: f64,
    /// Alignment transforms and the warped crops.
    pub align: f64,
    /// The segmenter's portrait masks of the crops.
    pub segment: f64,
}

impl StageTimings {
    /// The timings by stage name, for reports.
    pub fn as_map(&self) -> BTreeMap<&'static str, f64> {
        BTreeMap::from([
            ("detect", self.detect),
            ("landmarks", self.landmarks),
            ("align", self.align),
            ("segment", self.segment),
        ])
    }
}

/// Every face of one photo, largest first.
#[derive(Debug, Clone)]
pub struct PhotoFaces {
    /// Photo width in pixels.
    pub width: u32,
    /// Photo height in pixels.
    pub height: u32,
    /// The faces, largest first, at most `faces.max_faces`.
    pub faces: Vec<Face>,
    /// Faces detected before the `max_faces` cut (at least `faces.len()`).
    pub faces_found: usize,
    /// Time spent in each stage.
    pub timings: StageTimings,
}

/// The loaded networks for the face pipeline.
pub struct FacePipeline {
    detector: FaceDetector,
    landmarker: FaceLandmark68Net,
    segmenter: SelfieSegmenter,
    settings: config::Faces,
    device: Device,
}

/// Memory-maps `dir/name.safetensors`.
pub fn load_weights(dir: &Path, name: &str, device: &Device) -> Result<VarBuilder<'static>> {
    let path = dir.join(format!("{name}.safetensors"));
    anyhow::ensure!(
        path.is_file(),
        "model file {} is missing: run tools/import-models.sh (see models/README.md)",
        path.display()
    );
    // SAFETY: the weight files are only read, and nothing rewrites them while mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, device) }
        .with_context(|| format!("loading {}", path.display()))
}

impl FacePipeline {
    /// Loads the detector, landmark and segmenter weights from `models.dir`.
    pub fn load(config: &Config, device: &Device) -> Result<Self> {
        let dir = &config.models.dir;
        Ok(Self {
            detector: FaceDetector::new(
                &Default::default(),
                load_weights(dir, "face_detector", device)?,
            )?,
            landmarker: FaceLandmark68Net::new(
                &Default::default(),
                load_weights(dir, "landmarks68", device)?,
            )?,
            segmenter: SelfieSegmenter::new(
                &Default::default(),
                load_weights(dir, "segmenter", device)?,
            )?,
            settings: config.faces.clone(),
            device: device.clone(),
        })
    }

    /// Runs every stage on a decoded photo.
    pub fn find_faces(&self, photo: &RgbImage) -> Result<PhotoFaces> {
        let mut timings = StageTimings::default();
        let mut clock = Instant::now();
        let mut lap = |slot: &mut f64| {
            *slot = clock.elapsed().as_secs_f64() * 1e3;
            clock = Instant::now();
        };
        let mut detections = self.detect(photo)?;
        let faces_found = detections.len();
        detections.truncate(self.settings.max_faces);
        lap(&mut timings.detect);
        let landmarks = self.locate_landmarks(photo, &detections)?;
        lap(&mut timings.landmarks);
        let (alignments, crops): (Vec<_>, Vec<_>) = landmarks
            .iter()
            .map(|lm| {
                let alignment = align::align(lm, ALIGNED_SIZE);
                let crop = imageops::warp_affine(
                    photo,
                    alignment.to_crop,
                    ALIGNED_SIZE,
                    ALIGNED_SIZE,
                    Rgb([255; 3]),
                );
                (alignment, crop)
            })
            .unzip();
        lap(&mut timings.align);
        let masks = self.segment(&crops)?;
        lap(&mut timings.segment);
        let faces = detections
            .into_iter()
            .zip(landmarks)
            .zip(alignments.into_iter().zip(crops).zip(masks))
            .map(|((detection, landmarks), ((alignment, crop), mask))| Face {
                aligned: imageops::whiten(&crop, &mask),
                detection,
                landmarks,
                alignment,
                crop,
                mask,
            })
            .collect();
        Ok(PhotoFaces {
            width: photo.width(),
            height: photo.height(),
            faces,
            faces_found,
            timings,
        })
    }

    /// Step 2: every face above the score and size floors, largest first. Small photos are searched whole; large ones also in tiles. The photo
    /// is searched zoomed out as well only when that can find more: when nothing was found,
    /// or a face reaches the photo's edge and may run past it.
    pub fn detect(&self, photo: &RgbImage) -> Result<Vec<DetectedFace>> {
        let (width, height) = photo.dimensions();
        let (windows, zoomed_out) = windows::detection_windows(width, height);
        let mut candidates = self.detect_in(photo, &windows)?;
        if candidates.is_empty()
            || candidates
                .iter()
                .any(|f| windows::reaches_edge(f.bbox, width, height))
        {
            candidates.extend(self.detect_in(photo, &[zoomed_out])?);
        }
        let scored: Vec<(f32, [f32; 4])> = candidates.iter().map(|f| (f.score, f.bbox)).collect();
        let mut faces: Vec<DetectedFace> = windows::suppress_overlaps(&scored, MERGE_IOU)
            .into_iter()
            .map(|i| candidates[i].clone())
            .filter(|f| f.bbox[2] >= self.settings.min_face_px)
            .collect();
        faces.sort_by(|a, b| b.area().total_cmp(&a.area()));
        Ok(faces)
    }

    /// The detections in `windows` (one batch), in photo coordinates, less those a window
    /// cuts.
    fn detect_in(&self, photo: &RgbImage, windows: &[Window]) -> Result<Vec<DetectedFace>> {
        let size = face_detector::INPUT_SIZE as u32;
        let inputs: Vec<RgbImage> = windows
            .iter()
            .map(|w| imageops::warp_affine(photo, w.to_input(size), size, size, Rgb([0; 3])))
            .collect();
        let batch = face_detector::preprocess(&imageops::rgb_batch(&inputs, &self.device)?)?;
        let per_window = self.detector.detect(&batch, self.settings.min_score)?;
        Ok(windows
            .iter()
            .zip(per_window)
            .flat_map(|(window, found)| {
                found
                    .into_iter()
                    .map(|d| to_photo(window, size, &d))
                    .filter(|f| !window.cuts(f.bbox))
            })
            .collect())
    }

    /// Step 3: 68 landmarks per face in photo coordinates. A first look from the
    /// detector's box (rotated upright by its eye keypoints) frames a second, tighter look
    /// from the first look's landmarks.
    pub fn locate_landmarks(
        &self,
        photo: &RgbImage,
        faces: &[DetectedFace],
    ) -> Result<Vec<Landmarks>> {
        if faces.is_empty() {
            return Ok(Vec::new());
        }
        let first_views: Vec<Affine> = faces.iter().map(view_from_detection).collect();
        let first = self.landmarks_in_views(photo, &first_views)?;
        let second_views: Vec<Affine> = first.iter().map(view_from_landmarks).collect();
        self.landmarks_in_views(photo, &second_views)
    }

    fn landmarks_in_views(&self, photo: &RgbImage, views: &[Affine]) -> Result<Vec<Landmarks>> {
        let size = landmarks68::INPUT_SIZE as u32;
        let inputs: Vec<RgbImage> = views
            .iter()
            .map(|v| imageops::warp_affine(photo, *v, size, size, Rgb([0; 3])))
            .collect();
        let raw = self
            .landmarker
            .forward(&landmarks68::normalize(&imageops::rgb_batch(
                &inputs,
                &self.device,
            )?)?)?;
        let raw = raw.to_vec2::<f32>()?;
        Ok(raw
            .iter()
            .zip(views)
            .map(|(values, view)| {
                let back = view.inverse();
                let mut points = [[0.0; 2]; 68];
                for (p, xy) in points.iter_mut().zip(values.chunks_exact(2)) {
                    *p = back.apply([xy[0] * size as f32, xy[1] * size as f32]);
                }
                Landmarks(points)
            })
            .collect())
    }

    /// Step 6: soft portrait masks of the aligned crops.
    pub fn segment(&self, crops: &[RgbImage]) -> Result<Vec<GrayImage>> {
        if crops.is_empty() {
            return Ok(Vec::new());
        }
        let size = segmenter::INPUT_SIZE as u32;
        let resized: Vec<RgbImage> = crops
            .iter()
            .map(|c| {
                if c.width() == size && c.height() == size {
                    c.clone()
                } else {
                    imageops::resize_rgb(c, size, size)
                }
            })
            .collect();
        let masks = self
            .segmenter
            .forward(&segmenter::normalize(&imageops::rgb_batch(
                &resized,
                &self.device,
            )?)?)?;
        (0..crops.len())
            .map(|i| {
                let mask = imageops::mask_to_gray(&masks.get(i)?)?;
                let (w, h) = crops[i].dimensions();
                Ok(if mask.dimensions() == (w, h) {
                    mask
                } else {
                    image::imageops::resize(&mask, w, h, image::imageops::FilterType::Triangle)
                })
            })
            .collect()
    }
}

/// A detection from a window's input frame mapped back to photo pixels.
fn to_photo(window: &Window, input_size: u32, d: &face_detector::Detection) -> DetectedFace {
    let back = window.to_input(input_size).inverse();
    let s = input_size as f32;
    let point = |[x, y]: [f32; 2]| back.apply([x * s, y * s]);
    let [x, y] = point([d.bbox[0], d.bbox[1]]);
    let scale = window.side;
    DetectedFace {
        score: d.score,
        bbox: [x, y, d.bbox[2] * scale, d.bbox[3] * scale],
        keypoints: d.keypoints.map(point),
    }
}

/// Photo -> landmark-net input for a square of `side` centred on `centre`, rotated by
/// `angle` (radians) so that angle becomes horizontal.
fn landmark_view(centre: [f32; 2], side: f32, angle: f32) -> Affine {
    let size = landmarks68::INPUT_SIZE as f32;
    Affine::scale(size / side)
        .then_after(Affine::translation(
            side / 2.0 - centre[0],
            side / 2.0 - centre[1],
        ))
        .then_after(Affine::rotation_about(-angle, centre[0], centre[1]))
}

fn view_from_detection(face: &DetectedFace) -> Affine {
    let [x, y, w, h] = face.bbox;
    let [rx, ry] = face.keypoints[keypoint::RIGHT_EYE];
    let [lx, ly] = face.keypoints[keypoint::LEFT_EYE];
    let angle = (ly - ry).atan2(lx - rx);
    landmark_view(
        [x + w / 2.0, y + h / 2.0],
        w.max(h) * DETECTION_CROP_SCALE,
        angle,
    )
}

fn view_from_landmarks(landmarks: &Landmarks) -> Affine {
    let [l, t, r, b] = landmarks.bounds();
    let [[lx, ly], [rx, ry]] = landmarks.eye_centres();
    let angle = (ry - ly).atan2(rx - lx);
    landmark_view(
        [(l + r) / 2.0, (t + b) / 2.0],
        (r - l).max(b - t) * LANDMARK_CROP_SCALE,
        angle,
    )
}
