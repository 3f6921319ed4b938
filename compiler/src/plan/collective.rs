//! What a collective over a group of devices costs, as NCCL's own tuning model prices its ring
//! algorithm (NVIDIA/nccl, `src/graph/tuning.cc`, `ncclTopoTuneModel`):
//!
//! - **Bandwidth.** A ring moves 2(n−1)/n of the buffer through every rank for an all-reduce
//!   and (n−1)/n for an all-gather or reduce-scatter, at the bus bandwidth of the slowest link
//!   it crosses. Inside a node that is NVLink. Across nodes NCCL builds one channel per network
//!   adapter and threads each ring through NVLink inside the node, so a group with `k` ranks on
//!   each node drives `k` of the node's adapters: all of them for a data-parallel group of
//!   stride 1 (FSDP over whole nodes), one for Megatron's data-parallel groups of stride t = 8.
//!   nccl-tests shows the same: all-reduce across DGX A100 nodes reaches about 180-190 GB/s of
//!   bus bandwidth, eight HDR adapters' worth, not one.
//! - **Latency.** One pass around a ring pays a hop latency per step: `nodes − 1` steps cross
//!   the network and the other `n − nodes` stay on NVLink (NCCL's
//!   `(nsteps − nInterSteps)·intraLat + nInterSteps·interLat`); an all-reduce makes two passes.
//!   At a thousand ranks this, not the bytes, is what grows with the group.
//!
//! NCCL also has a tree all-reduce (log-depth latency) that it picks for small messages at
//! scale; the planner's all-reduces are large gradient and activation buffers, where the ring
//! wins, so only the ring is modelled.

use crate::spec::Node;

/// The ranks of one collective and how they sit on nodes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Group {
    pub ranks: u64,
    /// Nodes the group spans.
    pub nodes: u64,
    /// Ranks of the group on each node it spans.
    pub per_node: u64,
}

impl Group {
    /// `ranks` ranks `stride` apart in a stage's rank order (tensor fastest, then data), on
    /// nodes of `devices` devices, from the start of a node: consecutive ranks of a stride
    /// that divides the node share it. A ring runs at the pace of its emptiest node, so
    /// `per_node` is the fewest ranks any spanned node holds (the last, when it is partly
    /// filled).
    pub fn strided(ranks: u64, stride: u64, devices: u64) -> Group {
        let ranks = ranks.max(1);
        let full = (devices / stride.max(1)).clamp(1, ranks);
        let last = ranks % full;
        Group {
            ranks,
            nodes: ranks.div_ceil(full),
            per_node: if last == 0 { full } else { last },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    AllReduce,
    /// All-gather or reduce-scatter: the same ring pass, half an all-reduce.
    AllGather,
}

impl Collective {
    fn passes(self) -> f64 {
        match self {
            Collective::AllReduce => 2.0,
            Collective::AllGather => 1.0,
        }
    }
}

/// Bus bandwidth (bytes/s) a group's ring achieves on `node`s: NVLink inside one node; across
/// nodes the group's share of each node's adapters, never more than NVLink carries.
pub fn bus_bandwidth(node: &Node, group: Group) -> f64 {
    if group.nodes <= 1 {
        return node.intra_bandwidth;
    }
    let share = group.per_node as f64 / node.devices.max(1) as f64;
    (node.inter_bandwidth * share).min(node.intra_bandwidth)
}

/// Seconds of collective `c` over `bytes` (each rank's whole buffer) in `group`, by a
/// framework whose collectives reach `efficiency` of NCCL's bus bandwidth.
pub fn seconds(node: &Node, c: Collective, bytes: f64, group: Group, efficiency: f64) -> f64 {
    if group.ranks <= 1 {
        return 0.0;
    }
    let n = group.ranks as f64;
    let inter_steps = group.nodes.saturating_sub(1) as f64;
    let intra_steps = n - 1.0 - inter_steps;
    let pass = intra_steps * node.intra_latency + inter_steps * node.inter_latency;
    c.passes() * ((n - 1.0) / n * bytes / (bus_bandwidth(node, group) * efficiency) + pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DGX A100's links as `stdlib/clusters.kiln` describes them.
    fn dgx_a100() -> Node {
        Node {
            intra_bandwidth: 230e9,
            intra_latency: 5e-6,
            inter_bandwidth: 0.9 * 8.0 * 25e9,
            inter_latency: 10e-6,
            ..crate::plan::unit_node()
        }
    }

    #[test]
    fn groups_sit_on_nodes_by_their_stride() {
        assert_eq!(
            Group::strided(64, 1, 8),
            Group {
                ranks: 64,
                nodes: 8,
                per_node: 8
            }
        );
        assert_eq!(
            Group::strided(64, 8, 8),
            Group {
                ranks: 64,
                nodes: 64,
                per_node: 1
            }
        );
        assert_eq!(
            Group::strided(16, 4, 8),
            Group {
                ranks: 16,
                nodes: 8,
                per_node: 2
            }
        );
        assert_eq!(
            Group::strided(4, 2, 8),
            Group {
                ranks: 4,
                nodes: 1,
                per_node: 4
            }
        );
    }

    /// nccl-tests' all_reduce_perf across DGX A100 nodes reports ~180-190 GB/s bus bandwidth
    /// (eight 200 Gb/s HDR adapters at ~90%); a group with one rank per node gets one adapter.
    #[test]
    fn a_ring_across_nodes_uses_the_adapters_of_its_ranks() {
        let node = dgx_a100();
        let whole_nodes = bus_bandwidth(&node, Group::strided(64, 1, 8));
        assert!((whole_nodes - 180e9).abs() < 1e6, "{whole_nodes}");
        let one_per_node = bus_bandwidth(&node, Group::strided(64, 8, 8));
        assert!((one_per_node - 22.5e9).abs() < 1e6, "{one_per_node}");
        assert_eq!(bus_bandwidth(&node, Group::strided(8, 1, 8)), 230e9);
    }

    /// NCCL's ring latency: nodes − 1 network steps, the rest on NVLink, twice for an
    /// all-reduce. 1,536 ranks on 192 nodes: 191 × 10 µs + 1,344 × 5 µs per pass.
    #[test]
    fn ring_latency_counts_network_and_nvlink_steps() {
        let node = dgx_a100();
        let group = Group::strided(1536, 1, 8);
        let pass = 191.0 * 10e-6 + 1344.0 * 5e-6;
        let gather = seconds(&node, Collective::AllGather, 0.0, group, 1.0);
        assert!((gather - pass).abs() < 1e-12, "{gather}");
        let reduce = seconds(&node, Collective::AllReduce, 0.0, group, 1.0);
        assert!((reduce - 2.0 * pass).abs() < 1e-12, "{reduce}");
        let bytes = 1e9;
        let big = seconds(&node, Collective::AllReduce, bytes, group, 1.0) - reduce;
        assert!(
            (big - 2.0 * 1535.0 / 1536.0 * bytes / 180e9).abs() < 1e-9,
            "{big}"
        );
        assert_eq!(
            seconds(
                &node,
                Collective::AllReduce,
                bytes,
                Group::strided(1, 1, 8),
                1.0
            ),
            0.0
        );
    }
}
