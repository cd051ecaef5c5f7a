//! photo2cartoon's alignment: level the outer eye corners, then crop an expanded square
//! around the 68 landmarks (DESIGN §3, steps 4-5).

use crate::imageops::Affine;

/// 68 facial landmarks in iBUG order, in some image's pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Landmarks(pub [[f32; 2]; 68]);

/// iBUG index of the outer corner of the eye on the image's left.
pub const OUTER_EYE_CORNER_LEFT: usize = 36;
/// iBUG index of the outer corner of the eye on the image's right.
pub const OUTER_EYE_CORNER_RIGHT: usize = 45;

impl Landmarks {
    /// The landmarks moved by `m`, e.g. from photo to crop coordinates.
    pub fn map(&self, m: &Affine) -> Self {
        Self(self.0.map(|p| m.apply(p)))
    }

    /// The tilt of the line through the outer eye corners in radians, as photo2cartoon
    /// computes it: `atan((y36 - y45) / (x36 - x45))`; positive is clockwise on screen.
    pub fn eye_line_angle(&self) -> f32 {
        let [x36, y36] = self.0[OUTER_EYE_CORNER_LEFT];
        let [x45, y45] = self.0[OUTER_EYE_CORNER_RIGHT];
        ((y36 - y45) / (x36 - x45)).atan()
    }

    /// Mean of the two eyes' six-point contours (iBUG 36-41 and 42-47).
    pub fn eye_centres(&self) -> [[f32; 2]; 2] {
        let mean = |range: std::ops::Range<usize>| {
            let n = range.len() as f32;
            let (sx, sy) = range.fold((0.0, 0.0), |(sx, sy), i| {
                (sx + self.0[i][0], sy + self.0[i][1])
            });
            [sx / n, sy / n]
        };
        [mean(36..42), mean(42..48)]
    }

    /// `(left, top, right, bottom)` of the points.
    pub fn bounds(&self) -> [f32; 4] {
        self.0.iter().fold(
            [f32::MAX, f32::MAX, f32::MIN, f32::MIN],
            |[l, t, r, b], &[x, y]| [l.min(x), t.min(y), r.max(x), b.max(y)],
        )
    }
}

/// Where the aligned crop comes from in the photo.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Alignment {
    /// Photo pixel coordinates -> aligned crop pixel coordinates.
    pub to_crop: Affine,
    /// The eye line's tilt in the photo, in degrees (what the rotation removes).
    pub roll_degrees: f32,
    /// The crop square's side in photo pixels.
    pub side_in_photo: f32,
}

/// The photo -> `size x size` crop transform for a face: rotate by the eye-line angle so
/// the eyes are level, take the landmarks' box widened by 0.3 W each side, 0.8 H above and
/// 0.3 H below, square it by widening the short side about its centre, scale to `size`.
pub fn align(landmarks: &Landmarks, size: u32) -> Alignment {
    let theta = landmarks.eye_line_angle();
    let [cx, cy] = landmarks
        .eye_centres()
        .iter()
        .fold([0.0, 0.0], |[x, y], [ex, ey]| [x + ex / 2.0, y + ey / 2.0]);
    let level = Affine::rotation_about(-theta, cx, cy);
    let [l, t, r, b] = landmarks.map(&level).bounds();
    let (w, h) = (r - l, b - t);
    let (mut left, mut top, mut right, mut bottom) =
        (l - 0.3 * w, t - 0.8 * h, r + 0.3 * w, b + 0.3 * h);
    let (cw, ch) = (right - left, bottom - top);
    if ch > cw {
        left -= (ch - cw) / 2.0;
        right = left + ch;
    } else {
        top -= (cw - ch) / 2.0;
        bottom = top + cw;
    }
    let side = bottom - top;
    debug_assert!((right - left - side).abs() < 1e-3);
    let to_crop = Affine::scale(size as f32 / side)
        .then_after(Affine::translation(-left, -top))
        .then_after(level);
    Alignment {
        to_crop,
        roll_degrees: theta.to_degrees(),
        side_in_photo: side,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic face: a 68-point layout from an upright template, rotated and scaled.
    fn tilted_face(degrees: f32, scale: f32, offset: [f32; 2]) -> Landmarks {
        let mut upright = [[0.0f32; 2]; 68];
        for (i, p) in upright.iter_mut().enumerate() {
            // Jaw 0-16 along a U, everything else inside; exact shape is irrelevant here.
            let t = i as f32 / 67.0;
            *p = [(t * 6.0).sin() * 40.0, (t * 9.0).cos() * 40.0];
        }
        upright[OUTER_EYE_CORNER_LEFT] = [-30.0, -10.0];
        upright[OUTER_EYE_CORNER_RIGHT] = [30.0, -10.0];
        let m = Affine::translation(offset[0], offset[1])
            .then_after(Affine::rotation_about(degrees.to_radians(), 0.0, 0.0))
            .then_after(Affine::scale(scale));
        Landmarks(upright.map(|p| m.apply(p)))
    }

    #[test]
    fn aligned_eyes_are_level_and_face_is_framed() {
        for degrees in [-35.0f32, -5.0, 0.0, 12.0, 40.0] {
            let face = tilted_face(degrees, 2.0, [400.0, 300.0]);
            let a = align(&face, 256);
            assert!(
                (a.roll_degrees - degrees).abs() < 1e-3,
                "{} vs {degrees}",
                a.roll_degrees
            );
            let in_crop = face.map(&a.to_crop);
            let angle = in_crop.eye_line_angle().to_degrees();
            assert!(
                angle.abs() < 1e-3,
                "eye line still tilted by {angle} degrees"
            );
            let [l, t, r, b] = in_crop.bounds();
            assert!(
                l > 0.0 && t > 0.0 && r < 256.0 && b < 256.0,
                "{:?}",
                [l, t, r, b]
            );
            // 0.8 H of margin above the landmarks and 0.3 H below them.
            let h = b - t;
            assert!(h <= 256.0 / 2.1 + 0.5, "landmark height {h}");
        }
    }

    #[test]
    fn crop_scale_does_not_depend_on_face_size() {
        let small = align(&tilted_face(10.0, 1.0, [100.0, 100.0]), 256);
        let large = align(&tilted_face(10.0, 3.0, [900.0, 700.0]), 256);
        let small_eyes = tilted_face(10.0, 1.0, [100.0, 100.0])
            .map(&small.to_crop)
            .eye_centres();
        let large_eyes = tilted_face(10.0, 3.0, [900.0, 700.0])
            .map(&large.to_crop)
            .eye_centres();
        for (p, q) in small_eyes.iter().zip(&large_eyes) {
            assert!(
                (p[0] - q[0]).abs() < 1e-2 && (p[1] - q[1]).abs() < 1e-2,
                "{p:?} vs {q:?}"
            );
        }
        assert!((large.side_in_photo / small.side_in_photo - 3.0).abs() < 1e-3);
    }
}
