//! Finding strategies: the candidates a parallel block allows (a manual plan fixes most
//! knobs; `plan = auto` leaves them to the search), the uniform fast path over all of them, and
//! the stage dynamic program (stages.rs) for the best: re-cutting their layers on their own
//! submesh and, for `plan = auto`, giving each stage a submesh of its own.

use super::cost::{Evaluation, Model, RecomputeChoice, ScheduleChoice, StagePlace, Strategy};
use super::stages::{partition, Menu};
use crate::spec::limits::SCHEDULE;
use rayon::prelude::*;

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
    /// Attention is costed as FlashAttention, whose backward recomputes the scores already:
    /// selective recompute would change nothing, so it is not a candidate of its own.
    pub flash_attention: bool,
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

/// The divisors of `n`, ascending: found in pairs (d, n / d) with d ≤ √n, so a cluster of
/// millions of devices costs thousands of steps rather than millions.
fn divisors(n: u64) -> Vec<u64> {
    let (mut small, mut large) = (Vec::new(), Vec::new());
    let mut d = 1;
    while d <= n / d {
        if n % d == 0 {
            small.push(d);
            if d != n / d {
                large.push(n / d);
            }
        }
        d += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

/// The tensor degrees the space allows: tensor parallelism stays inside a node and must divide
/// heads, KV heads and the FFN.
fn tensor_degrees(space: &Space, shape: &Shape) -> Vec<u64> {
    match space.tensor {
        Some(t) => vec![t],
        None => divisors(shape.node_devices)
            .into_iter()
            .filter(|t| shape.heads % t == 0 && shape.kv_heads % t == 0 && shape.ffn % t == 0)
            .collect(),
    }
}

/// Whether the plan can list the schedule: every microbatch on every stage and chunk.
fn schedule_listable(microbatches: u64, pipeline: u64, schedule: ScheduleChoice) -> bool {
    let listed = microbatches
        .saturating_mul(pipeline)
        .saturating_mul(schedule.chunks());
    listed <= SCHEDULE.max
}

/// Every strategy the space allows, in a stable order.
pub fn candidates(space: &Space, shape: &Shape) -> Vec<Strategy> {
    let mut out = Vec::new();
    for t in tensor_degrees(space, shape) {
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
                    if !schedule_listable(m, p, schedule) {
                        continue;
                    }
                    let zeros: Vec<u8> = match space.zero {
                        Some(z) => vec![z],
                        None if d == 1 => vec![0],
                        None => vec![0, 1, 2, 3],
                    };
                    let recomputes = match space.recompute {
                        Some(r) => vec![r],
                        None if space.flash_attention => {
                            vec![RecomputeChoice::None, RecomputeChoice::Full]
                        }
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

/// A candidate with its stages, costed.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub evaluation: Evaluation,
    pub layout: Vec<StagePlace>,
}

/// What orders evaluations, without their stages: feasible first, then faster, then (among
/// plans that fit) larger microbatches — at equal modeled time fewer and larger GEMMs run faster
/// in practice, the model having one efficiency for every size — then less memory, then uniform
/// stages before uneven ones, then the stable order of the strategy.
#[derive(Clone, Copy, Debug)]
struct Rank {
    fits: bool,
    time: f64,
    micro_batch: u64,
    peak_memory: f64,
    uniform: bool,
    strategy: Strategy,
}

impl Rank {
    fn of(e: &Evaluation) -> Rank {
        Rank {
            fits: e.fits,
            time: e.time.total,
            micro_batch: e.strategy.micro_batch,
            peak_memory: e.peak_memory(),
            uniform: e.uniform(),
            strategy: e.strategy,
        }
    }

    fn order(&self, o: &Rank) -> std::cmp::Ordering {
        let larger_microbatch = if self.fits && o.fits {
            o.micro_batch.cmp(&self.micro_batch)
        } else {
            std::cmp::Ordering::Equal
        };
        o.fits
            .cmp(&self.fits)
            .then(self.time.total_cmp(&o.time))
            .then(larger_microbatch)
            .then_with(|| self.peak_memory.total_cmp(&o.peak_memory))
            .then_with(|| o.uniform.cmp(&self.uniform))
            .then(self.strategy.cmp(&o.strategy))
    }
}

/// Orders evaluations by [`Rank`], then by the stages' submeshes (deterministic ties between
/// plans of one strategy).
fn better(a: &Evaluation, b: &Evaluation) -> std::cmp::Ordering {
    Rank::of(a).order(&Rank::of(b)).then_with(|| {
        let (a, b) = (a.stages.iter(), b.stages.iter());
        a.map(|s| s.submesh).cmp(b.map(|s| s.submesh))
    })
}

/// Costs every candidate with balanced stages (in parallel) and returns the best first: as many
/// as the search and the report read (see [`kept`]). Candidates are ranked on their [`Rank`]
/// and only the kept ones are costed again in full: the full records are large (a cost per
/// stage), and moving and freeing thousands of them dominated this path.
pub fn uniform(model: &Model, candidates: &[Strategy]) -> Vec<Candidate> {
    // Per-layer costs depend on a few of the knobs: each set of prefix sums is computed once.
    let prefixes = model.prefixes(candidates);
    let cost = |s: &Strategy| {
        let layout = model.layout(s);
        Candidate {
            evaluation: model.evaluate_with(s, &layout, &prefixes),
            layout,
        }
    };
    let mut ranks: Vec<Rank> = candidates
        .par_iter()
        .map(|s| Rank::of(&cost(s).evaluation))
        .collect();
    // Every candidate is a distinct strategy, so no two compare equal: an unstable sort gives
    // the one order.
    ranks.sort_unstable_by(Rank::order);
    ranks.truncate(kept(ranks.iter().map(|r| &r.strategy)));
    ranks.par_iter().map(|r| cost(&r.strategy)).collect()
}

/// How many of the ranked uniform strategies to keep: through the [`REFINE`]th without
/// interleaving (the stage DP's seeds) and through the fourth distinct grid of degrees (the
/// report's runners-up with other degrees than the winner, even when the DP replaces it).
fn kept<'a>(ranked: impl Iterator<Item = &'a Strategy>) -> usize {
    let mut seeds = 0;
    let mut grids: Vec<(u64, u64, u64)> = Vec::new();
    let mut count = 0;
    for s in ranked {
        count += 1;
        if !matches!(s.schedule, ScheduleChoice::Interleaved(_)) {
            seeds += 1;
        }
        let grid = (s.pipeline, s.data, s.tensor);
        if !grids.contains(&grid) {
            grids.push(grid);
        }
        if seeds >= REFINE && grids.len() >= 4 {
            break;
        }
    }
    count
}

/// How many of the best uniform candidates the stage DP starts from.
const REFINE: usize = 16;

/// The search: the uniform path over every candidate, then the stage DP from the best few —
/// on their own submesh (better cut points) and, when the degrees are free (`plan = auto`),
/// with a submesh per stage. Best first; plans with uneven submeshes among them.
pub fn search(
    model: &Model,
    space: &Space,
    shape: &Shape,
    candidates: &[Strategy],
) -> Vec<Candidate> {
    let mut ranked = uniform(model, candidates);
    let seeds: Vec<&Candidate> = ranked
        .iter()
        .filter(|c| {
            !matches!(
                c.evaluation.strategy.schedule,
                ScheduleChoice::Interleaved(_)
            )
        })
        .take(REFINE)
        .collect();
    // The pipeline time to beat: what a seed already achieves.
    let bound = |c: &Candidate| {
        if c.evaluation.fits {
            c.evaluation.time.pipeline()
        } else {
            f64::INFINITY
        }
    };
    let mut jobs: Vec<(&Candidate, Menu)> = seeds
        .iter()
        .map(|c| (*c, Menu::uniform(&c.evaluation.strategy)))
        .collect();
    if space.data.is_none() && space.tensor.is_none() && space.pipeline.is_none() {
        // The per-stage DP depends on the pipeline microbatch and the knobs shared by every
        // stage, not on the seed's own submesh: one run per such setting.
        let key = |s: &Strategy| {
            (
                s.pipeline_microbatch(),
                s.microbatches,
                s.schedule,
                s.zero,
                s.recompute,
            )
        };
        let tensors = tensor_degrees(space, shape);
        let mut keys = Vec::new();
        for c in &seeds {
            let s = &c.evaluation.strategy;
            if !keys.contains(&key(s)) {
                keys.push(key(s));
                let menu = Menu::per_stage(
                    s,
                    &tensors,
                    shape.devices,
                    shape.node_devices,
                    shape.rows_per_record,
                    // Sequence parallelism only saves memory and memory-bound time.
                    space.sequence_parallel.unwrap_or(true),
                );
                jobs.push((*c, menu));
            }
        }
    }
    let found: Vec<Candidate> = jobs
        .par_iter()
        .filter_map(|(seed, menu)| {
            let layout = partition(model, &seed.evaluation.strategy, menu, bound(seed))?;
            let s = &seed.evaluation.strategy;
            if !schedule_listable(s.microbatches, layout.len() as u64, s.schedule) {
                return None;
            }
            let first = layout[0].submesh;
            let strategy = if layout.iter().all(|st| st.submesh == first) {
                Strategy {
                    pipeline: layout.len() as u64,
                    ..s.on(first)
                }
            } else {
                // Uneven: the seed's degrees stay as the record of its pipeline microbatch.
                Strategy {
                    pipeline: layout.len() as u64,
                    ..*s
                }
            };
            let evaluation = model.evaluate(&strategy, &layout);
            (better(&evaluation, &seed.evaluation) == std::cmp::Ordering::Less)
                .then_some(Candidate { evaluation, layout })
        })
        .collect();
    for f in found {
        // A uniform plan replaces its strategy's balanced stages when better.
        let slot = ranked.iter_mut().find(|c| {
            f.evaluation.uniform()
                && c.evaluation.uniform()
                && c.evaluation.strategy == f.evaluation.strategy
        });
        match slot {
            Some(c) if better(&f.evaluation, &c.evaluation) == std::cmp::Ordering::Less => *c = f,
            Some(_) => {}
            None => ranked.push(f),
        }
    }
    ranked.sort_by(|a, b| better(&a.evaluation, &b.evaluation));
    ranked
}

#[cfg(test)]
mod tests {
    use super::divisors;

    #[test]
    fn divisors_come_in_ascending_order() {
        assert_eq!(divisors(1), [1]);
        assert_eq!(divisors(12), [1, 2, 3, 4, 6, 12]);
        assert_eq!(divisors(16), [1, 2, 4, 8, 16]);
        assert_eq!(divisors(1 << 26).len(), 27);
    }
}
