//! The planner: device mesh, cost model, manual and automatic partitioning, and the
//! execution plan. Formulas: shared/reference/cost-model.md; search: auto-partition.md.

mod assemble;
pub mod collective;
pub mod cost;
mod profile;
mod report;
pub mod search;
pub mod sharding;
mod stages;
mod svg;
pub mod timeline;
mod types;

/// A node for the cost model's unit tests: eight devices of 1 TFLOP/s bf16 that compute at
/// peak, with instant memory and links; a test overrides what it measures.
#[cfg(test)]
pub(crate) fn unit_node() -> crate::spec::Node {
    use crate::spec::{Device, Node, Precision};
    let device = Device {
        name: "unit".into(),
        peak: [(Precision::Bf16, 1e12)].into(),
        matmul_efficiency: 1.0,
        attention_efficiency: 1.0,
        memory: 100e9,
        memory_reserve: 0.0,
        hbm_bandwidth: 1e18,
        activation_overhead: 1.0,
        weight_copies: 1.0,
        flash_attention: false,
        multiprocessors: None,
    };
    Node {
        name: "unit".into(),
        device,
        devices: 8,
        intra_bandwidth: 1e18,
        intra_latency: 0.0,
        inter_bandwidth: 1e18,
        inter_latency: 0.0,
        host_bandwidth: None,
        host_memory_bandwidth: None,
    }
}

pub use cost::{model_states, MemoryBreakdown, TimeBreakdown};
pub use report::render_text;
pub use svg::render_svg;
pub use types::*;

use crate::diagnostics::{Code, Diagnostic, Diagnostics, Span};
use crate::graph::{Graph, LayerKind};
use crate::spec::{AttentionKernel, Experiment, Origin, Plan};
use cost::Submesh;
use cost::{Model, RecomputeChoice, ScheduleChoice};
use search::{Shape, Space};
use sharding::{LayoutError, TensorLayout};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// Whether `e`'s attention is costed as FlashAttention: as it asks, or (`auto`) as its
/// devices run it.
pub fn flash_attention(e: &Experiment) -> bool {
    match e.train.attention {
        AttentionKernel::Flash => true,
        AttentionKernel::Eager => false,
        AttentionKernel::Auto => e.parallel.mesh.node.device.flash_attention,
    }
}

/// Which plans the planner may choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submeshes {
    /// Every pipeline stage on the same data × tensor grid.
    Uniform,
    /// A submesh per stage when that is faster (what `kiln plan` and `kiln run` choose from).
    PerStage,
}

/// An experiment prepared for planning: its graph, per-layer profiles and shape facts.
pub struct Planner<'e> {
    experiment: &'e Experiment,
    graph: Graph,
    layers: Vec<profile::LayerProfile>,
    shape: Shape,
    /// The tensor-parallel layout of each (tensor degree, sequence parallel) a plan may use,
    /// worked out once; an error where the graph cannot be split that way.
    layouts: RefCell<BTreeMap<(u64, bool), Result<Rc<TensorLayout>, LayoutError>>>,
}

impl<'e> Planner<'e> {
    /// Prepares `e`, lowered to `graph`, for planning.
    pub fn new(e: &'e Experiment, graph: Graph) -> Self {
        let layers = profile::profile(&graph, flash_attention(e));
        let blocks = graph
            .layers
            .iter()
            .filter(|l| l.kind == LayerKind::Block)
            .count() as u64;
        let shape = Shape {
            devices: e.parallel.mesh.devices(),
            node_devices: e.parallel.mesh.node.devices,
            batch: e.train.batch,
            rows_per_record: match &e.objective {
                crate::spec::Objective::Reward { .. } => 2,
                crate::spec::Objective::Pvp(pvp) if pvp.mlm_weight > 0.0 => 2,
                _ => 1,
            },
            blocks,
            heads: e.model.heads,
            kv_heads: e.model.kv_heads,
            ffn: e.model.ffn,
        };
        Planner {
            experiment: e,
            graph,
            layers,
            shape,
            layouts: RefCell::default(),
        }
    }

    /// The graph the planner plans.
    pub fn into_graph(self) -> Graph {
        self.graph
    }

    /// The tensor-parallel layout of `grid`'s groups (shared: candidates only ask whether it
    /// exists, the chosen plan's stages copy it).
    fn layout(&self, grid: Submesh) -> Result<Rc<TensorLayout>, LayoutError> {
        let key = (grid.tensor, grid.sequence_parallel);
        self.layouts
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| TensorLayout::new(&self.graph, key.0 as usize, key.1).map(Rc::new))
            .clone()
    }

    fn model(&self) -> Model<'_> {
        let e = self.experiment;
        Model {
            layers: &self.layers,
            cluster: &e.parallel.mesh,
            precision: e.train.precision,
            batch: e.train.batch,
            offload: e.parallel.offload,
            overlap: e.parallel.overlap_grad_sync,
            weight_gather: e.parallel.weight_gather,
            collective_efficiency: e.parallel.collective_efficiency,
        }
    }

    /// The uniform fast path alone: every candidate costed with balanced stages, best first
    /// (the prefix the search and the report read, see `search::uniform`).
    pub fn uniform(&self) -> Vec<search::Candidate> {
        search::uniform(
            &self.model(),
            &search::candidates(&space(self.experiment), &self.shape),
        )
    }

    /// The whole search and the execution plan, among the plans `submeshes` allows.
    pub fn plan(&self, submeshes: Submeshes) -> Result<ExecutionPlan, Diagnostics> {
        let (e, graph, shape, model) = (self.experiment, &self.graph, &self.shape, self.model());
        let model = &model;
        let auto = e.parallel.plan == Plan::Auto;
        let space = space(e);
        check_placement(e, shape)?;
        check_offload(e)?;
        check_attention(e)?;
        let all = search::candidates(&space, shape);
        let span = span_of(e, &["parallel.mesh", "parallel"]);
        if all.is_empty() {
            let mut d = Diagnostic::new(
                Code::NoPlan,
                format!(
                    "no way to split a batch of {} sequences over this mesh",
                    e.train.batch
                ),
            )
            .help("the global batch must split evenly into data-parallel replicas and microbatches, and an interleaved schedule needs a multiple of `pipeline` microbatches");
            if let Some(s) = span {
                d = d.at(s, format!("{} devices", shape.devices));
            }
            return Err(one(d));
        }
        // Only plans whose every stage the graph can be laid out on: what is planned runs.
        let mut unsplittable: Option<LayoutError> = None;
        let mut laid_out = |grids: &mut dyn Iterator<Item = Submesh>| {
            let laid: Result<Vec<Rc<TensorLayout>>, LayoutError> =
                grids.map(|grid| self.layout(grid)).collect();
            laid.map_err(|err| unsplittable.get_or_insert(err).clone())
                .ok()
        };
        let candidates: Vec<cost::Strategy> = all
            .iter()
            .copied()
            .filter(|s| {
                let grid = Submesh {
                    data: s.data,
                    tensor: s.tensor,
                    sequence_parallel: s.sequence_parallel,
                };
                laid_out(&mut std::iter::once(grid)).is_some()
            })
            .collect();
        let mut ranked = search::search(model, &space, shape, &candidates);
        ranked.retain(|c| {
            (submeshes == Submeshes::PerStage || c.evaluation.uniform())
                && laid_out(&mut c.evaluation.stages.iter().map(|st| st.submesh)).is_some()
        });
        let (Some(best), Some(stage_layouts)) = (
            ranked.first(),
            ranked
                .first()
                .and_then(|c| laid_out(&mut c.evaluation.stages.iter().map(|st| st.submesh))),
        ) else {
            return Err(one(unsplittable_model(e, unsplittable)));
        };
        if !best.evaluation.fits {
            // Nothing fits: the error describes the candidate closest to fitting (its hints
            // are the likeliest to help), not the fastest.
            let closest = ranked
                .iter()
                .min_by(|a, b| {
                    let peak = |c: &search::Candidate| c.evaluation.peak_memory();
                    peak(a).total_cmp(&peak(b))
                })
                .unwrap_or(best);
            return Err(one(does_not_fit(e, model, closest, auto, span)));
        }
        let alternatives = if auto {
            alternatives(&ranked)
        } else {
            Vec::new()
        };
        let chosen_by = if auto { "auto" } else { "manual" };
        Ok(assemble::plan(
            model,
            graph,
            e,
            best,
            chosen_by,
            alternatives,
            candidates.len(),
            stage_layouts
                .iter()
                .map(|layout| (**layout).clone())
                .collect(),
        ))
    }
}

/// Plans a checked experiment on its mesh, as `kiln run` executes it: stages on submeshes of
/// their own where that is faster.
pub fn compile_plan(e: &Experiment) -> Result<ExecutionPlan, Diagnostics> {
    compile_plan_with(e, Submeshes::PerStage)
}

/// Plans a checked experiment on its mesh among the plans `submeshes` allows: the plan of its
/// [`Program`](crate::Program), checked like every program.
pub fn compile_plan_with(
    e: &Experiment,
    submeshes: Submeshes,
) -> Result<ExecutionPlan, Diagnostics> {
    crate::compile_with(e, submeshes).map(|program| program.plan)
}

/// The runners-up of `ranked[0]`: the best three with other degrees or stage submeshes, the
/// next two overall, and, when the winner's stages run on different submeshes, the best plan
/// whose stages do not (simpler to reason about).
fn alternatives(ranked: &[search::Candidate]) -> Vec<Alternative> {
    let best = &ranked[0].evaluation;
    let grids = |e: &cost::Evaluation| {
        (
            e.strategy.pipeline,
            e.stages
                .iter()
                .map(|s| (s.submesh.data, s.submesh.tensor))
                .collect::<Vec<_>>(),
        )
    };
    let uniform = (!best.uniform())
        .then(|| ranked.iter().find(|c| c.evaluation.uniform()))
        .flatten();
    let mut out: Vec<Alternative> = ranked
        .iter()
        .skip(1)
        .filter(|c| grids(&c.evaluation) != grids(best))
        .take(3)
        .chain(ranked.iter().skip(1).take(2))
        .chain(uniform)
        .map(|c| Alternative {
            strategy: assemble::describe(&c.evaluation),
            step_time: assemble::round(c.evaluation.time.total),
            peak_memory: c.evaluation.peak_memory().round(),
            why: assemble::why_lost(best, &c.evaluation),
        })
        .collect();
    out.sort_by(|a, b| {
        a.step_time
            .total_cmp(&b.step_time)
            .then(a.strategy.cmp(&b.strategy))
    });
    out.dedup_by(|a, b| a.strategy == b.strategy);
    out
}

/// No candidate plan's tensor-parallel groups can hold the model: why the first one could not.
fn unsplittable_model(e: &Experiment, why: Option<LayoutError>) -> Diagnostic {
    let reason = why.map_or_else(|| "no plan remains".to_string(), |err| err.0);
    let mut d = Diagnostic::new(
        Code::Placement,
        format!("the model cannot be laid out on this plan's tensor-parallel groups: {reason}"),
    )
    .help("choose another `tensor` degree or `sequence_parallel = false`, or let `plan = auto` choose among the plans the model can be laid out on");
    if let Some(s) = span_of(
        e,
        &[
            "parallel.plan.tensor",
            "parallel.sequence_parallel",
            "parallel",
        ],
    ) {
        d = d.at(s, "tensor parallelism chosen here");
    }
    d
}

fn one(d: Diagnostic) -> Diagnostics {
    let mut out = Diagnostics::default();
    out.push(d);
    out
}

/// The first of `paths` the user wrote.
fn span_of(e: &Experiment, paths: &[&str]) -> Option<Span> {
    paths.iter().find_map(|p| match e.origins.get(p)? {
        Origin::Source(s) => Some(s),
        Origin::Default => None,
    })
}

/// Whether the user wrote this field themselves (not inherited from an enclosing value).
fn written(e: &Experiment, path: &str) -> bool {
    matches!(e.origins.exact(path), Some(Origin::Source(_)))
}

/// What the parallel block fixes. A manual plan fixes its degrees and knobs; `plan = auto`
/// searches every knob the user did not write.
fn space(e: &Experiment) -> Space {
    let p = &e.parallel;
    let manual = match p.plan {
        Plan::Manual {
            data,
            tensor,
            pipeline,
        } => Some((data, tensor, pipeline)),
        Plan::Auto => None,
    };
    let fixed = |path: &str| manual.is_some() || written(e, path);
    Space {
        data: manual.map(|m| m.0),
        tensor: manual.map(|m| m.1),
        pipeline: manual.map(|m| m.2),
        micro_batch: e.train.micro_batch,
        microbatches: p.microbatches,
        schedule: fixed("parallel.schedule").then_some(ScheduleChoice::from_spec(p.schedule)),
        zero: fixed("parallel.zero").then_some(p.zero),
        recompute: fixed("parallel.recompute").then_some(RecomputeChoice::from_spec(p.recompute)),
        sequence_parallel: fixed("parallel.sequence_parallel").then_some(p.sequence_parallel),
        flash_attention: flash_attention(e),
    }
}

/// Tensor parallelism exchanges activations twice per layer: it stays on NVLink.
fn check_placement(e: &Experiment, shape: &Shape) -> Result<(), Diagnostics> {
    if let Plan::Manual { tensor, .. } = e.parallel.plan {
        if tensor > shape.node_devices {
            let mut d = Diagnostic::new(Code::Placement, format!("tensor = {tensor} spans more than one node of {} devices", shape.node_devices))
                .help(format!("tensor parallelism all-reduces activations four times per layer; keep tensor <= {} and use pipeline or data parallelism across nodes", shape.node_devices));
            if let Some(s) = span_of(e, &["parallel.plan.tensor"]) {
                d = d.at(s, "crosses the node boundary");
            }
            if let Some(s) = span_of(e, &["parallel.mesh"]) {
                d = d.also(s, format!("{} devices per node", shape.node_devices));
            }
            return Err(one(d));
        }
    }
    Ok(())
}

/// Offloading is costed by the node's host link and host memory: the node must describe them.
fn check_offload(e: &Experiment) -> Result<(), Diagnostics> {
    let node = &e.parallel.mesh.node;
    if e.parallel.offload == crate::spec::Offload::None
        || (node.host_bandwidth.is_some() && node.host_memory_bandwidth.is_some())
    {
        return Ok(());
    }
    let mut d = Diagnostic::new(
        Code::Missing,
        format!(
            "offloading needs the host link and host memory of node `{}`, which it does not describe",
            node.name
        ),
    )
    .help("give the node `host_bandwidth` (each device's PCIe link to host memory) and `host_memory_bandwidth` (the node's CPU memory), or set `offload = none`");
    if let Some(s) = span_of(e, &["parallel.offload"]) {
        d = d.at(s, "offloads to the host");
    }
    Err(one(d))
}

/// `attention = flash` on a device whose profile says it runs attention unfused (the CPU
/// executor keeps its probabilities for the backward) would plan memory and time that device
/// does not have.
fn check_attention(e: &Experiment) -> Result<(), Diagnostics> {
    let device = &e.parallel.mesh.node.device;
    if e.train.attention != AttentionKernel::Flash || device.flash_attention {
        return Ok(());
    }
    let mut d = Diagnostic::new(
        Code::Conflict,
        format!(
            "`attention = flash` asks for a fused attention kernel that device `{}` does not run",
            device.name
        ),
    )
    .help("leave `attention = auto` (what the device runs), or give the device `flash_attention = true` if it has such a kernel");
    if let Some(s) = span_of(e, &["train.attention"]) {
        d = d.at(s, "a fused, tiled kernel");
    }
    Err(one(d))
}

/// The plan does not fit: which device, by how much, and which levers would make it fit.
fn does_not_fit(
    e: &Experiment,
    model: &Model,
    best: &search::Candidate,
    auto: bool,
    span: Option<Span>,
) -> Diagnostic {
    let ev = &best.evaluation;
    let (i, stage) = ev
        .stages
        .iter()
        .enumerate()
        .max_by(|a, b| {
            (a.1.memory.total / a.1.memory.capacity)
                .total_cmp(&(b.1.memory.total / b.1.memory.capacity))
        })
        .unwrap_or((0, &ev.stages[0]));
    let m = &stage.memory;
    let gib = |x: f64| x / assemble::GIB;
    let device = &e.parallel.mesh.node.device.name;
    let message = if auto {
        format!(
            "no plan fits in memory: the closest to fitting needs {:.1} GiB per {device}, which has {:.1} GiB",
            gib(m.total),
            gib(m.capacity)
        )
    } else {
        format!("the plan does not fit in memory: stage {i} needs {:.1} GiB per {device}, which has {:.1} GiB", gib(m.total), gib(m.capacity))
    };
    let mut d = Diagnostic::new(Code::Memory, message).note(format!(
        "per device: weights {:.1} GiB, gradients {:.1} GiB, optimizer state {:.1} GiB, activations {:.1} GiB, buffers {:.1} GiB",
        gib(m.weights),
        gib(m.gradients),
        gib(m.optimizer),
        gib(m.activations),
        gib(m.buffers)
    ));
    if let Some(s) = span {
        d = d.at(s, format!("{} devices", e.parallel.mesh.devices()));
    }
    // Levers: the same plan with one setting changed, kept if it then fits.
    let s = ev.strategy;
    let mut levers: Vec<(String, search::Candidate)> = Vec::new();
    let mut try_lever = |label: String, changed: cost::Strategy| {
        let layout = model.layout(&changed);
        let evaluation = model.evaluate(&changed, &layout);
        if evaluation.fits {
            levers.push((label, search::Candidate { evaluation, layout }));
        }
    };
    for zero in (s.zero + 1)..=3 {
        if s.data > 1 {
            try_lever(format!("zero = {zero}"), cost::Strategy { zero, ..s });
        }
    }
    for (label, r) in [
        ("recompute = selective", RecomputeChoice::Selective),
        ("recompute = full", RecomputeChoice::Full),
    ] {
        if r > s.recompute {
            try_lever(label.into(), cost::Strategy { recompute: r, ..s });
        }
    }
    if s.micro_batch > 1 {
        let per_replica = s.micro_batch * s.microbatches;
        try_lever(
            "micro_batch = 1".into(),
            cost::Strategy {
                micro_batch: 1,
                microbatches: per_replica,
                ..s
            },
        );
    }
    if s.tensor > 1 && !s.sequence_parallel {
        try_lever(
            "sequence_parallel = true".into(),
            cost::Strategy {
                sequence_parallel: true,
                ..s
            },
        );
    }
    d = if levers.is_empty() {
        d.help("no single setting makes it fit: add devices (a larger mesh), use more pipeline stages, or offload = optimizer")
    } else {
        let list: Vec<String> = levers
            .iter()
            .map(|(label, c)| format!("{label} ({:.1} GiB)", gib(c.evaluation.peak_memory())))
            .collect();
        d.help(format!("any of these makes it fit: {}", list.join(", ")))
    };
    d
}

/// Plans the first experiment of a source text: the library entry point for users who snapshot
/// plans from their own tests.
pub fn compile(source: &str) -> Result<ExecutionPlan, CompileError> {
    let checked = crate::check_source("experiment.kiln", source, None);
    if !checked.is_ok() {
        return Err(CompileError {
            rendered: checked.render_errors(),
            diagnostics: checked.errors(),
        });
    }
    let all = checked.module.all_experiments();
    let experiment = all.first().copied().ok_or_else(|| CompileError {
        rendered: "error: the source defines no experiment\n".into(),
        diagnostics: Vec::new(),
    })?;
    compile_plan(experiment).map_err(|d| {
        let refs: Vec<&Diagnostic> = d.items.iter().collect();
        CompileError {
            rendered: crate::diagnostics::render_plain(&checked.program.sources.borrow(), &refs),
            diagnostics: d.items,
        }
    })
}

/// Errors of [`compile`], with their rendering.
#[derive(Debug)]
pub struct CompileError {
    pub diagnostics: Vec<Diagnostic>,
    pub rendered: String,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.rendered)
    }
}

impl std::error::Error for CompileError {}
