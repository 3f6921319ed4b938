//! Building the [`ExecutionPlan`] from the chosen evaluation: stages and devices, sharding of
//! every parameter, collectives, the per-stage schedule, throughput.

use super::cost::{
    Evaluation, Model, RecomputeChoice, ScheduleChoice, StageCost, StagePlace, Strategy, Submesh,
};
use super::search::Candidate;
use super::sharding::TensorLayout;
use super::types::*;
use crate::graph::{Graph, LayerKind};
use crate::spec::{Experiment, Offload, WeightGather};

/// Rounds to six significant digits so plans print the same everywhere.
pub fn round(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return 0.0;
    }
    let digits = 6 - x.abs().log10().ceil() as i32;
    // Scale by an exact power of ten in the direction that keeps the result exact.
    let scale = 10f64.powi(digits.abs());
    if digits >= 0 {
        (x * scale).round() / scale
    } else {
        (x / scale).round() * scale
    }
}

pub fn summary(ev: &Evaluation, e: &Experiment, chosen_by: &str) -> StrategySummary {
    let s = &ev.strategy;
    // Degrees shared by every stage, or 0 when stages differ.
    let (data, tensor, micro_batch) = if ev.uniform() {
        (s.data, s.tensor, s.micro_batch)
    } else {
        (0, 0, 0)
    };
    StrategySummary {
        chosen_by: chosen_by.into(),
        data,
        tensor,
        pipeline: s.pipeline,
        sequence_parallel: ev.stages.iter().any(|st| st.submesh.sequence_parallel),
        zero: s.zero,
        recompute: s.recompute,
        schedule: s.schedule,
        micro_batch,
        microbatches: s.microbatches,
        global_batch: e.train.batch,
        offload: match e.parallel.offload {
            Offload::None => "none",
            Offload::Optimizer => "optimizer",
            Offload::All => "all",
        }
        .into(),
        attention: match super::flash_attention(e) {
            true => "flash",
            false => "eager",
        }
        .into(),
        overlap_grad_sync: e.parallel.overlap_grad_sync,
        weight_gather: (s.zero >= 3).then_some(e.parallel.weight_gather),
        collective_efficiency: Some(e.parallel.collective_efficiency).filter(|&x| x < 1.0),
    }
}

/// A one-line description of a plan, for alternatives: its degrees, or each stage's
/// data × tensor grid when they differ.
pub fn describe(ev: &Evaluation) -> String {
    let s = &ev.strategy;
    let sp = |on: bool| if on { "+sp" } else { "" };
    let layout = if ev.uniform() {
        format!(
            "d={} t={} p={}{} mb={}×{}",
            s.data,
            s.tensor,
            s.pipeline,
            sp(s.sequence_parallel),
            s.micro_batch,
            s.microbatches
        )
    } else {
        let grids: Vec<String> = ev
            .stages
            .iter()
            .map(|st| {
                let g = st.submesh;
                format!("{}x{}{}", g.data, g.tensor, sp(g.sequence_parallel))
            })
            .collect();
        format!(
            "p={} d×t per stage {} mb={} seq×{}",
            s.pipeline,
            grids.join("|"),
            s.pipeline_microbatch(),
            s.microbatches
        )
    };
    let recompute = match s.recompute {
        RecomputeChoice::None => String::new(),
        r => format!(" recompute={r}"),
    };
    let zero = if s.zero > 0 {
        format!(" zero={}", s.zero)
    } else {
        String::new()
    };
    format!("{layout} {}{zero}{recompute}", s.schedule)
}

/// Why `other` lost to `best`, from their breakdowns.
pub fn why_lost(best: &Evaluation, other: &Evaluation) -> String {
    if !other.fits {
        let worst = other.stages.iter().max_by(|a, b| {
            (a.memory.total - a.memory.capacity).total_cmp(&(b.memory.total - b.memory.capacity))
        });
        return match worst {
            Some(st) => format!(
                "does not fit: {:.1} GiB of {:.1} GiB",
                st.memory.total / GIB,
                st.memory.capacity / GIB
            ),
            None => "does not fit".into(),
        };
    }
    let (b, o) = (&best.time, &other.time);
    let deltas = [
        ("compute", o.compute - b.compute),
        ("recompute", o.recompute - b.recompute),
        (
            "tensor-parallel communication",
            o.tensor_comm - b.tensor_comm,
        ),
        ("pipeline bubble", o.pipeline_bubble - b.pipeline_bubble),
        ("pipeline transfers", o.p2p - b.p2p),
        (
            "gradient synchronisation",
            o.data_parallel - b.data_parallel,
        ),
    ];
    let (cause, delta) = deltas
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("time", 0.0));
    if o.total <= b.total * (1.0 + 1e-4) {
        let more = (other.peak_memory() - best.peak_memory()) / GIB;
        return if more > 0.005 {
            format!("as fast, but needs {more:.2} GiB more per device")
        } else {
            "as fast and as large: the tie goes to the simpler plan".into()
        };
    }
    format!(
        "{:.1}% slower: +{:.3} s {cause}",
        100.0 * (o.total / b.total - 1.0),
        delta
    )
}

pub const GIB: f64 = 1073741824.0;

/// Which pipeline rank holds each layer (with an interleaved schedule a rank holds several
/// chunks).
fn owners(model: &Model, layout: &[StagePlace]) -> Vec<u64> {
    (0..model.layers.len())
        .map(|l| {
            layout
                .iter()
                .position(|st| st.layers.iter().any(|r| r.contains(&l)))
                .unwrap_or(0) as u64
        })
        .collect()
}

/// The layers a rank holds, in graph order, runs of consecutive blocks together
/// (`block.0-11`).
fn layer_runs(g: &Graph, owners: &[u64], rank: u64) -> Vec<LayerRun> {
    let block = |l: usize| {
        (g.layers[l].kind == LayerKind::Block)
            .then(|| g.layers[l].name.trim_start_matches("block."))
    };
    let mut out: Vec<LayerRun> = Vec::new();
    let mut l = 0;
    while l < g.layers.len() {
        if owners[l] != rank {
            l += 1;
            continue;
        }
        let mut end = l + 1;
        if block(l).is_some() {
            while end < g.layers.len() && owners[end] == rank && block(end).is_some() {
                end += 1;
            }
        }
        let name = match (block(l), block(end - 1)) {
            (Some(a), Some(b)) if end - l > 1 => format!("block.{a}-{b}"),
            _ => g.layers[l].name.clone(),
        };
        out.push(LayerRun {
            layers: l..end,
            name,
        });
        l = end;
    }
    out
}

fn zero_label(zero: u8, trainable: bool) -> &'static str {
    match (zero, trainable) {
        (0, _) | (1 | 2, false) => "none",
        (1, true) => "optimizer state",
        (2, true) => "optimizer state, gradients",
        (_, true) => "optimizer state, gradients, weights",
        (_, false) => "weights",
    }
}

/// Every parameter's layout, the same parameter of consecutive blocks grouped while it is
/// laid out alike (stages on different submeshes split it differently).
fn sharding(g: &Graph, ev: &Evaluation, stages: &[Stage], owners: &[u64]) -> Vec<Sharding> {
    struct Group {
        name: String,
        blocks: Vec<u64>,
        id: usize,
        stages: Vec<u64>,
        tensor: TensorSplit,
        zero: &'static str,
    }
    let mut groups: Vec<Group> = Vec::new();
    for (id, p) in g.params.iter().enumerate() {
        let layer = &g.layers[p.layer];
        let (pattern, block) = match layer.kind {
            LayerKind::Block => {
                let i = layer.name.trim_start_matches("block.");
                (
                    p.name.replacen(&format!(".{i}."), ".*.", 1),
                    i.parse::<u64>().ok(),
                )
            }
            _ => (p.name.clone(), None),
        };
        let stage = owners[p.layer];
        let grid = ev.stages[stage as usize].submesh;
        let tensor = stages[stage as usize].layout.splits[id];
        let zero = if grid.data > 1 {
            zero_label(ev.strategy.zero, p.trainable)
        } else {
            "none"
        };
        match groups
            .iter_mut()
            .find(|gr| gr.name == pattern && gr.tensor == tensor && gr.zero == zero)
        {
            Some(gr) => {
                gr.blocks.extend(block);
                if !gr.stages.contains(&stage) {
                    gr.stages.push(stage);
                }
            }
            None => groups.push(Group {
                name: pattern,
                blocks: block.into_iter().collect(),
                id,
                stages: vec![stage],
                tensor,
                zero,
            }),
        }
    }
    groups
        .into_iter()
        .map(|mut gr| {
            gr.stages.sort();
            let p = &g.params[gr.id];
            Sharding {
                name: gr.name,
                blocks: render_ranges(&gr.blocks),
                shape: p.shape.clone(),
                trainable: p.trainable,
                tensor: gr.tensor,
                zero: gr.zero.into(),
                stages: render_ranges(&gr.stages),
            }
        })
        .collect()
}

/// Collectives per iteration: tensor-parallel and data-parallel ones for each distinct stage
/// submesh (the group named with its stages when stages differ), and the pipeline's transfers.
fn collectives(model: &Model, g: &Graph, c: &Candidate) -> Vec<Collective> {
    let ev = &c.evaluation;
    let s = &ev.strategy;
    let t = &ev.time;
    let m = s.microbatches as f64;
    let mut grids: Vec<Submesh> = ev.stages.iter().map(|st| st.submesh).collect();
    grids.sort();
    grids.dedup();
    // Each grid's stages, and the slowest of them (by time per microbatch).
    let groups: Vec<(Submesh, Vec<&StageCost>, Option<Vec<u64>>)> = grids
        .into_iter()
        .map(|grid| {
            let stages: Vec<&StageCost> =
                ev.stages.iter().filter(|st| st.submesh == grid).collect();
            let indices: Vec<u64> = (0..ev.stages.len() as u64)
                .filter(|&i| ev.stages[i as usize].submesh == grid)
                .collect();
            let which = (stages.len() < ev.stages.len()).then_some(indices);
            (grid, stages, which)
        })
        .collect();
    let boundary = model.layers.first().map_or(0.0, |l| l.boundary_bytes)
        * s.pipeline_microbatch() as f64
        / g.batch as f64;
    let per_block = if s.recompute == RecomputeChoice::Full {
        6
    } else {
        4
    };
    let mut out = Vec::new();
    for (grid, stages, label) in &groups {
        if grid.tensor == 1 {
            continue;
        }
        let blocks = stages
            .iter()
            .map(|st| {
                st.layers
                    .iter()
                    .flat_map(|&(a, b)| a..b)
                    .filter(|&l| g.layers[l].kind == LayerKind::Block)
                    .count()
            })
            .max()
            .unwrap_or(0) as u64;
        let slowest = stages
            .iter()
            .max_by(|a, b| a.per_microbatch().total_cmp(&b.per_microbatch()));
        out.push(Collective {
            kind: if grid.sequence_parallel {
                "reduce_scatter + all_gather".into()
            } else {
                "all_reduce".into()
            },
            group: Group {
                axis: GroupAxis::Tensor,
                stages: label.clone(),
            },
            group_size: grid.tensor,
            bytes: boundary / grid.data as f64,
            per_iteration: s.microbatches * (blocks * per_block + 1),
            seconds: slowest.map_or(0.0, |st| m * st.tensor_comm),
        });
    }
    if s.pipeline > 1 {
        let fewest = ev
            .stages
            .windows(2)
            .map(|w| w[0].submesh.devices().min(w[1].submesh.devices()))
            .min()
            .unwrap_or(1);
        out.push(Collective {
            kind: "send/recv".into(),
            group: Group {
                axis: GroupAxis::Pipeline,
                stages: None,
            },
            group_size: 2,
            bytes: boundary / fewest as f64,
            per_iteration: 2 * s.microbatches * s.schedule.chunks(),
            seconds: t.p2p,
        });
    }
    for (grid, stages, label) in &groups {
        if grid.data == 1 {
            continue;
        }
        let on = s.on(*grid);
        // The grid's stage whose synchronisation takes longest sets the figures.
        let Some((stage, sync)) = stages
            .iter()
            .map(|st| (st, model.sync_parts(&on, st)))
            .max_by(|a, b| a.1.total().total_cmp(&b.1.total()))
        else {
            continue;
        };
        let bytes = model.element_bytes();
        let gradients = stage.trainable * bytes;
        let collective = |kind: &str, bytes: f64, per_iteration: u64, seconds: f64| Collective {
            kind: kind.into(),
            group: Group {
                axis: GroupAxis::Data,
                stages: label.clone(),
            },
            group_size: grid.data,
            bytes,
            per_iteration,
            seconds,
        };
        if s.zero == 0 {
            out.push(collective(
                "all_reduce (gradients)",
                gradients,
                1,
                sync.reduce,
            ));
            continue;
        }
        out.push(collective(
            "reduce_scatter (gradients)",
            gradients,
            1,
            sync.reduce,
        ));
        out.push(if s.zero >= 3 {
            let gathers = model.zero3_gathers(&on, stage);
            collective(
                match model.weight_gather {
                    WeightGather::Prefetch => {
                        "all_gather (weights, each layer's, prefetched, forward and backward)"
                    }
                    WeightGather::OnDemand => {
                        "all_gather (weights, each module's, forward and backward)"
                    }
                },
                gathers.bytes,
                gathers.count as u64,
                sync.gather,
            )
        } else {
            collective("all_gather (updated weights)", gradients, 1, sync.gather)
        });
    }
    for col in &mut out {
        col.bytes = round(col.bytes);
        col.seconds = round(col.seconds);
    }
    out
}

/// The order one device of stage `i` runs an iteration in.
fn stage_steps(s: &Strategy, i: u64) -> Vec<Action> {
    let (p, m, v) = (s.pipeline, s.microbatches, s.schedule.chunks());
    let first = i == 0;
    let last = i + 1 == p;
    let interleaved = matches!(s.schedule, ScheduleChoice::Interleaved(_));
    // A chunk receives unless it is the pipeline's first, and sends unless it is the last.
    let receives = |c: u64| !first || (interleaved && c > 0);
    let sends = |c: u64| !last || (interleaved && c + 1 < v);
    let fwd = |mb: u64, c: u64| {
        let (mb, chunk) = (mb as usize, c as usize);
        let mut w = Vec::new();
        if receives(c) {
            w.push(Action::Recv { mb, chunk });
        }
        w.push(Action::Forward { mb, chunk });
        if sends(c) {
            w.push(Action::Send { mb, chunk });
        }
        w
    };
    let bwd = |mb: u64, c: u64| {
        let (mb, chunk) = (mb as usize, c as usize);
        let mut w = Vec::new();
        if sends(c) {
            w.push(Action::RecvGrad { mb, chunk });
        }
        w.push(Action::Backward { mb, chunk });
        if receives(c) {
            w.push(Action::SendGrad { mb, chunk });
        }
        w
    };
    let mut steps: Vec<Action> = Vec::new();
    if p == 1 {
        for mb in 0..m as usize {
            steps.push(Action::Forward { mb, chunk: 0 });
            steps.push(Action::Backward { mb, chunk: 0 });
        }
    } else {
        match s.schedule {
            ScheduleChoice::Gpipe => {
                steps.extend((0..m).flat_map(|mb| fwd(mb, 0)));
                steps.extend((0..m).rev().flat_map(|mb| bwd(mb, 0)));
            }
            ScheduleChoice::OneFOneB => {
                let warmup = (p - i - 1).min(m);
                steps.extend((0..warmup).flat_map(|mb| fwd(mb, 0)));
                for k in 0..(m - warmup) {
                    steps.extend(fwd(warmup + k, 0));
                    steps.extend(bwd(k, 0));
                }
                steps.extend((m - warmup..m).flat_map(|mb| bwd(mb, 0)));
            }
            ScheduleChoice::Interleaved(v) => {
                // Megatron's order: groups of p microbatches, chunk by chunk; backward in reverse.
                let order: Vec<(u64, u64)> = (0..m.div_ceil(p))
                    .flat_map(|g| {
                        (0..v)
                            .flat_map(move |c| (g * p..((g + 1) * p).min(m)).map(move |mb| (mb, c)))
                    })
                    .collect();
                let back: Vec<(u64, u64)> = (0..m.div_ceil(p))
                    .flat_map(|g| {
                        (0..v)
                            .rev()
                            .flat_map(move |c| (g * p..((g + 1) * p).min(m)).map(move |mb| (mb, c)))
                    })
                    .collect();
                let total = order.len() as u64;
                let warmup = ((p - i - 1) * 2 + (v - 1) * p).min(total) as usize;
                steps.extend(order[..warmup].iter().flat_map(|&(mb, c)| fwd(mb, c)));
                for k in 0..order.len() - warmup {
                    let (mb, c) = order[warmup + k];
                    steps.extend(fwd(mb, c));
                    let (mb, c) = back[k];
                    steps.extend(bwd(mb, c));
                }
                steps.extend(
                    back[order.len() - warmup..]
                        .iter()
                        .flat_map(|&(mb, c)| bwd(mb, c)),
                );
            }
        }
    }
    if s.data > 1 {
        steps.push(if s.zero == 0 {
            Action::AllReduceGrads
        } else {
            Action::ReduceScatterGrads
        });
    }
    steps.push(Action::Optimizer);
    if s.data > 1 && (1..=2).contains(&s.zero) {
        steps.push(Action::GatherWeights);
    }
    steps
}

pub fn plan(
    model: &Model,
    g: &Graph,
    e: &Experiment,
    best: &Candidate,
    chosen_by: &str,
    alternatives: Vec<Alternative>,
    considered: usize,
    layouts: Vec<TensorLayout>,
) -> ExecutionPlan {
    let ev = &best.evaluation;
    let s = ev.strategy;
    let cluster = &e.parallel.mesh;
    let owners = owners(model, &best.layout);
    let stages: Vec<Stage> = ev
        .stages
        .iter()
        .zip(layouts)
        .enumerate()
        .map(|(i, (st, layout))| {
            let mut memory = st.memory.clone();
            for x in [
                &mut memory.weights,
                &mut memory.gradients,
                &mut memory.optimizer,
                &mut memory.activations,
                &mut memory.buffers,
                &mut memory.total,
                &mut memory.capacity,
            ] {
                *x = x.round();
            }
            Stage {
                index: i as u64,
                layers: layer_runs(g, &owners, i as u64),
                devices: st.devices.0..st.devices.1,
                submesh: st.submesh,
                layout,
                micro_batch: s.on(st.submesh).micro_batch,
                forward: round(st.forward),
                backward: round(st.backward),
                recompute: round(st.recompute),
                tensor_comm: round(st.tensor_comm),
                memory,
            }
        })
        .collect();
    let mut time = ev.time.clone();
    for x in [
        &mut time.compute,
        &mut time.recompute,
        &mut time.tensor_comm,
        &mut time.pipeline_bubble,
        &mut time.p2p,
        &mut time.data_parallel,
        &mut time.optimizer,
        &mut time.total,
    ] {
        *x = round(*x);
    }
    let devices = cluster.devices() as f64;
    let tokens = e.train.batch as f64 * e.train.seq_len as f64;
    let peak = model.peak_flops();
    let throughput = Throughput {
        tokens_per_second: round(tokens / ev.time.total),
        tflops_per_device: round(ev.hardware_flops / ev.time.total / devices / 1e12),
        mfu: round(ev.model_flops / ev.time.total / devices / peak),
    };
    let trainable = g.trainable_params();
    let sharding = sharding(g, ev, &stages, &owners);
    ExecutionPlan {
        experiment: e.name.clone(),
        mesh: Mesh {
            cluster: cluster.name.clone(),
            nodes: cluster.nodes,
            devices_per_node: cluster.node.devices,
            devices: cluster.devices(),
            device: cluster.node.device.name.clone(),
            peak_flops: round(peak),
            memory_per_device: round(cluster.node.device.memory),
        },
        strategy: summary(ev, e, chosen_by),
        stages,
        sharding,
        collectives: collectives(model, g, best),
        schedule: ev
            .stages
            .iter()
            .enumerate()
            .map(|(i, st)| StageSchedule {
                stage: i as u64,
                actions: stage_steps(&s.on(st.submesh), i as u64),
                // Without a pipeline a stage runs its layers as one chunk, whatever the schedule.
                chunks: if s.pipeline > 1 {
                    s.schedule.chunks()
                } else {
                    1
                },
            })
            .collect(),
        time,
        throughput,
        params: ParamCounts {
            total: g.total_params(),
            trainable,
            frozen: g.total_params() - trainable,
        },
        alternatives,
        considered,
    }
}
