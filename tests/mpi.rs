//! One process per device, started by `mpirun`: GPT-2 over data, tensor and pipeline
//! parallelism and ZeRO-3, LLaMA with LoRA, BERT with MLM + NSP, on 2 and 4 processes, give the
//! losses and final weights of the same mesh run as threads of one process (which the runtime's
//! own tests hold to one device). A rank killed mid-run ends the job with a message instead of
//! a hang, and the run resumes from its last checkpoint with the losses of a run never
//! interrupted, on the same or on another number of processes.
//!
//! Built with `--features mpi`; needs `mpirun` (Open MPI) on the PATH, which `.ci/run` installs.

#![cfg(feature = "mpi")]

use kiln_runtime::store::run_dir::latest_checkpoint;
use kiln_runtime::store::sharded::{saved_moments, saved_weights};
use kiln_runtime::tensor::HostTensor;
use std::collections::BTreeMap;
mod common;

use common::{kiln_run, run_args, scratch, succeeded, KILN};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn data(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/data")
        .join(file)
        .display()
        .to_string()
}

/// An experiment `e` with `model`, `objective` and `parallel` as given, on the quick-start's
/// data (or the stories' for LLaMA), written into `dir`.
fn experiment(dir: &Path, import: &str, model: &str, rest: &str, parallel: &str) -> PathBuf {
    let file = dir.join("e.kiln");
    let (train, eval, tokenizer) = if import.contains("llama") {
        (
            "tiny_stories_train.jsonl",
            "tiny_stories_eval.jsonl",
            "tokenizer.json",
        )
    } else if import.contains("bert") {
        (
            "wiki_docs_train.jsonl",
            "wiki_docs_eval.jsonl",
            "wordpiece.json",
        )
    } else {
        (
            "austen_train.jsonl",
            "austen_eval.jsonl",
            "austen_tokenizer.json",
        )
    };
    std::fs::write(
        &file,
        format!(
            "import {import}\n\
             experiment e {{\n\
               model = {model}\n\
               data {{ train = \"{}\", eval = \"{}\", tokenizer = \"{}\" }}\n\
               {rest}\n\
               parallel {{ {parallel} }}\n\
               train {{ optimizer = adamw {{ lr = 2e-3, weight_decay = 0.01 }}, batch = 8, seq_len = 32, steps = 4, seed = 7, eval_every = 2, checkpoint_every = 2 }}\n\
             }}\n",
            data(train),
            data(eval),
            data(tokenizer)
        ),
    )
    .unwrap();
    file
}

/// `kiln run` under `mpirun -np N` (as root in CI: Open MPI asks for that to be explicit).
fn mpirun(np: usize, file: &Path, runs: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &np.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // More processes than cores: yield instead of spinning while waiting on a peer.
        .env("OMPI_MCA_mpi_yield_when_idle", "1")
        .arg(KILN);
    run_args(&mut cmd, file, runs, extra);
    cmd
}

/// Runs `cmd` to its end, which must come within `limit`.
fn within(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .spawn()
        .expect("mpirun is installed (.ci/run installs Open MPI)");
    wait_within(child, limit)
}

fn wait_within(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().ok();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Every metrics line's figures (throughput left out: it is timing), by step and kind.
fn metrics(run: &Path) -> Vec<BTreeMap<String, f64>> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            v.as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| *k != "tokens_per_second")
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
                .collect()
        })
        .collect()
}

/// The newest checkpoint's trainable weights and optimizer moments, whole.
fn saved(run: &Path) -> BTreeMap<String, HostTensor> {
    let newest = latest_checkpoint(run).unwrap().expect("a checkpoint");
    let mut all = saved_weights(&newest).unwrap();
    all.extend(saved_moments(&newest).unwrap());
    all
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1e-3)
}

/// The same figures within 1e-5 relative, and the same weights and moments: within `tolerance`
/// of each tensor's largest value.
fn same_run(got: &Path, want: &Path, what: &str, tolerance: f32) {
    let (m, n) = (metrics(got), metrics(want));
    assert_eq!(m.len(), n.len(), "{what}: metrics lines\n{m:?}\n{n:?}");
    for (a, b) in m.iter().zip(&n) {
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{what}"
        );
        for (k, x) in a {
            assert!(close(*x, b[k]), "{what}: {k} {x} vs {} ({a:?})", b[k]);
        }
    }
    let (w, v) = (saved(got), saved(want));
    assert_eq!(
        w.keys().collect::<Vec<_>>(),
        v.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, t) in &w {
        let u = &v[name];
        assert_eq!(t.shape, u.shape, "{what}: {name}");
        let scale = u.data.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        for (x, y) in t.data.iter().zip(&u.data) {
            assert!(
                (x - y).abs() <= tolerance * scale,
                "{what}: {name}: {x} vs {y} (largest {scale})"
            );
        }
    }
}

/// Trains `file` under `mpirun -np N` and as N threads of one process; both must agree.
fn processes_train_as_threads(name: &str, np: usize, file: &Path) {
    let dir = file.parent().unwrap();
    let (procs, threads) = (dir.join("procs"), dir.join("threads"));
    let limit = Duration::from_secs(300);
    succeeded(&within(mpirun(np, file, &procs, &[]), limit));
    succeeded(&within(kiln_run(file, &threads, &[]), limit));
    same_run(&procs.join("e"), &threads.join("e"), name, 1e-5);
}

const GPT2: &str =
    "gpt2 { vocab = 1024, positions = 64, hidden = 32, layers = 2, heads = 2, dropout = 0.1 }";

#[test]
fn gpt2_over_2_and_4_processes_trains_as_over_threads() {
    for (np, parallel) in [
        (2, "mesh = cpu(2), data = 2"),
        (2, "mesh = cpu(2), tensor = 2"),
        (
            2,
            "mesh = cpu(2), pipeline = 2, microbatches = 2, schedule = 1f1b",
        ),
        (2, "mesh = cpu(2), data = 2, zero = 3"),
        (4, "mesh = cpu(4), data = 2, tensor = 2, zero = 1"),
        (
            4,
            "mesh = cpu(4), pipeline = 2, data = 2, microbatches = 2, zero = 3",
        ),
    ] {
        let dir = scratch(&format!("mpi-gpt2-{np}-{}", parallel.len()));
        let file = experiment(&dir, "std.models.gpt2", GPT2, "", parallel);
        processes_train_as_threads(parallel, np, &file);
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn llama_lora_and_bert_mlm_nsp_over_processes_train_as_over_threads() {
    let llama = "llama_7b { vocab = 1024, hidden = 64, layers = 2, heads = 4, kv_heads = 2, ffn = 128, positions = 64 }";
    let lora = "adapter = lora { rank = 4, alpha = 8, dropout = 0.05, targets = [q_proj, v_proj] }";
    let dir = scratch("mpi-llama");
    let file = experiment(
        &dir,
        "std.models.llama",
        llama,
        lora,
        "mesh = cpu(4), data = 2, tensor = 2",
    );
    processes_train_as_threads("llama lora", 4, &file);
    std::fs::remove_dir_all(&dir).ok();

    let bert =
        "bert_base { vocab = 1024, hidden = 32, layers = 2, heads = 2, ffn = 64, positions = 64 }";
    let objective = "objective = mlm { prob = 15%, strategy = whole_word } + nsp";
    let dir = scratch("mpi-bert");
    let file = experiment(
        &dir,
        "std.models.bert",
        bert,
        objective,
        "mesh = cpu(2), pipeline = 2, microbatches = 2",
    );
    processes_train_as_threads("bert mlm+nsp", 2, &file);
    std::fs::remove_dir_all(&dir).ok();
}

/// The pids of the kiln processes training into `runs`.
fn ranks_of(runs: &Path) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("^{KILN} run .* --runs {}", runs.display())])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_on_as_many_or_fewer_processes() {
    let dir = scratch("mpi-kill");
    let steps = "--steps=40";
    let file = experiment(&dir, "std.models.gpt2", GPT2, "", "mesh = cpu(4), data = 4");
    // The run never interrupted, as threads (equal to processes: the tests above).
    let whole = dir.join("whole");
    succeeded(&within(
        kiln_run(&file, &whole, &[steps]),
        Duration::from_secs(300),
    ));

    // Kill one rank once a checkpoint past the first is in place.
    let runs = dir.join("killed");
    let child = mpirun(4, &file, &runs, &[steps]).spawn().unwrap();
    let start = Instant::now();
    while latest_checkpoint(&runs.join("e"))
        .ok()
        .flatten()
        .is_none_or(|c| c.step < 4)
    {
        assert!(start.elapsed() < Duration::from_secs(240), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ranks = ranks_of(&runs);
    assert_eq!(ranks.len(), 4, "{ranks:?}");
    let killed = Instant::now();
    Command::new("kill")
        .args(["-9", &ranks[2].to_string()])
        .status()
        .unwrap();
    let out = wait_within(child, Duration::from_secs(30));
    assert!(killed.elapsed() < Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(0));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("signal 9") || said.contains("Killed"),
        "{said}"
    );
    assert!(ranks_of(&runs).is_empty(), "every rank stopped");

    // The checkpoint left is complete; resumed on 2 processes (the mesh and its plan change,
    // the numbers do not beyond float rounding), the run ends as the one never interrupted.
    let file = experiment(&dir, "std.models.gpt2", GPT2, "", "mesh = cpu(2), data = 2");
    let two = &[steps, "--resume"];
    succeeded(&within(
        mpirun(2, &file, &runs, two),
        Duration::from_secs(300),
    ));
    // Summed over 2 replicas instead of 4, gradients differ in their last bits, which Adam's
    // normalisation lifts for parameters whose gradients are near zero: the weights agree to
    // 1e-3 of each tensor's scale, the losses to 1e-5.
    same_run(
        &runs.join("e"),
        &whole.join("e"),
        "killed, resumed on 2 ranks",
        1e-3,
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_plan_for_another_number_of_processes_is_refused_naming_both() {
    let dir = scratch("mpi-count");
    let file = experiment(&dir, "std.models.gpt2", GPT2, "", "mesh = cpu(4), data = 4");
    let out = within(
        mpirun(2, &file, &dir.join("runs"), &[]),
        Duration::from_secs(60),
    );
    assert_ne!(out.status.code(), Some(0));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("planned for 4 devices") && said.contains("2 processes"),
        "{said}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
