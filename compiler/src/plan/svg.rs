//! `kiln plan --format svg`: one training step as the cost model sees it — per stage a row of
//! its timeline (`timeline`: forward, recompute, backward, tensor-parallel communication, the
//! idle bubble, the gradient synchronisation and the optimizer), beside it the memory of one of
//! the stage's devices against its capacity, and under it the step's breakdown and why the
//! runners-up lost. Deterministic: the same plan draws the same bytes.

use super::assemble::GIB;
use super::timeline::{timeline, Activity, Block};
use super::types::{render_range, ExecutionPlan};
use std::fmt::Write;

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 150.0;
const TIMELINE: f64 = 760.0;
const MEMORY_AT: f64 = LEFT + TIMELINE + 30.0;
const MEMORY: f64 = 220.0;
const ROW: f64 = 24.0;
const GAP: f64 = 10.0;
const TOP: f64 = 96.0;

/// Blocks narrower than this many pixels are drawn together with their neighbours (a plan of
/// thousands of microbatches would otherwise draw sub-pixel rectangles by the thousand).
const MIN_WIDTH: f64 = 6.0;

/// Consecutive blocks of one stage drawn together: the first and last, and the share of their
/// span each activity took (the rest of it idle).
struct Run<'t> {
    first: &'t Block,
    last: &'t Block,
    shares: [f64; Activity::ALL.len()],
}

impl<'t> Run<'t> {
    /// Shares of the run's span: what is left of it is idle.
    fn of(blocks: &'t [Block]) -> Self {
        let (first, last) = (&blocks[0], &blocks[blocks.len() - 1]);
        let span = last.end - first.start;
        let mut shares = [0.0; Activity::ALL.len()];
        for b in blocks {
            shares[b.activity as usize] += (b.end - b.start) / span.max(f64::MIN_POSITIVE);
        }
        Run {
            first,
            last,
            shares,
        }
    }

    fn seconds(&self) -> f64 {
        self.last.end - self.first.start
    }
}

/// The runs `blocks` (sorted by stage and time) are drawn as: a block alone when it lasts
/// `min_seconds` or more, else with the blocks that follow it (idle gaps under a quarter of
/// that included) up to that length; then neighbouring runs whose time is shared alike (within
/// 10 points each, as in a pipeline's steady state) are joined, so that a long plan draws as
/// its phases. A bubble longer than the gaps stays a gap.
fn runs(blocks: &[Block], min_seconds: f64) -> Vec<Run<'_>> {
    let back_to_back =
        |a: &Block, b: &Block| b.stage == a.stage && b.start - a.end <= min_seconds / 4.0;
    let mut fine: Vec<Run> = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len()
            && back_to_back(&blocks[j - 1], &blocks[j])
            && blocks[j].end - blocks[i].start <= min_seconds
        {
            j += 1;
        }
        fine.push(Run::of(&blocks[i..j]));
        i = j;
    }
    let mut joined: Vec<Run> = Vec::new();
    for run in fine {
        match joined.last_mut() {
            Some(prev)
                if back_to_back(prev.last, run.first)
                    && prev
                        .shares
                        .iter()
                        .zip(&run.shares)
                        .all(|(a, b)| (a - b).abs() <= 0.1) =>
            {
                let (a, b) = (prev.seconds(), run.seconds());
                let gap = run.first.start - prev.last.end;
                for (p, r) in prev.shares.iter_mut().zip(run.shares) {
                    *p = (*p * a + r * b) / (a + b + gap);
                }
                prev.last = run.last;
            }
            _ => joined.push(run),
        }
    }
    joined
}

/// Fill colour of each activity (Tableau 10).
fn colour(a: Activity) -> &'static str {
    match a {
        Activity::Forward => "#4e79a7",
        Activity::Recompute => "#e15759",
        Activity::Backward => "#f28e2b",
        Activity::TensorComm => "#76b7b2",
        Activity::DataSync => "#59a14f",
        Activity::Optimizer => "#b07aa1",
    }
}

fn name(a: Activity) -> &'static str {
    match a {
        Activity::Forward => "forward",
        Activity::Recompute => "recompute",
        Activity::Backward => "backward",
        Activity::TensorComm => "tensor-parallel comm",
        Activity::DataSync => "data-parallel / ZeRO comm",
        Activity::Optimizer => "optimizer",
    }
}

/// The memory parts, each with its colour.
const MEMORY_PARTS: [(&str, &str); 5] = [
    ("weights", "#4e79a7"),
    ("gradients", "#f28e2b"),
    ("optimizer", "#b07aa1"),
    ("activations", "#edc948"),
    ("buffers", "#bab0ac"),
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn seconds(x: f64) -> String {
    match x {
        x if x >= 1.0 => format!("{x:.3} s"),
        x if x >= 1e-3 => format!("{:.2} ms", x * 1e3),
        x => format!("{:.1} µs", x * 1e6),
    }
}

/// A tick at `t` seconds, ticks `step` apart: in the unit of the step, as many decimals as it
/// needs (`0`, `200 ms`, `2.5 s`).
fn tick_label(t: f64, step: f64) -> String {
    if t == 0.0 {
        return "0".into();
    }
    let (scale, unit) = match step {
        s if s >= 0.5 => (1.0, "s"),
        s if s >= 5e-4 => (1e3, "ms"),
        _ => (1e6, "µs"),
    };
    let decimals = (-(step * scale).log10().floor()).max(0.0) as usize;
    format!("{:.*} {unit}", decimals, t * scale)
}

/// A round tick spacing giving about `ticks` ticks over `span`.
fn tick_step(span: f64, ticks: f64) -> f64 {
    let raw = span / ticks;
    let decade = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|&step| step >= raw)
        .unwrap_or(10.0 * decade)
}

/// The plan as an SVG picture.
pub fn render_svg(p: &ExecutionPlan) -> String {
    let t = timeline(p);
    let span = t.end.max(1e-12);
    let x = |seconds: f64| LEFT + seconds / span * TIMELINE;
    let row_y = |stage: usize| TOP + stage as f64 * (ROW + GAP);
    let rows_end = row_y(t.stages);
    let notes = p.alternatives.len().min(3);
    let height = rows_end + 150.0 + notes as f64 * 16.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);

    // Header: what runs where, and the prediction.
    let s = &p.strategy;
    let _ = writeln!(
        o,
        r#"<text x="12" y="22" font-size="16" font-weight="bold">{}</text>"#,
        escape(&format!(
            "`{}`: one training step as the cost model sees it",
            p.experiment
        ))
    );
    let degrees = match s.data {
        0 => format!("pipeline {} on a submesh per stage", s.pipeline),
        _ => format!(
            "data {} × tensor {}{} × pipeline {}",
            s.data,
            s.tensor,
            if s.sequence_parallel { " (+sp)" } else { "" },
            s.pipeline
        ),
    };
    let lines = [
        format!(
            "{} = {} × {} {} ({} device{}) | {degrees} | {} microbatch{} | schedule {} | zero {} | recompute {} | attention {}",
            p.mesh.cluster, p.mesh.nodes, p.mesh.devices_per_node, p.mesh.device, p.mesh.devices, if p.mesh.devices == 1 { "" } else { "s" },
            s.microbatches, if s.microbatches == 1 { "" } else { "es" }, s.schedule, s.zero, s.recompute, s.attention
        ),
        format!(
            "step {} (this timeline: {}{}) | {:.0} tokens/s | {:.1} TFLOP/s per device | MFU {:.1}%",
            seconds(p.time.total),
            seconds(t.end),
            if t.complete { "" } else { ", its schedule not played to the end" },
            p.throughput.tokens_per_second,
            p.throughput.tflops_per_device,
            p.throughput.mfu * 100.0
        ),
    ];
    for (i, line) in lines.iter().enumerate() {
        let _ = writeln!(
            o,
            r#"<text x="12" y="{}">{}</text>"#,
            42 + 16 * i,
            escape(line)
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{MEMORY_AT}" y="{}" font-weight="bold">memory per device</text>"#,
        TOP - 10.0
    );
    let _ = writeln!(
        o,
        r#"<text x="{LEFT}" y="{}" font-weight="bold">time (idle: pipeline bubble)</text>"#,
        TOP - 10.0
    );

    // One row per stage: its background (idle), its blocks, its memory.
    for (stage, st) in p.stages.iter().enumerate() {
        let y = row_y(stage);
        let _ = writeln!(
            o,
            r#"<text x="12" y="{:.1}">stage {} · devices {}</text>"#,
            y + ROW * 0.65,
            st.index,
            render_range(&st.devices)
        );
        let _ = writeln!(
            o,
            r##"<rect x="{LEFT}" y="{y:.1}" width="{TIMELINE}" height="{ROW}" fill="#eeeeee"/>"##
        );
        let mut at = MEMORY_AT;
        let m = &st.memory;
        let scale = MEMORY / m.capacity.max(m.total).max(1.0);
        for ((part, fill), bytes) in MEMORY_PARTS.iter().zip([
            m.weights,
            m.gradients,
            m.optimizer,
            m.activations,
            m.buffers,
        ]) {
            let w = bytes * scale;
            // What would not show (under a hundredth of a pixel) is left out.
            if w >= 0.01 {
                let _ = writeln!(
                    o,
                    r#"<rect x="{at:.2}" y="{y:.1}" width="{w:.2}" height="{ROW}" fill="{fill}"><title>{part} {:.2} GiB</title></rect>"#,
                    bytes / GIB
                );
            }
            at += w;
        }
        let cap = MEMORY_AT + m.capacity * scale;
        let _ = writeln!(
            o,
            r#"<line x1="{cap:.2}" y1="{:.1}" x2="{cap:.2}" y2="{:.1}" stroke="black" stroke-width="2"/>"#,
            y - 3.0,
            y + ROW + 3.0
        );
        let _ = writeln!(
            o,
            r#"<text x="{MEMORY_AT}" y="{:.1}" font-size="10">{:.1} of {:.1} GiB</text>"#,
            y + ROW + 9.0,
            m.total / GIB,
            m.capacity / GIB
        );
    }
    for run in runs(&t.blocks, MIN_WIDTH * span / TIMELINE) {
        let (first, last) = (run.first, run.last);
        let what = match (std::ptr::eq(first, last), first.label.is_empty()) {
            (true, true) => name(first.activity).to_string(),
            (true, false) => format!("{} {}", first.label, name(first.activity)),
            (false, _) => {
                let mix: Vec<String> = Activity::ALL
                    .iter()
                    .zip(run.shares)
                    .filter(|(_, share)| *share >= 0.005)
                    .map(|(a, share)| format!("{} {:.0}%", name(*a), share * 100.0))
                    .chain(
                        Some(1.0 - run.shares.iter().sum::<f64>())
                            .filter(|idle| *idle >= 0.005)
                            .map(|idle| format!("idle {:.0}%", idle * 100.0)),
                    )
                    .collect();
                match first.label.is_empty() || last.label.is_empty() {
                    true => mix.join(", "),
                    false => format!("{} to {}: {}", first.label, last.label, mix.join(", ")),
                }
            }
        };
        let (x0, x1) = (x(first.start), x(last.end));
        let _ = writeln!(
            o,
            r#"<g><title>{} {}</title>"#,
            escape(&what),
            seconds(run.seconds())
        );
        // Each activity a band of the row as high as its share of the run's time.
        let mut y = row_y(first.stage);
        for (a, share) in Activity::ALL.iter().zip(run.shares) {
            if share > 0.0 {
                let h = ROW * share;
                let _ = writeln!(
                    o,
                    r#"<rect x="{x0:.2}" y="{y:.2}" width="{:.2}" height="{h:.2}" fill="{}"/>"#,
                    (x1 - x0).max(0.05),
                    colour(*a)
                );
                y += h;
            }
        }
        o.push_str("</g>\n");
    }

    // The time axis.
    let step = tick_step(span, 8.0);
    let ticks = match span.is_finite() && step.is_finite() {
        true => ((span / step * (1.0 + 1e-9)).floor() as usize).min(100),
        false => 0,
    };
    for i in 0..=ticks {
        let tick = i as f64 * step;
        let _ = writeln!(
            o,
            r##"<line x1="{0:.2}" y1="{1:.1}" x2="{0:.2}" y2="{2:.1}" stroke="#888888"/><text x="{0:.2}" y="{3:.1}" font-size="10" text-anchor="middle">{4}</text>"##,
            x(tick),
            rows_end - GAP,
            rows_end - GAP + 5.0,
            rows_end + 8.0,
            tick_label(tick, step)
        );
    }

    // Legend and the step's breakdown.
    let legend_y = rows_end + 30.0;
    let mut lx = LEFT;
    for a in Activity::ALL {
        let _ = writeln!(
            o,
            r#"<rect x="{lx}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{}" y="{legend_y:.1}">{}</text>"#,
            legend_y - 10.0,
            colour(a),
            lx + 16.0,
            name(a)
        );
        lx += 16.0 + 7.0 * name(a).len() as f64 + 18.0;
    }
    let time = &p.time;
    let parts = [
        ("compute", time.compute),
        ("recompute", time.recompute),
        ("tensor-parallel comm", time.tensor_comm),
        ("pipeline bubble", time.pipeline_bubble),
        ("pipeline transfers", time.p2p),
        ("data-parallel / ZeRO comm", time.data_parallel),
        ("optimizer", time.optimizer),
    ];
    let breakdown: Vec<String> = parts
        .iter()
        .filter(|(_, s)| *s > 0.0)
        .map(|(what, s)| {
            format!(
                "{what} {} ({:.1}%)",
                seconds(*s),
                100.0 * s / time.total.max(1e-12)
            )
        })
        .collect();
    let _ = writeln!(
        o,
        r#"<text x="12" y="{:.1}">{}</text>"#,
        legend_y + 24.0,
        escape(&format!(
            "step {}: {}",
            seconds(time.total),
            breakdown.join(" · ")
        ))
    );
    let _ = writeln!(
        o,
        r#"<text x="12" y="{:.1}" font-weight="bold">{}</text>"#,
        legend_y + 48.0,
        match notes {
            0 => "no runners-up (a manual plan, or nothing else fits)",
            _ => "runners-up, and why they lost:",
        }
    );
    for (i, alt) in p.alternatives.iter().take(notes).enumerate() {
        let _ = writeln!(
            o,
            r#"<text x="24" y="{:.1}">{}</text>"#,
            legend_y + 66.0 + 16.0 * i as f64,
            escape(&format!(
                "{}: {}, {}",
                alt.strategy,
                seconds(alt.step_time),
                alt.why
            ))
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn ticks_are_round_numbers() {
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b;
        assert!(close(super::tick_step(17.57, 8.0), 5.0));
        assert!(close(super::tick_step(0.0123, 8.0), 0.002));
        assert!(close(super::tick_step(1.0, 10.0), 0.1));
        assert_eq!(super::tick_label(0.0, 0.2), "0");
        assert_eq!(super::tick_label(0.4, 0.2), "400 ms");
        assert_eq!(super::tick_label(1.5, 0.5), "1.5 s");
        assert_eq!(super::tick_label(10.0, 5.0), "10 s");
        assert_eq!(super::tick_label(0.00025, 0.00005), "250 µs");
    }
}
