//! An experiment's `parallel` block: mesh, degrees or `auto`, ZeRO, recompute, offload and
//! the pipeline schedule, with the checks that need the model.

use super::cluster::cluster;
use super::limits;
use super::read::*;
use super::types::*;
use crate::diagnostics::{Code, Diagnostic};
use crate::resolve::Spanned;

pub(super) fn parallel(r: &mut Rec, model: Option<&Model>) -> Option<Parallel> {
    let cx = r.cx;
    let mesh_default = || -> Option<Cluster> {
        // `cpu(1)`: the prelude's host with one device.
        let prelude = cx.ev.program.prelude()?;
        let found = cx.ev.lookup(prelude, "cpu_host", r.span())?;
        let host = cx.ev.definition(found.module, found.def)?;
        let node = super::cluster::node(cx, &host, "parallel.mesh.node")?;
        Some(Cluster {
            name: "cpu(1)".into(),
            nodes: 1,
            node: Node { devices: 1, ..node },
        })
    };
    let mesh = if r.has("mesh") {
        r.req("mesh", |cx, v| cluster(cx, v, "parallel.mesh"))
    } else {
        r.defaulted("mesh");
        mesh_default()
    };
    let mesh_span = r.span_of("mesh");
    let degrees = ["data", "tensor", "pipeline"];
    let given: Vec<&str> = degrees.iter().copied().filter(|d| r.has(d)).collect();
    let plan_v = r.get("plan");
    let auto = match &plan_v {
        Some(v) => choice(cx, v, "plan", &[("auto", true), ("manual", false)]),
        None if r.has("plan") => None,
        None => Some(given.is_empty() && mesh.as_ref().is_some_and(|m| m.devices() > 1)),
    };
    let data = r.opt("data", positive);
    let tensor = r.or("tensor", 1, positive);
    let pipeline = r.or("pipeline", 1, positive);
    let sequence_parallel = r.or("sequence_parallel", false, boolean);
    let zero = r.or("zero", 0u8, |cx, v| int_in(cx, v, 0, 3).map(|z| z as u8));
    let recompute = r.or("recompute", Recompute::None, |cx, v| {
        choice(
            cx,
            v,
            "recompute setting",
            &[
                ("none", Recompute::None),
                ("selective", Recompute::Selective),
                ("full", Recompute::Full),
            ],
        )
    });
    let schedule = r.or("schedule", PipelineSchedule::OneFOneB, schedule);
    let microbatches = r.opt("microbatches", size(limits::MICROBATCHES));
    let overlap_grad_sync = r.or("overlap_grad_sync", false, boolean);
    let weight_gather = r.or("weight_gather", WeightGather::Prefetch, |cx, v| {
        choice(
            cx,
            v,
            "weight gather setting",
            &[
                ("prefetch", WeightGather::Prefetch),
                ("on_demand", WeightGather::OnDemand),
            ],
        )
    });
    let collective_efficiency = r.or("collective_efficiency", 1.0, |cx, v| {
        number_where(cx, v, "above 0 and at most 1", |x| x > 0.0 && x <= 1.0)
    });
    let offload = r.or("offload", Offload::None, |cx, v| {
        choice(
            cx,
            v,
            "offload setting",
            &[
                ("none", Offload::None),
                ("optimizer", Offload::Optimizer),
                ("all", Offload::All),
            ],
        )
    });
    let (mesh, auto) = (mesh?, auto?);
    let (data, tensor, pipeline) = (data?, tensor?, pipeline?);
    let devices = mesh.devices();

    let plan = if auto {
        if !given.is_empty() {
            let d = given.iter().fold(
                Diagnostic::new(Code::Conflict, "`plan = auto` chooses the degrees itself").at(
                    plan_v.as_ref().map_or(r.span(), |v| v.span),
                    "automatic plan",
                ),
                |d, name| d.also(r.span_of(name), format!("`{name}` set by hand")),
            );
            cx.report(d.help("remove the degrees, or remove `plan = auto` to plan by hand"));
            return None;
        }
        r.cx.origins.borrow_mut().defaulted("parallel.plan");
        Plan::Auto
    } else {
        let data = match data {
            Some(d) => d,
            None if devices % tensor.saturating_mul(pipeline) == 0 => {
                devices / tensor.saturating_mul(pipeline)
            }
            None => {
                cx.report(
                    Diagnostic::new(
                        Code::Mesh,
                        format!(
                            "tensor × pipeline = {} does not divide the mesh's {devices} devices",
                            tensor.saturating_mul(pipeline)
                        ),
                    )
                    .at(
                        if r.has("tensor") {
                            r.span_of("tensor")
                        } else {
                            r.span_of("pipeline")
                        },
                        "this degree",
                    )
                    .also(mesh_span, format!("{devices} devices")),
                );
                return None;
            }
        };
        if data.saturating_mul(tensor).saturating_mul(pipeline) != devices {
            let mut d = Diagnostic::new(Code::Mesh, format!("data × tensor × pipeline = {data} × {tensor} × {pipeline} = {}, but the mesh has {devices} devices", data.saturating_mul(tensor).saturating_mul(pipeline)))
                .at(mesh_span, format!("{devices} devices"));
            for name in &given {
                d = d.also(r.span_of(name), *name);
            }
            cx.report(d.help("make the product equal the number of devices, or use `plan = auto`"));
            return None;
        }
        Plan::Manual {
            data,
            tensor,
            pipeline,
        }
    };
    let mut ok = true;
    if let (
        Plan::Manual {
            tensor, pipeline, ..
        },
        Some(m),
    ) = (plan, model)
    {
        let model_span = |path: &str| cx.origins.borrow().span(path);
        for (what, size, path) in [
            ("heads", m.heads, "model.heads"),
            ("kv_heads", m.kv_heads, "model.kv_heads"),
            ("ffn", m.ffn, "model.ffn"),
        ] {
            if size % tensor != 0 {
                let mut d = Diagnostic::new(
                    Code::Divisibility,
                    format!("tensor = {tensor} does not divide {what} = {size}"),
                )
                .at(r.span_of("tensor"), "tensor-parallel degree");
                if let Some(s) = model_span(path) {
                    d = d.also(s, format!("{what} = {size}"));
                }
                cx.report(d.help(format!("Megatron splits {what} across the tensor-parallel group; choose a divisor of {size}")));
                ok = false;
                break;
            }
        }
        if pipeline > m.layers {
            cx.report(
                Diagnostic::new(
                    Code::Range,
                    format!(
                        "pipeline = {pipeline} is more stages than the model's {} layers",
                        m.layers
                    ),
                )
                .at(r.span_of("pipeline"), "too many stages"),
            );
            ok = false;
        }
        // Chunks may hold uneven layer counts (as Megatron-Core allows): the planner cuts the
        // blocks as evenly as they go. Each chunk needs a layer.
        if let Some(PipelineSchedule::Interleaved { chunks }) = schedule {
            if pipeline.saturating_mul(chunks) > m.layers {
                cx.report(
                    Diagnostic::new(
                        Code::Divisibility,
                        format!(
                            "pipeline × chunks = {} is more chunks than the model's {} layers",
                            pipeline.saturating_mul(chunks),
                            m.layers
                        ),
                    )
                    .at(r.span_of("schedule"), "interleaved schedule")
                    .help("each device holds `chunks` groups of at least one layer: use fewer chunks or stages"),
                );
                ok = false;
            }
        }
        if let (Some(mb), Some(PipelineSchedule::OneFOneB | PipelineSchedule::Interleaved { .. })) =
            (microbatches.flatten(), schedule)
        {
            if pipeline > 1 && mb < pipeline {
                cx.report(
                    Diagnostic::new(Code::Range, format!("microbatches = {mb} is fewer than the {pipeline} pipeline stages"))
                        .at(r.span_of("microbatches"), "too few to fill the pipeline")
                        .help(format!("1F1B needs at least as many microbatches as stages; use microbatches >= {pipeline}")),
                );
                ok = false;
            }
        }
        if r.has("weight_gather") && zero.is_some_and(|z| z < 3) {
            cx.report(
                Diagnostic::new(
                    Code::Conflict,
                    "`weight_gather` sets how ZeRO-3 gathers weights, but this plan does not shard them",
                )
                .at(r.span_of("weight_gather"), "has no effect without ZeRO-3")
                .help("set `zero = 3`, or remove `weight_gather`"),
            );
            ok = false;
        }
        if sequence_parallel == Some(true) && tensor == 1 {
            cx.report(
                Diagnostic::new(
                    Code::Conflict,
                    "sequence parallelism needs tensor parallelism",
                )
                .at(
                    r.span_of("sequence_parallel"),
                    "has no effect with tensor = 1",
                )
                .help("set tensor > 1, or remove sequence_parallel"),
            );
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    move_degree_origins(cx);
    Some(Parallel {
        mesh,
        plan,
        sequence_parallel: sequence_parallel?,
        zero: zero?,
        recompute: recompute?,
        schedule: schedule?,
        microbatches: microbatches?,
        offload: offload?,
        overlap_grad_sync: overlap_grad_sync?,
        weight_gather: weight_gather?,
        collective_efficiency: collective_efficiency?,
    })
}

fn schedule(cx: &Cx, v: &Spanned) -> Option<PipelineSchedule> {
    let var = variant(
        cx,
        v,
        "pipeline schedule",
        &["gpipe", "1f1b", "interleaved"],
    )?;
    match var.name.as_str() {
        "gpipe" => Some(PipelineSchedule::Gpipe),
        "1f1b" => Some(PipelineSchedule::OneFOneB),
        _ => match var.args.as_slice() {
            [n] => int_in(cx, n, 2, u64::MAX)
                .filter(|&chunks| within(cx, limits::CHUNKS, chunks, n.span))
                .map(|chunks| PipelineSchedule::Interleaved { chunks }),
            _ => {
                cx.report(
                    Diagnostic::new(
                        Code::Type,
                        "`interleaved` takes the number of model chunks per device",
                    )
                    .at(v.span, "write `interleaved(2)`"),
                );
                None
            }
        },
    }
}

/// The manual degrees are written in the parallel block but live under `plan` in the spec.
fn move_degree_origins(cx: &Cx) {
    let mut origins = cx.origins.borrow_mut();
    for degree in ["data", "tensor", "pipeline"] {
        origins.rename(
            &format!("parallel.{degree}"),
            &format!("parallel.plan.{degree}"),
        );
    }
}
