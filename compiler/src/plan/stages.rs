//! Alpa's inter-operator pass (auto-partition.md §"Inter-op DP"): for one pipeline microbatch
//! and a strategy's other knobs, cut the layers into pipeline stages and the devices into one
//! submesh per stage. For a bound t_max on every stage's time per microbatch,
//!
//!   F(r, k, d) = min over stage ends i and submeshes of t(layers k..i) + F(r − 1, i, d − devices)
//!
//! covers layers k.. with r stages on the last d devices; a pipeline of m microbatches takes
//! Σ t_i + (m − 1)·max t_j. The smallest feasible t_max is found by binary search (feasibility
//! only grows with t_max), then larger ones are scanned in ε-buckets until m·t_max reaches the
//! best pipeline found (Alpa's early stop), buckets costed in parallel.

use super::cost::{prefix_key, Model, Position, ScheduleChoice, StagePlace, Strategy, Submesh};
use rayon::prelude::*;

/// Relative width of the t_max buckets: plans whose slowest stages are this close are found by
/// one dynamic program.
const EPS: f64 = 0.01;
/// Stage submeshes are at least this fraction of the cluster: finer ones would multiply the
/// device counts the DP tells apart and, beside stages of whole nodes on a large cluster, move
/// a negligible share of the devices.
const FINEST: u64 = 128;
/// The stage counts the DP tells apart: plans with more stages are costed as if every stage
/// kept the microbatches of the longest pipeline in flight (memory only grows with them), so
/// no plan it returns overflows memory, while deep pipelines' memory is judged cautiously.
const STAGE_COUNTS: u64 = 16;
/// Most DP states (stage counts × layers × device counts) one t_max may use.
const MAX_STATES: usize = 1 << 22;

/// The submeshes a stage may run on, grouped by device count.
pub struct Menu {
    sizes: Vec<(u64, Vec<Submesh>)>,
    /// Whether stages must respect node boundaries (a stage smaller than a node inside one, a
    /// larger one on whole nodes). A uniform menu keeps the executor's consecutive ranges.
    aligned: bool,
}

impl Menu {
    /// Every stage on the strategy's own submesh: only the cut points are searched.
    pub fn uniform(s: &Strategy) -> Menu {
        Menu {
            sizes: vec![(s.submesh().devices(), vec![s.submesh()])],
            aligned: false,
        }
    }

    /// Alpa's shapes: 1, 2, 4, … devices inside a node, then whole nodes; each as every
    /// tensor × data grid with an allowed tensor degree whose replicas split the pipeline
    /// microbatch evenly (a record's rows staying together).
    pub fn per_stage(
        s: &Strategy,
        tensors: &[u64],
        devices: u64,
        node: u64,
        rows_per_record: u64,
        sequence_parallel: bool,
    ) -> Menu {
        let batch = s.pipeline_microbatch();
        let inside = (0..).map(|k| 1u64 << k).take_while(|&n| n < node);
        let whole = (1..=devices / node).map(|k| k * node);
        let sizes = inside
            .chain(whole)
            .filter(|&n| n <= devices && n * FINEST >= devices)
            .filter_map(|n| {
                let grids: Vec<Submesh> = tensors
                    .iter()
                    .filter(|&&t| n % t == 0)
                    .map(|&t| Submesh {
                        data: n / t,
                        tensor: t,
                        sequence_parallel: sequence_parallel && t > 1,
                    })
                    .filter(|g| batch % g.data == 0 && (batch / g.data) % rows_per_record == 0)
                    .collect();
                (!grids.is_empty()).then_some((n, grids))
            })
            .collect();
        Menu {
            sizes,
            aligned: true,
        }
    }
}

/// Layers k..i on one grid: seconds per microbatch, and the most stages from this one to the
/// last (itself included) for which its memory fits; that count is what the activations of
/// microbatches in flight depend on.
#[derive(Clone, Copy, Debug)]
struct Run {
    time: f64,
    fits_up_to: u64,
    grid: u16,
}

/// The best stages found for one t_max: the pipeline time the DP counts, and the stages.
struct Solution {
    pipeline: f64,
    stages: Vec<StagePlace>,
}

struct Partitioner<'m, 'a> {
    model: &'m Model<'a>,
    base: Strategy,
    aligned: bool,
    layers: usize,
    devices: u64,
    node: u64,
    max_stages: u64,
    /// The stage counts the DP tells apart: 1, 2, … and "this many or more".
    stage_states: u64,
    /// Whether memory stops depending on the stages after a stage (microbatches in flight)
    /// before the last count the DP tells apart.
    saturated: bool,
    /// Each grid and the index of its size.
    grids: Vec<(Submesh, usize)>,
    sizes: Vec<u64>,
    /// `runs[size][k][i − k − 1]`: the Pareto-optimal runs of layers k..i on that size, faster
    /// first, each fitting in more stages than the one before it.
    runs: Vec<Vec<Vec<Vec<Run>>>>,
}

/// The stages and submeshes for `base`'s pipeline microbatch and knobs whose pipeline time (as
/// the DP counts it, stage boundaries included) is below `bound`, or `None`. Interleaved
/// schedules keep equal chunks, as their schedule assumes.
pub fn partition(
    model: &Model,
    base: &Strategy,
    menu: &Menu,
    bound: f64,
) -> Option<Vec<StagePlace>> {
    if matches!(base.schedule, ScheduleChoice::Interleaved(_)) || menu.sizes.is_empty() {
        return None;
    }
    let m = base.microbatches as f64;
    let p = Partitioner::new(model, base, menu, bound / m);
    let buckets = p.buckets(bound / m);
    // The smallest feasible bucket.
    let (mut lo, mut hi) = (0, buckets.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if p.solve(buckets[mid].1).is_some() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let mut best: Option<Solution> = None;
    let mut best_time = bound;
    let chunk = rayon::current_num_threads().max(1);
    'scan: for batch in buckets[lo..].chunks(chunk) {
        let solved: Vec<Option<Solution>> = batch.par_iter().map(|b| p.solve(b.1)).collect();
        // Walked in order, so the result does not depend on the batch size: a plan first found
        // at a larger t_max has its slowest stage above the previous bucket and takes at least
        // m times that.
        for (b, solution) in batch.iter().zip(solved) {
            if m * b.0 >= best_time {
                break 'scan;
            }
            if let Some(s) = solution.filter(|s| s.pipeline < best_time) {
                best_time = s.pipeline;
                best = Some(s);
            }
        }
    }
    best.map(|s| s.stages)
}

impl<'m, 'a> Partitioner<'m, 'a> {
    fn new(model: &'m Model<'a>, base: &Strategy, menu: &Menu, cap: f64) -> Self {
        let layers = model.layers.len();
        let devices = model.cluster.devices();
        let smallest = menu.sizes.iter().map(|s| s.0).min().unwrap_or(devices);
        let max_stages = (layers as u64).min(devices / smallest.max(1));
        let grids: Vec<(Submesh, usize)> = menu
            .sizes
            .iter()
            .enumerate()
            .flat_map(|(z, (_, g))| g.iter().map(move |g| (*g, z)))
            .collect();
        let strategies: Vec<Strategy> = grids.iter().map(|(g, _)| base.on(*g)).collect();
        let prefixes = model.prefixes(&strategies);
        let mut p = Partitioner {
            model,
            base: *base,
            aligned: menu.aligned,
            layers,
            devices,
            node: model.cluster.node.devices,
            max_stages,
            stage_states: 2,
            saturated: true,
            grids,
            sizes: menu.sizes.iter().map(|s| s.0).collect(),
            runs: Vec::new(),
        };
        let runs: Vec<Vec<Vec<Vec<Run>>>> = (0..p.sizes.len())
            .into_par_iter()
            .map(|z| {
                (0..layers)
                    .map(|k| p.runs_from(z, k, cap, &strategies, &prefixes))
                    .collect()
            })
            .collect();
        let binding = runs
            .iter()
            .flatten()
            .flatten()
            .flatten()
            .map(|r| r.fits_up_to)
            .filter(|&f| f < max_stages)
            .max();
        let states = binding.map_or(2, |f| f + 1).max(2);
        p.saturated = states <= STAGE_COUNTS;
        p.stage_states = states.min(STAGE_COUNTS);
        p.runs = runs;
        p
    }

    /// The runs starting at layer k on size `z`, up to stage time `cap`.
    fn runs_from(
        &self,
        z: usize,
        k: usize,
        cap: f64,
        strategies: &[Strategy],
        prefixes: &super::cost::Prefixes,
    ) -> Vec<Vec<Run>> {
        let mut by_end: Vec<Vec<Run>> = Vec::new();
        let first = u64::from(k > 0);
        for (g, _) in self.grids.iter().enumerate().filter(|(_, (_, s))| *s == z) {
            let on = &strategies[g];
            let prefix = &prefixes[&prefix_key(on)];
            for i in k + 1..=self.layers {
                let stage = |r: u64| {
                    let at = Position {
                        index: first,
                        stages: first + r,
                    };
                    self.model
                        .stage(on, prefix, std::slice::from_ref(&(k..i)), at)
                };
                let cost = stage(1);
                let time = cost.per_microbatch();
                if time > cap || cost.memory.total > cost.memory.capacity {
                    break;
                }
                // Memory only grows with the stages after this one: binary search the most.
                let (mut lo, mut hi) = (1, self.max_stages);
                while lo < hi {
                    let mid = (lo + hi).div_ceil(2);
                    let m = stage(mid).memory;
                    if m.total <= m.capacity {
                        lo = mid;
                    } else {
                        hi = mid - 1;
                    }
                }
                if by_end.len() < i - k {
                    by_end.resize(i - k, Vec::new());
                }
                by_end[i - k - 1].push(Run {
                    time,
                    fits_up_to: lo,
                    grid: g as u16,
                });
            }
        }
        for runs in &mut by_end {
            runs.sort_by(|a, b| a.time.total_cmp(&b.time).then(a.grid.cmp(&b.grid)));
            let mut kept: Vec<Run> = Vec::with_capacity(runs.len());
            for r in runs.iter() {
                if kept.last().is_none_or(|l| r.fits_up_to > l.fits_up_to) {
                    kept.push(*r);
                }
            }
            *runs = kept;
        }
        by_end
    }

    /// The fastest run of layers k..i on size `z` whose memory fits with `r` stages from it
    /// to the last.
    fn run(&self, z: usize, k: usize, i: usize, r: u64) -> Option<&Run> {
        self.runs[z][k]
            .get(i - k - 1)?
            .iter()
            .find(|run| run.fits_up_to >= r)
    }

    /// How many stages from a stage to the last its memory must fit with, at the DP's stage
    /// count `r`: the last count stands for that many or more.
    fn fits_needed(&self, r: usize) -> u64 {
        if r as u64 == self.stage_states && !self.saturated {
            self.max_stages
        } else {
            r as u64
        }
    }

    /// Time a stage of `n` devices starting at device `start` adds for its boundary with the
    /// next (whose size the DP does not know yet: taken as its own), activation and gradient.
    fn send(&self, start: u64, n: u64) -> f64 {
        2.0 * self.model.transfer(&self.base, start, n, n)
    }

    /// Whether a stage of `n` devices may start at device `start`.
    fn placeable(&self, start: u64, n: u64) -> bool {
        !self.aligned
            || if n < self.node {
                start % self.node + n <= self.node
            } else {
                start % self.node == 0
            }
    }

    /// The distinct stage times up to `cap` (boundary transfers inside and across nodes
    /// included), in ε-buckets: each bucket's smallest and largest time.
    fn buckets(&self, cap: f64) -> Vec<(f64, f64)> {
        let sends: Vec<[f64; 3]> = self
            .sizes
            .iter()
            .map(|&n| [0.0, self.send(0, n), self.send(self.node - 1, n)])
            .collect();
        let mut times: Vec<f64> = self
            .runs
            .iter()
            .enumerate()
            .flat_map(|(z, by_start)| {
                let sends = sends[z];
                by_start
                    .iter()
                    .flatten()
                    .flatten()
                    .flat_map(move |run| sends.map(|x| run.time + x))
            })
            .filter(|&t| t <= cap)
            .collect();
        times.sort_by(f64::total_cmp);
        times.dedup();
        let mut out: Vec<(f64, f64)> = Vec::new();
        for t in times {
            match out.last_mut() {
                Some(b) if t <= b.0 * (1.0 + EPS) => b.1 = t,
                _ => out.push((t, t)),
            }
        }
        out
    }

    /// The DP for one t_max: the stages with the least Σ t_i for every stage count the DP
    /// tells apart; of those, the one with the shortest pipeline.
    fn solve(&self, t_max: f64) -> Option<Solution> {
        let (layers, devices) = (self.layers, self.devices);
        // Sizes with some stage within t_max set the granularity of device counts.
        let usable: Vec<usize> = (0..self.sizes.len())
            .filter(|&z| {
                self.runs[z]
                    .iter()
                    .any(|by_end| by_end.first().is_some_and(|r| r[0].time <= t_max))
            })
            .collect();
        let unit = usable
            .iter()
            .fold(devices, |g, &z| gcd(g, self.sizes[z]))
            .max(1);
        let (rows, cols) = (layers + 1, (devices / unit) as usize + 1);
        // The fewest devices layers k.. and layers ..k can run on within t_max (memory of
        // later stages and transfers left out, so bounds): a state outside them is dead.
        let mut after = vec![u64::MAX; rows];
        let mut before = vec![u64::MAX; rows];
        after[layers] = 0;
        before[0] = 0;
        for k in (0..layers).rev() {
            for &z in &usable {
                for i in k + 1..=layers {
                    match self.run(z, k, i, 1) {
                        Some(run) if run.time <= t_max => {
                            after[k] = after[k].min(after[i].saturating_add(self.sizes[z]));
                        }
                        _ => break,
                    }
                }
            }
        }
        for k in 0..layers {
            for &z in &usable {
                for i in k + 1..=layers {
                    match self.run(z, k, i, 1) {
                        Some(run) if run.time <= t_max => {
                            before[i] = before[i].min(before[k].saturating_add(self.sizes[z]));
                        }
                        _ => break,
                    }
                }
            }
        }
        if after[0] > devices {
            return None;
        }
        let states = self.stage_states as usize;
        if (states + 1) * rows * cols > MAX_STATES {
            return None;
        }
        let at = |r: usize, k: usize, j: usize| (r * rows + k) * cols + j;
        // f[r][k][j]: least Σ t covering layers k.. with r stages (r stages or more at the
        // last count) on the last j·unit devices; `picks` the first stage's end, grid and
        // whether the rest stays at the last count.
        let mut f = vec![f64::INFINITY; (states + 1) * rows * cols];
        let mut picks = vec![0u32; f.len()];
        f[at(0, layers, 0)] = 0.0;
        for r in 1..=states {
            for k in (0..layers).rev() {
                if layers - k < r {
                    continue;
                }
                let Some(most) = devices.checked_sub(before[k]) else {
                    continue;
                };
                let js = if k == 0 {
                    cols - 1..cols
                } else {
                    (after[k].div_ceil(unit) as usize).max(1)..(most / unit) as usize + 1
                };
                for j in js {
                    let left = j as u64 * unit;
                    let start = devices - left;
                    let mut best = f64::INFINITY;
                    let mut pick = 0;
                    for &z in &usable {
                        let n = self.sizes[z];
                        let nj = (n / unit) as usize;
                        if n > left || !self.placeable(start, n) || (r == 1) != (nj == j) {
                            continue;
                        }
                        // The last stage takes every layer left; the others leave a layer for
                        // each stage after them and send to the next.
                        let (ends, send) = if r == 1 {
                            (layers..layers + 1, 0.0)
                        } else {
                            (k + 1..layers + 2 - r, self.send(start, n))
                        };
                        for i in ends {
                            // Later ends only take longer and need more memory.
                            let Some(run) = self.run(z, k, i, self.fits_needed(r)) else {
                                break;
                            };
                            let t = run.time + send;
                            if t > t_max {
                                break;
                            }
                            let fewer = f[at(r - 1, i, j - nj)];
                            let same = if r == states && r > 1 {
                                f[at(r, i, j - nj)]
                            } else {
                                f64::INFINITY
                            };
                            let total = t + fewer.min(same);
                            if total < best {
                                best = total;
                                pick = (i as u32) << 16
                                    | u32::from(same < fewer) << 15
                                    | u32::from(run.grid);
                            }
                        }
                    }
                    f[at(r, k, j)] = best;
                    picks[at(r, k, j)] = pick;
                }
            }
        }
        let m = self.base.microbatches as f64;
        let mut best: Option<Solution> = None;
        for r in (1..=states).filter(|&r| f[at(r, 0, cols - 1)].is_finite()) {
            let (mut r, mut k, mut j) = (r, 0, cols - 1);
            let sum = f[at(r, k, j)];
            let mut slowest = 0.0f64;
            let mut stages = Vec::new();
            while k < layers {
                let pick = picks[at(r, k, j)];
                let (i, g) = ((pick >> 16) as usize, (pick & 0x7fff) as usize);
                let (submesh, z) = self.grids[g];
                let n = submesh.devices();
                let time = self.runs[z][k][i - k - 1]
                    .iter()
                    .find(|run| usize::from(run.grid) == g)
                    .map_or(0.0, |run| run.time);
                let send = if i < layers {
                    self.send(devices - j as u64 * unit, n)
                } else {
                    0.0
                };
                slowest = slowest.max(time + send);
                stages.push(StagePlace {
                    layers: std::iter::once(k..i).collect(),
                    submesh,
                });
                r -= usize::from(pick & 1 << 15 == 0);
                k = i;
                j -= (n / unit) as usize;
            }
            let pipeline = sum + (m - 1.0) * slowest;
            if best.as_ref().is_none_or(|b| pipeline < b.pipeline) {
                best = Some(Solution { pipeline, stages });
            }
        }
        best
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::LayerKind;
    use crate::plan::cost::RecomputeChoice;
    use crate::plan::profile::LayerProfile;
    use crate::spec::{Cluster, Offload, Precision, WeightGather};

    /// Four nodes of eight devices; an embedding, four blocks of one unit of work and one unit
    /// of parameters each, and a head of twelve units of work and four of parameters. Memory
    /// holds six units of parameters, so there are two stages at least; communication is free.
    fn heavy_head() -> (Vec<LayerProfile>, Cluster) {
        let layer = |kind, work: f64, params: f64| LayerProfile {
            kind: Some(kind),
            flops_fwd: work * 1e13,
            flops_bwd: 2.0 * work * 1e13,
            params_split: params * 1e9,
            trainable_split: params * 1e9,
            ..Default::default()
        };
        let mut layers = vec![layer(LayerKind::Embedding, 0.0, 0.0)];
        layers.extend((0..4).map(|_| layer(LayerKind::Block, 1.0, 1.0)));
        layers.push(layer(LayerKind::Head, 12.0, 4.0));
        let cluster = Cluster {
            name: "unit * 4".into(),
            nodes: 4,
            node: crate::plan::unit_node(),
        };
        (layers, cluster)
    }

    #[test]
    fn a_heavy_head_gets_three_nodes_and_the_blocks_one() {
        let (layers, cluster) = heavy_head();
        let model = Model {
            layers: &layers,
            cluster: &cluster,
            precision: Precision::Bf16,
            batch: 192,
            offload: Offload::None,
            overlap: false,
            weight_gather: WeightGather::Prefetch,
            collective_efficiency: 1.0,
        };
        // The best uniform plan: two stages of 16 devices, pipeline microbatches of 48.
        let uniform = Strategy {
            data: 16,
            tensor: 1,
            pipeline: 2,
            micro_batch: 3,
            microbatches: 4,
            schedule: ScheduleChoice::OneFOneB,
            zero: 0,
            recompute: RecomputeChoice::None,
            sequence_parallel: false,
        };
        let cut = partition(&model, &uniform, &Menu::uniform(&uniform), f64::INFINITY).unwrap();
        let even = model.evaluate(&uniform, &cut);
        assert!(even.fits);
        // Blocks 4 units on 16 devices, head 12 on 16: the head's stage is three times slower.
        let times: Vec<f64> = even.stages.iter().map(|s| s.per_microbatch()).collect();
        assert_eq!(
            cut.iter().map(|s| s.layers[0].clone()).collect::<Vec<_>>(),
            [0..5, 5..6]
        );
        assert!((times[1] / times[0] - 3.0).abs() < 1e-12);

        // Per stage: the blocks on one node (4 units on 8), the head on three (12 on 24),
        // equal stages each 2/3 of the uniform plan's slowest.
        let menu = Menu::per_stage(&uniform, &[1], 32, 8, 1, false);
        let uneven = partition(&model, &uniform, &menu, f64::INFINITY).unwrap();
        let grid = |data| Submesh {
            data,
            tensor: 1,
            sequence_parallel: false,
        };
        assert_eq!(
            uneven,
            [
                StagePlace {
                    layers: std::iter::once(0..5).collect(),
                    submesh: grid(8)
                },
                StagePlace {
                    layers: std::iter::once(5..6).collect(),
                    submesh: grid(24)
                },
            ]
        );
        let better = model.evaluate(&uniform, &uneven);
        assert!(better.fits && !better.uniform());
        let t: Vec<f64> = better.stages.iter().map(|s| s.per_microbatch()).collect();
        assert!((t[0] / t[1] - 1.0).abs() < 1e-12);
        assert!((t[1] / times[1] - 2.0 / 3.0).abs() < 1e-12);
        // A pipeline of four microbatches: Σ t + 3·max t = 2.5 units against 3.25.
        let ratio = better.time.total / even.time.total;
        assert!((ratio - 2.5 / 3.25).abs() < 1e-6, "{ratio}");
    }

    fn random_model(
        blocks: &[(f64, f64, f64)],
        head: (f64, f64),
        nodes: u64,
        node: u64,
        memory: f64,
    ) -> (Vec<LayerProfile>, Cluster) {
        let (mut layers, mut cluster) = heavy_head();
        let layer = |kind, work: f64, params: f64, saved: f64| LayerProfile {
            kind: Some(kind),
            flops_fwd: work * 1e13,
            flops_bwd: 2.0 * work * 1e13,
            params_split: params * 1e9,
            trainable_split: params * 1e9,
            saved_split: saved * 1e10,
            boundary_bytes: 1e9,
            ..Default::default()
        };
        layers.truncate(1);
        layers.extend(
            blocks
                .iter()
                .map(|&(w, p, a)| layer(LayerKind::Block, w, p, a)),
        );
        layers.push(layer(LayerKind::Head, head.0, head.1, 1.0));
        cluster.nodes = nodes;
        cluster.node.devices = node;
        cluster.node.device.memory = memory * 1e9;
        cluster.node.intra_bandwidth = 2e11;
        cluster.node.inter_bandwidth = 1e11;
        cluster.node.inter_latency = 1e-5;
        (layers, cluster)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Whatever the layers, cluster and memory, stages the DP returns fit by the cost
        /// model's own memory, cover every layer once in order, tile the cluster with
        /// submeshes that respect nodes and split the pipeline microbatch evenly.
        #[test]
        fn stages_fit_cover_every_layer_and_tile_the_cluster(
            blocks in proptest::collection::vec((0.1f64..3.0, 0.1f64..1.5, 0.0f64..1.0), 1..14),
            head in (0.0f64..20.0, 0.0f64..8.0),
            nodes in 1u64..5,
            node in proptest::sample::select(vec![4u64, 8]),
            memory in 4.0f64..40.0,
            microbatch in proptest::sample::select(vec![8u64, 16, 24, 48]),
            microbatches in 1u64..9,
            zero in 0u8..4,
            recompute in proptest::sample::select(vec![RecomputeChoice::None, RecomputeChoice::Full]),
            gpipe in proptest::prelude::any::<bool>(),
        ) {
            let (layers, cluster) = random_model(&blocks, head, nodes, node, memory);
            let model = Model {
                layers: &layers,
                cluster: &cluster,
                precision: Precision::Bf16,
                batch: microbatch * microbatches,
                offload: Offload::None,
            overlap: false,
            weight_gather: WeightGather::Prefetch,
            collective_efficiency: 1.0,
            };
            let devices = nodes * node;
            let base = Strategy {
                data: microbatch,
                tensor: 1,
                pipeline: 1,
                micro_batch: 1,
                microbatches,
                schedule: if gpipe { ScheduleChoice::Gpipe } else { ScheduleChoice::OneFOneB },
                zero,
                recompute,
                sequence_parallel: false,
            };
            let menu = Menu::per_stage(&base, &[1, 2, 4], devices, node, 1, true);
            let Some(stages) = partition(&model, &base, &menu, f64::INFINITY) else {
                return Ok(());
            };
            let strategy = Strategy { pipeline: stages.len() as u64, ..base };
            let evaluation = model.evaluate(&strategy, &stages);
            proptest::prop_assert!(evaluation.fits, "{:?}", evaluation.stages);
            let mut next_layer = 0;
            let mut next_device = 0;
            for st in &stages {
                proptest::prop_assert_eq!(st.layers.len(), 1);
                proptest::prop_assert_eq!(st.layers[0].start, next_layer);
                proptest::prop_assert!(st.layers[0].end > next_layer);
                next_layer = st.layers[0].end;
                let n = st.submesh.devices();
                let inside_a_node = next_device % node + n <= node;
                let whole_nodes = next_device % node == 0 && n % node == 0;
                proptest::prop_assert!(inside_a_node || whole_nodes);
                proptest::prop_assert_eq!(microbatch % st.submesh.data, 0);
                next_device += n;
            }
            proptest::prop_assert_eq!(next_layer, layers.len());
            proptest::prop_assert_eq!(next_device, devices);
        }
    }
}
