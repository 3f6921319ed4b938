//! Building the [`ExecutionPlan`] from the chosen evaluation: stages and devices, sharding of
//! every parameter, collectives, the per-stage schedule, throughput.

use super::cost::{Evaluation, Model, RecomputeChoice, ScheduleChoice, Strategy};
use super::search::Candidate;
use super::types::*;
use crate::graph::{Graph, LayerKind, Op};
use crate::spec::{Experiment, Offload};

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

fn ranges(items: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let mut j = i;
        while j + 1 < items.len() && items[j + 1] == items[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            items[i].to_string()
        } else {
            format!("{}-{}", items[i], items[j])
        });
        i = j + 1;
    }
    out.join(",")
}

pub fn summary(s: &Strategy, e: &Experiment, chosen_by: &str) -> StrategySummary {
    StrategySummary {
        chosen_by: chosen_by.into(),
        data: s.data,
        tensor: s.tensor,
        pipeline: s.pipeline,
        sequence_parallel: s.sequence_parallel,
        zero: s.zero,
        recompute: match s.recompute {
            RecomputeChoice::None => "none",
            RecomputeChoice::Selective => "selective",
            RecomputeChoice::Full => "full",
        }
        .into(),
        schedule: s.schedule.name(),
        micro_batch: s.micro_batch,
        microbatches: s.microbatches,
        global_batch: e.train.batch,
        offload: match e.parallel.offload {
            Offload::None => "none",
            Offload::Optimizer => "optimizer",
            Offload::All => "all",
        }
        .into(),
    }
}

/// A one-line description of a strategy, for alternatives.
pub fn describe(s: &Strategy) -> String {
    let recompute = match s.recompute {
        RecomputeChoice::None => "",
        RecomputeChoice::Selective => " recompute=selective",
        RecomputeChoice::Full => " recompute=full",
    };
    format!(
        "d={} t={} p={}{} mb={}×{} {}{}{}",
        s.data,
        s.tensor,
        s.pipeline,
        if s.sequence_parallel { "+sp" } else { "" },
        s.micro_batch,
        s.microbatches,
        s.schedule.name(),
        if s.zero > 0 {
            format!(" zero={}", s.zero)
        } else {
            String::new()
        },
        recompute
    )
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
fn owners(model: &Model, layout: &[Vec<std::ops::Range<usize>>]) -> Vec<u64> {
    (0..model.layers.len())
        .map(|l| {
            layout
                .iter()
                .position(|ranges| ranges.iter().any(|r| r.contains(&l)))
                .unwrap_or(0) as u64
        })
        .collect()
}

/// The names of the layers a rank holds, runs of consecutive blocks folded (`block.0-11`).
fn layer_names(g: &Graph, owners: &[u64], rank: u64) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(String, String)> = None;
    let flush = |run: &mut Option<(String, String)>, out: &mut Vec<String>| {
        if let Some((a, b)) = run.take() {
            out.push(if a == b {
                format!("block.{a}")
            } else {
                format!("block.{a}-{b}")
            });
        }
    };
    for (l, layer) in g.layers.iter().enumerate() {
        if owners[l] != rank {
            flush(&mut run, &mut out);
            continue;
        }
        match layer.kind {
            LayerKind::Block => {
                let i = layer.name.trim_start_matches("block.").to_string();
                match &mut run {
                    Some((_, end)) => *end = i,
                    None => run = Some((i.clone(), i)),
                }
            }
            _ => {
                flush(&mut run, &mut out);
                out.push(layer.name.clone());
            }
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Tensor-parallel layout of every parameter (Megatron column/row splits, vocabulary-parallel
/// embeddings; LoRA A and B split so that no extra collective is needed).
fn tensor_split(g: &Graph) -> Vec<TensorSplit> {
    let mut out = vec![TensorSplit::Replicated; g.params.len()];
    let base_of = |name: &str| -> Option<TensorSplit> {
        let node = g.find(name)?;
        let input = g.inputs(node).first().copied()?;
        Some(if g.dag[input].cost.tensor_parallel {
            TensorSplit::Row
        } else {
            TensorSplit::Column
        })
    };
    for n in g.dag.node_indices() {
        let node = &g.dag[n];
        let kind = g.layers[node.layer].kind;
        match &node.op {
            Op::Embedding { table } if node.cost.tensor_parallel => {
                out[*table] = TensorSplit::Vocab
            }
            Op::Linear { weight, bias, .. } if node.cost.tensor_parallel => {
                let split = if kind == LayerKind::Head {
                    TensorSplit::Vocab
                } else if let Some(base) = node.name.strip_suffix(".lora_A") {
                    // Column W: A replicated; row W: A split on its input.
                    match base_of(base) {
                        Some(TensorSplit::Row) => TensorSplit::Row,
                        _ => TensorSplit::Replicated,
                    }
                } else if let Some(base) = node.name.strip_suffix(".lora_B") {
                    // Column W: B split on its output; row W: B replicated.
                    match base_of(base) {
                        Some(TensorSplit::Row) => TensorSplit::Replicated,
                        _ => TensorSplit::Column,
                    }
                } else {
                    let input = g.inputs(n).first().copied();
                    if input.is_some_and(|i| g.dag[i].cost.tensor_parallel) {
                        TensorSplit::Row
                    } else {
                        TensorSplit::Column
                    }
                };
                if out[weight.id] == TensorSplit::Replicated {
                    out[weight.id] = split;
                }
                if let Some(b) = bias {
                    // A row-parallel bias is added once, after the reduction.
                    out[b.id] = if split == TensorSplit::Row {
                        TensorSplit::Replicated
                    } else {
                        split
                    };
                }
            }
            Op::ScaleBy { param } if node.cost.tensor_parallel => out[*param] = TensorSplit::Column,
            _ => {}
        }
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

fn sharding(g: &Graph, s: &Strategy, owners: &[u64]) -> Vec<Sharding> {
    let splits = tensor_split(g);
    let stage_of = |layer: usize| owners[layer];
    // Group the same parameter of consecutive blocks.
    let mut groups: Vec<(String, Vec<u64>, usize, Vec<u64>)> = Vec::new();
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
        let stage = stage_of(p.layer);
        match groups.iter_mut().find(|(name, ..)| *name == pattern) {
            Some((_, blocks, _, stages)) => {
                blocks.extend(block);
                if !stages.contains(&stage) {
                    stages.push(stage);
                }
            }
            None => groups.push((pattern, block.into_iter().collect(), id, vec![stage])),
        }
    }
    for (_, _, _, stages) in &mut groups {
        stages.sort();
    }
    groups
        .into_iter()
        .map(|(name, blocks, id, stages)| {
            let p = &g.params[id];
            Sharding {
                name,
                blocks: ranges(&blocks),
                shape: p.shape.clone(),
                trainable: p.trainable,
                tensor: if s.tensor > 1 {
                    splits[id]
                } else {
                    TensorSplit::Replicated
                },
                zero: if s.data > 1 {
                    zero_label(s.zero, p.trainable).into()
                } else {
                    "none".into()
                },
                stages: ranges(&stages),
            }
        })
        .collect()
}

fn collectives(model: &Model, g: &Graph, c: &Candidate) -> Vec<Collective> {
    let s = &c.evaluation.strategy;
    let t = &c.evaluation.time;
    let mut out = Vec::new();
    let f = s.micro_batch as f64 / g.batch as f64;
    let hidden = model.layers.first().map_or(0.0, |l| l.boundary_bytes) * f;
    if s.tensor > 1 {
        let slowest = c
            .layout
            .iter()
            .map(|ranges| {
                ranges
                    .iter()
                    .flat_map(|r| r.clone())
                    .filter(|&l| g.layers[l].kind == LayerKind::Block)
                    .count()
            })
            .max()
            .unwrap_or(0) as u64;
        let per_block = if s.recompute == RecomputeChoice::Full {
            6
        } else {
            4
        };
        out.push(Collective {
            kind: if s.sequence_parallel {
                "reduce_scatter + all_gather".into()
            } else {
                "all_reduce".into()
            },
            group: "tensor".into(),
            group_size: s.tensor,
            bytes: hidden,
            per_iteration: s.microbatches * (slowest * per_block + 1),
            seconds: t.tensor_comm,
        });
    }
    if s.pipeline > 1 {
        let bytes = if s.tensor > 1 {
            hidden / s.tensor as f64
        } else {
            hidden
        };
        out.push(Collective {
            kind: "send/recv".into(),
            group: "pipeline".into(),
            group_size: 2,
            bytes,
            per_iteration: 2 * s.microbatches * s.schedule.chunks(),
            seconds: t.p2p,
        });
    }
    if s.data > 1 {
        let trainable: f64 = c
            .layout
            .iter()
            .map(|ranges| {
                ranges
                    .iter()
                    .flat_map(|r| &model.layers[r.clone()])
                    .map(|l| l.trainable_split / s.tensor as f64 + l.trainable_repl)
                    .sum::<f64>()
            })
            .fold(0.0, f64::max);
        let bytes = trainable * model.element_bytes();
        let kind = match s.zero {
            0 => "all_reduce (gradients)",
            1 | 2 => "reduce_scatter (gradients) + all_gather (weights)",
            _ => "all_gather (weights, forward and backward) + reduce_scatter (gradients)",
        };
        out.push(Collective {
            kind: kind.into(),
            group: "data".into(),
            group_size: s.data,
            bytes,
            per_iteration: 1,
            seconds: t.data_parallel,
        });
    }
    for col in &mut out {
        col.bytes = round(col.bytes);
        col.seconds = round(col.seconds);
    }
    out
}

/// The order one device of stage `i` runs an iteration in.
fn stage_steps(s: &Strategy, i: u64) -> String {
    let (p, m, v) = (s.pipeline, s.microbatches, s.schedule.chunks());
    let first = i == 0;
    let last = i + 1 == p;
    let fwd = |mb: u64, chunk: Option<u64>| {
        let id = chunk.map_or(mb.to_string(), |c| format!("{mb}.{c}"));
        let mut w: Vec<String> = Vec::new();
        if !first || chunk.is_some_and(|c| c > 0) {
            w.push(format!("R{id}"));
        }
        w.push(format!("F{id}"));
        if !last || chunk.is_some_and(|c| c + 1 < v) {
            w.push(format!("S{id}"));
        }
        w.join(" ")
    };
    let bwd = |mb: u64, chunk: Option<u64>| {
        let id = chunk.map_or(mb.to_string(), |c| format!("{mb}.{c}"));
        let mut w: Vec<String> = Vec::new();
        if !last || chunk.is_some_and(|c| c + 1 < v) {
            w.push(format!("R'{id}"));
        }
        w.push(format!("B{id}"));
        if !first || chunk.is_some_and(|c| c > 0) {
            w.push(format!("S'{id}"));
        }
        w.join(" ")
    };
    let mut steps: Vec<String> = Vec::new();
    if p == 1 {
        for mb in 0..m {
            steps.push(format!("F{mb}"));
            steps.push(format!("B{mb}"));
        }
    } else {
        match s.schedule {
            ScheduleChoice::Gpipe => {
                steps.extend((0..m).map(|mb| fwd(mb, None)));
                steps.extend((0..m).rev().map(|mb| bwd(mb, None)));
            }
            ScheduleChoice::OneFOneB => {
                let warmup = (p - i - 1).min(m);
                steps.extend((0..warmup).map(|mb| fwd(mb, None)));
                for k in 0..(m - warmup) {
                    steps.push(fwd(warmup + k, None));
                    steps.push(bwd(k, None));
                }
                steps.extend((m - warmup..m).map(|mb| bwd(mb, None)));
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
                steps.extend(order[..warmup].iter().map(|&(mb, c)| fwd(mb, Some(c))));
                for k in 0..order.len() - warmup {
                    let (mb, c) = order[warmup + k];
                    steps.push(fwd(mb, Some(c)));
                    let (mb, c) = back[k];
                    steps.push(bwd(mb, Some(c)));
                }
                steps.extend(
                    back[order.len() - warmup..]
                        .iter()
                        .map(|&(mb, c)| bwd(mb, Some(c))),
                );
            }
        }
    }
    if s.data > 1 {
        steps.push(if s.zero == 0 {
            "AllReduce(grads)".into()
        } else {
            "ReduceScatter(grads)".into()
        });
    }
    steps.push("Optimizer".into());
    if s.data > 1 && (1..=2).contains(&s.zero) {
        steps.push("AllGather(weights)".into());
    }
    steps.join(" ")
}

pub fn plan(
    model: &Model,
    g: &Graph,
    e: &Experiment,
    best: &Candidate,
    chosen_by: &str,
    alternatives: Vec<Alternative>,
    considered: usize,
) -> ExecutionPlan {
    let ev = &best.evaluation;
    let s = ev.strategy;
    let cluster = &e.parallel.mesh;
    let per_stage = s.data * s.tensor;
    let owners = owners(model, &best.layout);
    let stages: Vec<Stage> = ev
        .stages
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let devices: Vec<u64> = (i as u64 * per_stage..(i as u64 + 1) * per_stage).collect();
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
                layers: layer_names(g, &owners, i as u64),
                devices: ranges(&devices),
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
    let tokens = (e.train.batch * e.train.seq_len) as f64;
    let peak = model.peak_flops();
    let throughput = Throughput {
        tokens_per_second: round(tokens / ev.time.total),
        tflops_per_device: round(ev.hardware_flops / ev.time.total / devices / 1e12),
        mfu: round(ev.model_flops / ev.time.total / devices / peak),
    };
    let trainable = g.trainable_params();
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
        strategy: summary(&s, e, chosen_by),
        stages,
        sharding: sharding(g, &s, &owners),
        collectives: collectives(model, g, best),
        schedule: (0..s.pipeline)
            .map(|i| StageSchedule {
                stage: i,
                steps: stage_steps(&s, i),
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
