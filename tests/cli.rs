//! The `kiln` binary: exit codes, output streams, and `--emit spec`.

use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("NO_COLOR")
        .output()
        .expect("the kiln binary runs")
}

#[test]
fn clean_file_exits_zero() {
    let out = kiln(&["check", "examples/quickstart_gpt2_lora.kiln"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn user_errors_exit_one_with_every_error_and_no_colour_in_a_pipe() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.kiln");
    std::fs::write(&bad, "model m {\n  family = gpt2\n  vocab = 10, positions = 8\n  hidden = 10, layers = 1, heads = 3\n  dropout = 2\n}\n").unwrap();
    let out = kiln(&[
        "check",
        bad.to_str().unwrap(),
        "examples/quickstart_gpt2_lora.kiln",
    ]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error[K0012]") && stderr.contains("error[K0007]"),
        "both errors: {stderr}"
    );
    assert!(
        stderr.contains("bad.kiln:4:"),
        "location is file:line:col: {stderr}"
    );
    assert!(
        stderr.contains("examples/quickstart_gpt2_lora.kiln: ok"),
        "the other file is still checked: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "stderr is not a terminal, so no ANSI colour"
    );
}

#[test]
fn usage_errors_exit_two() {
    assert_eq!(kiln(&["check"]).status.code(), Some(2));
    assert_eq!(kiln(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        kiln(&["check", "--format", "yaml", "x.kiln"]).status.code(),
        Some(2)
    );
    assert_eq!(kiln(&["explain", "K9999"]).status.code(), Some(2));
}

#[test]
fn missing_file_is_a_user_error() {
    let out = kiln(&["check", "does/not/exist.kiln"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read `does/not/exist.kiln`"));
}

#[test]
fn explain_prints_the_code() {
    let out = kiln(&["explain", "k0012"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("K0012: A shape does not divide"));
}

#[test]
fn emit_spec_json_has_every_default_and_its_origin() {
    let out = kiln(&[
        "check",
        "examples/quickstart_gpt2_lora.kiln",
        "--emit",
        "spec",
        "--format",
        "json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let (_, exp) = json
        .as_object()
        .unwrap()
        .iter()
        .next()
        .expect("one experiment");
    let spec = &exp["spec"];
    let origins = &exp["origins"];
    // Inherited from the stdlib, overridden in the file, and defaulted.
    assert_eq!(spec["model"]["vocab"], 50257);
    assert!(origins["model.vocab"]
        .as_str()
        .unwrap()
        .starts_with("<std>/models/gpt2.kiln:"));
    assert!(origins["train.seed"]
        .as_str()
        .unwrap()
        .starts_with("examples/quickstart_gpt2_lora.kiln:"));
    assert_eq!(origins["train.optimizer.beta2"], "default");
    assert_eq!(spec["train"]["optimizer"]["beta2"], 0.999);
    // Every leaf has an origin.
    fn count_leaves(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Object(m) => m.values().map(count_leaves).sum(),
            serde_json::Value::Array(a) if a.iter().any(|x| x.is_object()) => {
                a.iter().map(count_leaves).sum()
            }
            serde_json::Value::Null => 0,
            _ => 1,
        }
    }
    assert_eq!(count_leaves(spec), origins.as_object().unwrap().len());
}

#[test]
fn emit_spec_toml_is_deterministic_and_parses() {
    let a = kiln(&["check", "examples/rlhf_pipeline.kiln", "--emit", "spec"]);
    let b = kiln(&["check", "examples/rlhf_pipeline.kiln", "--emit", "spec"]);
    assert_eq!(
        a.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&a.stderr)
    );
    assert_eq!(a.stdout, b.stdout, "byte-identical output");
    let text = String::from_utf8(a.stdout).unwrap();
    let parsed: toml::Value = toml::from_str(&text).expect("valid TOML");
    assert!(parsed.get("rlhf").is_some(), "the pipeline is emitted");
    assert!(text.contains("# default"));
}

#[test]
fn graph_formats() {
    let table = kiln(&["graph", "examples/quickstart_gpt2_lora.kiln"]);
    assert_eq!(
        table.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    assert!(String::from_utf8_lossy(&table.stdout).contains("16384 trainable"));

    let dot = kiln(&[
        "graph",
        "examples/quickstart_gpt2_lora.kiln",
        "--format",
        "dot",
    ]);
    let dot = String::from_utf8(dot.stdout).unwrap();
    assert!(
        dot.starts_with("digraph kiln {")
            && dot.contains("subgraph cluster_1")
            && dot.contains("fillcolor"),
        "layers as clusters, trainable nodes filled"
    );

    let json = kiln(&[
        "graph",
        "examples/quickstart_gpt2_lora.kiln",
        "--format",
        "json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("valid JSON");
    assert_eq!(json["params_trainable"], 16384);
    let nodes = json["nodes"].as_array().unwrap();
    // Topological order: every input comes before its consumer.
    for (i, node) in nodes.iter().enumerate() {
        for input in node["inputs"].as_array().unwrap() {
            assert!(input.as_u64().unwrap() < i as u64);
        }
    }

    let missing = kiln(&[
        "graph",
        "examples/rlhf_pipeline.kiln",
        "--experiment",
        "nope",
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("rlhf_sft"),
        "lists the experiments it has"
    );
}

#[test]
fn plan_formats_and_overrides() {
    let text = kiln(&["plan", "examples/gpt3_175b_plan.kiln"]);
    assert_eq!(
        text.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("runners-up:") && text.contains("step time"),
        "{text}"
    );

    let json = kiln(&["plan", "examples/gpt3_175b_plan.kiln", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("valid JSON");
    assert_eq!(json["mesh"]["devices"], 1024);

    let toml_out = kiln(&[
        "plan",
        "examples/quickstart_gpt2_lora.kiln",
        "--format",
        "toml",
    ]);
    assert_eq!(
        toml_out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&toml_out.stderr)
    );
    let parsed: toml::Value =
        toml::from_str(&String::from_utf8(toml_out.stdout).unwrap()).expect("valid TOML");
    assert_eq!(parsed["strategy"]["pipeline"].as_integer(), Some(1));

    // The same experiment on other hardware, with a larger batch.
    let h100 = kiln(&[
        "plan",
        "examples/gpt3_175b_plan.kiln",
        "--format",
        "json",
        "--cluster",
        "dgx_h100 * 64",
        "--set",
        "train.batch=2048",
    ]);
    assert_eq!(
        h100.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&h100.stderr)
    );
    let h100: serde_json::Value = serde_json::from_slice(&h100.stdout).unwrap();
    assert_eq!(
        (
            h100["mesh"]["devices"].as_u64(),
            h100["mesh"]["device"].as_str()
        ),
        (Some(512), Some("h100"))
    );
    assert_eq!(h100["strategy"]["global_batch"], 2048);
    assert_eq!(h100["experiment"], "gpt3_175b_plan");

    // A misspelt override is an ordinary diagnostic pointing at the override.
    let bad = kiln(&[
        "plan",
        "examples/gpt3_175b_plan.kiln",
        "--set",
        "train.bacth=1",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("<command line>") && stderr.contains("did you mean `batch`?"),
        "{stderr}"
    );
    let malformed = kiln(&[
        "plan",
        "examples/gpt3_175b_plan.kiln",
        "--set",
        "train.batch",
    ]);
    assert_eq!(malformed.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&malformed.stderr).contains("K0023"));
}

/// `kiln run` on a file with a pipeline trains its stages in order (a later stage starts from
/// an earlier one's run); `--experiment` picks one stage.
#[test]
fn run_trains_a_pipelines_stages_in_order() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("two.kiln");
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    std::fs::write(
        &file,
        format!(
            "import \"{}/quickstart.kiln\"\n\
             experiment first = quickstart {{ train {{ steps = 2 }} }}\n\
             experiment second = quickstart {{ init = first, train {{ steps = 2 }} }}\n\
             pipeline both {{ stages = [first, second] }}\n",
            examples.display()
        ),
    )
    .unwrap();
    let runs = dir.join("runs");
    let out = kiln(&[
        "run",
        file.to_str().unwrap(),
        "--runs",
        runs.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let second_alone = kiln(&[
        "run",
        file.to_str().unwrap(),
        "--experiment",
        "second",
        "--runs",
        dir.join("alone").to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (
        stdout.find("trained `first`").expect("first stage ran"),
        stdout.find("trained `second`").expect("second stage ran"),
    );
    assert!(a < b, "in order: {stdout}");
    // Alone, the second stage has no run of `first` to start from: a clear error.
    assert_eq!(second_alone.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second_alone.stderr).contains("first"),
        "{}",
        String::from_utf8_lossy(&second_alone.stderr)
    );
}

/// A plan for GPUs is refused on a machine whose driver offers none, saying what it found and
/// what to do instead; with `--emulate` it trains on CPU threads and says so.
#[test]
fn a_gpu_plan_runs_only_where_asked_to_emulate() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-emulate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gpus.kiln");
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    std::fs::write(
        &file,
        format!(
            "import std.clusters\nimport \"{}/quickstart.kiln\"\n\
             experiment on_gpus = quickstart {{ parallel {{ mesh = dgx_h100 * 1, plan = manual, data = 2, tensor = 4 }}, train {{ steps = 2 }} }}\n",
            examples.display()
        ),
    )
    .unwrap();
    let runs = dir.join("runs");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            file.to_str().unwrap(),
            "--runs",
            runs.to_str().unwrap(),
        ];
        args.extend(extra);
        kiln(&args)
    };
    let refused = run(&[]);
    let emulated = run(&["--emulate"]);
    std::fs::remove_dir_all(&dir).ok();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("planned for 8 h100 GPUs")
            && stderr.contains("this machine has")
            && stderr.contains("NVIDIA")
            && stderr.contains("--emulate"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&emulated.stdout);
    assert_eq!(
        emulated.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&emulated.stderr)
    );
    assert!(
        stdout.starts_with("emulating: `on_gpus` is planned for 8 h100 GPUs")
            && stdout.contains("trained `on_gpus` for 2 steps"),
        "{stdout}"
    );
}

/// `mesh = gpu(n)` plans for this machine's own GPUs; where the driver offers none, `kiln run`
/// says so and what to do instead, before it reads anything.
#[test]
fn a_local_gpu_mesh_needs_a_gpu() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-gpu-mesh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gpu.kiln");
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    std::fs::write(
        &file,
        format!(
            "import \"{}/quickstart.kiln\"\n\
             experiment on_gpu = quickstart {{ parallel {{ mesh = gpu(1) }}, train {{ steps = 2 }} }}\n",
            examples.display()
        ),
    )
    .unwrap();
    let runs = dir.join("runs");
    let out = kiln(&[
        "run",
        file.to_str().unwrap(),
        "--runs",
        runs.to_str().unwrap(),
    ]);
    let planned = kiln(&["plan", file.to_str().unwrap()]);
    let left_behind = runs.join("on_gpu").exists();
    std::fs::remove_dir_all(&dir).ok();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("training on ") {
        // This machine has a GPU: the run went ahead.
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("planned for a GPU of the machine it runs on")
            && stderr.contains("NVIDIA")
            && stderr.contains("--emulate"),
        "{stderr}"
    );
    assert!(!left_behind, "a refused run left a run directory behind");
    assert_eq!(
        planned.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&planned.stderr)
    );
}

/// `kiln gpu-check` compares the GPU kernels with the CPU path on a GPU; where there is none
/// (CI) it says what it found and fails, without a panic.
#[test]
fn gpu_check_needs_a_gpu_and_says_so() {
    let out = kiln(&["gpu-check"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if out.status.success() {
        assert!(
            stdout.contains("every kernel matches the CPU path"),
            "{stdout}"
        );
    } else {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.starts_with("error: GPU 0: "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
