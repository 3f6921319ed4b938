//! The loss curve of a run as an SVG (plotters), drawn from its `metrics.jsonl` so that a
//! resumed run's plot covers every step, not just the last segment.

use plotters::prelude::*;
use std::path::Path;

/// Losses by step.
pub type Curve = Vec<(u64, f32)>;

/// Training and evaluation losses by step, from metrics lines (an evaluation line carries the
/// step it followed).
pub fn read_losses(metrics: &str) -> (Curve, Curve) {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in metrics.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_u64() else {
            continue;
        };
        let (series, loss) = match (v["loss"].as_f64(), v["eval_loss"].as_f64()) {
            (Some(loss), _) => (&mut train, loss),
            (None, Some(loss)) => (&mut eval, loss),
            (None, None) => continue,
        };
        // Should a log hold a step twice, the later line wins.
        while series.last().is_some_and(|&(s, _)| s >= step) {
            series.pop();
        }
        series.push((step, loss as f32));
    }
    (train, eval)
}

/// Draws the training loss and the evaluation losses (a marked line) to `out`, written to a
/// temporary file and renamed into place.
pub fn write_loss_curve(
    title: &str,
    steps: &[(u64, f32)],
    eval: &[(u64, f32)],
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
    let eval: Vec<(u64, f32)> = eval
        .iter()
        .copied()
        .filter(|(_, l)| l.is_finite())
        .collect();
    let losses = finite.iter().chain(&eval).map(|&(_, l)| l);
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
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), &RED))
                .map_err(draw)?;
            chart
                .draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))
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
    crate::store::safetensors::write_atomic(out, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_steps_keep_the_later_line_and_evaluations_have_their_steps() {
        let metrics = r#"{"step":1,"loss":3.0}
{"step":2,"loss":2.5}
{"step":2,"eval_loss":2.6,"perplexity":13.5}
{"step":2,"loss":2.4}
{"step":3,"loss":2.0}
{"step":3,"eval_loss":2.2,"perplexity":9.0}"#;
        let (steps, eval) = read_losses(metrics);
        assert_eq!(steps, vec![(1, 3.0), (2, 2.4), (3, 2.0)]);
        assert_eq!(eval, vec![(2, 2.6), (3, 2.2)]);
    }

    #[test]
    fn the_svg_has_the_curve_and_the_eval_point() {
        let out = std::env::temp_dir().join(format!("kiln-plot-{}.svg", std::process::id()));
        write_loss_curve(
            "run",
            &[(1, 3.0), (2, 2.0), (3, f32::NAN)],
            &[(2, 2.5)],
            &out,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_file(&out).ok();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("<polyline"), "the loss line");
        assert!(svg.contains("<circle"), "the eval point");
        assert!(write_loss_curve("run", &[], &[], &out).is_err());
    }
}
