//! `plan = auto` for GPT-3 175B on `dgx_a100 * 128` (1024 GPUs, batch 1536, seq 2048): the whole
//! search as `kiln plan` runs it, per-stage submesh DP included (target under 1 s), and the
//! uniform path alone (target under 10 ms), full training and with LoRA.

use criterion::{criterion_group, criterion_main, Criterion};
use kiln::compiler::plan::{Planner, Submeshes};

fn source(adapter: &str) -> String {
    format!(
        "import std.models.gpt3\nimport std.clusters\n\
         experiment e {{ model = gpt3_175b, {adapter} parallel {{ mesh = dgx_a100 * 128, plan = auto }}, train {{ batch = 1536, seq_len = 2048, precision = bf16 }} }}"
    )
}

fn planning(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan");
    group.sample_size(10);
    for (name, adapter) in [
        ("gpt3_175b_full", ""),
        (
            "gpt3_175b_lora",
            "adapter = lora { rank = 8, targets = [c_attn] },",
        ),
    ] {
        let checked = kiln::compiler::check_source("bench.kiln", &source(adapter), None);
        assert!(checked.is_ok(), "{}", checked.render_errors());
        let experiment = &checked.module.experiments[0].value;
        // Lowering and profiling once (lower/gpt3_175b_* in the graph benchmark), then the search.
        let graph = kiln::compiler::graph::compile_graph(experiment).expect("lowers");
        let planner = Planner::new(experiment, graph);
        group.bench_function(format!("auto/{name}"), |b| {
            b.iter(|| planner.plan(Submeshes::PerStage).expect("plans"))
        });
        group.bench_function(format!("uniform/{name}"), |b| b.iter(|| planner.uniform()));
    }
    group.finish();
}

criterion_group!(benches, planning);
criterion_main!(benches);
