//! Every shipped example runs: each experiment of each file in `examples/` (found by listing
//! the directory, so a new example is covered without touching this test) trains for two steps
//! on this machine's CPU with its own data and tokenizer, a pipeline's stages in order so that
//! later stages find the runs of earlier ones. An example whose mesh is not made of CPU devices
//! (a GPU cluster) is a plan to study with `kiln plan`: `run` must refuse it, saying so, rather
//! than try. An example planned over several CPU devices trains as it would on one.

use kiln_compiler::spec::Experiment;
use kiln_runtime::comm::world::World;
use kiln_runtime::train::{run, Control, Devices, Event, Start};
use std::path::{Path, PathBuf};

/// Steps each experiment trains for: enough to take an optimizer step after the first.
const STEPS: u64 = 2;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Every `.kiln` file in `examples/`, in name order.
fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("examples/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kiln"))
        .collect();
    files.sort();
    files
}

/// Whether `kiln run` can train `e` here: its mesh is made of this machine's CPU devices
/// (`cpu(N)`, the prelude's `cpu` device), not of the accelerators of a cluster.
fn runs_on_this_machine(e: &Experiment) -> bool {
    e.parallel.mesh.node.device.name == "cpu"
}

/// The experiments of a file in the order they must run: each pipeline's stages in order,
/// then the experiments that are no pipeline's stage, in definition order.
fn in_running_order(module: &kiln_compiler::spec::CheckedModule) -> Vec<&Experiment> {
    let mut out: Vec<&Experiment> = Vec::new();
    let stages = module.pipelines.iter().flat_map(|p| p.value.stages.iter());
    for e in stages.chain(module.experiments.iter().map(|e| &e.value)) {
        if !out.iter().any(|seen| seen.name == e.name) {
            out.push(e);
        }
    }
    out
}

/// What became of one experiment.
enum Outcome {
    Ran(String),
    Refused(String),
}

/// Runs (or sees refused) every experiment of `file`, in order, in a runs directory of its
/// own; the first failure is returned as a message naming the file and experiment.
fn run_file(file: &Path) -> Result<Vec<Outcome>, String> {
    let checked = kiln_compiler::check_file(file);
    if !checked.is_ok() {
        return Err(format!("{}:\n{}", file.display(), checked.render_errors()));
    }
    let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
    let runs =
        std::env::temp_dir().join(format!("kiln-examples-run-{}-{stem}", std::process::id()));
    std::fs::remove_dir_all(&runs).ok();
    let experiments = in_running_order(&checked.module);
    if experiments.is_empty() {
        return Err(format!("{} defines no experiment", file.display()));
    }
    let mut out = Vec::new();
    for e in experiments {
        let what = format!("{} (`{}`)", file.display(), e.name);
        let started = std::time::Instant::now();
        let program = kiln::compiler::compile(e).map_err(|d| {
            let messages: Vec<&str> = d.items.iter().map(|i| i.message.as_str()).collect();
            format!("{what} does not compile: {}", messages.join("; "))
        })?;
        let result = run(
            &program,
            &World::Alone,
            Devices::Planned,
            &runs,
            Some(STEPS),
            Start::Fresh,
            |_| Control::Continue,
        );
        if runs_on_this_machine(e) {
            let summary = result.map_err(|err| format!("{what} does not run: {err}"))?;
            if summary.steps != STEPS || !summary.last_loss.is_finite() {
                return Err(format!(
                    "{what}: {} steps, loss {}",
                    summary.steps, summary.last_loss
                ));
            }
            eprintln!(
                "{what}: {STEPS} steps in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            out.push(Outcome::Ran(e.name.clone()));
        } else {
            let err = match result {
                Ok(_) => {
                    return Err(format!(
                    "{what} is planned for {} `{}` devices, yet `run` trained it on this machine",
                    e.parallel.mesh.devices(),
                    e.parallel.mesh.node.device.name
                ))
                }
                Err(err) => err.to_string(),
            };
            if !(err.contains("kiln plan") && err.contains("this machine")) {
                return Err(format!(
                    "{what}: the refusal should say to plan it rather than run it here: {err}"
                ));
            }
            if runs.join(&e.name).exists() {
                return Err(format!("{what}: a refused run left a run directory behind"));
            }
            out.push(Outcome::Refused(e.name.clone()));
        }
    }
    std::fs::remove_dir_all(&runs).ok();
    Ok(out)
}

/// Each file is run on its own thread, two at a time (an example's steps use about one core,
/// and the machine has two): files with a pipeline, the longest, first.
#[test]
fn every_example_runs_or_is_refused_as_plan_only() {
    let mut files = example_files();
    assert!(files.len() >= 10, "the examples are found: {files:?}");
    let stages = |f: &PathBuf| {
        let text = std::fs::read_to_string(f).unwrap();
        text.lines().filter(|l| l.starts_with("pipeline ")).count()
    };
    files.sort_by_key(|f| std::cmp::Reverse(stages(f)));
    let queue = std::sync::Mutex::new(files.into_iter());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let Some(file) = queue.lock().unwrap().next() else {
                    break;
                };
                let outcome = run_file(&file);
                results.lock().unwrap().push(outcome);
            });
        }
    });
    let (mut ran, mut refused, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    for result in results.into_inner().unwrap() {
        match result {
            Ok(outcomes) => {
                for o in outcomes {
                    match o {
                        Outcome::Ran(name) => ran.push(name),
                        Outcome::Refused(name) => refused.push(name),
                    }
                }
            }
            Err(message) => failures.push(message),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(!ran.is_empty(), "some example runs");
    eprintln!("ran {ran:?}; refused as plan-only {refused:?}");
}

/// Steps over which an example on its own mesh and on one device are compared: the first
/// loss, then two after optimizer steps.
const COMPARED_STEPS: u64 = 3;

/// The losses of `e`'s first `COMPARED_STEPS` steps, trained in `runs` (emptied first).
fn step_losses(e: &Experiment, runs: &Path) -> Vec<f32> {
    // Without the evaluation after the last step, which takes time and changes no step's loss.
    let e = &Experiment {
        data: kiln_compiler::spec::Data {
            eval: None,
            ..e.data.clone()
        },
        ..e.clone()
    };
    std::fs::remove_dir_all(runs).ok();
    let mut losses = Vec::new();
    let record = |event: &Event| {
        if let Event::Step(report) = event {
            losses.push(report.loss);
        }
        Control::Continue
    };
    let program = kiln::compiler::compile(e)
        .unwrap_or_else(|d| panic!("`{}` does not compile: {:?}", e.name, d.items));
    run(
        &program,
        &World::Alone,
        Devices::Planned,
        runs,
        Some(COMPARED_STEPS),
        Start::Fresh,
        record,
    )
    .unwrap_or_else(|err| panic!("`{}` does not run: {err}", e.name));
    std::fs::remove_dir_all(runs).ok();
    losses
}

/// Size knobs the mesh comparison sets on an example whose steps take long on two cores, which
/// leave its plan as it is (`kiln plan --set` with them shows the same strategy): BERT's
/// 30,522-word MLM head over 128 positions.
const SMALLER: &[(&str, &str)] = &[("bert_wwm_nsp", "train.seq_len=64")];

/// Experiment `name` of `file` with `--set` overrides.
fn overridden(file: &Path, name: &str, sets: &[String]) -> Experiment {
    let checked = kiln_compiler::overrides::check_with_overrides(file, name, None, sets).unwrap();
    assert!(checked.is_ok(), "{}", checked.render_errors());
    checked.module.experiments[0].value.clone()
}

/// Every example planned over several CPU devices computes what one device computes: its
/// losses equal those of the same experiment with `parallel = { mesh = cpu(1) }` (which the
/// planner also microbatches its own way) within 1e-5 relative, with the examples' dropout on:
/// every random draw is keyed by the row's place in the step, and a step's loss is the mean
/// over its labelled positions, whichever microbatch, replica or rank computes them.
#[test]
fn examples_on_several_devices_train_as_on_one() {
    let mut compared = Vec::new();
    for file in example_files() {
        let checked = kiln_compiler::check_file(&file);
        assert!(checked.is_ok(), "{}", checked.render_errors());
        for e in in_running_order(&checked.module) {
            if !runs_on_this_machine(e) || e.parallel.mesh.devices() < 2 {
                continue;
            }
            let mut sets: Vec<String> = SMALLER
                .iter()
                .filter(|(name, _)| *name == e.name)
                .map(|(_, set)| set.to_string())
                .collect();
            let many = overridden(&file, &e.name, &sets);
            sets.push("parallel = { mesh = cpu(1) }".into());
            let one = overridden(&file, &e.name, &sets);
            assert_eq!(one.parallel.mesh.devices(), 1);
            let runs = std::env::temp_dir().join(format!(
                "kiln-examples-mesh-{}-{}",
                std::process::id(),
                e.name
            ));
            let started = std::time::Instant::now();
            let (on_mesh, on_one) = (step_losses(&many, &runs), step_losses(&one, &runs));
            eprintln!(
                "{} on {} devices: {on_mesh:?}; on one: {on_one:?} ({:.1} s)",
                e.name,
                e.parallel.mesh.devices(),
                started.elapsed().as_secs_f64()
            );
            assert_eq!(on_mesh.len() as u64, COMPARED_STEPS);
            assert_eq!(on_one.len(), on_mesh.len());
            for (step, (m, o)) in on_mesh.iter().zip(&on_one).enumerate() {
                assert!(
                    (m - o).abs() <= 1e-5 * o.abs(),
                    "{} (`{}`), step {}: loss {m} on its mesh, {o} on one device",
                    file.display(),
                    e.name,
                    step + 1
                );
            }
            compared.push(e.name.clone());
        }
    }
    // The PET example (LoRA dropout 0.1, BERT's hidden and attention dropout) is the one whose
    // losses depended on the microbatch layout.
    assert!(
        compared.iter().any(|n| n == "pet_sentiment"),
        "compared {compared:?}"
    );
}

/// The plan-only example says so where a reader looks first, its header comment.
#[test]
fn plan_only_examples_say_so_in_their_header() {
    for file in example_files() {
        let checked = kiln_compiler::check_file(&file);
        let plan_only = checked
            .module
            .all_experiments()
            .iter()
            .any(|e| !runs_on_this_machine(e));
        if !plan_only {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let header: String = text
            .lines()
            .take_while(|l| l.starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n")
            .to_lowercase();
        assert!(
            header.contains("plan-only") || header.contains("plan only"),
            "{}: the header comment says the example is plan-only:\n{header}",
            file.display()
        );
    }
}
