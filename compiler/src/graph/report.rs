//! `kiln graph`: a per-layer table, Graphviz DOT (layers as clusters, trainable parameters
//! highlighted) and JSON.

use super::ir::*;
use std::fmt::Write;

/// Per-layer totals.
struct Row {
    name: String,
    params: u64,
    trainable: u64,
    flops_fwd: f64,
    flops_bwd: f64,
    saved: f64,
}

fn rows(g: &Graph) -> Vec<Row> {
    let mut rows: Vec<Row> = g
        .layers
        .iter()
        .map(|l| Row {
            name: l.name.clone(),
            params: 0,
            trainable: 0,
            flops_fwd: 0.0,
            flops_bwd: 0.0,
            saved: 0.0,
        })
        .collect();
    for p in &g.params {
        rows[p.layer].params += p.numel();
        if p.trainable {
            rows[p.layer].trainable += p.numel();
        }
    }
    for n in g.dag.node_weights() {
        let r = &mut rows[n.layer];
        r.flops_fwd += n.cost.flops_fwd;
        r.flops_bwd += n.cost.flops_bwd_input + n.cost.flops_bwd_weight;
        r.saved += n.cost.saved_bytes;
    }
    rows
}

/// A number with an SI suffix, three significant digits: `124M`, `1.35T`.
pub fn si(x: f64) -> String {
    let units = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, unit) in units {
        if x.abs() >= scale {
            return format!("{}{unit}", three_digits(x / scale));
        }
    }
    three_digits(x)
}

fn three_digits(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn bytes(x: f64) -> String {
    let units = [
        (1u64 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (scale, unit) in units {
        if x >= scale as f64 {
            return format!("{} {unit}", three_digits(x / scale as f64));
        }
    }
    format!("{x:.0} B")
}

/// The compact table: one row per layer, runs of identical blocks folded into one row.
pub fn render_table(g: &Graph) -> String {
    let rows = rows(g);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "layer", "params", "trainable", "fwd FLOPs", "bwd FLOPs", "activations"
    );
    let mut i = 0;
    while i < rows.len() {
        let r = &rows[i];
        // Fold consecutive blocks with identical numbers (`block.0-11`).
        let mut j = i + 1;
        while j < rows.len()
            && g.layers[j].kind == LayerKind::Block
            && g.layers[i].kind == LayerKind::Block
            && same(&rows[j], r)
        {
            j += 1;
        }
        let name = if j - i > 1 {
            format!(
                "{}-{}",
                r.name,
                rows[j - 1].name.trim_start_matches("block.")
            )
        } else {
            r.name.clone()
        };
        let each = if j - i > 1 { " each" } else { "" };
        let _ = writeln!(
            out,
            "{:<16} {:>10} {:>10} {:>10} {:>10} {:>11}{each}",
            name,
            si(r.params as f64),
            si(r.trainable as f64),
            si(r.flops_fwd),
            si(r.flops_bwd),
            bytes(r.saved)
        );
        i = j;
    }
    let total = g.totals(|_| true);
    let _ = writeln!(
        out,
        "{:<16} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "total",
        si(g.total_params() as f64),
        si(g.trainable_params() as f64),
        si(total.flops_fwd),
        si(total.flops_bwd),
        bytes(total.saved_bytes)
    );
    let _ = writeln!(
        out,
        "\n{} parameters, {} trainable ({:.4}%); {} nodes; batch {} × {} tokens, {:?}",
        g.total_params(),
        g.trainable_params(),
        100.0 * g.trainable_params() as f64 / g.total_params().max(1) as f64,
        g.dag.node_count(),
        g.batch,
        g.seq,
        g.dtype
    );
    out
}

fn same(a: &Row, b: &Row) -> bool {
    a.params == b.params
        && a.trainable == b.trainable
        && a.flops_fwd == b.flops_fwd
        && a.flops_bwd == b.flops_bwd
        && a.saved == b.saved
}

/// Graphviz DOT: one cluster per layer; nodes with trainable parameters filled.
pub fn render_dot(g: &Graph) -> String {
    let mut out = String::from(
        "digraph kiln {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n",
    );
    for (l, layer) in g.layers.iter().enumerate() {
        let _ = writeln!(
            out,
            "  subgraph cluster_{l} {{\n    label=\"{}\";",
            layer.name
        );
        for n in g.dag.node_indices().filter(|&n| g.dag[n].layer == l) {
            let node = &g.dag[n];
            let trainable = node.op.params().iter().any(|&p| g.params[p].trainable);
            let style = if trainable {
                ", style=filled, fillcolor=\"#ffd27f\""
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "    n{} [label=\"{}\\n{} {:?}\"{style}];",
                n.index(),
                node.name,
                node.op.kind(),
                node.out.shape
            );
        }
        out.push_str("  }\n");
    }
    for e in g.dag.edge_indices() {
        if let Some((a, b)) = g.dag.edge_endpoints(e) {
            let _ = writeln!(out, "  n{} -> n{};", a.index(), b.index());
        }
    }
    out.push_str("}\n");
    out
}

/// JSON: layers, parameters and nodes (with inputs by index) in topological order.
pub fn render_json(g: &Graph) -> String {
    let order = g.topo_order();
    let position: std::collections::HashMap<usize, usize> = order
        .iter()
        .enumerate()
        .map(|(i, n)| (n.index(), i))
        .collect();
    let nodes: Vec<serde_json::Value> = order
        .iter()
        .map(|&n| {
            let mut v = serde_json::to_value(&g.dag[n]).unwrap_or_default();
            let inputs: Vec<usize> = g.inputs(n).iter().map(|i| position[&i.index()]).collect();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("inputs".into(), serde_json::json!(inputs));
            }
            v
        })
        .collect();
    let json = serde_json::json!({
        "batch": g.batch,
        "seq": g.seq,
        "dtype": g.dtype,
        "params_total": g.total_params(),
        "params_trainable": g.trainable_params(),
        "layers": g.layers,
        "params": g.params,
        "nodes": nodes,
        "loss": g.loss.map(|l| position[&l.index()]),
    });
    let mut text = serde_json::to_string_pretty(&json).unwrap_or_default();
    text.push('\n');
    text
}
