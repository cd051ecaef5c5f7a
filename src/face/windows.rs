//! Where the detector looks: the whole photo, plus overlapping tiles on large photos so
//! that small faces in group photos are seen at a usable resolution.

use crate::imageops::Affine;

/// Photos whose short side is at least this many pixels are also searched in tiles.
const TILE_FROM_SHORT_SIDE: u32 = 768;
/// Tiles overlap by this fraction of their side.
const TILE_OVERLAP: f32 = 0.25;
/// A second whole-photo window this much larger than the photo finds close-ups whose
/// face runs past the photo's edges.
const ZOOMED_OUT: f32 = 1.6;
/// A tile detection this close to an inner tile edge (fraction of the tile side) is cut
/// off by the tile; the neighbouring tile or the whole-photo pass sees the face whole.
const EDGE_MARGIN: f32 = 0.02;

/// A square region of the photo (it may extend past the photo's edges) that is resized
/// to the detector's input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Left edge, in photo pixels (negative when the window starts left of the photo).
    pub left: f32,
    /// Top edge, in photo pixels (negative when the window starts above the photo).
    pub top: f32,
    /// Side, in photo pixels.
    pub side: f32,
    /// Whether each edge (left, top, right, bottom) lies inside the photo, where a face
    /// can be cut in two.
    pub inner_edges: [bool; 4],
}

impl Window {
    /// Photo coordinates -> detector input coordinates (`input_size` square).
    pub fn to_input(&self, input_size: u32) -> Affine {
        Affine::scale(input_size as f32 / self.side)
            .then_after(Affine::translation(-self.left, -self.top))
    }

    /// Whether a box (photo coordinates, `[x, y, w, h]`) touches an edge of this window
    /// that lies inside the photo.
    pub fn cuts(&self, [x, y, w, h]: [f32; 4]) -> bool {
        let margin = EDGE_MARGIN * self.side;
        let [l, t, r, b] = self.inner_edges;
        (l && x < self.left + margin)
            || (t && y < self.top + margin)
            || (r && x + w > self.left + self.side - margin)
            || (b && y + h > self.top + self.side - margin)
    }
}

/// The windows searched first: the whole photo as one letterboxed square, then, on large
/// photos, a grid of square tiles of half the short side overlapping by a quarter; and the
/// whole photo zoomed out, searched only when the first windows may have missed a face.
pub fn detection_windows(width: u32, height: u32) -> (Vec<Window>, Window) {
    let (w, h) = (width as f32, height as f32);
    let side = w.max(h);
    let whole = |side: f32| Window {
        left: (w - side) / 2.0,
        top: (h - side) / 2.0,
        side,
        inner_edges: [false; 4],
    };
    let zoomed_out = whole(side * ZOOMED_OUT);
    let mut windows = vec![whole(side)];
    if width.min(height) < TILE_FROM_SHORT_SIDE {
        return (windows, zoomed_out);
    }
    let tile = w.min(h) / 2.0;
    let starts = |extent: f32| -> Vec<f32> {
        let stride = tile * (1.0 - TILE_OVERLAP);
        let count = ((extent - tile) / stride).ceil() as usize + 1;
        (0..count)
            .map(|i| (i as f32 * stride).min(extent - tile))
            .collect()
    };
    for top in starts(h) {
        for left in starts(w) {
            windows.push(Window {
                left,
                top,
                side: tile,
                inner_edges: [
                    left > 0.5,
                    top > 0.5,
                    left + tile < w - 0.5,
                    top + tile < h - 0.5,
                ],
            });
        }
    }
    (windows, zoomed_out)
}

/// Whether a box (`[x, y, w, h]`) comes within [`EDGE_MARGIN`] of the photo's side of an
/// edge of a `width` x `height` photo, where the face may run past the edge.
pub fn reaches_edge([x, y, w, h]: [f32; 4], width: u32, height: u32) -> bool {
    let margin = EDGE_MARGIN * width.max(height) as f32;
    x < margin || y < margin || x + w > width as f32 - margin || y + h > height as f32 - margin
}

/// Intersection over union of two `[x, y, w, h]` boxes.
pub fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let ix = ((a[0] + a[2]).min(b[0] + b[2]) - a[0].max(b[0])).max(0.0);
    let iy = ((a[1] + a[3]).min(b[1] + b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    let union = a[2] * a[3] + b[2] * b[3] - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Greedy non-maximum suppression: keeps the highest-scoring of each group of boxes that
/// overlap by more than `threshold` IoU. Items are `(score, box)`; returns kept indices.
pub fn suppress_overlaps(items: &[(f32, [f32; 4])], threshold: f32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&i, &j| items[j].0.total_cmp(&items[i].0));
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        if kept
            .iter()
            .all(|&k| iou(items[k].1, items[i].1) <= threshold)
        {
            kept.push(i);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_photos_get_whole_photo_windows() {
        let (windows, zoomed_out) = detection_windows(640, 480);
        assert_eq!(windows.len(), 1);
        assert_eq!(zoomed_out.side, 640.0 * ZOOMED_OUT);
        assert_eq!(zoomed_out.inner_edges, [false; 4]);
        let w = windows[0];
        assert_eq!((w.left, w.top, w.side), (0.0, -80.0, 640.0));
        let m = w.to_input(192);
        assert_eq!(m.apply([320.0, 240.0]), [96.0, 96.0]);
    }

    #[test]
    fn large_photos_are_covered_by_overlapping_tiles() {
        let (width, height) = (1920u32, 1280u32);
        let (windows, _) = detection_windows(width, height);
        let tiles = &windows[1..];
        assert!(tiles.len() >= 6, "{} tiles", tiles.len());
        // Every point of the photo lies in some tile, and every tile lies in the photo.
        for y in (0..height).step_by(37) {
            for x in (0..width).step_by(37) {
                let (x, y) = (x as f32, y as f32);
                assert!(tiles.iter().any(|t| x >= t.left
                    && x <= t.left + t.side
                    && y >= t.top
                    && y <= t.top + t.side));
            }
        }
        for t in tiles {
            assert!(t.left >= 0.0 && t.top >= 0.0);
            assert!(
                t.left + t.side <= width as f32 + 1e-3 && t.top + t.side <= height as f32 + 1e-3
            );
        }
        // A face of a quarter tile fits whole in some tile, away from its inner edges.
        let face = [1000.0, 700.0, 160.0, 160.0];
        assert!(tiles.iter().any(|t| {
            face[0] >= t.left
                && face[1] >= t.top
                && !t.cuts(face)
                && face[0] + face[2] <= t.left + t.side
        }));
    }

    #[test]
    fn only_faces_at_the_photo_edge_call_for_the_zoomed_out_window() {
        // 2 % of 640 px is 12.8 px.
        assert!(!reaches_edge([100.0, 80.0, 200.0, 200.0], 640, 480));
        assert!(!reaches_edge([13.0, 13.0, 614.0, 454.0], 640, 480));
        assert!(reaches_edge([12.0, 80.0, 200.0, 200.0], 640, 480));
        assert!(reaches_edge([100.0, 10.0, 200.0, 200.0], 640, 480));
        assert!(reaches_edge([500.0, 80.0, 130.0, 130.0], 640, 480));
        assert!(reaches_edge([100.0, 300.0, 200.0, 170.0], 640, 480));
        assert!(reaches_edge([-40.0, -30.0, 700.0, 600.0], 640, 480));
    }

    #[test]
    fn suppression_keeps_the_best_of_overlapping_boxes() {
        let items = [
            (0.6, [0.0, 0.0, 10.0, 10.0]),
            (0.9, [1.0, 1.0, 10.0, 10.0]),
            (0.8, [50.0, 50.0, 10.0, 10.0]),
        ];
        assert_eq!(suppress_overlaps(&items, 0.3), vec![1, 2]);
        assert_eq!(iou([0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 2.0, 2.0]), 2.0 / 6.0);
    }
}
