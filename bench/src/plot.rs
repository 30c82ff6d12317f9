//! The accuracy plot, drawn without text so it needs no system font: two panels, one above
//! the other, sharing the time axis (one vertical grid line per second).
//!
//! - Top: offered packets per second through each gateway and in total, with a horizontal
//!   grid line every 1000 packets per second.
//! - Bottom: passed packets per second through each gateway and in total, with a horizontal
//!   grid line every 250 packets per second. The limit is a thick grey line.
//!
//! Colours, in both panels: gateway 1 red, gateway 2 blue, gateway 3 green, total black.
//! Each second's figure is drawn at the middle of that second.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::accuracy::Accuracy;

pub const ACCURACY_PLOT: &str = "bench-fleet-accuracy.png";

const GATEWAY_COLOURS: [RGBColor; 3] = [
    RGBColor(220, 40, 40),
    RGBColor(40, 80, 220),
    RGBColor(30, 150, 60),
];
const GRID: RGBColor = RGBColor(225, 225, 225);
const LIMIT: RGBColor = RGBColor(150, 150, 150);

pub fn draw_accuracy(accuracy: &Accuracy, path: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (top, bottom) = root.split_vertically(330);

    let offered_total = sum_columns(&accuracy.offered_per_gateway);
    let offered_max = offered_total.iter().copied().max().unwrap_or(0).max(1000);
    draw_panel(
        &top,
        &accuracy.offered_per_gateway,
        &offered_total,
        round_up(offered_max + offered_max / 10, 1000),
        1000,
        None,
    )?;

    let passed_max = accuracy
        .passed_total
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(accuracy.limit_per_second);
    let passed_top = round_up(passed_max + passed_max / 10, 250);
    draw_panel(
        &bottom,
        &accuracy.passed_per_gateway,
        &accuracy.passed_total,
        passed_top,
        250,
        Some(accuracy.limit_per_second),
    )?;

    root.present().map_err(plot_error)?;
    Ok(())
}

/// Draws one panel: grid, optional limit line, one line per gateway and the total.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    per_gateway: &[Vec<u64>],
    total: &[u64],
    y_max: u64,
    y_step: u64,
    limit: Option<u64>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let seconds = total.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .margin(20)
        .build_cartesian_2d(0f64..seconds, 0f64..y_max as f64)
        .map_err(plot_error)?;

    for second in 0..=total.len() {
        let x = second as f64;
        chart
            .draw_series(LineSeries::new([(x, 0.0), (x, y_max as f64)], GRID))
            .map_err(plot_error)?;
    }
    for step in (0..=y_max).step_by(y_step.max(1) as usize) {
        let y = step as f64;
        chart
            .draw_series(LineSeries::new([(0.0, y), (seconds, y)], GRID))
            .map_err(plot_error)?;
    }
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (seconds, 0.0)], BLACK))
        .map_err(plot_error)?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (0.0, y_max as f64)], BLACK))
        .map_err(plot_error)?;
    if let Some(limit) = limit {
        let y = limit as f64;
        chart
            .draw_series(LineSeries::new(
                [(0.0, y), (seconds, y)],
                LIMIT.stroke_width(4),
            ))
            .map_err(plot_error)?;
    }

    for (gateway, values) in per_gateway.iter().enumerate() {
        let colour = GATEWAY_COLOURS[gateway % GATEWAY_COLOURS.len()];
        chart
            .draw_series(LineSeries::new(points(values), colour.stroke_width(2)))
            .map_err(plot_error)?;
    }
    chart
        .draw_series(LineSeries::new(points(total), BLACK.stroke_width(3)))
        .map_err(plot_error)?;
    Ok(())
}

fn points(values: &[u64]) -> Vec<(f64, f64)> {
    values
        .iter()
        .enumerate()
        .map(|(second, value)| (second as f64 + 0.5, *value as f64))
        .collect()
}

fn sum_columns(rows: &[Vec<u64>]) -> Vec<u64> {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    (0..len)
        .map(|index| rows.iter().filter_map(|row| row.get(index)).sum())
        .collect()
}

fn round_up(value: u64, step: u64) -> u64 {
    value.div_ceil(step) * step
}

fn plot_error<E: std::error::Error + Send + Sync + 'static>(
    error: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow!("failed to draw the accuracy plot: {error}")
}
