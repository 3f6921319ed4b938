//! The planner against published numbers, its own invariants, and its diagnostics (the
//! full text of plan-stage errors is in the UI corpus, `tests/ui/plan/`).

use kiln::compiler::plan::{compile, compile_plan_with, model_states, ExecutionPlan, Submeshes};
use kiln::compiler::spec::Precision;
use proptest::prelude::*;

fn plan(src: &str) -> ExecutionPlan {
    compile(src).unwrap_or_else(|e| panic!("{e}"))
}

/// Megatron 2021 Table 1 (DGX A100 80GB, s = 2048, V = 51200, full recompute).
const ROWS: &[(&str, u64, u64, u64, u64, f64)] = &[
    ("megatron_1_7b", 1, 1, 32, 512, 137.0),
    ("megatron_3_6b", 2, 1, 64, 512, 138.0),
    ("megatron_7_5b", 4, 1, 128, 512, 142.0),
    ("megatron_18_4b", 8, 1, 256, 1024, 135.0),
    ("megatron_39_1b", 8, 2, 512, 1536, 138.0),
];

/// Table 1's larger runs, deeper pipelines on up to 3,072 GPUs.
const LARGE_ROWS: &[(&str, u64, u64, u64, u64, f64)] = &[
    ("megatron_76_1b", 8, 4, 1024, 1792, 140.0),
    ("megatron_145_6b", 8, 8, 1536, 2304, 148.0),
    ("megatron_310_1b", 8, 16, 1920, 2160, 155.0),
    ("megatron_529_6b", 8, 35, 2520, 2520, 163.0),
    ("megatron_1t", 8, 64, 3072, 3072, 163.0),
];

/// A run measured by Megatron 2021 (Tables 1 and 2), whose attention was unfused (the paper
/// predates FlashAttention): `attention = eager`.
fn megatron_source(model: &str, gpus: u64, batch: u64, parallel: &str) -> String {
    format!(
        "import std.models.megatron\nimport std.clusters\n\
         experiment e {{ model = {model}, parallel {{ mesh = dgx_a100 * {}, {parallel} }}, train {{ batch = {batch}, seq_len = 2048, precision = bf16, attention = eager }} }}",
        gpus / 8
    )
}

/// Table 1's run `model` as published: `t`-way tensor and `p`-way pipeline parallelism (two
/// interleaved chunks), full recompute.
fn megatron_published(model: &str, t: u64, p: u64, gpus: u64, batch: u64) -> String {
    let d = gpus / (t * p);
    let schedule = if p > 1 {
        "schedule = interleaved(2),"
    } else {
        ""
    };
    megatron_source(
        model,
        gpus,
        batch,
        &format!("data = {d}, tensor = {t}, pipeline = {p}, recompute = full, {schedule}"),
    )
}

#[test]
fn auto_is_at_least_as_fast_as_the_published_plan_and_keeps_tensor_parallelism_in_a_node() {
    for &(model, t, p, gpus, batch, _) in ROWS {
        let d = gpus / (t * p);
        let published = plan(&megatron_source(
            model,
            gpus,
            batch,
            &format!("data = {d}, tensor = {t}, pipeline = {p}, recompute = full"),
        ));
        let auto = plan(&megatron_source(model, gpus, batch, "plan = auto"));
        auto_is_as_fast_inside_nodes(&format!("{model} (t={t}, p={p})"), &auto, &published);
    }
}

/// `auto` is at least as fast as the `published` plan of run `what`, by the model's own
/// figures, and keeps tensor parallelism inside a node (8 GPUs).
fn auto_is_as_fast_inside_nodes(what: &str, auto: &ExecutionPlan, published: &ExecutionPlan) {
    assert!(
        auto.time.total <= published.time.total * (1.0 + 1e-9),
        "{what}: auto {} s vs published {} s",
        auto.time.total,
        published.time.total
    );
    assert!(
        auto.strategy.tensor <= 8,
        "{what}: tensor {} crosses a node",
        auto.strategy.tensor
    );
}

/// Megatron 2021 Table 2: GPT-3 175B, batch 1536, ZeRO-3 without model parallelism
/// (DeepSpeed, which overlaps the gradient reduction with the backward under ZeRO-3 by
/// default), one microbatch per GPU: (GPUs, microbatch, published TF/s per GPU).
const ZERO3_ROWS: &[(u64, u64, f64)] = &[(384, 4, 144.0), (768, 2, 88.0), (1536, 1, 44.0)];

const DEEPSPEED_2021_EFFICIENCY: f64 = 0.125;

fn zero3_source(gpus: u64, parallel: &str) -> String {
    megatron_source("megatron_175b", gpus, 1536, parallel)
}

/// The published ZeRO-3 run on `gpus` GPUs: one microbatch per GPU.
fn zero3_published(gpus: u64) -> String {
    zero3_source(
        gpus,
        &format!(
            "data = {gpus}, zero = 3, recompute = full, microbatches = 1, overlap_grad_sync = true, weight_gather = on_demand, collective_efficiency = {DEEPSPEED_2021_EFFICIENCY}"
        ),
    )
}

#[test]
fn zero3_rows_run_one_microbatch_per_gpu() {
    for &(gpus, micro_batch, _) in ZERO3_ROWS {
        assert_eq!(
            plan(&zero3_published(gpus)).strategy.micro_batch,
            micro_batch
        );
    }
}

/// The 384-GPU ZeRO-3 run as `kiln plan` reports it: the per-module weight gathers and the
/// gradient reduce-scatter hidden under the backward (reviewed snapshot).
#[test]
fn zero3_plan_report() {
    insta::assert_snapshot!(kiln::compiler::plan::render_text(&plan(&zero3_published(
        384
    ))));
}

#[test]
fn auto_beats_zero3_on_its_own_cluster_and_batch() {
    for &(gpus, _, _) in ZERO3_ROWS {
        let zero3 = plan(&zero3_published(gpus));
        let auto = plan(&zero3_source(gpus, "plan = auto, overlap_grad_sync = true"));
        auto_is_as_fast_inside_nodes(&format!("ZeRO-3 on {gpus} GPUs"), &auto, &zero3);
    }
}

/// A run of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
/// Models"): its Table 3 configuration (s = 2048, V = 51200, t = 8, DGX A100) and Table 5's
/// seconds per iteration with full recompute, and with selective recompute plus sequence
/// parallelism.
struct IterationTimes {
    hidden: u64,
    layers: u64,
    heads: u64,
    pipeline: u64,
    gpus: u64,
    batch: u64,
    micro_batch: u64,
    full: f64,
    selective: f64,
}

const fn run(shape: [u64; 7], full: f64, selective: f64) -> IterationTimes {
    let [hidden, layers, heads, pipeline, gpus, batch, micro_batch] = shape;
    IterationTimes {
        hidden,
        layers,
        heads,
        pipeline,
        gpus,
        batch,
        micro_batch,
        full,
        selective,
    }
}

const KORTHIKANTI_ROWS: &[IterationTimes] = &[
    run([6144, 48, 64, 1, 8, 4, 4], 1.42, 1.10),
    run([12288, 96, 96, 8, 64, 64, 1], 18.13, 13.75),
    run([20480, 105, 128, 35, 280, 280, 1], 49.05, 37.83),
    run([25600, 128, 160, 64, 512, 512, 1], 94.42, 71.49),
];

/// Run `r` as published with `recompute` (and sequence parallelism `sp`). Korthikanti et al.
/// measured unfused attention (selective recompute is about its saved scores):
/// `attention = eager`.
fn korthikanti_published(r: &IterationTimes, recompute: &str, sp: bool) -> String {
    let (hidden, layers, heads, p) = (r.hidden, r.layers, r.heads, r.pipeline);
    format!(
        "import std.models.megatron\nimport std.clusters\n\
         model m = megatron_1_7b {{ hidden = {hidden}, layers = {layers}, heads = {heads} }}\n\
         experiment e {{ model = m, parallel {{ mesh = dgx_a100 * {nodes}, data = {d}, tensor = 8, pipeline = {p}, recompute = {recompute}, sequence_parallel = {sp}, microbatches = {m} }}, train {{ batch = {batch}, seq_len = 2048, precision = bf16, attention = eager }} }}",
        nodes = r.gpus / 8,
        d = r.gpus / (8 * p),
        m = r.batch / r.micro_batch,
        batch = r.batch,
    )
}

/// Run `r`'s model, cluster and batch with `plan = auto`.
fn korthikanti_auto(r: &IterationTimes) -> String {
    format!(
        "import std.models.megatron\nimport std.clusters\n\
         model m = megatron_1_7b {{ hidden = {}, layers = {}, heads = {} }}\n\
         experiment e {{ model = m, parallel {{ mesh = dgx_a100 * {}, plan = auto }}, train {{ batch = {}, seq_len = 2048, precision = bf16, attention = eager }} }}",
        r.hidden,
        r.layers,
        r.heads,
        r.gpus / 8,
        r.batch
    )
}

/// MosaicML's MPT throughput table (llm-foundry, `scripts/train/benchmarking/README.md`): PyTorch
/// FSDP `FULL_SHARD` (forward and backward prefetch, gradient reduce-scatter overlapped),
/// FlashAttention, bf16, s = 2048, tokens/s per GPU. MPT is a GPT without biases or learned
/// positions (ALiBi's bias is added inside the attention kernel, free at this precision of
/// costing), vocabulary 50,368, FFN 4h.
struct Mpt {
    hidden: u64,
    layers: u64,
    heads: u64,
    /// `dgx_a100` (the table's "1600 Gbps node-node interconnect") or `dgx_h100`.
    node: &'static str,
    gpus: u64,
    micro_batch: u64,
    batch: u64,
    checkpointing: bool,
    tokens_per_gpu: f64,
}

const fn mpt(
    shape: [u64; 3],
    node: &'static str,
    [gpus, micro_batch, batch]: [u64; 3],
    checkpointing: bool,
    tokens_per_gpu: f64,
) -> Mpt {
    let [hidden, layers, heads] = shape;
    Mpt {
        hidden,
        layers,
        heads,
        node,
        gpus,
        micro_batch,
        batch,
        checkpointing,
        tokens_per_gpu,
    }
}

const MPT_7B: [u64; 3] = [4096, 32, 32];
const MPT_13B: [u64; 3] = [5120, 40, 40];
const MPT_30B: [u64; 3] = [7168, 48, 64];
const MPT_70B: [u64; 3] = [8192, 80, 64];

const MPT_ROWS: &[Mpt] = &[
    mpt(MPT_7B, "dgx_h100", [8, 6, 48], false, 10643.0),
    mpt(MPT_13B, "dgx_h100", [8, 2, 16], false, 4792.0),
    mpt(MPT_30B, "dgx_h100", [8, 3, 504], true, 2002.0),
    mpt(MPT_70B, "dgx_h100", [64, 8, 2048], true, 1039.0),
    mpt(MPT_30B, "dgx_a100", [8, 3, 504], true, 916.0),
    mpt(MPT_70B, "dgx_a100", [64, 8, 2048], true, 410.0),
];

fn mpt_source(r: &Mpt, parallel: &str) -> String {
    format!(
        "import std.models.gpt2\nimport std.clusters\n\
         model m = gpt2 {{ vocab = 50368, positions = 2048, hidden = {}, layers = {}, heads = {}, position = none, bias = false, dropout = 0.0 }}\n\
         experiment e {{ model = m, parallel {{ mesh = {} * {}, {parallel} }}, train {{ batch = {}, seq_len = 2048, precision = bf16 }} }}",
        r.hidden,
        r.layers,
        r.heads,
        r.node,
        r.gpus / 8,
        r.batch
    )
}

fn mpt_published(r: &Mpt) -> String {
    mpt_source(
        r,
        &format!(
            "data = {}, zero = 3, overlap_grad_sync = true, microbatches = {}, recompute = {}",
            r.gpus,
            r.batch / (r.gpus * r.micro_batch),
            if r.checkpointing { "full" } else { "none" }
        ),
    )
}

/// What a published figure is.
#[derive(Clone, Copy)]
enum Measure {
    TflopsPerGpu,
    SecondsPerIteration,
    TokensPerGpu,
}

/// A published run the planner is checked against: its configuration as written by its
/// authors, the figure they measured, and what the figure is.
struct Published {
    what: String,
    source: String,
    figure: f64,
    measure: Measure,
    /// How far the prediction may be from the figure; `None` for a run reported but not yet
    /// predicted well (a known gap, see its rows).
    tolerance: Option<f64>,
    /// The same model, cluster and batch with `plan = auto`.
    auto: String,
}

/// Every published run Kiln ships: Megatron 2021 Tables 1 and 2 and Korthikanti 2022 Table 5
/// (the rows the model was first checked on, within 15%), Table 1's larger runs and MosaicML's
/// FSDP runs on A100 (added after, within 20%), and MosaicML's H100 runs (reported only).
fn published_runs() -> Vec<Published> {
    let mut runs = Vec::new();
    for (rows, tolerance) in [(ROWS, 0.15), (LARGE_ROWS, 0.20)] {
        let tolerance = Some(tolerance);
        for &(model, t, p, gpus, batch, figure) in rows {
            runs.push(Published {
                what: format!("Megatron 2021 T1 {model} t={t} p={p} on {gpus}"),
                source: megatron_published(model, t, p, gpus, batch),
                figure,
                measure: Measure::TflopsPerGpu,
                tolerance,
                auto: megatron_source(model, gpus, batch, "plan = auto"),
            });
        }
    }
    for &(gpus, _, figure) in ZERO3_ROWS {
        runs.push(Published {
            what: format!("Megatron 2021 T2 175B ZeRO-3 on {gpus}"),
            source: zero3_published(gpus),
            figure,
            measure: Measure::TflopsPerGpu,
            tolerance: Some(0.15),
            auto: zero3_source(gpus, "plan = auto, overlap_grad_sync = true"),
        });
    }
    for r in KORTHIKANTI_ROWS {
        for (recompute, sp, figure) in [("full", false, r.full), ("selective", true, r.selective)] {
            runs.push(Published {
                what: format!("Korthikanti 2022 h={} {recompute} on {}", r.hidden, r.gpus),
                source: korthikanti_published(r, recompute, sp),
                figure,
                measure: Measure::SecondsPerIteration,
                tolerance: Some(0.15),
                auto: korthikanti_auto(r),
            });
        }
    }
    for r in MPT_ROWS {
        runs.push(Published {
            what: format!(
                "MPT h={} FSDP on {} {}{}",
                r.hidden,
                r.gpus,
                r.node,
                if r.checkpointing { " +ckpt" } else { "" }
            ),
            source: mpt_published(r),
            figure: r.tokens_per_gpu,
            measure: Measure::TokensPerGpu,
            // The H100 rows are predicted 27-64% fast: the H100 profile's 80% GEMM ceiling is
            // not calibrated against a measurement yet; they are reported, not checked, until
            // it is.
            tolerance: (r.node != "dgx_h100").then_some(0.20),
            auto: mpt_source(r, "plan = auto, overlap_grad_sync = true"),
        });
    }
    runs
}

/// Every published run within its tolerance; the report (`cargo test --test plan published --
/// --nocapture`) prints each beside its prediction, the mean |error|, and what `plan = auto`
/// claims over the published configuration.
#[test]
fn published_runs_within_their_tolerance() {
    let mut errors = Vec::new();
    println!(
        "{:<48} {:>10} {:>10} {:>8} {:>10}",
        "run", "published", "predicted", "error", "auto gain"
    );
    for run in published_runs() {
        let ours = plan(&run.source);
        let predicted = match run.measure {
            Measure::TflopsPerGpu => ours.throughput.tflops_per_device,
            Measure::SecondsPerIteration => ours.time.total,
            Measure::TokensPerGpu => ours.throughput.tokens_per_second / ours.mesh.devices as f64,
        };
        let auto =
            compile(&run.auto).unwrap_or_else(|e| panic!("{} with plan = auto: {e}", run.what));
        let gain = format!("{:+.1}%", (ours.time.total / auto.time.total - 1.0) * 100.0);
        let error = predicted / run.figure - 1.0;
        println!(
            "{:<48} {:>10.2} {:>10.2} {:>+7.1}% {:>10}",
            run.what,
            run.figure,
            predicted,
            error * 100.0,
            gain
        );
        errors.push((run.what, error, run.tolerance));
    }
    let mean = |rows: &[&(String, f64, Option<f64>)]| {
        rows.iter().map(|(_, e, _)| e.abs()).sum::<f64>() / rows.len().max(1) as f64
    };
    let checked: Vec<_> = errors.iter().filter(|(_, _, t)| t.is_some()).collect();
    let everything: Vec<_> = errors.iter().collect();
    println!(
        "mean |error| {:.1}% over the {} checked runs, {:.1}% over all {}",
        mean(&checked) * 100.0,
        checked.len(),
        mean(&everything) * 100.0,
        everything.len()
    );
    for (what, error, tolerance) in &errors {
        if let Some(tolerance) = tolerance {
            assert!(error.abs() <= *tolerance, "{what}: {:+.1}%", error * 100.0);
        }
    }
    let mean = mean(&checked);
    // Where the model stands, with a little room: a change that makes it worse overall shows
    // here even when every run stays within its tolerance.
    assert!(
        mean <= MEAN_ERROR_BOUND,
        "mean |error| {:.1}%",
        mean * 100.0
    );
}

const MEAN_ERROR_BOUND: f64 = 0.08;

/// Rajbhandari et al. 2020: Ψ = 7.5B on 64 GPUs, mixed-precision Adam (K = 12).
#[test]
fn zero_memory_matches_the_paper() {
    let gb = |zero| {
        let (w, g, o) = model_states(7.5e9, 7.5e9, zero, 64, Precision::Bf16);
        ((w + g + o) / 1e9 * 10.0).round() / 10.0
    };
    assert_eq!([gb(0), gb(1), gb(2), gb(3)], [120.0, 31.4, 16.6, 1.9]);
}

#[test]
fn lora_shrinks_model_state_to_the_adapter() {
    let full = plan("import std.models.gpt2\nexperiment e { model = gpt2, parallel { mesh = cpu(1) }, train { batch = 1, seq_len = 16 } }");
    let lora = plan("import std.models.gpt2\nexperiment e { model = gpt2, adapter = lora, parallel { mesh = cpu(1) }, train { batch = 1, seq_len = 16 } }");
    let (f, l) = (&full.stages[0].memory, &lora.stages[0].memory);
    assert!(
        l.weights >= f.weights && l.weights < 1.01 * f.weights,
        "frozen weights stay, plus the adapter's"
    );
    assert!(
        l.gradients < f.gradients / 100.0 && l.optimizer < f.optimizer / 100.0,
        "gradients and optimizer state only for the adapter"
    );
}

fn check_invariants(p: &ExecutionPlan, devices: u64, blocks: u64) {
    let s = &p.strategy;
    assert_eq!(p.stages.len() as u64, s.pipeline);
    if s.data > 0 {
        assert_eq!(
            s.data * s.tensor * s.pipeline,
            devices,
            "device counts add up"
        );
        for st in &p.stages {
            assert_eq!((st.submesh.data, st.submesh.tensor), (s.data, s.tensor));
        }
    }
    for st in &p.stages {
        assert!(
            st.memory.total <= st.memory.capacity,
            "stage {} does not fit by the planner's own model",
            st.index
        );
    }
    // Every layer exactly once (interleaved schedules give a rank several chunks), each run
    // named for the layers it holds.
    let mut seen: Vec<usize> = Vec::new();
    for st in &p.stages {
        for run in &st.layers {
            let named = match run
                .name
                .strip_prefix("block.")
                .and_then(|r| r.split_once('-'))
            {
                Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
                None => 1,
            };
            assert_eq!(named, run.layers.len(), "{run:?}");
            seen.extend(run.layers.clone());
        }
    }
    seen.sort();
    assert_eq!(seen, (0..blocks as usize + 2).collect::<Vec<_>>());
    // Stages hold disjoint, consecutive device ranges of their submesh's size covering the
    // mesh.
    let mut first = 0;
    for st in &p.stages {
        let n = st.submesh.data * st.submesh.tensor;
        assert_eq!(st.devices, first..first + n);
        first += n;
    }
    assert_eq!(first, devices, "device counts add up");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn auto_plans_fit_cover_every_layer_and_use_every_device(
        layers in 2u64..13, heads_log in 1u32..4, nodes in prop::sample::select(vec![1u64, 2, 4, 16]), per_device_log in 0u32..3, lora in any::<bool>(),
    ) {
        let heads = 1u64 << heads_log;
        let hidden = 64 * heads;
        // At least one sequence per device, so some data-parallel split exists.
        let batch = (nodes * 8) << per_device_log;
        let adapter = if lora { "adapter = lora," } else { "" };
        let src = format!(
            "import std.models.gpt2\nimport std.clusters\n\
             experiment e {{ model = gpt2 {{ layers = {layers}, hidden = {hidden}, heads = {heads} }}, {adapter} parallel {{ mesh = dgx_a100 * {nodes}, plan = auto }}, train {{ batch = {batch}, seq_len = 256, precision = bf16 }} }}"
        );
        let p = plan(&src);
        check_invariants(&p, nodes * 8, layers);
        // Deterministic: the same input gives the same plan, byte for byte.
        prop_assert_eq!(serde_json::to_string(&p).unwrap(), serde_json::to_string(&plan(&src)).unwrap());
    }

    /// Plans with a submesh per stage, where they can win: models too large for one device
    /// without ZeRO, heavy vocabularies, head counts that rule tensor parallelism out or in.
    #[test]
    fn per_stage_plans_fit_cover_every_layer_and_use_every_device(
        layers in 4u64..33, heads in prop::sample::select(vec![25u64, 32]), head_dim in prop::sample::select(vec![128u64, 256]), vocab in prop::sample::select(vec![50257u64, 256000]), nodes in prop::sample::select(vec![1u64, 2, 4]), lora in any::<bool>(),
    ) {
        let hidden = heads * head_dim;
        let adapter = if lora { "adapter = lora," } else { "" };
        let src = format!(
            "import std.models.gpt2\nimport std.clusters\n\
             experiment e {{ model = gpt2 {{ positions = 2048, vocab = {vocab}, layers = {layers}, hidden = {hidden}, heads = {heads}, tie_embeddings = false }}, {adapter} parallel {{ mesh = dgx_a100 * {nodes}, plan = auto, zero = 0 }}, train {{ batch = 512, seq_len = 2048, precision = bf16 }} }}"
        );
        let checked = kiln::compiler::check_source("e.kiln", &src, None);
        prop_assert!(checked.is_ok(), "{}", checked.render_errors());
        let e = &checked.module.experiments[0].value;
        let (Ok(per_stage), Ok(uniform)) = (compile_plan_with(e, Submeshes::PerStage), compile_plan_with(e, Submeshes::Uniform)) else {
            // Nothing fits: both agree.
            prop_assert!(compile_plan_with(e, Submeshes::PerStage).is_err() && compile_plan_with(e, Submeshes::Uniform).is_err());
            return Ok(());
        };
        check_invariants(&per_stage, nodes * 8, layers);
        check_invariants(&uniform, nodes * 8, layers);
        prop_assert!(uniform.strategy.data > 0, "what `kiln run` gets has one submesh");
        prop_assert!(per_stage.time.total <= uniform.time.total);
        let again = compile_plan_with(e, Submeshes::PerStage).unwrap();
        prop_assert_eq!(serde_json::to_string(&per_stage).unwrap(), serde_json::to_string(&again).unwrap());
    }
}

/// 25 heads rule tensor parallelism out, ZeRO is off and a 256k vocabulary makes the embedding
/// and head heavy: uniform stages can only come in counts dividing 32 devices (eight stages of
/// four), while stages of four and eight devices give five stages, the light first ones on
/// half nodes. The uniform plan is also the runner-up the report names.
#[test]
fn uneven_submeshes_beat_uniform_stages() {
    let src = "import std.models.gpt2\nimport std.clusters\n\
        experiment e { model = gpt2 { positions = 2048, vocab = 256000, hidden = 6400, layers = 24, heads = 25, tie_embeddings = false }, parallel { mesh = dgx_a100 * 4, plan = auto, zero = 0 }, train { batch = 512, seq_len = 2048, precision = bf16 } }";
    let checked = kiln::compiler::check_source("e.kiln", src, None);
    let e = &checked.module.experiments[0].value;
    let per_stage = compile_plan_with(e, Submeshes::PerStage).unwrap();
    let uniform = compile_plan_with(e, Submeshes::Uniform).unwrap();
    check_invariants(&per_stage, 32, 24);
    check_invariants(&uniform, 32, 24);
    assert_eq!(per_stage.strategy.data, 0, "stages on different submeshes");
    assert!(per_stage
        .stages
        .iter()
        .any(|s| s.submesh != per_stage.stages[0].submesh));
    let gain = 1.0 - per_stage.time.total / uniform.time.total;
    assert!(
        gain > 0.05,
        "{} s against {} s",
        per_stage.time.total,
        uniform.time.total
    );
    // The runners-up name the uniform plan that `kiln run` executes.
    let runner_up = per_stage
        .alternatives
        .iter()
        .find(|a| a.step_time == uniform.time.total);
    assert!(runner_up.is_some(), "{:?}", per_stage.alternatives);
    insta::assert_snapshot!(kiln::compiler::plan::render_text(&per_stage));
}

/// Every shipped example's plan (of its first experiment, or its first pipeline's first
/// stage), by the example's name, in name order. Paths are relative to the workspace, as the
/// snapshots show them.
fn example_plans_by_name() -> Vec<(String, ExecutionPlan)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(root.join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kiln"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let checked = kiln::compiler::check_file(path.strip_prefix(root).unwrap());
            assert!(checked.is_ok(), "{}", checked.render_errors());
            let experiment = checked
                .module
                .experiments
                .first()
                .map(|e| &e.value)
                .or_else(|| {
                    checked
                        .module
                        .pipelines
                        .first()
                        .and_then(|p| p.value.stages.first())
                })
                .unwrap();
            let p = kiln::compiler::plan::compile_plan(experiment)
                .unwrap_or_else(|d| panic!("{}: {:?}", path.display(), d.items));
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            (name, p)
        })
        .collect()
}

/// Every example's plan, as text and as JSON (reviewed snapshots).
#[test]
fn example_plans() {
    for (name, p) in example_plans_by_name() {
        insta::assert_snapshot!(
            format!("plan_{name}"),
            kiln::compiler::plan::render_text(&p)
        );
        insta::assert_json_snapshot!(format!("plan_{name}_json"), p);
    }
}

/// Offloading the optimizer (ZeRO-Offload) costs the owned gradients' trip to the host and the
/// updated weights' trip back over each GPU's PCIe link, and Adam's 28 bytes per owned
/// parameter through host memory shared by the node's eight GPUs; it frees the optimizer
/// state from GPU memory. Offloading the weights too streams them in twice per microbatch.
#[test]
fn offload_is_costed_by_the_host_link_and_host_memory() {
    let source = |offload: &str| {
        format!(
            "import std.models.megatron\nimport std.clusters\n\
             experiment e {{ model = megatron_7_5b, parallel {{ mesh = dgx_a100 * 8, data = 64, zero = 3, recompute = full, offload = {offload} }}, train {{ batch = 512, seq_len = 2048, precision = bf16 }} }}"
        )
    };
    let (none, optimizer, all) = (
        plan(&source("none")),
        plan(&source("optimizer")),
        plan(&source("all")),
    );
    let owned = none.params.trainable as f64 / 64.0;
    let (pcie, host) = (0.8 * 31.5e9, 0.8 * 409.6e9);
    let expected = 2.0 * 2.0 * owned / pcie + 28.0 * owned * 8.0 / host;
    let got = optimizer.time.optimizer;
    assert!(
        // Plans round times to six significant digits.
        (got / expected - 1.0).abs() < 1e-5,
        "offloaded optimizer step {got} s, expected {expected} s"
    );
    assert!(got > none.time.optimizer, "the host is slower than HBM");
    assert_eq!(optimizer.stages[0].memory.optimizer, 0.0);
    assert!(none.stages[0].memory.optimizer > 0.0);
    // ZeRO-3 holds 1/64 of the weights; they come in for the forward and the backward of each
    // microbatch.
    let microbatches = all.strategy.microbatches as f64;
    let streamed = 2.0 * microbatches * 2.0 * none.params.total as f64 / 64.0 / pcie;
    assert_eq!(all.stages[0].memory.weights, 0.0);
    assert!(
        (all.time.optimizer - got - streamed).abs() < 1e-5 * all.time.optimizer,
        "weights streamed: {} s, expected {streamed} s",
        all.time.optimizer - got
    );
}

#[test]
fn offload_on_a_node_without_a_host_description_is_an_error() {
    let err = compile(
        "import std.models.gpt2\nexperiment e { model = gpt2, parallel { mesh = cpu(2), data = 2, offload = optimizer }, train { batch = 2, seq_len = 16 } }",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("host_bandwidth") && err.contains("cpu_host"),
        "{err}"
    );
}

/// `overlap_grad_sync`: the gradient all-reduce runs during the last microbatch's backward,
/// and only what outlasts that backward (with its recompute) stays on the critical path.
#[test]
fn overlapped_gradient_reduction_hides_behind_the_backward() {
    // Hidden entirely (tensor 8: little traffic per device), and in part (one sequence per
    // replica on 512 devices: a short backward for a whole model's gradients, reduced at an
    // eighth of NCCL's bandwidth).
    for (model, gpus, tensor, efficiency) in [
        ("megatron_7_5b", 128, 8, 1.0),
        ("megatron_1_7b", 512, 1, 0.125),
    ] {
        let source = |overlap: bool| {
            megatron_source(
                model,
                gpus,
                512,
                &format!(
                    "data = {}, tensor = {tensor}, recompute = full, overlap_grad_sync = {overlap}, collective_efficiency = {efficiency}",
                    gpus / tensor
                ),
            )
        };
        let (plain, overlapped) = (plan(&source(false)), plan(&source(true)));
        let stage = &plain.stages[0];
        let window = stage.backward + stage.recompute;
        let expected = (plain.time.data_parallel - window).max(0.0);
        assert!(
            (overlapped.time.data_parallel - expected).abs() <= 1e-5 * plain.time.total,
            "{model}: {} s visible, expected {expected} s (all-reduce {} s, backward {window} s)",
            overlapped.time.data_parallel,
            plain.time.data_parallel
        );
        assert!(overlapped.time.total < plain.time.total);
        assert_eq!(
            tensor == 1,
            expected > 0.0,
            "{model}: hidden only in part without tensor parallelism"
        );
        assert!(overlapped.strategy.overlap_grad_sync && !plain.strategy.overlap_grad_sync);
    }
}

/// `kiln plan --format svg` of every shipped example is an image: the same bytes each time,
/// rendered by resvg to the size it declares, with each stage's timeline drawn (coloured
/// pixels inside the timeline's rows) and bounded in size however many microbatches the plan
/// has (GPT-3 175B: 96 of them on 8 stages of 4 chunks).
#[test]
fn plan_pictures_are_deterministic_images() {
    for (name, p) in example_plans_by_name() {
        let svg = kiln::compiler::plan::render_svg(&p);
        assert_eq!(svg, kiln::compiler::plan::render_svg(&p), "{name}");
        if name == "llama_lora_tp" {
            insta::assert_snapshot!("plan_svg_llama_lora_tp", svg);
        }
        assert!(svg.len() < 100_000, "{name}: {} bytes", svg.len());
        let tree = resvg::usvg::Tree::from_str(&svg, &resvg::usvg::Options::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let size = tree.size().to_int_size();
        let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).unwrap();
        resvg::render(
            &tree,
            resvg::tiny_skia::Transform::default(),
            &mut pixmap.as_mut(),
        );
        // The first stage's row, a third of the way along its timeline: drawn, not blank.
        let (x, y) = (150 + 760 / 3, 96 + 12);
        let pixel = pixmap.pixel(x, y).unwrap();
        let grey = pixel.red() == pixel.green() && pixel.green() == pixel.blue();
        assert!(!grey, "{name}: the timeline is empty at ({x}, {y})");
    }
}
