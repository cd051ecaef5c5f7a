//! `toonbot train plot`: KID and identity against CPU-hours, one curve per run, from the
//! evaluation results that `tools/compare-fast.sh` (and the long run's segments) append
//! as JSON lines: `{"variant", "cpu_s", "kid_x100", "kid_std_x100", "identity_cosine"}`.
//!
//! Two special variants: `init` (the shared starting point, drawn at 0 CPU-hours at the
//! start of every curve) and `baseline` (the do-nothing baseline, a dashed line with the
//! ship bar at half of it and the resolution bar at a third).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Deserialize;

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 480;
const FONT: &str = "sans-serif";

/// One evaluation, as the results file holds it.
#[derive(Debug, Clone, Deserialize)]
pub struct EvalRow {
    /// The run it belongs to, or `init` / `baseline`.
    pub variant: String,
    /// CPU-seconds (user + sys) the run had used when evaluated.
    pub cpu_s: f64,
    /// KID x100 against the held-out cartoons (lower is closer).
    pub kid_x100: f64,
    /// Standard deviation of the KID x100 over subsets.
    pub kid_std_x100: f64,
    /// Mean photo/cartoon face-embedding cosine.
    pub identity_cosine: f64,
}

/// A run's evaluations in CPU order, starting from the shared init when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// The run's variant name, shown in the legend.
    pub name: String,
    /// (CPU-hours, KID x100, its std, identity cosine).
    pub points: Vec<(f64, f64, f64, f64)>,
}

/// The results file's rows grouped into curves, and the baseline's KID x100.
pub fn curves(rows: &[EvalRow]) -> (Vec<Curve>, Option<f64>) {
    let point = |r: &EvalRow| {
        (
            r.cpu_s / 3600.0,
            r.kid_x100,
            r.kid_std_x100,
            r.identity_cosine,
        )
    };
    let init = rows.iter().find(|r| r.variant == "init").map(point);
    let baseline = rows
        .iter()
        .find(|r| r.variant == "baseline")
        .map(|r| r.kid_x100);
    let mut runs: BTreeMap<&str, Vec<(f64, f64, f64, f64)>> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| !["init", "baseline"].contains(&&*r.variant))
    {
        runs.entry(&r.variant).or_default().push(point(r));
    }
    let curves = runs
        .into_iter()
        .map(|(name, mut points)| {
            points.extend(init);
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Curve {
                name: name.to_string(),
                points,
            }
        })
        .collect();
    (curves, baseline)
}

/// Reads a results file (JSON lines; other keys are ignored).
pub fn read_rows(path: &Path) -> Result<Vec<EvalRow>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

/// Draws KID x100 (with ±std bars) and identity against CPU-hours side by side into a PNG
/// at `out`, the labels in the TrueType font at `font`.
pub fn plot(curves: &[Curve], baseline: Option<f64>, font: &Path, out: &Path) -> Result<()> {
    anyhow::ensure!(
        curves.iter().any(|c| !c.points.is_empty()),
        "nothing to plot: no evaluated runs"
    );
    let bytes =
        std::fs::read(font).with_context(|| format!("reading the font {}", font.display()))?;
    plotters::style::register_font(FONT, FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("{} is not a TrueType/OpenType font", font.display()))?;

    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let (left, right) = root.split_horizontally(WIDTH / 2);
        let points = curves.iter().flat_map(|c| &c.points);
        let max_x = points.clone().map(|p| p.0).fold(0.0, f64::max).max(0.1) * 1.05;
        let max_kid = points
            .clone()
            .map(|p| p.1 + p.2)
            .chain(baseline)
            .fold(0.0, f64::max)
            * 1.1;
        let min_id = points.map(|p| p.3).fold(1.0, f64::min).min(0.5) - 0.05;
        let colour = |i: usize| Palette99::pick(i).to_rgba();

        let mut kid = ChartBuilder::on(&left)
            .caption("KID x100 (held out; lower is better)", (FONT, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..max_x, 0.0..max_kid)
            .map_err(draw_error)?;
        kid.configure_mesh()
            .x_desc("CPU-hours from the shared init")
            .label_style((FONT, 14))
            .draw()
            .map_err(draw_error)?;
        if let Some(b) = baseline {
            for (fraction, label) in [(1.0, "do-nothing"), (0.5, "ship bar"), (1.0 / 3.0, "done")] {
                let y = b * fraction;
                kid.draw_series(DashedLineSeries::new(
                    [(0.0, y), (max_x, y)],
                    6,
                    4,
                    BLACK.mix(0.5).stroke_width(1),
                ))
                .map_err(draw_error)?
                .label(format!("{label} ({y:.1})"))
                .legend(|(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], BLACK.mix(0.5).stroke_width(1))
                });
            }
        }
        for (i, c) in curves.iter().enumerate() {
            let style = colour(i).stroke_width(2);
            kid.draw_series(LineSeries::new(c.points.iter().map(|p| (p.0, p.1)), style))
                .map_err(draw_error)?
                .label(&c.name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], style));
            kid.draw_series(c.points.iter().map(|p| {
                ErrorBar::new_vertical(p.0, p.1 - p.2, p.1, p.1 + p.2, colour(i).filled(), 6)
            }))
            .map_err(draw_error)?;
        }
        kid.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_error)?;

        let mut identity = ChartBuilder::on(&right)
            .caption("identity cosine (photo vs cartoon)", (FONT, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..max_x, min_id..1.0)
            .map_err(draw_error)?;
        identity
            .configure_mesh()
            .x_desc("CPU-hours from the shared init")
            .label_style((FONT, 14))
            .draw()
            .map_err(draw_error)?;
        identity
            .draw_series(DashedLineSeries::new(
                [(0.0, 0.5), (max_x, 0.5)],
                6,
                4,
                BLACK.mix(0.5).stroke_width(1),
            ))
            .map_err(draw_error)?;
        for (i, c) in curves.iter().enumerate() {
            let style = colour(i).stroke_width(2);
            identity
                .draw_series(LineSeries::new(c.points.iter().map(|p| (p.0, p.3)), style))
                .map_err(draw_error)?;
            identity
                .draw_series(
                    c.points
                        .iter()
                        .map(|p| Circle::new((p.0, p.3), 3, colour(i).filled())),
                )
                .map_err(draw_error)?;
        }
        root.present().map_err(draw_error)?;
    }
    let image = image::RgbImage::from_raw(WIDTH, HEIGHT, pixels).expect("buffer of the size");
    image
        .save(out)
        .with_context(|| format!("writing {}", out.display()))
}

fn draw_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(variant: &str, cpu_s: f64, kid: f64) -> EvalRow {
        EvalRow {
            variant: variant.into(),
            cpu_s,
            kid_x100: kid,
            kid_std_x100: 0.5,
            identity_cosine: 0.8,
        }
    }

    #[test]
    fn rows_group_into_curves_from_the_shared_init() {
        let rows = [
            row("baseline", 0.0, 18.0),
            row("init", 0.0, 15.0),
            row("b", 7200.0, 9.0),
            row("a", 3600.0, 12.0),
            row("b", 3600.0, 11.0),
        ];
        let (curves, baseline) = curves(&rows);
        assert_eq!(baseline, Some(18.0));
        let names: Vec<&str> = curves.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let kids: Vec<Vec<f64>> = curves
            .iter()
            .map(|c| c.points.iter().map(|p| p.1).collect())
            .collect();
        assert_eq!(kids, [vec![15.0, 12.0], vec![15.0, 11.0, 9.0]]);
        assert_eq!(curves[1].points[2].0, 2.0);
    }
}
