//! `kiln plan`: the plan as a readable report, EXPLAIN-style.

use super::assemble::GIB;
use super::types::{render_range, ExecutionPlan};
use crate::spec::WeightGather;
use std::fmt::Write;

fn gib(x: f64) -> String {
    format!("{:.2} GiB", x / GIB)
}

/// FLOP/s with a unit that suits the device (CPUs are in GFLOP/s).
fn flops(x: f64) -> String {
    if x >= 1e12 {
        format!("{:.1} TFLOP/s", x / 1e12)
    } else {
        format!("{:.1} GFLOP/s", x / 1e9)
    }
}

fn ms(x: f64) -> String {
    if x >= 1.0 {
        format!("{x:.3} s")
    } else {
        format!("{:.3} ms", x * 1e3)
    }
}

pub fn render_text(p: &ExecutionPlan) -> String {
    let mut o = String::new();
    let s = &p.strategy;
    let _ = writeln!(
        o,
        "plan for `{}` ({}, {} strategies considered)",
        p.experiment, s.chosen_by, p.considered
    );
    let _ = writeln!(
        o,
        "mesh: {} = {} node(s) x {} {} ({} devices, {} and {} each)",
        p.mesh.cluster,
        p.mesh.nodes,
        p.mesh.devices_per_node,
        p.mesh.device,
        p.mesh.devices,
        flops(p.mesh.peak_flops),
        gib(p.mesh.memory_per_device)
    );
    let uniform = s.data > 0;
    let degrees = if uniform {
        format!(
            "data {} x tensor {}{} x pipeline {}",
            s.data,
            s.tensor,
            if s.sequence_parallel {
                " (+sequence parallel)"
            } else {
                ""
            },
            s.pipeline
        )
    } else {
        format!("pipeline {} on a submesh per stage", s.pipeline)
    };
    let microbatch = if uniform {
        format!("{}", s.micro_batch)
    } else {
        format!(
            "{} split over each stage's replicas",
            s.global_batch / s.microbatches
        )
    };
    let _ = writeln!(
        o,
        "strategy: {degrees} | {} microbatches of {microbatch} ({} sequences) | schedule {} | zero {} | recompute {} | offload {} | attention {}",
        s.microbatches,
        s.global_batch,
        s.schedule,
        s.zero,
        s.recompute,
        s.offload,
        s.attention
    );
    if s.overlap_grad_sync {
        let _ = writeln!(
            o,
            "gradient reduction overlaps the last microbatch's backward (only what outlasts it is counted)"
        );
    }
    match s.weight_gather {
        Some(WeightGather::Prefetch) => {
            let _ = writeln!(o, "ZeRO-3 gathers each layer's weights, the next one's under the current one's compute");
        }
        Some(WeightGather::OnDemand) => {
            let _ = writeln!(
                o,
                "ZeRO-3 gathers each module's weights when it runs, on the critical path"
            );
        }
        None => {}
    }
    if let Some(x) = s.collective_efficiency {
        let _ = writeln!(o, "collectives costed at {x} of NCCL's bus bandwidth");
    }
    if !uniform {
        let _ = writeln!(
            o,
            "note: the stages run on submeshes of their own; the best plan with one grid for every stage is among the runners-up"
        );
    }
    let _ = writeln!(
        o,
        "parameters: {} total, {} trainable, {} frozen\n",
        p.params.total, p.params.trainable, p.params.frozen
    );

    let _ = writeln!(
        o,
        "{:<6} {:<12} {:<10} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}  layers",
        "stage",
        "devices",
        "d x t",
        "fwd/mb",
        "bwd/mb",
        "recomp/mb",
        "tp comm/mb",
        "memory",
        "capacity"
    );
    for st in &p.stages {
        let _ = writeln!(
            o,
            "{:<6} {:<12} {:<10} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}  {}",
            st.index,
            render_range(&st.devices),
            format!(
                "{} x {}{}",
                st.submesh.data,
                st.submesh.tensor,
                if st.submesh.sequence_parallel {
                    "+sp"
                } else {
                    ""
                }
            ),
            ms(st.forward),
            ms(st.backward),
            ms(st.recompute),
            ms(st.tensor_comm),
            gib(st.memory.total),
            gib(st.memory.capacity),
            st.layers
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(o, "\nmemory per device (fullest stage):");
    if let Some(st) = p
        .stages
        .iter()
        .max_by(|a, b| a.memory.total.total_cmp(&b.memory.total))
    {
        let m = &st.memory;
        let _ = writeln!(
            o,
            "  weights {}  gradients {}  optimizer {}  activations {}  buffers {}  = {} of {} ({:.0}%)",
            gib(m.weights),
            gib(m.gradients),
            gib(m.optimizer),
            gib(m.activations),
            gib(m.buffers),
            gib(m.total),
            gib(m.capacity),
            100.0 * m.total / m.capacity
        );
    }
    let t = &p.time;
    let _ = writeln!(o, "\nstep time {}:", ms(t.total));
    for (name, x) in [
        ("compute", t.compute),
        ("recompute", t.recompute),
        ("tensor-parallel comm", t.tensor_comm),
        ("pipeline bubble", t.pipeline_bubble),
        ("pipeline transfers", t.p2p),
        ("data-parallel / ZeRO comm", t.data_parallel),
        ("optimizer step", t.optimizer),
    ] {
        if x > 0.0 {
            let _ = writeln!(
                o,
                "  {name:<26} {:>12} {:>6.1}%",
                ms(x),
                100.0 * x / t.total
            );
        }
    }
    let _ = writeln!(
        o,
        "throughput: {:.0} tokens/s, {} per device, MFU {:.1}%",
        p.throughput.tokens_per_second,
        flops(p.throughput.tflops_per_device * 1e12),
        100.0 * p.throughput.mfu
    );
    if !p.collectives.is_empty() {
        let _ = writeln!(o, "\ncollectives per iteration:");
        // Groups of stages on different submeshes have longer names.
        let width = p
            .collectives
            .iter()
            .map(|c| c.group.to_string().chars().count())
            .fold(10, usize::max);
        for c in &p.collectives {
            let _ = writeln!(
                o,
                "  {:<width$} x{:<3} {:<58} {:>8} calls of {:>12}  {}",
                c.group.to_string(),
                c.group_size,
                c.kind,
                c.per_iteration,
                gib(c.bytes),
                ms(c.seconds)
            );
        }
    }
    if !p.alternatives.is_empty() {
        let _ = writeln!(o, "\nrunners-up:");
        for a in &p.alternatives {
            let _ = writeln!(o, "  {:<60} {:>12}  {}", a.strategy, ms(a.step_time), a.why);
        }
    }
    o
}
