//! Devices, nodes and clusters.

use super::limits;
use super::read::*;
use super::types::*;
use crate::diagnostics::{did_you_mean, Code, Diagnostic};
use crate::resolve::units::Dim;
use crate::resolve::{RecordKind, Spanned, Value};
use crate::syntax::DefKind;
use std::collections::BTreeMap;

/// Checks that `v` is a record defined as `kind` (or a plain record), reporting a misspelt
/// reference with the definitions of that kind in scope.
pub fn expect_def<'c, 'e, 'p>(
    cx: &'c Cx<'e, 'p>,
    v: &Spanned,
    kind: DefKind,
    path: &str,
) -> Option<Rec<'c, 'e, 'p>> {
    let unknown = |name: &str, module| {
        let names = cx.ev.visible_names(module, Some(kind));
        let mut d = Diagnostic::new(Code::UnknownName, format!("unknown {kind} `{name}`")).at(
            name_span(cx, v.span, name),
            format!("no {kind} of this name"),
        );
        d = match did_you_mean(name, names.iter().copied()) {
            Some(s) => d.help(format!("did you mean `{s}`?")),
            None if names.is_empty() => d.help(format!(
                "import the module that defines it (for example `import std.{}`)",
                if kind == DefKind::Model {
                    "models.gpt2"
                } else {
                    "clusters"
                }
            )),
            None => d.help(format!("{kind}s in scope: {}", names.join(", "))),
        };
        cx.report(d);
    };
    match &v.value {
        Value::Record(r) => match &r.kind {
            RecordKind::Def { kind: k, name, .. } if *k == kind => {
                Some(Rec::new(cx, r.clone(), path, format!("{kind} `{name}`")))
            }
            RecordKind::Plain => Some(Rec::new(cx, r.clone(), path, kind.as_str())),
            RecordKind::Tag { name, module } => {
                unknown(name, *module);
                None
            }
            RecordKind::Def { .. } => {
                cx.type_error(v, &format!("a {kind}"));
                None
            }
        },
        Value::Symbol { name, module } => {
            unknown(name, *module);
            None
        }
        _ => {
            cx.type_error(v, &format!("a {kind}"));
            None
        }
    }
}

pub fn device(cx: &Cx, v: &Spanned, path: &str) -> Option<Device> {
    let mut r = expect_def(cx, v, DefKind::Device, path)?;
    let name = r.record.kind.name().unwrap_or("device").to_string();
    let peak = r.req("peak", peak);
    let matmul_efficiency = r.req("matmul_efficiency", |cx, v| {
        number_where(cx, v, "in (0, 1]", |x| x > 0.0 && x <= 1.0)
    });
    let attention_efficiency = r.opt("attention_efficiency", |cx, v| {
        number_where(cx, v, "in (0, 1]", |x| x > 0.0 && x <= 1.0)
    });
    let memory = r.req("memory", |cx, v| quantity(cx, v, Dim::Bytes));
    let memory_reserve = r.or("memory_reserve", 0.0, |cx, v| quantity(cx, v, Dim::Bytes));
    let hbm_bandwidth = r.req("hbm_bandwidth", |cx, v| quantity(cx, v, Dim::Bandwidth));
    let activation_overhead = r.or("activation_overhead", 1.0, |cx, v| {
        number_where(cx, v, "at least 1", |x| x >= 1.0)
    });
    let weight_copies = r.or("weight_copies", 1.0, |cx, v| {
        number_where(cx, v, "at least 1", |x| x >= 1.0)
    });
    let flash_attention = r.or("flash_attention", false, boolean);
    let multiprocessors = r.opt("multiprocessors", positive);
    let reserve_span = r.span_of("memory_reserve");
    r.finish();
    let (memory, memory_reserve) = (memory?, memory_reserve?);
    if memory_reserve >= memory {
        cx.report(
            Diagnostic::new(Code::Range, "the memory reserve leaves no memory to use")
                .at(reserve_span, "at least the device's memory"),
        );
        return None;
    }
    Some(Device {
        name,
        peak: peak?,
        attention_efficiency: attention_efficiency?.or(matmul_efficiency)?,
        matmul_efficiency: matmul_efficiency?,
        memory,
        memory_reserve,
        hbm_bandwidth: hbm_bandwidth?,
        activation_overhead: activation_overhead?,
        weight_copies: weight_copies?,
        flash_attention: flash_attention?,
        multiprocessors: multiprocessors?,
    })
}

const PRECISIONS: &[(&str, Precision)] = &[
    ("f32", Precision::F32),
    ("tf32", Precision::Tf32),
    ("bf16", Precision::Bf16),
    ("f16", Precision::F16),
];

pub fn precision(cx: &Cx, v: &Spanned) -> Option<Precision> {
    choice(cx, v, "precision", PRECISIONS)
}

fn peak(cx: &Cx, v: &Spanned) -> Option<BTreeMap<Precision, f64>> {
    let r = record(cx, v, "", "a record of FLOP/s by precision")?;
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (name, field) in &r.record.fields {
        let key = Spanned {
            value: Value::Symbol {
                name: name.clone(),
                module: crate::resolve::ModuleId(0),
            },
            span: field.key_span,
        };
        let Some(p) = precision(cx, &key) else {
            ok = false;
            continue;
        };
        match cx
            .ev
            .field(&r.record, name)
            .and_then(|v| quantity(cx, &v, Dim::FlopRate))
        {
            Some(f) => {
                out.insert(p, f);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

pub fn node(cx: &Cx, v: &Spanned, path: &str) -> Option<Node> {
    let mut r = expect_def(cx, v, DefKind::Node, path)?;
    let name = r.record.kind.name().unwrap_or("node").to_string();
    let device_path = r.child_path("device");
    let device = r
        .required("device")
        .and_then(|v| device(cx, &v, &device_path));
    let devices = r.req("devices", size(limits::NODE_DEVICES));
    let intra_bandwidth = r.req("intra_bandwidth", |cx, v| quantity(cx, v, Dim::Bandwidth));
    let intra_latency = r.req("intra_latency", |cx, v| quantity(cx, v, Dim::Time));
    let inter_bandwidth = r.req("inter_bandwidth", |cx, v| quantity(cx, v, Dim::Bandwidth));
    let inter_latency = r.req("inter_latency", |cx, v| quantity(cx, v, Dim::Time));
    let host_bandwidth = r.opt("host_bandwidth", |cx, v| quantity(cx, v, Dim::Bandwidth));
    let host_memory_bandwidth = r.opt("host_memory_bandwidth", |cx, v| {
        quantity(cx, v, Dim::Bandwidth)
    });
    r.finish();
    Some(Node {
        name,
        device: device?,
        devices: devices?,
        intra_bandwidth: intra_bandwidth?,
        intra_latency: intra_latency?,
        inter_bandwidth: inter_bandwidth?,
        inter_latency: inter_latency?,
        host_bandwidth: host_bandwidth?,
        host_memory_bandwidth: host_memory_bandwidth?,
    })
}

pub fn cluster(cx: &Cx, v: &Spanned, path: &str) -> Option<Cluster> {
    // A single node is a cluster of one.
    if let Value::Record(r) = &v.value {
        if matches!(
            r.kind,
            RecordKind::Def {
                kind: DefKind::Node,
                ..
            }
        ) {
            return Some(Cluster {
                name: r.kind.name().unwrap_or("node").to_string(),
                nodes: 1,
                node: node(cx, v, &format!("{path}.node"))?,
            });
        }
    }
    let mut r = expect_def(cx, v, DefKind::Cluster, path)?;
    let name = r.record.kind.name().unwrap_or("cluster").to_string();
    let node_path = r.child_path("node");
    let node = r.required("node").and_then(|v| node(cx, &v, &node_path));
    let nodes = r.req("nodes", size(limits::NODES));
    r.finish();
    Some(Cluster {
        name,
        nodes: nodes?,
        node: node?,
    })
}
