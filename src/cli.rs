//! The `kiln` command line. Exit codes: 0 success, 1 user errors in the input, 2 usage errors.

use clap::{Parser, Subcommand, ValueEnum};
use kiln_compiler::diagnostics::{render_to_stderr, Code, Diagnostic};
use kiln_compiler::spec::{emit, Format};
use kiln_runtime::comm::launch::Launch;
use kiln_runtime::comm::world::World;
use kiln_runtime::train::Devices;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

mod interrupt;
mod progress;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Compile and run language-model training experiments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check experiment files and report every error with its location.
    Check {
        /// The .kiln files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print the resolved spec (every default filled in, every value's origin).
        #[arg(long, value_enum)]
        emit: Option<Emit>,
        /// Output format for --emit.
        #[arg(long, value_enum, default_value_t = OutputFormat::Toml)]
        format: OutputFormat,
    },
    /// Lower an experiment to its operator graph and print it.
    Graph {
        file: PathBuf,
        /// Which experiment of the file (default: the first; a pipeline's stages count).
        #[arg(long)]
        experiment: Option<String>,
        /// table: per-layer parameters, FLOPs and activations; dot: Graphviz; json: the IR.
        #[arg(long, value_enum, default_value_t = GraphFormat::Table)]
        format: GraphFormat,
    },
    /// Plan an experiment on its mesh (or another cluster): stages, sharding, memory, time.
    ///
    /// With `plan = auto`, pipeline stages may run on submeshes of their own (a different data
    /// and tensor degree per stage) when that is faster; `kiln run` executes the same plan.
    Plan {
        file: PathBuf,
        /// Which experiment of the file (default: the first; a pipeline's stages count).
        #[arg(long)]
        experiment: Option<String>,
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
        /// Plan for other hardware: a cluster expression such as `dgx_a100 * 16`.
        #[arg(long, value_name = "EXPR")]
        cluster: Option<String>,
        /// Override a field: `--set train.batch=512` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Train an experiment on this machine's CPU (a plan for GPUs with --emulate), with metrics
    /// and checkpoints under --runs.
    ///
    /// Checkpoints are saved every `train.checkpoint_minutes` (default 10), every
    /// `train.checkpoint_every` steps if set, at the end, and on Ctrl-C or SIGTERM (a second
    /// signal exits at once).
    Run {
        file: PathBuf,
        /// Which experiment (default: every stage of the file's first pipeline, in order; a
        /// file without a pipeline, its first experiment).
        #[arg(long)]
        experiment: Option<String>,
        /// Train for this many steps instead of the experiment's.
        #[arg(long)]
        steps: Option<u64>,
        /// Where run directories go.
        #[arg(long, default_value = "runs")]
        runs: PathBuf,
        /// Continue the run from its newest checkpoint (bit-exactly, as if never interrupted);
        /// from the start when it has none.
        #[arg(long, conflicts_with = "restart")]
        resume: bool,
        /// Discard the run already in the run directory (checkpoints, metrics) and start over.
        #[arg(long)]
        restart: bool,
        /// Override a field: `--set train.steps=50` (repeatable), as `kiln plan` does.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Print each device's measured peak memory next to the plan's prediction.
        #[arg(long)]
        report: bool,
        /// Run a plan for GPUs on this machine's CPU threads, one per planned device: the
        /// numbers the plan computes, not its devices' speed.
        #[arg(long)]
        emulate: bool,
    },
    /// Measure training throughput: time `--steps` steps after `--warmup` steps (nothing kept).
    Bench {
        file: PathBuf,
        #[arg(long)]
        experiment: Option<String>,
        #[arg(long, default_value_t = 5)]
        steps: u64,
        #[arg(long, default_value_t = 1)]
        warmup: u64,
        /// Time a plan for GPUs on this machine's CPU threads (as `kiln run --emulate`).
        #[arg(long)]
        emulate: bool,
    },
    /// Export a run: its adapter in PEFT's format (--peft), or the base model with LoRA merged
    /// in as a Hugging Face checkpoint (--merged).
    Export {
        file: PathBuf,
        #[arg(long)]
        experiment: Option<String>,
        /// Write PEFT's files (adapter_config.json + adapter_model.safetensors) into DIR.
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "merged",
            conflicts_with = "merged"
        )]
        peft: Option<PathBuf>,
        /// Write config.json + model.safetensors with LoRA merged into the weights into DIR.
        #[arg(long, value_name = "DIR")]
        merged: Option<PathBuf>,
        #[arg(long, default_value = "runs")]
        runs: PathBuf,
    },
    /// Tokenizers: `kiln tokenizer train --vocab 2000 --out tokenizer.json data.jsonl`.
    Tokenizer {
        #[command(subcommand)]
        action: TokenizerAction,
    },
    /// Explain a diagnostic code, such as K0012.
    Explain { code: String },
    /// Check Kiln's GPU kernels on one of this machine's GPUs: each compiled by NVRTC for it,
    /// run, and compared with the CPU path on the same inputs.
    GpuCheck {
        /// Which GPU (the driver's numbering, after CUDA_VISIBLE_DEVICES).
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    Spec,
}

#[derive(Subcommand)]
enum TokenizerAction {
    /// Train a tokenizer on text or JSONL files: byte-level BPE (GPT-2 style) for causal
    /// models, or uncased WordPiece with [CLS]/[SEP]/[MASK] for BERT-style models.
    Train {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long, default_value_t = 2000)]
        vocab: usize,
        #[arg(long, default_value = "tokenizer.json")]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = TokenizerKind::Bpe)]
        kind: TokenizerKind,
        /// Words kept as single tokens (comma-separated), such as PET verbalizer words.
        #[arg(long, value_delimiter = ',')]
        words: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TokenizerKind {
    Bpe,
    Wordpiece,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlanFormat {
    Text,
    Json,
    Toml,
    /// A picture of one step: each stage's timeline and memory, the runners-up.
    Svg,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Table,
    Dot,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Toml,
    Json,
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2).
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Check {
            files,
            emit: emit_what,
            format,
        } => check(&files, emit_what, format),
        Command::Graph {
            file,
            experiment,
            format,
        } => graph(&file, experiment.as_deref(), format),
        Command::Plan {
            file,
            experiment,
            format,
            cluster,
            overrides,
        } => plan(
            &file,
            experiment.as_deref(),
            format,
            cluster.as_deref(),
            &overrides,
        ),
        Command::Run {
            file,
            experiment,
            steps,
            runs,
            resume,
            restart,
            overrides,
            report,
            emulate,
        } => {
            let start = match (resume, restart) {
                (true, _) => kiln_runtime::train::Start::Resume,
                (_, true) => kiln_runtime::train::Start::Restart,
                _ => kiln_runtime::train::Start::Fresh,
            };
            let options = RunOptions {
                steps,
                runs: &runs,
                start,
                report,
                devices: devices(emulate),
            };
            run(&file, experiment.as_deref(), &overrides, &options)
        }
        Command::Bench {
            file,
            experiment,
            steps,
            warmup,
            emulate,
        } => bench(
            &file,
            experiment.as_deref(),
            steps,
            warmup,
            devices(emulate),
        ),
        Command::Tokenizer {
            action:
                TokenizerAction::Train {
                    files,
                    vocab,
                    out,
                    kind,
                    words,
                },
        } => train_tokenizer(&files, vocab, &out, kind, &words),
        Command::Export {
            file,
            experiment,
            peft,
            merged,
            runs,
        } => export(&file, experiment.as_deref(), peft, merged, &runs),
        Command::Explain { code } => explain(&code),
        Command::GpuCheck { device } => gpu_check(device),
    }
}

fn check(files: &[PathBuf], emit_what: Option<Emit>, format: OutputFormat) -> ExitCode {
    let mut failed = false;
    let mut out = std::io::stdout().lock();
    for file in files {
        let checked = kiln_compiler::check_file(file);
        if report_errors(file, &checked) {
            failed = true;
            continue;
        }
        match emit_what {
            Some(Emit::Spec) => {
                let format = match format {
                    OutputFormat::Toml => Format::Toml,
                    OutputFormat::Json => Format::Json,
                };
                let text = emit(&checked.module, &checked.program.sources.borrow(), format);
                if out.write_all(text.as_bytes()).is_err() {
                    return ExitCode::from(1);
                }
            }
            None => eprintln!("{}: ok", file.display()),
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Compiles a checked experiment for a back end (`kiln run`, `export`, `bench`, the plan's
/// reports); what stops it is rendered against the source, with exit code 1.
fn compile(
    checked: &kiln_compiler::CheckedFile,
    experiment: &kiln_compiler::spec::Experiment,
) -> Result<kiln_compiler::Program, ExitCode> {
    kiln_compiler::compile(experiment).map_err(|diagnostics| {
        let refs: Vec<&Diagnostic> = diagnostics.items.iter().collect();
        render_to_stderr(&checked.program.sources.borrow(), &refs);
        ExitCode::from(1)
    })
}

/// Reports a file's errors; `true` when there were any.
fn report_errors(file: &std::path::Path, checked: &kiln_compiler::CheckedFile) -> bool {
    if checked.is_ok() {
        return false;
    }
    let errors = checked.errors();
    let refs: Vec<&Diagnostic> = errors.iter().collect();
    render_to_stderr(&checked.program.sources.borrow(), &refs);
    let n = errors.len();
    eprintln!(
        "error: {} has {n} error{}",
        file.display(),
        if n == 1 { "" } else { "s" }
    );
    true
}

fn graph(file: &std::path::Path, wanted: Option<&str>, format: GraphFormat) -> ExitCode {
    with_experiment(file, wanted, |checked, experiment| {
        let graph = match kiln_compiler::graph::compile_graph(experiment) {
            Ok(g) => g,
            Err(diagnostics) => {
                let refs: Vec<&Diagnostic> = diagnostics.items.iter().collect();
                render_to_stderr(&checked.program.sources.borrow(), &refs);
                return ExitCode::from(1);
            }
        };
        let text = match format {
            GraphFormat::Table => kiln_compiler::graph::render_table(&graph),
            GraphFormat::Dot => kiln_compiler::graph::render_dot(&graph),
            GraphFormat::Json => kiln_compiler::graph::render_json(&graph),
        };
        print!("{text}");
        ExitCode::SUCCESS
    })
}

/// Checks `file` and runs `then` on the experiment `wanted` (or the first); exit 1 when the
/// file has errors or no such experiment (the errors are printed).
fn with_experiment(
    file: &std::path::Path,
    wanted: Option<&str>,
    then: impl FnOnce(&kiln_compiler::CheckedFile, &kiln_compiler::spec::Experiment) -> ExitCode,
) -> ExitCode {
    let checked = kiln_compiler::check_file(file);
    if report_errors(file, &checked) {
        return ExitCode::from(1);
    }
    match pick(file, &checked, wanted) {
        Some(experiment) => then(&checked, experiment),
        None => ExitCode::from(1),
    }
}

/// The experiment `wanted` (or the first) of a checked file, pipeline stages included.
fn pick<'a>(
    file: &std::path::Path,
    checked: &'a kiln_compiler::CheckedFile,
    wanted: Option<&str>,
) -> Option<&'a kiln_compiler::spec::Experiment> {
    let all = checked.module.all_experiments();
    let chosen = match wanted {
        Some(name) => all.iter().find(|e| e.name == name).copied(),
        None => all.first().copied(),
    };
    if chosen.is_none() {
        let names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
        match wanted {
            Some(name) => eprintln!(
                "error: {} has no experiment `{name}`; it has: {}",
                file.display(),
                names.join(", ")
            ),
            None => eprintln!("error: {} defines no experiment", file.display()),
        }
    }
    chosen
}

fn plan(
    file: &std::path::Path,
    wanted: Option<&str>,
    format: PlanFormat,
    cluster: Option<&str>,
    sets: &[String],
) -> ExitCode {
    let mut checked = kiln_compiler::check_file(file);
    if report_errors(file, &checked) {
        return ExitCode::from(1);
    }
    if cluster.is_some() || !sets.is_empty() {
        let Some(name) = pick(file, &checked, wanted).map(|e| e.name.clone()) else {
            return ExitCode::from(1);
        };
        checked = match kiln_compiler::overrides::check_with_overrides(file, &name, cluster, sets) {
            Ok(c) => c,
            Err(message) => {
                eprintln!("{message}");
                return ExitCode::from(2);
            }
        };
        if report_errors(file, &checked) {
            return ExitCode::from(1);
        }
    }
    let Some(experiment) = pick(file, &checked, wanted) else {
        return ExitCode::from(1);
    };
    let program = match compile(&checked, experiment) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let plan = &program.plan;
    let text = match format {
        PlanFormat::Text => kiln_compiler::plan::render_text(plan),
        PlanFormat::Json => serde_json::to_string_pretty(plan).unwrap_or_default() + "\n",
        PlanFormat::Svg => kiln_compiler::plan::render_svg(plan),
        PlanFormat::Toml => match toml::to_string(plan) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: cannot write the plan as TOML: {e}");
                return ExitCode::from(1);
            }
        },
    };
    print!("{text}");
    ExitCode::SUCCESS
}

/// How `kiln run` trains each experiment it is given.
struct RunOptions<'a> {
    steps: Option<u64>,
    runs: &'a std::path::Path,
    start: kiln_runtime::train::Start,
    report: bool,
    devices: Devices,
}

fn devices(emulate: bool) -> Devices {
    match emulate {
        true => Devices::CpuThreads,
        false => Devices::Planned,
    }
}

/// Says, from rank 0, that a plan for other devices runs on this machine's CPU threads.
fn announce_emulation(
    experiment: &kiln_compiler::spec::Experiment,
    world: &World,
    devices: Devices,
) {
    let mesh = &experiment.parallel.mesh;
    let device = &mesh.node.device.name;
    if devices == Devices::CpuThreads && device != "cpu" && world.speaks() {
        println!(
            "emulating: `{}` is planned for {}; each runs as a CPU thread of this machine (--emulate): the numbers the plan computes, not its speed",
            experiment.name,
            mesh.describe_devices()
        );
    }
}

/// The job this process is part of: alone, or one rank of the MPI job that `mpirun`, `srun`
/// or another launcher started (MPI is initialised once per process, here).
fn join_job() -> Result<World, ExitCode> {
    let joined = Launch::from_env().and_then(|launch| World::join(&launch));
    joined.map_err(|err| {
        eprintln!("error: {err}");
        ExitCode::from(2)
    })
}

/// Reports a run's failure. In a job of several processes it names this process and ends the
/// whole job: the others would wait for this one forever.
fn fail(world: &World, err: impl std::fmt::Display) -> ExitCode {
    if world.size() == 1 {
        eprintln!("error: {err}");
        return ExitCode::from(1);
    }
    eprintln!("error: rank {} of {}: {err}", world.rank(), world.size());
    world.abort(1)
}

fn run(
    file: &std::path::Path,
    wanted: Option<&str>,
    sets: &[String],
    options: &RunOptions,
) -> ExitCode {
    let checked = kiln_compiler::check_file(file);
    if report_errors(file, &checked) {
        return ExitCode::from(1);
    }
    let world = match join_job() {
        Ok(world) => world,
        Err(code) => return code,
    };
    let stop = match interrupt::install() {
        Ok(flag) => flag,
        Err(err) => return fail(&world, format!("cannot handle interrupts: {err}")),
    };
    // A pipeline's stages read each other's runs (`init`, reward model, reference): run them
    // in order, stopping at the first that fails.
    if let (None, Some(pipeline)) = (wanted, checked.module.pipelines.first()) {
        for stage in &pipeline.value.stages {
            if world.speaks() {
                println!(
                    "stage `{}` of pipeline `{}`",
                    stage.name, pipeline.value.name
                );
            }
            let code = with_overrides(file, &checked, &stage.name, sets, |c, e| {
                train(c, e, &world, options, &stop)
            });
            if code != ExitCode::SUCCESS {
                return code;
            }
        }
        return ExitCode::SUCCESS;
    }
    let Some(name) = pick(file, &checked, wanted).map(|e| e.name.clone()) else {
        return ExitCode::from(1);
    };
    with_overrides(file, &checked, &name, sets, |c, e| {
        train(c, e, &world, options, &stop)
    })
}

/// Runs `then` on experiment `name` of a checked file, with `--set` overrides applied.
fn with_overrides(
    file: &std::path::Path,
    checked: &kiln_compiler::CheckedFile,
    name: &str,
    sets: &[String],
    then: impl FnOnce(&kiln_compiler::CheckedFile, &kiln_compiler::spec::Experiment) -> ExitCode,
) -> ExitCode {
    if sets.is_empty() {
        return match pick(file, checked, Some(name)) {
            Some(e) => then(checked, e),
            None => ExitCode::from(1),
        };
    }
    let overridden = match kiln_compiler::overrides::check_with_overrides(file, name, None, sets) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    if report_errors(file, &overridden) {
        return ExitCode::from(1);
    }
    match pick(file, &overridden, Some(name)) {
        Some(e) => then(&overridden, e),
        None => ExitCode::from(1),
    }
}

/// Trains one experiment with progress (a bar on a terminal, else a line every few seconds),
/// then prints its summary; in a job, rank 0 alone reports. An interrupt stops it with a
/// checkpoint (exit 130).
fn train(
    checked: &kiln_compiler::CheckedFile,
    experiment: &kiln_compiler::spec::Experiment,
    world: &World,
    options: &RunOptions,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> ExitCode {
    use kiln_runtime::train::{Control, Event};
    let program = match compile(checked, experiment) {
        Ok(p) => p,
        Err(code) => return code,
    };
    announce_emulation(experiment, world, options.devices);
    let mut progress = progress::Progress::new(&experiment.name);
    let result = kiln_runtime::train::run(
        &program,
        world,
        options.devices,
        options.runs,
        options.steps,
        options.start,
        |event| {
            if world.speaks() {
                progress.show(event);
            }
            if stop.load(std::sync::atomic::Ordering::SeqCst) && matches!(event, Event::Step(_)) {
                Control::Stop
            } else {
                Control::Continue
            }
        },
    );
    if world.speaks() {
        progress.finish();
    }
    match result {
        Err(e) => fail(world, e),
        Ok(s) if !world.speaks() && s.steps < s.total => ExitCode::from(130),
        Ok(_) if !world.speaks() => ExitCode::SUCCESS,
        Ok(s) if s.steps < s.total => {
            println!(
                "stopped `{}` at step {} of {}; its checkpoint is in {}: `kiln run ... --resume` continues it",
                experiment.name,
                s.steps,
                s.total,
                s.run_dir.display()
            );
            ExitCode::from(130)
        }
        Ok(s) if s.resumed_from.is_some_and(|step| step >= s.total) => {
            println!(
                "`{}` had finished its {} steps already; its checkpoint is in {} (`--restart` trains it again)",
                experiment.name,
                s.steps,
                s.run_dir.display()
            );
            ExitCode::SUCCESS
        }
        Ok(s) => {
            println!(
                "trained `{}` for {} steps: loss {:.4} -> {:.4}{}{}",
                experiment.name,
                s.steps,
                s.first_loss,
                s.last_loss,
                s.eval_loss
                    .map(|l| if s.token_loss {
                        format!(", eval loss {l:.4} (perplexity {:.1})", (l as f64).exp())
                    } else {
                        format!(", eval loss {l:.4}")
                    })
                    .unwrap_or_default(),
                s.eval_accuracy
                    .map(|a| format!(", eval accuracy {:.1}%", a * 100.0))
                    .unwrap_or_default()
            );
            println!(
                "{:.0} tokens/s; metrics and checkpoints in {}",
                s.tokens_per_second,
                s.run_dir.display()
            );
            if options.report {
                print_memory_report(&s.memory);
            }
            ExitCode::SUCCESS
        }
    }
}

/// Measured peak memory per device against the plan's prediction for its stage.
fn print_memory_report(memory: &[kiln_runtime::parallel::mesh::DeviceMemory]) {
    if memory.is_empty() {
        println!("memory: not measured (this build does not count allocations)");
        return;
    }
    const MIB: f64 = 1024.0 * 1024.0;
    println!("device  stage   measured peak   plan predicts   measured/plan");
    for d in memory {
        let measured = d.measured_bytes as f64;
        println!(
            "{:<7} {:<7} {:>10.1} MiB  {:>10.1} MiB   {:>8.2}",
            d.device,
            d.stage,
            measured / MIB,
            d.predicted_bytes / MIB,
            measured / d.predicted_bytes.max(1.0)
        );
    }
}

fn bench(
    file: &std::path::Path,
    wanted: Option<&str>,
    steps: u64,
    warmup: u64,
    devices: Devices,
) -> ExitCode {
    with_experiment(file, wanted, |checked, experiment| {
        if steps == 0 {
            eprintln!("error: --steps must be at least 1");
            return ExitCode::from(2);
        }
        let program = match compile(checked, experiment) {
            Ok(p) => p,
            Err(code) => return code,
        };
        let world = match join_job() {
            Ok(world) => world,
            Err(code) => return code,
        };
        // Written by rank 0 alone (a fresh run: the others read nothing of it).
        let scratch = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
        // The end of each step; a step's time is the gap to the previous one's end.
        let mut ends = vec![std::time::Instant::now()];
        let mut collectives = Vec::new();
        announce_emulation(experiment, &world, devices);
        let result = kiln_runtime::train::run(
            &program,
            &world,
            devices,
            &scratch,
            Some(warmup + steps),
            kiln_runtime::train::Start::Fresh,
            |event| {
                if let kiln_runtime::train::Event::Step(r) = event {
                    ends.push(std::time::Instant::now());
                    collectives.push(r.collective_seconds);
                }
                kiln_runtime::train::Control::Continue
            },
        );
        if let Err(e) = result {
            return fail(&world, e);
        }
        if !world.speaks() {
            return ExitCode::SUCCESS;
        }
        std::fs::remove_dir_all(&scratch).ok();
        let mut times: Vec<f64> = ends
            .windows(2)
            .skip(warmup as usize)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let positions = (experiment.train.batch * experiment.train.seq_len) as f64;
        println!(
            "{}: {} steps after {warmup} warm-up: {median:.3} s/step median (min {:.3}, max {:.3}); {:.0} tokens/s (batch {} x seq_len {}, padding included)",
            experiment.name,
            times.len(),
            times[0],
            times[times.len() - 1],
            positions / median,
            experiment.train.batch,
            experiment.train.seq_len
        );
        let mut collectives: Vec<f64> = collectives.into_iter().skip(warmup as usize).collect();
        collectives.sort_by(f64::total_cmp);
        let in_collectives = collectives[collectives.len() / 2];
        if in_collectives > 0.0 {
            println!(
                "collectives and transfers (waiting for peers included): {in_collectives:.3} s/step per device, {:.1}% of the step",
                100.0 * in_collectives / median
            );
        }
        let predicted = program.plan.throughput.tokens_per_second;
        println!(
            "planner's prediction for this mesh: {:.3} s/step, {predicted:.0} tokens/s",
            positions / predicted,
        );
        ExitCode::SUCCESS
    })
}

fn export(
    file: &std::path::Path,
    wanted: Option<&str>,
    peft: Option<PathBuf>,
    merged: Option<PathBuf>,
    runs: &std::path::Path,
) -> ExitCode {
    with_experiment(file, wanted, |checked, experiment| {
        let program = match compile(checked, experiment) {
            Ok(p) => p,
            Err(code) => return code,
        };
        let (result, what, out) = match (peft, merged) {
            (_, Some(out)) => (
                kiln_runtime::export::export_merged(&program, runs, &out),
                "the merged Hugging Face model",
                out,
            ),
            (Some(out), None) => (
                kiln_runtime::export::export_run(&program, runs, &out),
                "PEFT adapter files",
                out,
            ),
            (None, None) => unreachable!("clap requires --peft or --merged"),
        };
        match result {
            Ok(()) => {
                println!("wrote {what} to {}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        }
    })
}

fn train_tokenizer(
    files: &[PathBuf],
    vocab: usize,
    out: &std::path::Path,
    kind: TokenizerKind,
    words: &[String],
) -> ExitCode {
    let kind = match kind {
        TokenizerKind::Bpe => kiln_runtime::data::TokenizerKind::Bpe,
        TokenizerKind::Wordpiece => kiln_runtime::data::TokenizerKind::WordPiece,
    };
    match kiln_runtime::data::train_tokenizer(files, vocab, out, kind, words) {
        Ok(size) => {
            println!("wrote {} ({size} tokens)", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn gpu_check(ordinal: usize) -> ExitCode {
    use kiln_runtime::gpu::{cuda::CudaDevice, parity};
    let device = match CudaDevice::open(ordinal) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("error: GPU {ordinal}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "GPU {ordinal}: {} (compute capability {}.{}), Kiln's kernels compiled by NVRTC",
        device.name, device.capability.0, device.capability.1
    );
    let mut failed = 0;
    for (name, check) in parity::checks::<CudaDevice>() {
        let started = std::time::Instant::now();
        match check(&device) {
            Ok(()) => println!(
                "ok    {name} ({:.0} ms)",
                started.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => {
                failed += 1;
                println!("FAIL  {name}: {e}");
            }
        }
    }
    if failed == 0 {
        println!("every kernel matches the CPU path");
        ExitCode::SUCCESS
    } else {
        eprintln!("error: {failed} kernel check(s) differ from the CPU path");
        ExitCode::FAILURE
    }
}

fn explain(code: &str) -> ExitCode {
    let wanted = code.trim().to_ascii_uppercase();
    match Code::ALL.iter().find(|c| c.as_str() == wanted) {
        Some(c) => {
            println!("{}: {}", c.as_str(), c.explanation());
            ExitCode::SUCCESS
        }
        None => {
            eprintln!(
                "error: unknown code `{code}`; codes run from K0001 to {}",
                Code::ALL.last().map_or("", |c| c.as_str())
            );
            ExitCode::from(2)
        }
    }
}
