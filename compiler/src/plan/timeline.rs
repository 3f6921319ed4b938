//! One training step as the cost model sees it, laid out in time: every stage's schedule
//! (`ExecutionPlan::schedule`) played with the stage's per-microbatch costs, a forward waiting
//! for the previous virtual stage's activations and a backward for the next one's gradients
//! (each a point-to-point transfer away), then the gradient synchronisation and the optimizer.
//! Idle time between a stage's blocks is its pipeline bubble. `kiln plan --format svg` draws it.
//!
//! The analytic step time (`time.total`) sums the same terms in closed form (Narayanan et al.
//! 2021, Eq. 1); the timeline shows where they fall, and its length is reported beside it.

use super::types::{Action, ExecutionPlan, GroupAxis};
use std::collections::BTreeMap;

/// What a block of a stage's time is spent on (`as usize`: its place in [`Activity::ALL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Activity {
    Forward = 0,
    /// Recomputing a microbatch's forward before its backward.
    Recompute = 1,
    Backward = 2,
    /// Tensor-parallel collectives inside a forward or backward.
    TensorComm = 3,
    /// Summing (or reduce-scattering) gradients over the data-parallel group, and ZeRO's
    /// gathers, as far as they are not hidden under the backward.
    DataSync = 4,
    Optimizer = 5,
}

impl Activity {
    pub const ALL: [Activity; 6] = [
        Activity::Forward,
        Activity::Recompute,
        Activity::Backward,
        Activity::TensorComm,
        Activity::DataSync,
        Activity::Optimizer,
    ];
}

/// A stretch of one stage's time.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub stage: usize,
    pub activity: Activity,
    /// Seconds from the start of the step.
    pub start: f64,
    pub end: f64,
    /// `F3`, `B3.1` (microbatch 3, chunk 1): what the block belongs to.
    pub label: String,
}

/// A step's blocks, stage by stage in time order, and when the last one ends.
#[derive(Clone, Debug)]
pub struct Timeline {
    pub stages: usize,
    pub blocks: Vec<Block>,
    pub end: f64,
    /// Whether every stage played its whole schedule (a schedule waiting on a pass no stage
    /// runs stops where it waits).
    pub complete: bool,
}

/// The timeline of one step of `plan`.
pub fn timeline(plan: &ExecutionPlan) -> Timeline {
    let stages = plan.stages.len();
    let chunks = plan
        .schedule
        .iter()
        .map(|s| s.chunks)
        .max()
        .unwrap_or(1)
        .max(1) as usize;
    let virtual_stages = stages * chunks;
    let p2p = transfer_seconds(plan);
    // When each pass of (microbatch, virtual stage) ends: forward (false) or backward (true).
    let mut done: BTreeMap<(bool, usize, usize), f64> = BTreeMap::new();
    let mut free = vec![0.0f64; stages];
    let mut next = vec![0usize; stages];
    let mut blocks = Vec::new();
    loop {
        let mut progressed = false;
        for s in 0..stages {
            let actions = &plan.schedule[s].actions;
            while let Some(&action) = actions.get(next[s]) {
                let (backward, mb, chunk) = match action {
                    Action::Forward { mb, chunk } => (false, mb, chunk),
                    Action::Backward { mb, chunk } => (true, mb, chunk),
                    _ => {
                        next[s] += 1;
                        continue;
                    }
                };
                let v = chunk * stages + s;
                // The neighbouring virtual stage this pass waits for, if any.
                let waits_for = match backward {
                    false => v.checked_sub(1),
                    true => Some(v + 1).filter(|&u| u < virtual_stages),
                };
                let ready = match waits_for {
                    None => 0.0,
                    Some(u) => match done.get(&(backward, mb, u)) {
                        Some(&t) => t + p2p,
                        None => break,
                    },
                };
                let start = free[s].max(ready);
                let end = play(
                    &mut blocks,
                    plan,
                    s,
                    chunks,
                    backward,
                    start,
                    action_label(action, chunks),
                );
                done.insert((backward, mb, v), end);
                free[s] = end;
                next[s] += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    let complete = (0..stages).all(|s| next[s] == plan.schedule[s].actions.len());
    // Gradients are synchronised and the optimizer steps once a stage's last backward is done.
    for (s, &at) in free.iter().enumerate() {
        let sync_end = at + plan.time.data_parallel;
        for (activity, start, end) in [
            (Activity::DataSync, at, sync_end),
            (
                Activity::Optimizer,
                sync_end,
                sync_end + plan.time.optimizer,
            ),
        ] {
            if end > start {
                blocks.push(Block {
                    stage: s,
                    activity,
                    start,
                    end,
                    label: String::new(),
                });
            }
        }
    }
    blocks.sort_by(|a, b| a.stage.cmp(&b.stage).then(a.start.total_cmp(&b.start)));
    let end = blocks.iter().map(|b| b.end).fold(0.0, f64::max);
    Timeline {
        stages,
        blocks,
        end,
        complete,
    }
}

/// Adds the blocks of one forward or backward pass of a chunk on stage `s` from `start`, and
/// returns its end: a chunk's share of the stage's per-microbatch costs, tensor-parallel
/// communication split between the passes in proportion to their compute.
fn play(
    blocks: &mut Vec<Block>,
    plan: &ExecutionPlan,
    s: usize,
    chunks: usize,
    backward: bool,
    start: f64,
    label: String,
) -> f64 {
    let st = &plan.stages[s];
    let share = 1.0 / chunks as f64;
    let compute = st.forward + st.backward + st.recompute;
    let comm = |part: f64| match compute > 0.0 {
        true => st.tensor_comm * part / compute,
        false => 0.0,
    };
    let parts = match backward {
        false => vec![
            (Activity::Forward, st.forward),
            (Activity::TensorComm, comm(st.forward)),
        ],
        true => vec![
            (Activity::Recompute, st.recompute),
            (Activity::Backward, st.backward),
            (Activity::TensorComm, comm(st.backward + st.recompute)),
        ],
    };
    let mut at = start;
    for (activity, seconds) in parts {
        let seconds = seconds * share;
        if seconds > 0.0 {
            blocks.push(Block {
                stage: s,
                activity,
                start: at,
                end: at + seconds,
                label: label.clone(),
            });
            at += seconds;
        }
    }
    at
}

fn action_label(action: Action, chunks: usize) -> String {
    let (pass, mb, chunk) = match action {
        Action::Forward { mb, chunk } => ("F", mb, chunk),
        Action::Backward { mb, chunk } => ("B", mb, chunk),
        _ => return String::new(),
    };
    match chunks {
        1 => format!("{pass}{mb}"),
        _ => format!("{pass}{mb}.{chunk}"),
    }
}

/// Seconds of one point-to-point transfer between stages (the plan's pipeline collectives,
/// per call); 0 without pipeline parallelism.
fn transfer_seconds(plan: &ExecutionPlan) -> f64 {
    let (seconds, calls) = plan
        .collectives
        .iter()
        .filter(|c| c.group.axis == GroupAxis::Pipeline)
        .fold((0.0, 0u64), |(s, n), c| {
            (s + c.seconds, n + c.per_iteration)
        });
    match calls {
        0 => 0.0,
        n => seconds / n as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::compile_plan;

    fn plan_of(parallel: &str) -> ExecutionPlan {
        let src = format!(
            "import std.models.gpt2\nimport std.clusters\nexperiment e {{ model = gpt2 {{ vocab = 1024, positions = 128, hidden = 256, layers = 8, heads = 4 }}, parallel {{ mesh = dgx_a100 * 1, plan = manual, {parallel} }}, train {{ batch = 16, micro_batch = 2, seq_len = 128 }} }}"
        );
        let checked = crate::check_source("t.kiln", &src, None);
        assert!(checked.is_ok(), "{}", checked.render_errors());
        compile_plan(&checked.module.experiments[0].value).unwrap()
    }

    #[test]
    fn a_1f1b_pipeline_waits_for_its_neighbours_and_leaves_the_bubble_idle() {
        let plan = plan_of("data = 2, pipeline = 4, schedule = 1f1b");
        let t = timeline(&plan);
        assert!(t.complete);
        let (m, p) = (plan.strategy.microbatches as f64, 4.0);
        // Within a stage blocks never overlap.
        for s in 0..t.stages {
            let mine: Vec<&Block> = t.blocks.iter().filter(|b| b.stage == s).collect();
            for w in mine.windows(2) {
                assert!(w[0].end <= w[1].start + 1e-12, "{w:?}");
            }
        }
        // A forward on stage s starts after stage s − 1's forward of that microbatch.
        let start = |s: usize, label: &str| {
            t.blocks
                .iter()
                .find(|b| b.stage == s && b.label == label)
                .map(|b| b.start)
                .unwrap()
        };
        let end = |s: usize, label: &str| {
            t.blocks
                .iter()
                .filter(|b| b.stage == s && b.label == label)
                .map(|b| b.end)
                .fold(0.0, f64::max)
        };
        assert!(start(1, "F0") >= end(0, "F0"));
        assert!(start(2, "B3") >= end(3, "B3"));
        // Eq. 1: (m + p − 1)·(t_f + t_b) with equal stages, plus transfers and the sync.
        let st = &plan.stages[1];
        let per_mb = st.forward + st.backward + st.recompute + st.tensor_comm;
        let ideal = (m + p - 1.0) * per_mb;
        assert!(t.end >= ideal * 0.95, "{} vs {ideal}", t.end);
        assert!(
            t.end <= ideal * 1.3 + plan.time.data_parallel + plan.time.optimizer + plan.time.p2p
        );
    }

    #[test]
    fn activities_index_their_list() {
        for (i, a) in Activity::ALL.into_iter().enumerate() {
            assert_eq!(a as usize, i);
        }
    }

    #[test]
    fn interleaving_names_chunks_and_shortens_the_bubble() {
        let plain = timeline(&plan_of("pipeline = 4, schedule = 1f1b"));
        let interleaved = timeline(&plan_of("pipeline = 4, schedule = interleaved(2)"));
        assert!(interleaved.blocks.iter().any(|b| b.label == "F0.1"));
        let compute = |t: &Timeline| {
            t.blocks
                .iter()
                .filter(|b| {
                    b.stage == 0
                        && b.activity != Activity::DataSync
                        && b.activity != Activity::Optimizer
                })
                .map(|b| b.end - b.start)
                .sum::<f64>()
        };
        let idle = |t: &Timeline| t.end - compute(t);
        assert!(
            idle(&interleaved) < idle(&plain),
            "{} vs {}",
            idle(&interleaved),
            idle(&plain)
        );
    }
}
