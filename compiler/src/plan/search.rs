//! Finding strategies: the candidates a parallel block allows (a manual plan fixes most
//! knobs; `plan = auto` leaves them to the search), the uniform fast path over all of them, and
//! an Alpa-style dynamic program that re-cuts the layers into stages for the best candidates.

use super::cost::{Evaluation, Model, RecomputeChoice, ScheduleChoice, Strategy, Terms};
use rayon::prelude::*;
use std::collections::HashMap;
use std::ops::Range;

/// What the search may choose; `None` fields are free.
#[derive(Clone, Debug, Default)]
pub struct Space {
    pub data: Option<u64>,
    pub tensor: Option<u64>,
    pub pipeline: Option<u64>,
    pub micro_batch: Option<u64>,
    pub microbatches: Option<u64>,
    pub schedule: Option<ScheduleChoice>,
    pub zero: Option<u8>,
    pub recompute: Option<RecomputeChoice>,
    pub sequence_parallel: Option<bool>,
}

/// Shape facts that restrict degrees.
pub struct Shape {
    pub devices: u64,
    pub node_devices: u64,
    pub batch: u64,
    /// Rows that must share a microbatch (a reward model's chosen/rejected pair, PET's row and
    /// its masked copy).
    pub rows_per_record: u64,
    pub blocks: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub ffn: u64,
}

fn divisors(n: u64) -> Vec<u64> {
    (1..=n).filter(|d| n % d == 0).collect()
}

/// Every strategy the space allows, in a stable order.
pub fn candidates(space: &Space, shape: &Shape) -> Vec<Strategy> {
    let mut out = Vec::new();
    let tensors: Vec<u64> = match space.tensor {
        Some(t) => vec![t],
        // Tensor parallelism stays inside a node and must divide heads, KV heads and the FFN.
        None => divisors(shape.node_devices)
            .into_iter()
            .filter(|t| shape.heads % t == 0 && shape.kv_heads % t == 0 && shape.ffn % t == 0)
            .collect(),
    };
    for &t in &tensors {
        let pipelines: Vec<u64> = match space.pipeline {
            Some(p) => vec![p],
            None => divisors(shape.devices / t.max(1))
                .into_iter()
                .filter(|p| *p <= shape.blocks)
                .collect(),
        };
        for &p in &pipelines {
            let Some(d) = space
                .data
                .or_else(|| (shape.devices % (t * p) == 0).then(|| shape.devices / (t * p)))
            else {
                continue;
            };
            if d * t * p != shape.devices || shape.batch % d != 0 {
                continue;
            }
            let per_replica = shape.batch / d;
            let micro_batches: Vec<u64> = match (space.micro_batch, space.microbatches) {
                (Some(b), _) => vec![b],
                (None, Some(m)) if per_replica % m == 0 => vec![per_replica / m],
                (None, Some(_)) => continue,
                (None, None) => divisors(per_replica)
                    .into_iter()
                    .filter(|b| b.is_power_of_two() || *b == per_replica)
                    .collect(),
            };
            for &b in &micro_batches {
                if per_replica % b != 0 || b % shape.rows_per_record != 0 {
                    continue;
                }
                let m = per_replica / b;
                let schedules: Vec<ScheduleChoice> = match space.schedule {
                    Some(s) => vec![s],
                    None if p == 1 => vec![ScheduleChoice::OneFOneB],
                    // GPipe costs the same time as 1F1B and more memory: never better.
                    None => {
                        let mut v = vec![ScheduleChoice::OneFOneB];
                        for chunks in [2, 3, 4, 6, 8] {
                            if shape.blocks % (p * chunks) == 0 && m % p == 0 {
                                v.push(ScheduleChoice::Interleaved(chunks));
                            }
                        }
                        v
                    }
                };
                for &schedule in &schedules {
                    // Interleaving fills the pipeline in groups of p microbatches.
                    if matches!(schedule, ScheduleChoice::Interleaved(_)) && m % p != 0 {
                        continue;
                    }
                    let zeros: Vec<u8> = match space.zero {
                        Some(z) => vec![z],
                        None if d == 1 => vec![0],
                        None => vec![0, 1, 2, 3],
                    };
                    let recomputes = match space.recompute {
                        Some(r) => vec![r],
                        None => vec![
                            RecomputeChoice::None,
                            RecomputeChoice::Selective,
                            RecomputeChoice::Full,
                        ],
                    };
                    let sps = match space.sequence_parallel {
                        Some(sp) => vec![sp],
                        None if t > 1 => vec![false, true],
                        None => vec![false],
                    };
                    for &zero in &zeros {
                        for &recompute in &recomputes {
                            for &sequence_parallel in &sps {
                                out.push(Strategy {
                                    data: d,
                                    tensor: t,
                                    pipeline: p,
                                    micro_batch: b,
                                    microbatches: m,
                                    schedule,
                                    zero,
                                    recompute,
                                    sequence_parallel,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// A candidate with its layout, costed.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub evaluation: Evaluation,
    /// Each stage's layer ranges.
    pub layout: Vec<Vec<Range<usize>>>,
}

/// Orders evaluations: feasible first, then faster, then (among plans that fit) larger
/// microbatches — at equal modeled time fewer and larger GEMMs run faster in practice, the model
/// having one efficiency for every size — then less memory, then the stable order of the
/// strategy itself (deterministic ties).
fn better(a: &Evaluation, b: &Evaluation) -> std::cmp::Ordering {
    let larger_microbatch = if a.fits && b.fits {
        b.strategy.micro_batch.cmp(&a.strategy.micro_batch)
    } else {
        std::cmp::Ordering::Equal
    };
    b.fits
        .cmp(&a.fits)
        .then(a.time.total.total_cmp(&b.time.total))
        .then(larger_microbatch)
        .then(a.peak_memory().total_cmp(&b.peak_memory()))
        .then(a.strategy.cmp(&b.strategy))
}

/// Costs every candidate with balanced stages (in parallel) and returns them best first.
pub fn uniform(model: &Model, candidates: &[Strategy]) -> Vec<Candidate> {
    // Per-layer costs depend only on these four choices: compute each set of prefix sums once.
    let key = |s: &Strategy| (s.tensor, s.micro_batch, s.recompute, s.sequence_parallel);
    let mut keys: Vec<&Strategy> = candidates.iter().collect();
    keys.sort_by_key(|s| key(s));
    keys.dedup_by_key(|s| key(s));
    let prefixes: HashMap<_, Vec<Terms>> =
        keys.par_iter().map(|s| (key(s), model.prefix(s))).collect();
    let mut out: Vec<Candidate> = candidates
        .par_iter()
        .map(|s| {
            let layout = model.layout(s);
            Candidate {
                evaluation: model.evaluate_with(s, &layout, &prefixes[&key(s)]),
                layout,
            }
        })
        .collect();
    out.sort_by(|a, b| better(&a.evaluation, &b.evaluation));
    out
}

/// Re-cuts the layers into `p` stages to minimise the slowest stage, with every stage fitting
/// its memory (Alpa's inter-operator DP, here over uniform submeshes): `best[i][j]` is the
/// smallest possible slowest-stage time when stages `i..p` hold layers `j..`.
pub fn rebalance(model: &Model, s: &Strategy) -> Option<Vec<Vec<Range<usize>>>> {
    let n = model.layers.len();
    let p = s.pipeline as usize;
    // Interleaved chunks stay equal: the schedule assumes it.
    if matches!(s.schedule, ScheduleChoice::Interleaved(_)) {
        return None;
    }
    if p <= 1 {
        return Some(vec![std::iter::once(0..n).collect()]);
    }
    let prefix = model.prefix(s);
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; n + 1]; p + 1];
    let mut cut = vec![vec![usize::MAX; n + 1]; p + 1];
    best[p][n] = 0.0;
    for i in (0..p).rev() {
        // Stage i needs at least one layer, and leaves one for each later stage.
        for j in i..=n.saturating_sub(p - i) {
            for k in (j + 1)..=(n - (p - i - 1)) {
                if best[i + 1][k] == inf {
                    continue;
                }
                let stage = model.stage(s, &prefix, std::slice::from_ref(&(j..k)), i as u64);
                if stage.memory.total > stage.memory.capacity {
                    continue;
                }
                let slowest = stage.per_microbatch().max(best[i + 1][k]);
                if slowest < best[i][j] {
                    best[i][j] = slowest;
                    cut[i][j] = k;
                }
            }
        }
    }
    if best[0][0] == inf {
        return None;
    }
    let mut layout = Vec::with_capacity(p);
    let mut j = 0;
    for row in cut.iter().take(p) {
        let k = row[j];
        layout.push(std::iter::once(j..k).collect());
        j = k;
    }
    Some(layout)
}

/// The search: the uniform path over every candidate, then the stage DP for the best few.
pub fn search(model: &Model, candidates: &[Strategy]) -> Vec<Candidate> {
    let mut ranked = uniform(model, candidates);
    const REFINE: usize = 16;
    let refined: Vec<Candidate> = ranked
        .par_iter()
        .take(REFINE)
        .filter_map(|c| {
            let layout = rebalance(model, &c.evaluation.strategy)?;
            let evaluation = model.evaluate(&c.evaluation.strategy, &layout);
            (better(&evaluation, &c.evaluation) == std::cmp::Ordering::Less)
                .then_some(Candidate { evaluation, layout })
        })
        .collect();
    for r in refined {
        if let Some(slot) = ranked
            .iter_mut()
            .find(|c| c.evaluation.strategy == r.evaluation.strategy)
        {
            *slot = r;
        }
    }
    ranked.sort_by(|a, b| better(&a.evaluation, &b.evaluation));
    ranked
}
