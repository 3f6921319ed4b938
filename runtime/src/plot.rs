//! The loss curve of a run as an SVG (plotters), drawn from its `metrics.jsonl` so that a
//! resumed run's plot covers every step, not just the last segment.

use plotters::prelude::*;
use std::path::Path;

/// Training losses by step and the evaluation loss (the last one written), from metrics lines.
pub fn read_losses(metrics: &str) -> (Vec<(u64, f32)>, Option<f32>) {
    let mut steps = Vec::new();
    let mut eval = None;
    for line in metrics.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
            // A resumed run rewrites the steps after its checkpoint; the later line wins.
            while steps.last().is_some_and(|&(s, _)| s >= step) {
                steps.pop();
            }
            steps.push((step, loss as f32));
        } else if let Some(loss) = v["eval_loss"].as_f64() {
            eval = Some(loss as f32);
        }
    }
    (steps, eval)
}

/// Draws the training loss (and the evaluation loss as a marked point at the last step) to
/// `out`, written to a temporary file and renamed into place.
pub fn write_loss_curve(
    title: &str,
    steps: &[(u64, f32)],
    eval: Option<f32>,
    out: &Path,
) -> Result<(), String> {
    let finite: Vec<(u64, f32)> = steps
        .iter()
        .copied()
        .filter(|(_, l)| l.is_finite())
        .collect();
    let Some(&(last, _)) = finite.last() else {
        return Err("no finite losses to plot".into());
    };
    let losses = finite.iter().map(|&(_, l)| l).chain(eval);
    let (lo, hi) = losses.fold((f32::MAX, f32::MIN), |(lo, hi), l| (lo.min(l), hi.max(l)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 420)).into_drawing_area();
        let draw = |e: DrawingAreaErrorKind<_>| e.to_string();
        root.fill(&WHITE).map_err(draw)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0u64..last.max(1), (lo - pad)..(hi + pad))
            .map_err(draw)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(draw)?;
        chart
            .draw_series(LineSeries::new(finite.iter().copied(), &BLUE))
            .map_err(draw)?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        if let Some(eval) = eval {
            chart
                .draw_series([Circle::new((last, eval), 5, RED.filled())])
                .map_err(draw)?
                .label("eval")
                .legend(|(x, y)| Circle::new((x + 8, y), 4, RED.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw)?;
        root.present().map_err(draw)?;
    }
    let tmp = out.with_extension("svg.tmp");
    std::fs::write(&tmp, svg).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumed_steps_replace_earlier_ones_and_eval_is_kept() {
        let metrics = r#"{"step":1,"loss":3.0}
{"step":2,"loss":2.5}
{"step":2,"loss":2.4}
{"step":3,"loss":2.0}
{"eval_loss":2.2,"perplexity":9.0}"#;
        let (steps, eval) = read_losses(metrics);
        assert_eq!(steps, vec![(1, 3.0), (2, 2.4), (3, 2.0)]);
        assert_eq!(eval, Some(2.2));
    }

    #[test]
    fn the_svg_has_the_curve_and_the_eval_point() {
        let out = std::env::temp_dir().join(format!("kiln-plot-{}.svg", std::process::id()));
        write_loss_curve("run", &[(1, 3.0), (2, 2.0), (3, f32::NAN)], Some(2.5), &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_file(&out).ok();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("<polyline"), "the loss line");
        assert!(svg.contains("<circle"), "the eval point");
        assert!(write_loss_curve("run", &[], None, &out).is_err());
    }
}
