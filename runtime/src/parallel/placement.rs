//! Where the plan puts things, in the executor's terms: which graph nodes each pipeline stage
//! (and each chunk of an interleaved stage) runs, which values cross between stages, which
//! parameters each stage holds, the pieces recomputed in the backward pass, and each stage's
//! sequence of actions for one iteration — read from the typed `ExecutionPlan`, never
//! re-decided.

use kiln_compiler::graph::{Graph, Op};
use kiln_compiler::plan::cost::RecomputeChoice;
use kiln_compiler::plan::sharding::{Compute, Conversion, TensorLayout};
use kiln_compiler::plan::{Action, ExecutionPlan, MemoryBreakdown};
use petgraph::graph::NodeIndex;
use std::collections::{BTreeMap, BTreeSet};

/// A plan the runtime cannot follow (a planner/runtime mismatch, not a user error).
#[derive(Debug)]
pub struct PlacementError(pub String);

fn fail<T>(message: impl Into<String>) -> Result<T, PlacementError> {
    Err(PlacementError(message.into()))
}

/// A run of consecutive layers held by one stage: the unit that receives its inputs, runs
/// forward and backward, and sends its outputs. Without interleaving each stage has one.
#[derive(Clone, Debug)]
pub struct VirtualStage {
    pub stage: usize,
    pub chunk: usize,
    /// Its nodes in topological order, cut into the pieces forward keeps or recomputes.
    pub pieces: Vec<Piece>,
    /// Values it reads from earlier virtual stages, with the one that computes each.
    pub needs: Vec<(NodeIndex, usize)>,
    /// Values it computes that later virtual stages read, with the ones that read each.
    pub feeds: Vec<(NodeIndex, Vec<usize>)>,
}

/// Consecutive nodes of a virtual stage run as one tape. A recomputed piece keeps only its
/// inputs after the forward pass and runs forward again just before its backward. Under tensor
/// parallelism a piece computes in one way only (on whole values, split ones, or a share of the
/// sequence), so the collectives between them sit between pieces.
#[derive(Clone, Debug)]
pub struct Piece {
    pub nodes: Vec<NodeIndex>,
    pub recompute: bool,
    pub compute: Compute,
    /// Values computed outside the piece that it reads (integer inputs aside), with the
    /// collective on the way in.
    pub inputs: Vec<(NodeIndex, Conversion)>,
    /// Values it computes that are read outside it.
    pub outputs: Vec<NodeIndex>,
}

/// The devices of one pipeline stage: data-parallel replicas of a tensor-parallel group, which
/// may differ from stage to stage (Alpa's submeshes).
#[derive(Clone, Debug)]
pub struct StageGrid {
    pub data: usize,
    /// How the stage's tensor-parallel group lays out every parameter and value.
    pub tensor: TensorLayout,
    /// Rows of a microbatch each replica computes: its share of the pipeline's microbatch.
    pub micro_batch: usize,
}

impl StageGrid {
    pub fn devices(&self) -> usize {
        self.data * self.tensor.size
    }

    /// The rows of a pipeline microbatch that data-parallel rank `rank` computes.
    pub fn rows(&self, rank: usize) -> std::ops::Range<usize> {
        rank * self.micro_batch..(rank + 1) * self.micro_batch
    }
}

#[derive(Clone, Debug)]
pub struct Placement {
    /// Each stage's devices.
    pub grids: Vec<StageGrid>,
    /// Whether every stage has the same grid: devices then pair up stage to stage.
    pub uniform: bool,
    pub pipeline: usize,
    pub zero: u8,
    /// Rows of one pipeline microbatch, split among each stage's replicas.
    pub rows_per_microbatch: usize,
    /// The stage computing the loss.
    pub loss_stage: usize,
    pub microbatches: usize,
    /// In pipeline order: virtual stage k feeds k + 1.
    pub virtual_stages: Vec<VirtualStage>,
    /// `holds[stage][param]`: whether the stage's devices keep the parameter.
    pub holds: Vec<Vec<bool>>,
    /// One iteration of each stage's devices.
    pub schedules: Vec<Vec<Action>>,
    /// The plan's prediction of each stage's memory per device.
    pub memory: Vec<MemoryBreakdown>,
}

impl Placement {
    /// What `plan` says, for the graph it was made from.
    pub fn from_plan(g: &Graph, plan: &ExecutionPlan) -> Result<Self, PlacementError> {
        let st = &plan.strategy;
        let pipeline = st.pipeline as usize;
        if plan.stages.len() != pipeline || plan.schedule.len() != pipeline {
            return fail("the plan's stage table or schedule does not list every stage");
        }
        let grids: Vec<StageGrid> = plan
            .stages
            .iter()
            .map(|stage| StageGrid {
                data: stage.submesh.data as usize,
                tensor: stage.layout.clone(),
                micro_batch: stage.micro_batch as usize,
            })
            .collect();
        let rows_per_microbatch = grids[0].data * grids[0].micro_batch;
        if let Some(s) = grids
            .iter()
            .position(|grid| grid.data * grid.micro_batch != rows_per_microbatch)
        {
            return fail(format!(
                "stage {s}'s replicas compute {} x {} rows of each microbatch, stage 0's {rows_per_microbatch}",
                grids[s].data, grids[s].micro_batch
            ));
        }
        let uniform = plan
            .stages
            .iter()
            .all(|stage| stage.submesh == plan.stages[0].submesh);
        let owner = layer_owners(g, plan)?;
        let recompute = st.recompute;
        // Virtual stages: maximal runs of consecutive layers on one stage, in layer order.
        let mut runs: Vec<(usize, Vec<usize>)> = Vec::new();
        for (layer, &stage) in owner.iter().enumerate() {
            match runs.last_mut() {
                Some((s, layers)) if *s == stage => layers.push(layer),
                _ => runs.push((stage, vec![layer])),
            }
        }
        let mut vstage_of_layer = vec![0; owner.len()];
        for (k, (_, layers)) in runs.iter().enumerate() {
            for &l in layers {
                vstage_of_layer[l] = k;
            }
        }
        let order = g.topo_order();
        let home = |n: NodeIndex| -> Option<usize> {
            (!matches!(g.dag[n].op, Op::Input { .. })).then(|| vstage_of_layer[g.dag[n].layer])
        };
        let mut needs: Vec<Vec<(NodeIndex, usize)>> = vec![Vec::new(); runs.len()];
        let mut feeds: Vec<BTreeMap<NodeIndex, Vec<usize>>> = vec![BTreeMap::new(); runs.len()];
        let mut nodes: Vec<Vec<NodeIndex>> = vec![Vec::new(); runs.len()];
        for &n in &order {
            let Some(k) = home(n) else { continue };
            nodes[k].push(n);
            for i in g.inputs(n) {
                let Some(j) = home(i) else { continue };
                if j > k {
                    return fail(format!(
                        "`{}` reads `{}` from a later pipeline stage",
                        g.dag[n].name, g.dag[i].name
                    ));
                }
                if j < k {
                    if !needs[k].iter().any(|&(m, _)| m == i) {
                        needs[k].push((i, j));
                    }
                    let readers = feeds[j].entry(i).or_default();
                    if !readers.contains(&k) {
                        readers.push(k);
                    }
                }
            }
        }
        let mut chunks_seen = vec![0usize; pipeline];
        let mut virtual_stages = Vec::with_capacity(runs.len());
        for (k, (stage, _)) in runs.iter().enumerate() {
            let chunk = chunks_seen[*stage];
            chunks_seen[*stage] += 1;
            virtual_stages.push(VirtualStage {
                stage: *stage,
                chunk,
                pieces: pieces(g, &nodes[k], recompute, &grids[*stage].tensor)?,
                needs: std::mem::take(&mut needs[k]),
                feeds: std::mem::take(&mut feeds[k]).into_iter().collect(),
            });
        }
        // Between stages on different grids, values are resharded by rows.
        for v in &virtual_stages {
            for &(n, from) in &v.needs {
                let other = virtual_stages[from].stage;
                if plan.stages[v.stage].submesh != plan.stages[other].submesh && !by_rows(g, n) {
                    return fail(format!(
                        "`{}` is broadcast over the batch and crosses from stage {other} to stage {} on another grid, which the executor does not reshard",
                        g.dag[n].name, v.stage
                    ));
                }
            }
        }
        let mut holds = vec![vec![false; g.params.len()]; pipeline];
        for v in &virtual_stages {
            for piece in &v.pieces {
                for &n in &piece.nodes {
                    for id in g.dag[n].op.params() {
                        holds[v.stage][id] = true;
                    }
                }
            }
        }
        let schedules = plan.schedule.iter().map(|s| s.actions.clone()).collect();
        let loss_stage = g
            .loss
            .and_then(|l| owner.get(g.dag[l].layer).copied())
            .unwrap_or(pipeline - 1);
        Ok(Placement {
            grids,
            uniform,
            pipeline,
            zero: st.zero,
            rows_per_microbatch,
            loss_stage,
            microbatches: st.microbatches as usize,
            virtual_stages,
            holds,
            schedules,
            memory: plan.stages.iter().map(|s| s.memory.clone()).collect(),
        })
    }

    /// Devices over all stages.
    pub fn devices(&self) -> usize {
        self.grids.iter().map(StageGrid::devices).sum()
    }

    /// Every device's (stage, data rank, tensor rank), in device order.
    pub fn coordinates(&self) -> Vec<(usize, usize, usize)> {
        let mut all = Vec::with_capacity(self.devices());
        for (stage, grid) in self.grids.iter().enumerate() {
            for rank in 0..grid.data {
                for part in 0..grid.tensor.size {
                    all.push((stage, rank, part));
                }
            }
        }
        all
    }

    /// The mesh index of the device of `stage` at data rank `rank`, tensor rank `part`
    /// (stages in order, then data rank, tensor rank fastest).
    pub fn device(&self, stage: usize, rank: usize, part: usize) -> usize {
        let before: usize = self.grids[..stage].iter().map(StageGrid::devices).sum();
        before + rank * self.grids[stage].tensor.size + part
    }

    /// The first stage holding parameter `param` (its gradient is counted there once).
    pub fn first_holder(&self, param: usize) -> usize {
        (0..self.pipeline)
            .find(|&s| self.holds[s][param])
            .unwrap_or(0)
    }

    /// Whether the GPU executor runs this plan: it runs a device's share of the graph whole,
    /// so every device must hold the whole graph (data parallelism and ZeRO 1-2), not yet
    /// pipeline or tensor parallelism, ZeRO-3 or recomputation.
    pub fn gpu_executable(&self) -> Result<(), String> {
        let unsupported = if self.grids.len() > 1 {
            Some(format!(
                "pipeline parallelism ({} stages)",
                self.grids.len()
            ))
        } else if self.grids.iter().any(|grid| grid.tensor.size > 1) {
            Some("tensor parallelism".into())
        } else if self.zero >= 3 {
            Some("ZeRO-3".into())
        } else if self
            .virtual_stages
            .iter()
            .any(|v| v.pieces.iter().any(|piece| piece.recompute))
        {
            Some("activation recomputation".into())
        } else {
            None
        };
        match unsupported {
            Some(what) => Err(format!(
                "the GPU executor does not run plans with {what} yet (data parallelism and ZeRO 1-2 only)"
            )),
            None => Ok(()),
        }
    }

    /// The virtual stage that is chunk `chunk` of `stage`.
    pub fn virtual_stage(&self, stage: usize, chunk: usize) -> Option<usize> {
        self.virtual_stages
            .iter()
            .position(|v| v.stage == stage && v.chunk == chunk)
    }
}

/// Whether `n`'s value has the batch's rows as its first axis (an activation), rather than one
/// value broadcast over the batch.
pub fn by_rows(g: &Graph, n: NodeIndex) -> bool {
    g.dag[n].out.shape.first() == Some(&g.batch)
}

/// The pipeline stage of every layer, from the plan's stage table.
fn layer_owners(g: &Graph, plan: &ExecutionPlan) -> Result<Vec<usize>, PlacementError> {
    let mut owner: Vec<Option<usize>> = vec![None; g.layers.len()];
    for (s, stage) in plan.stages.iter().enumerate() {
        for l in stage.layers.iter().flat_map(|run| run.layers.clone()) {
            match owner.get_mut(l) {
                Some(slot) => *slot = Some(s),
                None => return fail(format!("the plan places layer {l}, which the graph lacks")),
            }
        }
    }
    owner
        .into_iter()
        .enumerate()
        .map(|(l, o)| {
            o.ok_or_else(|| PlacementError(format!("layer `{}` is on no stage", g.layers[l].name)))
        })
        .collect()
}

/// Cuts a virtual stage's nodes into pieces, one per layer at least: each piece's backward
/// frees its intermediate gradients before the next runs (a step's peak memory fell from 1.8 to
/// 1.0 GiB on bench/gpt2_6l_384.kiln, at the same speed). Under full recompute every piece keeps
/// only its inputs; under selective recompute each attention core is a piece of its own,
/// recomputed. Under tensor parallelism a piece also ends where computation moves between whole
/// values, split ones and shares of the sequence.
fn pieces(
    g: &Graph,
    nodes: &[NodeIndex],
    mode: RecomputeChoice,
    tl: &TensorLayout,
) -> Result<Vec<Piece>, PlacementError> {
    let mut out: Vec<Piece> = Vec::new();
    let mut layer = None;
    for n in grouped_by_compute(g, nodes, tl) {
        let node = &g.dag[n];
        let compute = tl.compute(n);
        let core = matches!(node.op, Op::Attention { .. });
        let recompute = match mode {
            RecomputeChoice::None => false,
            RecomputeChoice::Full => true,
            RecomputeChoice::Selective => core,
        };
        let fresh = layer != Some(node.layer) || (mode == RecomputeChoice::Selective && core);
        layer = Some(node.layer);
        match out.last_mut() {
            Some(p) if !fresh && p.recompute == recompute && p.compute == compute => {
                p.nodes.push(n)
            }
            _ => out.push(Piece {
                nodes: vec![n],
                recompute,
                compute,
                inputs: Vec::new(),
                outputs: Vec::new(),
            }),
        }
    }
    for piece in &mut out {
        let inside: BTreeSet<NodeIndex> = piece.nodes.iter().copied().collect();
        for &n in &piece.nodes {
            for i in g.inputs(n) {
                let outside = !inside.contains(&i) && !matches!(g.dag[i].op, Op::Input { .. });
                if !outside {
                    continue;
                }
                let conversion = tl.conversion(g, i, n, piece.compute);
                match piece.inputs.iter().find(|(m, _)| *m == i) {
                    None => piece.inputs.push((i, conversion)),
                    Some((_, c)) if *c == conversion => {}
                    Some(_) => {
                        return fail(format!(
                            "`{}` is read two ways within one piece of the graph",
                            g.dag[i].name
                        ))
                    }
                }
            }
            let read_outside = g
                .dag
                .neighbors_directed(n, petgraph::Direction::Outgoing)
                .any(|m| !inside.contains(&m));
            if read_outside {
                piece.outputs.push(n);
            }
        }
    }
    Ok(out)
}

/// `nodes` (in topological order) reordered, still topologically, so that the nodes of a layer
/// that compute alike run one after another: a change between whole, split and per-token
/// computation ends a piece, and values crossing pieces are copied (a language model's logits
/// into its vocabulary-parallel loss, for one). Ties keep the original order.
fn grouped_by_compute(g: &Graph, nodes: &[NodeIndex], tl: &TensorLayout) -> Vec<NodeIndex> {
    let position: BTreeMap<NodeIndex, usize> =
        nodes.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut waiting = vec![0usize; nodes.len()];
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, &n) in nodes.iter().enumerate() {
        for input in g.inputs(n) {
            if let Some(&j) = position.get(&input) {
                waiting[i] += 1;
                readers[j].push(i);
            }
        }
    }
    let kind = |i: usize| (g.dag[nodes[i]].layer, tl.compute(nodes[i]));
    let mut ready: BTreeSet<usize> = (0..nodes.len()).filter(|&i| waiting[i] == 0).collect();
    let mut out = Vec::with_capacity(nodes.len());
    while let Some(&first) = ready.first() {
        let next = out
            .last()
            .and_then(|&last: &usize| ready.iter().copied().find(|&i| kind(i) == kind(last)))
            .unwrap_or(first);
        ready.remove(&next);
        for &r in &readers[next] {
            waiting[r] -= 1;
            if waiting[r] == 0 {
                ready.insert(r);
            }
        }
        out.push(next);
    }
    out.into_iter().map(|i| nodes[i]).collect()
}
