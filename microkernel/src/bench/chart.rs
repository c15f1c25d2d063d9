//! The chart of docs/PERFORMANCE.md: swap pause against state size, next to its floor.

use std::path::Path;

use plotters::prelude::*;

use super::Row;

/// The state size of a swap pause row, in KiB (from the `(N B)` its measure ends with).
fn size_kib(row: &Row) -> Option<f64> {
    let bytes = row.measure.rsplit_once('(')?.1.strip_suffix(" B)")?;
    Some(bytes.parse::<f64>().ok()? / 1024.0)
}

/// Draws the pauses (ms) and their floors against the state size (KiB), both axes
/// logarithmic, into an SVG file.
pub(super) fn swap_pause(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let points: Vec<(f64, f64, f64)> = rows
        .iter()
        .filter_map(|row| Some((size_kib(row)?, row.value.max(1e-3), row.floor.max(1e-3))))
        .collect();
    draw(path, &points).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

fn draw(
    path: &Path,
    points: &[(f64, f64, f64)],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = points.iter().map(|p| p.0).fold(2.0, f64::max) * 2.0;
    let y_min = points.iter().map(|p| p.2.min(p.1)).fold(1.0, f64::min) / 2.0;
    let y_max = points.iter().map(|p| p.1.max(p.2)).fold(1.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Swap pause (requests held) against state size",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((0.5f64..x_max).log_scale(), (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("kv state (KiB)")
        .y_desc("milliseconds (median)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()?;
    let pause: Vec<(f64, f64)> = points.iter().map(|p| (p.0, p.1)).collect();
    let floor: Vec<(f64, f64)> = points.iter().map(|p| (p.0, p.2)).collect();
    let host = RGBColor(0xc0, 0x39, 0x2b);
    let direct = RGBColor(0x2c, 0x3e, 0x50);
    chart
        .draw_series(LineSeries::new(pause.clone(), host.stroke_width(2)))?
        .label("swap pause through the host")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], host.stroke_width(2)));
    chart.draw_series(pause.iter().map(|&p| Circle::new(p, 4, host.filled())))?;
    chart
        .draw_series(LineSeries::new(floor.clone(), direct.stroke_width(2)))?
        .label("floor: export, seal + durable write, import, start, directly")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], direct.stroke_width(2)));
    chart.draw_series(
        floor
            .iter()
            .map(|&p| TriangleMarker::new(p, 5, direct.filled())),
    )?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
