//! Lowering GPT-3 175B (96 layers) with LoRA to the costed operator graph.
//! Target: under 20 ms.

use criterion::{criterion_group, criterion_main, Criterion};

fn lowering(c: &mut Criterion) {
    let src = "import std.models.gpt3\nimport std.clusters\n\
               experiment e {\n  model = gpt3_175b\n  adapter = lora { rank = 8, targets = [c_attn] }\n\
               parallel { mesh = dgx_a100 * 128, plan = auto }\n  train { batch = 1536, seq_len = 2048, precision = bf16 }\n}\n";
    let checked = kiln::compiler::check_source("gpt3_lora.kiln", src, None);
    assert!(checked.is_ok(), "{}", checked.render_errors());
    let experiment = &checked.module.experiments[0].value;
    c.bench_function("lower/gpt3_175b_lora", |b| {
        b.iter(|| kiln::compiler::graph::compile_graph(experiment).expect("lowers"))
    });
    let full = kiln::compiler::check_source(
        "gpt3.kiln",
        &src.replace("  adapter = lora { rank = 8, targets = [c_attn] }\n", ""),
        None,
    );
    let experiment = &full.module.experiments[0].value;
    c.bench_function("lower/gpt3_175b_full", |b| {
        b.iter(|| kiln::compiler::graph::compile_graph(experiment).expect("lowers"))
    });
}

criterion_group!(benches, lowering);
criterion_main!(benches);
