//! Training on the CPU executor: the quick-start lowers its loss, runs are reproducible, the
//! checkpoint is a valid safetensors file of the trainable parameters, and a diverging run
//! stops with the step named and the last good checkpoint intact.

use kiln_runtime::memory::CountingAllocator;
use kiln_runtime::store::run_dir::{latest_checkpoint, Checkpoint};
use kiln_runtime::store::safetensors::read_safetensors;
use kiln_runtime::store::sharded;
use kiln_runtime::tensor::HostTensor;
use kiln_runtime::train::{Control, Event, Start};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;
use common::run;

/// Allocations are counted, for the measured memory per device.
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn examples() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples")).to_path_buf()
}

/// The runtime's tests train on the small stories set, which loads in milliseconds (the
/// quick-start's novel takes a while to tokenize, and its eval set to evaluate).
const STORIES: &str = "data = { train = \"data/tiny_stories_train.jsonl\", eval = \"data/tiny_stories_eval.jsonl\", tokenizer = \"data/tokenizer.json\" }";

fn quickstart(overrides: &str) -> kiln_compiler::spec::Experiment {
    let src = std::fs::read_to_string(examples().join("quickstart.kiln")).unwrap();
    let src = format!("{src}\nexperiment variant = quickstart {{ {STORIES}, {overrides} }}\n");
    variant(&src)
}

/// The experiment named `variant` in `src`, checked as a file beside the examples.
fn variant(src: &str) -> kiln_compiler::spec::Experiment {
    named(src, "variant")
}

/// The experiment `name` of `src`, checked as a file beside the examples.
fn named(src: &str, name: &str) -> kiln_compiler::spec::Experiment {
    let checked = kiln_compiler::check_source("variant.kiln", src, Some(&examples()));
    assert!(checked.is_ok(), "{}", checked.render_errors());
    checked
        .module
        .experiments
        .into_iter()
        .find(|e| e.value.name == name)
        .unwrap()
        .value
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-train-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

#[test]
fn quickstart_learns_and_is_reproducible() {
    let e = quickstart("train { steps = 12, optimizer = adamw { lr = 3e-3, weight_decay = 0.01 }, schedule = cosine { warmup = 10, min_lr_ratio = 0.1 } }");
    let (a, b) = (scratch("a"), scratch("b"));
    let first = run(&e, &a, None, Start::Fresh, |_| Control::Continue).unwrap();
    assert!(
        first.last_loss < first.first_loss - 1.0,
        "loss {} -> {}",
        first.first_loss,
        first.last_loss
    );
    run(&e, &b, None, Start::Fresh, |_| Control::Continue).unwrap();
    assert_eq!(
        metrics(&a, "variant"),
        metrics(&b, "variant"),
        "same seed, same losses"
    );
    assert_eq!(
        metrics(&a, "variant").len(),
        13,
        "12 steps and the evaluation"
    );
    let svg = std::fs::read_to_string(a.join("variant/loss.svg")).unwrap();
    assert!(svg.contains("<polyline"), "the loss curve is plotted");
    let saved = saved_weights(&a.join("variant"));
    assert!(
        saved.contains_key("transformer.wte.weight")
            && saved.contains_key("transformer.h.1.mlp.c_proj.weight")
    );
    std::fs::remove_dir_all(&a).ok();
    std::fs::remove_dir_all(&b).ok();
}

#[test]
fn divergence_names_the_step_and_keeps_the_last_checkpoint() {
    let e = quickstart("train { steps = 40, checkpoint_every = 1, grad_clip = false, optimizer = sgd { lr = 1e4 } }");
    let dir = scratch("nan");
    let err = run(&e, &dir, None, Start::Fresh, |_| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at step") || err.contains("step "), "{err}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(saved(&dir.join("variant"), "state.json")).unwrap(),
    )
    .unwrap();
    assert!(
        state["loss"].as_f64().unwrap().is_finite(),
        "the saved checkpoint is from a finite step"
    );
    assert!(!saved_weights(&dir.join("variant")).is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

/// The metrics lines of run `name` under `dir`, without the throughput (which differs between
/// runs; everything else must not).
fn metrics(dir: &Path, name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join(name).join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_second");
            v
        })
        .collect()
}

/// A callback that stops the run after step `at` (to resume it later).
fn stop_at(at: u64) -> impl FnMut(&Event) -> Control {
    move |event| match event {
        Event::Step(r) if r.step == at => Control::Stop,
        _ => Control::Continue,
    }
}

/// The newest checkpoint of the run in `run_dir`.
fn newest(run_dir: &Path) -> Checkpoint {
    latest_checkpoint(run_dir)
        .unwrap()
        .expect("the run has a checkpoint")
}

/// `file` of the newest checkpoint of the run in `run_dir`.
fn saved(run_dir: &Path, file: &str) -> PathBuf {
    newest(run_dir).dir.join(file)
}

/// The whole weights the newest checkpoint of the run in `run_dir` holds, however its mesh
/// saved them.
fn saved_weights(run_dir: &Path) -> BTreeMap<String, HostTensor> {
    sharded::saved_weights(&newest(run_dir)).unwrap()
}

/// The whole optimizer moments the newest checkpoint of the run in `run_dir` holds.
fn saved_moments(run_dir: &Path) -> BTreeMap<String, HostTensor> {
    sharded::saved_moments(&newest(run_dir)).unwrap()
}

#[test]
fn an_interrupted_run_resumes_bit_exactly() {
    // Dropout on, so that the resumed run must also reproduce the random masks.
    let model = "model = gpt2 { vocab = 1024, positions = 128, hidden = 64, layers = 4, heads = 4, dropout = 0.1 }";
    let e = quickstart(&format!(
        "{model}, train {{ steps = 8, batch = 4, micro_batch = 2 }}"
    ));
    let (whole, split) = (scratch("whole"), scratch("split"));
    run(&e, &whole, None, Start::Fresh, |_| Control::Continue).unwrap();
    let stopped = run(&e, &split, None, Start::Fresh, stop_at(3)).unwrap();
    assert_eq!(stopped.steps, 3);
    run(&e, &split, None, Start::Resume, |_| Control::Continue).unwrap();
    assert_eq!(
        metrics(&whole, "variant"),
        metrics(&split, "variant"),
        "the same losses as the uninterrupted run"
    );
    let a = saved_weights(&whole.join("variant"));
    let b = saved_weights(&split.join("variant"));
    assert_eq!(a, b, "and the same weights, bit for bit");

    // A changed experiment is refused.
    let changed = quickstart(&format!(
        "{model}, train {{ steps = 8, batch = 4, micro_batch = 2, seed = 8 }}"
    ));
    let err = run(&changed, &split, None, Start::Resume, |_| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the experiment changed"), "{err}");
    std::fs::remove_dir_all(&whole).ok();
    std::fs::remove_dir_all(&split).ok();
}

/// The RLHF example's stages on a tiny model under names of their own: `tiny_sft`,
/// `tiny_reward` (starting from `tiny_sft`) and `tiny_ppo` (starting from `tiny_sft`, scored by
/// `tiny_reward`, against `tiny_sft`); `train` adds to `tiny_ppo`'s train block.
fn rlhf(stage: &str, train: &str) -> kiln_compiler::spec::Experiment {
    named(&rlhf_source(train), stage)
}

/// The source [`rlhf`] reads its stages from.
fn rlhf_source(train: &str) -> String {
    format!(
        "import std.models.gpt2\nimport \"rlhf_pipeline.kiln\"\n\
         model tiny = gpt2 {{ vocab = 1024, hidden = 64, layers = 2, heads = 4, positions = 256, dropout = 0.0 }}\n\
         experiment tiny_sft = rlhf_sft {{ model = tiny, train {{ seq_len = 96, optimizer = adamw {{ lr = 3e-3, weight_decay = 0.0 }} }} }}\n\
         experiment tiny_reward = rlhf_reward {{ init = tiny_sft, model = tiny {{ output_heads = [reward] }}, \
           train {{ seq_len = 96, optimizer = adamw {{ lr = 1e-3, weight_decay = 0.0 }} }} }}\n\
         experiment tiny_ppo = rlhf_ppo {{ init = tiny_sft, model = tiny {{ output_heads = [lm, value] }}, \
           objective = ppo {{ kl = 0.05, reward_model = tiny_reward, reference = tiny_sft, response_length = 24 }}, \
           data {{ eval = \"data/ppo_prompts.jsonl\" }}, \
           train {{ seq_len = 96, optimizer = adamw {{ lr = 3e-4, weight_decay = 0.0 }} {train} }} }}\n"
    )
}

/// Runs stage `name` of [`rlhf`] for `steps` steps under `dir`.
fn run_stage(dir: &Path, name: &str, steps: u64) -> kiln_runtime::train::RunSummary {
    run(&rlhf(name, ""), dir, Some(steps), Start::Restart, |_| {
        Control::Continue
    })
    .unwrap()
}

#[test]
fn sft_and_reward_models_train() {
    let dir = scratch("rlhf");
    let sft = run_stage(&dir, "tiny_sft", 15);
    assert!(
        sft.last_loss < sft.first_loss,
        "SFT: {} -> {}",
        sft.first_loss,
        sft.last_loss
    );
    let reward = run_stage(&dir, "tiny_reward", 12);
    assert!(
        reward.first_loss > 0.5 && reward.first_loss < 0.9,
        "an untrained reward model scores pairs near ln 2: {}",
        reward.first_loss
    );
    assert!(
        reward.last_loss < reward.first_loss,
        "reward: {} -> {}",
        reward.first_loss,
        reward.last_loss
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The PPO run's metrics lines.
fn ppo_metrics(dir: &Path) -> Vec<serde_json::Value> {
    metrics(dir, "tiny_ppo")
}

#[test]
fn ppo_raises_the_reward_and_keeps_its_reference_frozen() {
    let dir = scratch("ppo");
    run_stage(&dir, "tiny_sft", 60);
    run_stage(&dir, "tiny_reward", 40);
    // No step: the evaluation scores the SFT policy's responses.
    run_stage(&dir, "tiny_ppo", 0);
    let before = ppo_metrics(&dir)[0]["eval_reward"].as_f64().unwrap();
    run_stage(&dir, "tiny_ppo", 20);
    let lines = ppo_metrics(&dir);
    assert_eq!(lines.len(), 21, "20 steps and the evaluation");
    let steps = &lines[..20];
    for line in steps {
        for key in [
            "loss",
            "reward",
            "kl",
            "policy_loss",
            "value_loss",
            "clip_fraction",
            "response_length",
        ] {
            let x = line[key].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite(), "{key} is {x} in {line}");
        }
    }
    // The policy starts as its reference: the same log-probabilities, no KL. Then the policy
    // moves and the reference does not.
    assert_eq!(steps[0]["kl"].as_f64(), Some(0.0));
    assert!(steps[19]["kl"].as_f64().unwrap() > 0.5, "{}", steps[19]);
    let after = lines[20]["eval_reward"].as_f64().unwrap();
    assert!(
        after > before + 0.5,
        "the reward model's mean score of sampled responses: {before} -> {after}"
    );
    let weights = |stage: &str| saved_weights(&dir.join(stage));
    let (sft, ppo) = (weights("tiny_sft"), weights("tiny_ppo"));
    let name = "transformer.h.0.attn.c_attn.weight";
    assert_ne!(sft[name], ppo[name], "the policy trained");
    assert!(
        ppo.contains_key("v_head.summary.weight"),
        "with its value head"
    );
    assert!(
        ppo.keys().all(|k| !k.starts_with("ref.")),
        "the reference is not trained"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ppo_rollouts_repeat_for_a_seed_and_resume_bit_exactly() {
    let dir = scratch("ppo-seed");
    run_stage(&dir, "tiny_sft", 20);
    run_stage(&dir, "tiny_reward", 10);
    run_stage(&dir, "tiny_ppo", 3);
    let first = ppo_metrics(&dir);
    run_stage(&dir, "tiny_ppo", 3);
    assert_eq!(
        first,
        ppo_metrics(&dir),
        "same seed, same rollouts and updates"
    );
    // Stopped after a step and resumed: the same rollouts and weights.
    let ppo = rlhf("tiny_ppo", "");
    run(&ppo, &dir, Some(3), Start::Restart, stop_at(1)).unwrap();
    run(&ppo, &dir, Some(3), Start::Resume, |_| Control::Continue).unwrap();
    assert_eq!(first, ppo_metrics(&dir), "resumed");
    run(
        &rlhf("tiny_ppo", ", seed = 8"),
        &dir,
        Some(3),
        Start::Restart,
        |_| Control::Continue,
    )
    .unwrap();
    assert_ne!(
        first[0]["reward"],
        ppo_metrics(&dir)[0]["reward"],
        "another seed samples other responses"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ppo_names_the_stage_to_run_first() {
    let dir = scratch("ppo-missing");
    let ppo = rlhf("tiny_ppo", "");
    let err = run(&ppo, &dir, Some(1), Start::Fresh, |_| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`tiny_ppo` starts from `tiny_sft`") && err.contains("run that stage first"),
        "{err}"
    );
    run_stage(&dir, "tiny_sft", 1);
    let err = run(&ppo, &dir, Some(1), Start::Fresh, |_| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`tiny_ppo` uses the reward model of `tiny_reward`")
            && err.contains("kiln run FILE --experiment tiny_reward"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bert_pretraining_with_whole_word_masking_and_nsp_learns() {
    let src = "import std.models.bert\nimport \"bert_wwm_nsp.kiln\"\n\
         experiment variant = bert_wwm_nsp { model = bert_mini { vocab = 1024, hidden = 64, layers = 2, heads = 2, dropout = 0.0 }, \
         parallel { mesh = cpu(1), plan = auto }, train { batch = 8, seq_len = 64, schedule = constant { warmup = 0 }, optimizer = adamw { lr = 2e-3 } } }";
    let e = variant(src);
    let dir = scratch("bert");
    let out = run(&e, &dir, Some(30), Start::Fresh, |_| Control::Continue).unwrap();
    // MLM over ~1000 tokens starts near ln 1000 ≈ 6.9 plus NSP's ln 2 ≈ 0.69.
    assert!(
        (6.5..8.5).contains(&out.first_loss),
        "untrained MLM+NSP loss: {}",
        out.first_loss
    );
    assert!(
        out.last_loss < out.first_loss - 1.0,
        "loss {} -> {}",
        out.first_loss,
        out.last_loss
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn pet_cloze_fits_its_training_set_and_reports_accuracy() {
    // Evaluating on the training set: a model that has fitted it must classify it.
    let src = "import std.models.bert\nimport \"pet_sentiment.kiln\"\n\
         experiment variant = pet_sentiment { model = bert_tiny { vocab = 1024, dropout = 0.0 }, adapter = [], \
         parallel { mesh = cpu(1) }, data { tokenizer = \"data/wordpiece.json\", eval = \"data/reviews_train.jsonl\" }, \
         train { batch = 8, seq_len = 64, optimizer = adamw { lr = 1e-3 }, schedule = constant } }";
    let e = variant(src);
    let dir = scratch("pet");
    let out = run(&e, &dir, Some(60), Start::Fresh, |_| Control::Continue).unwrap();
    assert!(
        (0.6..0.8).contains(&out.first_loss),
        "two classes start near ln 2: {}",
        out.first_loss
    );
    let accuracy = out.eval_accuracy.expect("PET reports accuracy");
    assert!(accuracy >= 0.9, "training-set accuracy {accuracy}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Every way of spreading a step over a mesh computes what one device computes: the same
/// losses step by step and the same trained weights (and a checkpoint with every optimizer
/// moment), with dropout on (its masks follow the microbatch and the node, not the device).
/// GPT-2's tied embedding spans the first and last pipeline stages, and is split by vocabulary
/// under tensor parallelism.
#[test]
fn parallel_training_matches_one_device() {
    assert_parallel_matches_one_device(
        "quickstart",
        "quickstart",
        &format!("{STORIES}, model = gpt2 {{ vocab = 1024, positions = 128, hidden = 64, layers = 4, heads = 4, dropout = 0.1 }}, \
         train {{ batch = 8, micro_batch = 2, steps = 4 }}"),
        &[
            "mesh = cpu(2), data = 2",
            "mesh = cpu(4), data = 4",
            "mesh = cpu(2), data = 2, zero = 1",
            "mesh = cpu(4), data = 4, zero = 2",
            "mesh = cpu(2), data = 2, zero = 3",
            "mesh = cpu(2), pipeline = 2, schedule = gpipe",
            "mesh = cpu(2), pipeline = 2, schedule = 1f1b",
            "mesh = cpu(2), pipeline = 2, schedule = interleaved(2)",
            "mesh = cpu(4), data = 2, pipeline = 2, schedule = 1f1b, zero = 1",
            "mesh = cpu(1), recompute = full",
            "mesh = cpu(2), pipeline = 2, recompute = selective",
            "mesh = cpu(2), tensor = 2",
            "mesh = cpu(4), tensor = 2, data = 2, zero = 1",
            "mesh = cpu(4), tensor = 2, pipeline = 2, schedule = 1f1b, recompute = full",
            "mesh = cpu(4), tensor = 4, zero = 3",
            "mesh = cpu(2), tensor = 2, sequence_parallel = true",
            "mesh = cpu(4), tensor = 2, pipeline = 2, sequence_parallel = true, recompute = selective",
        ],
    );
}

/// An interleaved pipeline whose chunks hold uneven layer counts (5 blocks in 4 chunks: the
/// first has the embedding and two blocks) computes what one device computes.
#[test]
fn uneven_interleaved_chunks_match_one_device() {
    assert_parallel_matches_one_device(
        "quickstart",
        "quickstart",
        &format!("{STORIES}, model = gpt2 {{ vocab = 1024, positions = 128, hidden = 64, layers = 5, heads = 4, dropout = 0.1 }}, \
         train {{ batch = 8, micro_batch = 2, steps = 3 }}"),
        &["mesh = cpu(2), pipeline = 2, schedule = interleaved(2)"],
    );
}

/// Tensor parallelism across families and adapters: LoRA on GPT-2's fused c_attn (B split by
/// q|k|v sections), IA3 vectors split with the values they scale, LLaMA's grouped-query
/// attention with rotary positions and a gated MLP, BERT's MLM + NSP heads, prompt tuning.
#[test]
fn tensor_parallel_training_matches_one_device_across_families() {
    let small = "train { batch = 4, micro_batch = 2, steps = 3, seq_len = 128 }";
    let gpt2 = "model { vocab = 1024, hidden = 64, layers = 2, heads = 4 }, data { tokenizer = \"data/tokenizer.json\" }";
    let prefix_v2 = format!("{gpt2}, adapter = prefix {{ tokens = 4 }}");
    for (file, name, model, plans) in [
        (
            "quickstart_gpt2_lora",
            "quickstart_gpt2_lora",
            gpt2,
            &["mesh = cpu(2), tensor = 2", "mesh = cpu(4), tensor = 2, pipeline = 2"][..],
        ),
        ("ia3", "ia3_sft", gpt2, &["mesh = cpu(2), tensor = 2"][..]),
        (
            "llama_lora_tp",
            "llama_lora_tp",
            "model { vocab = 1024, hidden = 64, layers = 2, heads = 4, kv_heads = 2, ffn = 128 }, data { tokenizer = \"data/tokenizer.json\" }",
            &["mesh = cpu(2), tensor = 2", "mesh = cpu(4), data = 2, tensor = 2, sequence_parallel = true"][..],
        ),
        (
            "bert_wwm_nsp",
            "bert_wwm_nsp",
            "model { hidden = 64, layers = 2, heads = 4, ffn = 128 }",
            &["mesh = cpu(2), plan = auto", "mesh = cpu(2), tensor = 2, plan = manual"][..],
        ),
        ("prompt_tuning", "prompt_tuning", gpt2, &["mesh = cpu(2), tensor = 2"][..]),
        // Key/value prefixes (whole) join split keys: each rank takes its heads' part.
        ("prefix_tuning", "prefix_tuning", gpt2, &["mesh = cpu(2), tensor = 2"][..]),
        (
            "prefix_tuning",
            "prefix_tuning",
            prefix_v2.as_str(),
            &["mesh = cpu(2), tensor = 2, sequence_parallel = true"][..],
        ),
    ] {
        assert_parallel_matches_one_device(file, name, &format!("{model}, {small}"), plans);
    }
    // The examples' own parallel blocks: LLaMA on data 2 x tensor 2; PET (LoRA on BERT, a
    // masked copy of each row in the same microbatch) planned automatically on cpu(4).
    assert_parallel_matches_one_device(
        "llama_lora_tp",
        "llama_lora_tp",
        &format!("model {{ vocab = 1024, hidden = 64, layers = 2, heads = 4, kv_heads = 2, ffn = 128 }}, data {{ tokenizer = \"data/tokenizer.json\" }}, {small}"),
        &["mesh = cpu(4), data = 2, tensor = 2"],
    );
    assert_parallel_matches_one_device(
        "pet_sentiment",
        "pet_sentiment",
        "model { hidden = 64, layers = 2, heads = 4, ffn = 128 }, train { batch = 16, micro_batch = 2, steps = 2, seq_len = 64 }",
        &[
            "mesh = cpu(4), plan = auto, microbatches = 4, zero = 1, recompute = selective",
            // The mask's logits split by vocabulary, the MLM loss taken from them split.
            "mesh = cpu(2), tensor = 2",
        ],
    );
}

/// Prompt learning on BERT over a mesh: the token types and the MLM labels grow by the virtual
/// tokens (type 0, label −100) on every rank, and PET's [MASK] is picked after the prompt.
#[test]
fn prompt_learning_on_bert_trains_in_parallel_as_on_one_device() {
    let bert = "model { hidden = 64, layers = 2, heads = 4, ffn = 128 }";
    assert_parallel_matches_one_device(
        "bert_wwm_nsp",
        "bert_wwm_nsp",
        &format!("{bert}, adapter = prompt {{ tokens = 4 }}, train {{ batch = 4, micro_batch = 2, steps = 2, seq_len = 64 }}"),
        &["mesh = cpu(2), tensor = 2, sequence_parallel = true, plan = manual", "mesh = cpu(2), pipeline = 2, plan = manual"],
    );
    assert_parallel_matches_one_device(
        "pet_sentiment",
        "pet_sentiment",
        &format!("{bert}, adapter = ptuning {{ tokens = 4 }}, train {{ batch = 4, micro_batch = 2, steps = 2, seq_len = 64 }}"),
        &["mesh = cpu(2), tensor = 2", "mesh = cpu(2), data = 2"],
    );
}

/// Every number of every metrics line of two runs (step losses, gradient norms, evaluations)
/// within 1e-5 relative.
fn assert_same_metrics(want: &[serde_json::Value], got: &[serde_json::Value], what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: metrics lines");
    for (x, y) in want.iter().zip(got) {
        for (key, vx) in x.as_object().unwrap() {
            let (vx, vy) = (vx.as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (vx - vy).abs() <= 1e-5 * vx.abs(),
                "{what}: {key} {vy} vs {vx}"
            );
        }
    }
}

/// A tiny GPT-2 with dropout on stories of different lengths (most shorter than the sequence).
const TINY_STORIES: &str = "model = gpt2 { vocab = 1024, positions = 128, hidden = 32, layers = 2, heads = 4, dropout = 0.1 }";

/// A step's numbers do not depend on how it is cut into microbatches: dropout masks follow
/// each row's place in the step, and a step's loss (and the evaluation's) is the mean over all
/// of its tokens, not a mean of microbatch means, which weighs tokens by their microbatch.
#[test]
fn microbatching_does_not_change_a_runs_numbers() {
    let trained = |micro_batch: u64| {
        let e = quickstart(&format!(
            "{TINY_STORIES}, train {{ batch = 8, micro_batch = {micro_batch}, steps = 3, seq_len = 128 }}"
        ));
        let dir = scratch(&format!("micro-batch-{micro_batch}"));
        run(&e, &dir, None, Start::Fresh, |_| Control::Continue).unwrap();
        let lines = metrics(&dir, "variant");
        std::fs::remove_dir_all(&dir).ok();
        lines
    };
    let whole = trained(8);
    for micro_batch in [1, 2] {
        let what = format!("micro_batch = {micro_batch} against 8");
        assert_same_metrics(&whole, &trained(micro_batch), &what);
    }
}

/// A run may move to another mesh when it resumes (its checkpoint holds whole weights and
/// optimizer moments, and its fingerprint leaves the mesh out) and go on as if uninterrupted:
/// two steps on two data-parallel devices with sharded moments (ZeRO-1), two on one device.
#[test]
fn a_run_resumed_on_another_mesh_goes_on_as_if_uninterrupted() {
    let overrides =
        format!("{STORIES}, {TINY_STORIES}, train {{ batch = 8, steps = 4, seq_len = 128 }}");
    let on = |parallel: &str| {
        example_with("quickstart", "quickstart", &overrides, parallel)
            .unwrap_or_else(|err| panic!("{err}"))
    };
    let whole = scratch("mesh-whole");
    run(&on("mesh = cpu(1)"), &whole, None, Start::Fresh, |_| {
        Control::Continue
    })
    .unwrap();
    // Saved by one mesh, put back together and dealt out by another: ZeRO blocks, tensor
    // parallel parts (fused sections included) and pipeline stages, each way.
    for (first, then, files) in [
        // Replicas write their weights once; ZeRO's owners each write their moments.
        (
            "mesh = cpu(2), data = 2, zero = 1",
            "mesh = cpu(1)",
            &[
                "optimizer-00000-of-00002",
                "optimizer-00001-of-00002",
                "weights-00000-of-00002",
            ][..],
        ),
        (
            "mesh = cpu(4), data = 2, tensor = 2, zero = 3",
            "mesh = cpu(4), tensor = 2, pipeline = 2",
            &[],
        ),
        (
            "mesh = cpu(4), tensor = 2, pipeline = 2",
            "mesh = cpu(2), data = 2, zero = 2",
            &[],
        ),
    ] {
        let moved = scratch("mesh-moved");
        let stopped = run(&on(first), &moved, None, Start::Fresh, stop_at(2)).unwrap();
        assert_eq!(stopped.steps, 2);
        if !files.is_empty() {
            let mut saved: Vec<String> = std::fs::read_dir(newest(&moved.join("variant")).dir)
                .unwrap()
                .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
                .filter_map(|f| f.strip_suffix(".safetensors").map(str::to_string))
                .collect();
            saved.sort();
            assert_eq!(saved, files, "{first}");
        }
        let resumed = run(&on(then), &moved, None, Start::Resume, |_| {
            Control::Continue
        })
        .unwrap();
        assert_eq!((resumed.resumed_from, resumed.steps), (Some(2), 4));
        let what = format!("two steps on {first}, two on {then}");
        assert_same_metrics(
            &metrics(&whole, "variant"),
            &metrics(&moved, "variant"),
            &what,
        );
        assert_same_tensors(
            &saved_weights(&whole.join("variant")),
            &saved_weights(&moved.join("variant")),
            &what,
        );
        std::fs::remove_dir_all(&moved).ok();
    }
    std::fs::remove_dir_all(&whole).ok();
}

/// `name` from `examples/<file>.kiln` with `overrides` and `parallel` as its parallel block, or
/// the errors that make it invalid.
fn example_with(
    file: &str,
    name: &str,
    overrides: &str,
    parallel: &str,
) -> Result<kiln_compiler::spec::Experiment, String> {
    let src = std::fs::read_to_string(examples().join(format!("{file}.kiln"))).unwrap();
    let src = format!(
        "{src}\nexperiment variant = {name} {{ {overrides}, parallel = {{ {parallel} }} }}\n"
    );
    let checked = kiln_compiler::check_source("variant.kiln", &src, Some(&examples()));
    if !checked.is_ok() {
        return Err(checked.render_errors());
    }
    Ok(checked
        .module
        .experiments
        .into_iter()
        .find(|e| e.value.name == "variant")
        .unwrap()
        .value)
}

/// Two checkpoints' tensors (weights or moments) are the same within 1e-5 relative L2.
fn assert_same_tensors(
    want: &BTreeMap<String, HostTensor>,
    got: &BTreeMap<String, HostTensor>,
    what: &str,
) {
    let names = |m: &BTreeMap<String, HostTensor>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(want), names(got), "{what}: the tensors saved");
    for (key, ta) in want {
        let tb = &got[key];
        assert_eq!(ta.shape, tb.shape, "{what}: `{key}`");
        // The key projection's bias has an exactly-zero gradient (softmax ignores a shift
        // shared by every key), so its "gradient" is rounding noise, which Adam scales up to
        // full-size steps whose direction depends on summation order. It is left out.
        let param = key
            .trim_end_matches(".exp_avg_sq")
            .trim_end_matches(".exp_avg");
        let n = ta.data.len();
        let key_bias =
            param.ends_with("attn.c_attn.bias") || param.ends_with("attention.self.key.bias");
        let range = if param.ends_with("c_attn.bias") {
            n / 3..2 * n / 3
        } else {
            0..n
        };
        let compared = (0..n).filter(|&i| !key_bias || !range.contains(&i));
        let (num, den) = compared
            .map(|i| (ta.data[i], tb.data[i]))
            .fold((0.0f64, 0.0f64), |(n, d), (x, y)| {
                (n + f64::from(x - y).powi(2), d + f64::from(x).powi(2))
            });
        assert!(
            num.sqrt() <= 1e-5 * den.sqrt().max(1e-12),
            "{what}: `{key}` differs (relative L2 {})",
            num.sqrt() / den.sqrt()
        );
    }
}

/// Trains `name` from `examples/<file>.kiln` with `overrides` on one device, then with each of
/// `plans` as its parallel block, and compares metrics, weights and optimizer state.
fn assert_parallel_matches_one_device(file: &str, name: &str, overrides: &str, plans: &[&str]) {
    let example = |parallel: &str| {
        example_with(file, name, overrides, parallel).unwrap_or_else(|err| panic!("{err}"))
    };
    let one = example("mesh = cpu(1), plan = manual, data = 1, tensor = 1, pipeline = 1");
    let tag = format!("{file}-{}", plans.len());
    let (a, b) = (
        scratch(&format!("{tag}-one")),
        scratch(&format!("{tag}-many")),
    );
    let single = run(&one, &a, None, Start::Fresh, |_| Control::Continue).unwrap();
    for plan in plans {
        let many = example(plan);
        let parallel = run(&many, &b, None, Start::Restart, |_| Control::Continue)
            .unwrap_or_else(|err| panic!("{name}, {plan}: {err}"));
        assert_same_metrics(
            &metrics(&a, "variant"),
            &metrics(&b, "variant"),
            &format!("{name}, {plan}"),
        );
        assert!((single.last_loss - parallel.last_loss).abs() <= 1e-5 * single.last_loss.abs());
        let what = format!("{name}, {plan}");
        assert_same_tensors(
            &saved_weights(&a.join("variant")),
            &saved_weights(&b.join("variant")),
            &what,
        );
        // The checkpoint holds every moment, whichever device owned it.
        assert_same_tensors(
            &saved_moments(&a.join("variant")),
            &saved_moments(&b.join("variant")),
            &what,
        );
        std::fs::remove_dir_all(&b).ok();
    }
    std::fs::remove_dir_all(&a).ok();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

    /// Random manual plans (degrees, ZeRO stage, schedule, microbatch size, recompute, sequence
    /// parallelism) with random adapters train exactly as one device does. Plans the checker or
    /// the planner rejects (a degree that does not divide, too few microbatches) are skipped. SGD with
    /// momentum keeps the comparison about the gradients: Adam's g/√v turns last-bit
    /// differences in a gradient that nearly cancels (summed over sequence shards in another
    /// order) into visible steps, as with the key bias above.
    #[test]
    fn random_manual_plans_train_as_one_device_does(
        (data, tensor, pipeline) in proptest::sample::select(vec![
            (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (4, 1, 1), (1, 4, 1), (1, 1, 4),
        ]),
        zero in 0u8..4,
        schedule in proptest::sample::select(vec!["gpipe", "1f1b", "interleaved(2)"]),
        micro_batch in proptest::sample::select(vec![1u64, 2, 4]),
        recompute in proptest::sample::select(vec!["none", "selective", "full"]),
        sequence_parallel in proptest::bool::ANY,
        adapter in proptest::sample::select(vec![
            "", "adapter = lora { rank = 4, targets = [c_attn, c_fc] },",
            "adapter = ia3 { targets = [c_attn, \"mlp.c_proj\"], feedforward = [\"mlp.c_proj\"] },",
            "adapter = prompt { tokens = 4 },",
        ]),
    ) {
        let overrides = format!(
            "{STORIES}, model = gpt2 {{ vocab = 1024, positions = 128, hidden = 32, layers = 4, heads = 4, dropout = 0.1 }}, {adapter} \
             train {{ batch = 8, micro_batch = {micro_batch}, steps = 3, seq_len = 32, \
             optimizer = sgd {{ lr = 0.1, momentum = 0.9 }} }}"
        );
        let plan = format!(
            "mesh = cpu({}), data = {data}, tensor = {tensor}, pipeline = {pipeline}, zero = {zero}, \
             schedule = {schedule}, recompute = {recompute}, sequence_parallel = {sequence_parallel}",
            data * tensor * pipeline
        );
        let plannable = example_with("quickstart", "quickstart", &overrides, &plan)
            .is_ok_and(|e| kiln_compiler::plan::compile_plan(&e).is_ok());
        proptest::prop_assume!(plannable);
        assert_parallel_matches_one_device("quickstart", "quickstart", &overrides, &[plan.as_str()]);
    }
}

/// Every device reports its measured peak beside the plan's prediction for its stage: at least
/// the parameters and optimizer state it holds, more for a larger batch, the same on devices
/// that do the same work, and written to `memory.json`.
#[test]
fn each_device_reports_its_measured_peak_memory() {
    let measure = |batch: u64, plan: &str| {
        let e = quickstart(&format!(
            "parallel = {{ {plan} }}, train {{ batch = {batch}, steps = 2 }}"
        ));
        let dir = scratch(&format!("memory-{batch}-{}", plan.len()));
        let summary = run(&e, &dir, None, Start::Fresh, |_| Control::Continue).unwrap();
        let written: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("variant/memory.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(written.as_array().unwrap().len(), summary.memory.len());
        std::fs::remove_dir_all(&dir).ok();
        summary.memory
    };
    // 544,256 parameters: weights and two Adam moments, 6.5 MB.
    let held = 544_256 * 4 * 3;
    let small = measure(4, "mesh = cpu(1)");
    let large = measure(16, "mesh = cpu(1)");
    assert_eq!((small.len(), large.len()), (1, 1));
    assert!(small[0].measured_bytes > held, "{small:?}");
    assert!(
        large[0].measured_bytes > small[0].measured_bytes,
        "{small:?} {large:?}"
    );
    assert!(small[0].predicted_bytes > 0.0);
    let pair = measure(8, "mesh = cpu(2), data = 2");
    assert_eq!(pair.len(), 2);
    let (a, b) = (pair[0].measured_bytes as f64, pair[1].measured_bytes as f64);
    assert!(
        (a - b).abs() <= 0.1 * a,
        "replicas do the same work: {pair:?}"
    );
    let stages = measure(8, "mesh = cpu(2), pipeline = 2, schedule = 1f1b");
    assert_eq!(
        stages.iter().map(|d| d.stage).collect::<Vec<_>>(),
        vec![0, 1]
    );
}

/// The plan's memory per device agrees with the measured peak within 15% for full training of
/// GPT-2 shapes other than the ones the CPU profile was measured on (bench/
/// gpt2_6l_384_scaling.kiln): one device, and data (ZeRO-2), tensor and pipeline parallel.
#[test]
fn measured_memory_agrees_with_the_plan() {
    let model =
        "model = gpt2 { vocab = 1024, positions = 128, hidden = 256, layers = 4, heads = 4 }";
    for plan in [
        "mesh = cpu(1)",
        "mesh = cpu(2), data = 2, zero = 2",
        "mesh = cpu(2), tensor = 2",
        "mesh = cpu(2), pipeline = 2, schedule = gpipe",
    ] {
        let e = quickstart(&format!(
            "{model}, parallel = {{ {plan} }}, train {{ batch = 8, micro_batch = 2, seq_len = 128, steps = 2 }}"
        ));
        let dir = scratch("memory-vs-plan");
        let summary = run(&e, &dir, None, Start::Fresh, |_| Control::Continue).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert!(!summary.memory.is_empty());
        for d in &summary.memory {
            let ratio = d.measured_bytes as f64 / d.predicted_bytes;
            assert!(
                (0.85..=1.15).contains(&ratio),
                "{plan}: device {} measured {} bytes, the plan predicts {} ({ratio:.2})",
                d.device,
                d.measured_bytes,
                d.predicted_bytes
            );
        }
    }
}

/// P-tuning v1 with PEFT's LSTM prompt encoder trains (the base stays frozen), on one device
/// and data-parallel with the same losses.
#[test]
fn ptuning_with_an_lstm_encoder_trains() {
    let overrides = "model { vocab = 1024, hidden = 64, layers = 2, heads = 4 }, \
         data { tokenizer = \"data/tokenizer.json\" }, \
         train { batch = 8, micro_batch = 4, steps = 12, seq_len = 64, optimizer = adamw { lr = 1e-2 } }";
    let e = example_with("ptuning_lstm", "ptuning_lstm", overrides, "mesh = cpu(1)").unwrap();
    let dir = scratch("ptuning-lstm");
    let summary = run(&e, &dir, None, Start::Fresh, |_| Control::Continue).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        summary.last_loss < summary.first_loss,
        "{} -> {}",
        summary.first_loss,
        summary.last_loss
    );
    // SGD for the comparison: many gate gradients nearly cancel, and Adam's g/√v would turn
    // their last-bit differences (another summation order) into visible steps.
    assert_parallel_matches_one_device(
        "ptuning_lstm",
        "ptuning_lstm",
        &overrides
            .replace("steps = 12", "steps = 3")
            .replace("adamw { lr = 1e-2 }", "sgd { lr = 0.1, momentum = 0.9 }"),
        &["mesh = cpu(2), data = 2", "mesh = cpu(2), tensor = 2"],
    );
}

/// Plans the model cannot be laid out on are refused when compiled, naming the setting to change.
#[test]
fn unexecutable_plans_are_clear_errors() {
    let prompt = "adapter = prompt { tokens = 3 }, train { seq_len = 32, steps = 1 }";
    for (parallel, expected) in [
        (
            "mesh = cpu(2), tensor = 2, sequence_parallel = true",
            "sequence_parallel = false",
        ),
        ("mesh = cpu(2), tensor = 2", ""),
    ] {
        let e = quickstart(&format!("{prompt}, parallel = {{ {parallel} }}"));
        let dir = scratch("unexecutable");
        let result = run(&e, &dir, None, Start::Fresh, |_| Control::Continue);
        std::fs::remove_dir_all(&dir).ok();
        match (result, expected) {
            (Err(err), expected) if !expected.is_empty() => {
                let err = err.to_string();
                assert!(
                    err.contains(expected) && err.contains("35 positions"),
                    "{err}"
                );
            }
            (Ok(_), "") => {}
            (other, _) => panic!("{parallel}: {:?}", other.map(|s| s.steps)),
        }
    }
}

#[test]
fn a_diverging_data_parallel_run_stops_with_one_message() {
    let e = quickstart(
        "parallel { mesh = cpu(2), data = 2 }, \
         train { steps = 40, micro_batch = 4, checkpoint_every = 1, grad_clip = false, optimizer = sgd { lr = 1e4 } }",
    );
    let dir = scratch("nan-dp");
    let err = run(&e, &dir, None, Start::Fresh, |_| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(err.contains("step "), "{err}");
    assert!(
        !err.contains("neighbouring device"),
        "the cause, not its echo: {err}"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(saved(&dir.join("variant"), "state.json")).unwrap(),
    )
    .unwrap();
    assert!(state["loss"].as_f64().unwrap().is_finite());
    std::fs::remove_dir_all(&dir).ok();
}

/// `adapter = peft("dir")` continues from the adapter's trained weights: with a vanishing
/// learning rate, the run's checkpoint holds the tensors PEFT saved (a virtual-token adapter's
/// saved prompt as its table). A prompt PEFT saved from an encoder (its output) is refused.
#[test]
fn peft_adapter_weights_are_loaded_to_continue_training() {
    let fixtures = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ));
    let dir = scratch("peft-continue");
    std::fs::create_dir_all(&dir).unwrap();
    let (data, tokenizer) = common::tiny_corpus(&dir);
    let experiment = |case: &str| {
        variant(&format!(
            "experiment variant {{ model = hf(\"{}\"), adapter = peft(\"{}\"), \
             data {{ train = \"{}\", tokenizer = \"{}\" }}, \
             train {{ batch = 2, seq_len = 16, optimizer = sgd {{ lr = 1e-30 }}, schedule = constant }} }}",
            fixtures.join("gpt2_tiny").display(),
            fixtures.join("gpt2_tiny").join(case).display(),
            data.display(),
            tokenizer.display()
        ))
    };
    let runs = dir.join("runs");
    for case in ["clm_lora", "clm_prefix", "clm_prompt"] {
        let e = experiment(case);
        assert_eq!(e.adapter_weights.len(), 1);
        run(&e, &runs, Some(1), Start::Restart, |_| Control::Continue).unwrap();
        let saved = saved_weights(&runs.join("variant"));
        let peft = read_safetensors(
            &fixtures
                .join("gpt2_tiny")
                .join(case)
                .join("adapter_model.safetensors"),
        )
        .unwrap();
        assert!(!peft.is_empty());
        for (name, t) in &peft {
            let ours = match name.as_str() {
                "prompt_embeddings" => &saved["prompt_encoder.embedding.weight"],
                _ => &saved[name],
            };
            let diff = ours
                .data
                .iter()
                .zip(&t.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let scale = t.data.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
            assert!(
                scale > 0.0 && diff <= 1e-6 * scale,
                "{case}: `{name}` continues from PEFT's value"
            );
        }
    }
    let err = run(
        &experiment("clm_ptuning_mlp"),
        &runs,
        Some(1),
        Start::Restart,
        |_| Control::Continue,
    )
    .unwrap_err();
    assert!(
        err.0.contains("adapter_model.safetensors")
            && err.0.contains("cannot be recovered")
            && err
                .0
                .contains("`adapter = prompt { tokens = 5, checkpoint = \"DIR\" }`"),
        "{}",
        err.0
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Under tensor parallelism a language model's loss (and PPO's log-probabilities) read the
/// logits split by vocabulary where they lie (no `[b, s, vocab]` gather onto every rank), and
/// PET's logits at the mask stay split until its verbalizer's columns are picked (a `[b, vocab]`
/// gather).
#[test]
fn losses_read_vocabulary_split_logits_without_gathering_them() {
    use kiln_compiler::plan::sharding::{Conversion, Form};
    let pet = example_with(
        "pet_sentiment",
        "pet_sentiment",
        "model { hidden = 64, layers = 2, heads = 4, ffn = 128 }, train { batch = 16, micro_batch = 2, steps = 2, seq_len = 64 }",
        "mesh = cpu(2), tensor = 2",
    )
    .unwrap();
    let gpt2 = quickstart("parallel = { mesh = cpu(2), tensor = 2 }");
    let ppo = || {
        let src = format!(
            "{}experiment split = tiny_ppo {{ parallel = {{ mesh = cpu(2), tensor = 2 }} }}\n",
            rlhf_source("")
        );
        named(&src, "split")
    };
    for (e, loss, gathered) in [
        (gpt2, "loss", None),
        (
            pet,
            "mlm.loss",
            Some(("pvp.mask_logits", "pvp.class_logits")),
        ),
        (ppo(), "ppo.log_probs", None),
        (ppo(), "ppo.ref_log_probs", None),
    ] {
        let program = kiln_compiler::compile(&e).unwrap();
        let (g, layout) = (&program.graph, &program.plan.stages[0].layout);
        let conversion = |from: &str, to: &str| {
            let (from, to) = (g.find(from).unwrap(), g.find(to).unwrap());
            layout.conversion(g, from, to, layout.compute(to))
        };
        let loss = g.find(loss).unwrap();
        let logits = g.inputs(loss)[0];
        assert_eq!(layout.forms[loss.index()], Form::Replicated);
        let vocab = *g.dag[logits].out.shape.last().unwrap() as usize;
        assert_eq!(layout.forms[logits.index()], Form::Split(vec![vocab]));
        assert_eq!(
            conversion(&g.dag[logits].name, &g.dag[loss].name),
            Conversion::None
        );
        if let Some((at_mask, classes)) = gathered {
            assert!(matches!(
                conversion(at_mask, classes),
                Conversion::AllGather(_)
            ));
            let at_mask = g.find(at_mask).unwrap();
            assert_eq!(g.dag[at_mask].out.shape.len(), 2, "[b, vocab]");
        }
    }
}

/// Auto plans whose pipeline stages run on grids of their own (Alpa's submeshes: one device
/// then two data-parallel replicas on cpu(3); two replicas, then two replicas of a
/// tensor-parallel pair with sequence parallelism and ZeRO-2 on cpu(6)) train as one device
/// does: activations are resharded at the stage boundary and the tied embedding's gradient is
/// summed across stages that shard it differently.
#[test]
fn auto_plans_with_a_grid_per_stage_train_as_one_device_does() {
    let overrides = format!(
        "model = gpt2 {{ vocab = 8192, positions = 64, hidden = 64, layers = 4, heads = 4, dropout = 0.1 }}, {STORIES}, train = {{ batch = 8, steps = 3, seq_len = 32, grad_clip = 1.0, eval_every = 100 }}"
    );
    let plans = ["mesh = cpu(3), plan = auto", "mesh = cpu(6), plan = auto"];
    for plan in plans {
        let e = example_with("quickstart", "quickstart", &overrides, plan).unwrap();
        let program = kiln_compiler::compile(&e).unwrap();
        let grids: Vec<_> = program.plan.stages.iter().map(|s| s.submesh).collect();
        assert!(
            grids.windows(2).any(|w| w[0] != w[1]),
            "{plan}: the planner chose one grid for every stage ({grids:?}); the test needs a plan with a grid per stage"
        );
    }
    assert_parallel_matches_one_device("quickstart", "quickstart", &overrides, &plans);
}

/// A scratch directory `name` with short `tiny_sft` and `tiny_reward` runs in it: what a PPO
/// stage starts from and is scored by.
fn trained_sft_and_reward(name: &str) -> PathBuf {
    let dir = scratch(name);
    run_stage(&dir, "tiny_sft", 10);
    run_stage(&dir, "tiny_reward", 5);
    dir
}

/// `temperature` divides the logits PPO samples from: near 0 the policy's most likely token is
/// drawn (two small temperatures sample the same responses), at 1 and 2 the draws differ. The
/// rollouts' rewards tell.
#[test]
fn ppo_temperature_sharpens_sampling() {
    let dir = trained_sft_and_reward("ppo_temperature");
    let reward = |temperature: f64| {
        let name = "tempered";
        let src = format!(
            "{}experiment {name} = tiny_ppo {{ objective = ppo {{ kl = 0.05, reward_model = tiny_reward, reference = tiny_sft, response_length = 24, temperature = {temperature} }} }}\n",
            rlhf_source("")
        );
        run(&named(&src, name), &dir, Some(1), Start::Restart, |_| {
            Control::Continue
        })
        .unwrap();
        metrics(&dir, name)[0]["reward"].as_f64().unwrap()
    };
    assert_eq!(reward(0.001), reward(0.002), "near-greedy sampling");
    assert_ne!(reward(1.0), reward(2.0));
    std::fs::remove_dir_all(&dir).ok();
}

/// With `kl_target`, each rollout's KL moves the KL coefficient as TRL's adaptive controller
/// does (reported as `kl_coef`), and a resumed run carries the coefficient on.
#[test]
fn ppo_adapts_its_kl_coefficient_and_resumes_it() {
    let dir = trained_sft_and_reward("ppo_adaptive_kl");
    let name = "adaptive";
    let src = format!(
        "{}experiment {name} = tiny_ppo {{ objective = ppo {{ kl = 0.05, kl_target = 0.01, kl_horizon = 16, reward_model = tiny_reward, reference = tiny_sft, response_length = 24 }} }}\n",
        rlhf_source("")
    );
    let e = named(&src, name);
    run(&e, &dir, Some(4), Start::Fresh, |_| Control::Continue).unwrap();
    let straight = metrics(&dir, name);
    let batch = e.train.batch as usize;
    let figure = |i: usize, key: &str| straight[i][key].as_f64().unwrap();
    assert_eq!(figure(0, "kl_coef"), 0.05);
    for i in 1..4 {
        let want = kiln_runtime::train::ppo::adapt_kl_coef(
            figure(i - 1, "kl_coef"),
            figure(i - 1, "kl"),
            0.01,
            16,
            batch,
        );
        assert_eq!(figure(i, "kl_coef"), want, "step {}", i + 1);
    }
    assert_ne!(figure(3, "kl_coef"), 0.05);
    run(&e, &dir, Some(4), Start::Restart, stop_at(2)).unwrap();
    run(&e, &dir, Some(4), Start::Resume, |_| Control::Continue).unwrap();
    assert_eq!(straight, metrics(&dir, name), "resumed");
    std::fs::remove_dir_all(&dir).ok();
}

/// PPO spread over a mesh trains as on one device (the same microbatches): the same rollout
/// (rewards) and loss over the first step's PPO updates. One step only: Adam turns last-bit
/// differences in near-zero gradients into differences of the order of the learning rate, so
/// that the next rollout, sampled from policies that differ that much, may differ in a token,
/// and then the runs part ways (the second rollout on two pipeline stages does).
#[test]
fn ppo_on_a_mesh_matches_one_device() {
    let dir = trained_sft_and_reward("ppo_mesh");
    let mut runs = Vec::new();
    for (i, parallel) in [
        "mesh = cpu(1)",
        "mesh = cpu(2), data = 2",
        "mesh = cpu(2), pipeline = 2",
        // The policy's and the reference's log-probabilities from vocabulary-split logits.
        "mesh = cpu(2), tensor = 2",
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("ppo_mesh_{i}");
        let src = format!(
            "{}experiment {name} = tiny_ppo {{ parallel = {{ {parallel} }}, train {{ micro_batch = 4 }} }}\n",
            rlhf_source("")
        );
        run(&named(&src, &name), &dir, Some(1), Start::Fresh, |_| {
            Control::Continue
        })
        .unwrap();
        runs.push((parallel, metrics(&dir, &name)));
    }
    let (_, one) = &runs[0];
    for (parallel, lines) in &runs[1..] {
        // The step's line (an evaluation's follows).
        let (a, b) = (&one[0], &lines[0]);
        let close = |key: &str, tol: f64| {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= tol * x.abs().max(1e-3),
                "{parallel}: {key} {x} vs {y}"
            );
        };
        close("reward", 1e-12);
        close("loss", 1e-4);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A stage that starts from another trains on that stage's model: the frozen weights of a model
/// defined in Kiln (no file names them) are kept in the checkpoint, not drawn again from the
/// next stage's seed.
#[test]
fn a_stage_starts_from_the_frozen_weights_of_the_stage_before() {
    let src = std::fs::read_to_string(examples().join("quickstart.kiln")).unwrap();
    let src = format!(
        "{src}\nexperiment first = quickstart {{ {STORIES}, model {{ hidden = 32, layers = 1, heads = 2 }}, \
         adapter = lora {{ rank = 2, targets = [c_attn] }}, train {{ steps = 1, seq_len = 32, seed = 1 }} }}\n\
         experiment second = first {{ init = first, train {{ seed = 2, optimizer = sgd {{ lr = 1e-30 }} }} }}\n"
    );
    let dir = scratch("frozen-stage");
    for stage in ["first", "second"] {
        run(&named(&src, stage), &dir, None, Start::Fresh, |_| {
            Control::Continue
        })
        .unwrap();
    }
    // The frozen weights: all but the adapter's.
    let frozen = |stage: &str| {
        let mut weights = saved_weights(&dir.join(stage));
        weights.retain(|name, _| !name.contains("lora_"));
        weights
    };
    let (first, second) = (frozen("first"), frozen("second"));
    assert!(first.contains_key("transformer.h.0.attn.c_attn.weight"));
    assert_eq!(
        first, second,
        "the second stage's base is the first's, not seed 2's"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// bf16 and fp16 runs stay within their rounding of the f32 run, round for real (they differ
/// from it), and on a mesh match one device in the same format. The bound: bf16 keeps 8
/// significant bits, so each rounded operand or result of a product is off by at most 2^-9
/// relative (fp16: 2^-12); the loss, a mean over every token, and the global norm, a sum over
/// every weight, average those errors rather than add them, so one rounding's worth bounds
/// them with room (measured on the quickstart model: 2e-5 for the loss, 1.3e-3 for the norm in bf16).
#[test]
fn mixed_precision_stays_within_its_rounding_and_a_mesh_matches_one_device() {
    let run_in = |precision: &str, parallel: &str, tag: &str| {
        let overrides = format!(
            "{STORIES}, {TINY_STORIES}, train {{ batch = 8, steps = 3, seq_len = 64, precision = {precision} }}"
        );
        let e = example_with("quickstart", "quickstart", &overrides, parallel)
            .unwrap_or_else(|err| panic!("{err}"));
        let dir = scratch(&format!("precision-{tag}"));
        run(&e, &dir, None, Start::Fresh, |_| Control::Continue).unwrap();
        let lines = metrics(&dir, "variant");
        std::fs::remove_dir_all(&dir).ok();
        lines
    };
    let field = |lines: &[serde_json::Value], key: &str| -> Vec<f64> {
        lines.iter().filter_map(|l| l[key].as_f64()).collect()
    };
    let f32_run = run_in("f32", "mesh = cpu(1)", "f32");
    for (precision, bits) in [("bf16", 9), ("f16", 12)] {
        let one = run_in(precision, "mesh = cpu(1)", precision);
        let bound = 2f64.powi(-bits);
        for key in ["loss", "grad_norm"] {
            let (want, got) = (field(&f32_run, key), field(&one, key));
            assert_eq!(want.len(), got.len());
            assert_ne!(want, got, "{precision}: rounded, not f32");
            for (w, g) in want.iter().zip(&got) {
                let tolerance = if key == "loss" { bound } else { 8.0 * bound };
                assert!(
                    (w - g).abs() <= tolerance * w.abs(),
                    "{precision} {key}: f32 {w}, {g}"
                );
            }
        }
        if precision == "f16" {
            assert_eq!(field(&one, "loss_scale"), [65536.0; 3], "no overflow here");
        }
        for parallel in ["mesh = cpu(2), data = 2", "mesh = cpu(2), tensor = 2"] {
            let many = run_in(precision, parallel, &format!("{precision}-mesh"));
            for (w, g) in field(&one, "loss").iter().zip(field(&many, "loss")) {
                assert!(
                    (w - g).abs() <= 1e-5 * w.abs(),
                    "{precision}, {parallel}: {w} vs {g}"
                );
            }
        }
    }
}
