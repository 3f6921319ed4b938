//! The training loop: the data and the starting weights (a Hugging Face checkpoint, the run of
//! the pipeline stage it starts from, or fresh values), steps on the mesh the plan lays out
//! (batches of the objective's examples, or PPO's rollouts), the learning-rate schedule,
//! metrics, evaluation, checkpoints and the loss curve.

use crate::comm::launch::Launch;
use crate::comm::world::World;
use crate::data::{load_tokenizer, task_data, Example, Feed, Source};
use crate::exec::precision::Format;
use crate::exec::DropoutKey;
use crate::gpu::{self, cuda::CudaDevice, Accelerator};
use crate::host::gpus::Gpus;
use crate::parallel::mesh::{Mesh, StepOutcome};
use crate::parallel::placement::Placement;
use crate::rng::{Key, Purpose};
use crate::store::run_dir::{latest_checkpoint, MetricsLog, RunDir};
use crate::store::safetensors::write_atomic;
use crate::store::starting_weights::{named_checkpoints, starting_values};
use crate::train::checkpoint::{load_checkpoint, save_checkpoint, unsourced_frozen, Progress};
use crate::train::evaluate::Evaluator;
use crate::train::optim::{learning_rate, State};
use crate::train::plot::{read_losses, write_loss_curve};
use crate::train::ppo::{adapt_kl_coef, reference_weights, updates, Rollouts};
use crate::train::{
    share_label_counts, Control, Devices, Event, RunError, RunSummary, Start, StepReport, Steps,
};
use kiln_compiler::spec::{Experiment, Length, Optimizer};
use kiln_compiler::Program;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `loss.svg` beside `metrics.jsonl`, covering every step the run has taken.
fn plot_run(name: &str, run_dir: &Path) -> Result<(), RunError> {
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .map_err(|err| RunError(format!("metrics: {err}")))?;
    let (steps, eval) = read_losses(&metrics);
    if steps.is_empty() {
        return Ok(());
    }
    write_loss_curve(name, &steps, &eval, &run_dir.join("loss.svg"))
        .map_err(|err| RunError(format!("loss curve: {err}")))
}

/// How `kiln run` spreads a step: as the program's plan places it (one device running every
/// microbatch in turn, on `cpu(1)`), over this process's threads or one process per device of
/// an MPI job. Refused before anything is allocated when the plan is for devices this machine
/// cannot execute it on, for another number of processes, or does not fit this machine's memory.
fn placement(program: &Program, world: &World, devices: Devices) -> Result<Placement, RunError> {
    let e = &program.experiment;
    let on_cpu = e.parallel.mesh.node.device.name == "cpu" || devices == Devices::CpuThreads;
    let batch = e.train.batch as usize;
    let placement = Placement::from_plan(&program.graph, &program.plan)
        .map_err(|err| RunError(format!("the plan: {}", err.0)))?;
    if world.size() > 1 && world.size() != placement.devices() {
        return Err(RunError(format!(
            "`{}` is planned for {} devices (`parallel {{ mesh = cpu({}) }}`) and its job has {} processes: start one process per device (`mpirun -np {}`), or plan for {} devices",
            e.name,
            placement.devices(),
            placement.devices(),
            world.size(),
            placement.devices(),
            world.size()
        )));
    }
    // A GPU's memory is checked when it is opened (`open_gpus`).
    if on_cpu {
        check_host_memory(&placement, world)?;
    }
    let (rows, microbatches) = (placement.rows_per_microbatch, placement.microbatches);
    if rows * microbatches != batch {
        return Err(RunError(format!(
            "a batch of {batch} does not split into {microbatches} microbatches of {rows} rows"
        )));
    }
    Ok(placement)
}

/// The GPUs a plan for GPUs trains on: one per device this process hosts (in an MPI job, the
/// GPU of its local rank), each with Kiln's kernels compiled for it; `None` when the run is on
/// CPU threads (a `cpu(N)` plan, or `--emulate`). Refused before anything is read when this
/// machine cannot run it: too few GPUs (named), a plan or graph the GPU executor does not run
/// yet, or a GPU, NVRTC or cuBLAS that does not load.
fn open_gpus(
    program: &Program,
    world: &World,
    devices: Devices,
    placement: &Placement,
) -> Result<Option<Vec<Accelerator>>, RunError> {
    let e = &program.experiment;
    if e.parallel.mesh.node.device.name == "cpu" || devices == Devices::CpuThreads {
        return Ok(None);
    }
    let found = crate::host::gpus::probe();
    let visible = match &found {
        Gpus::Found { gpus, .. } => gpus.len(),
        Gpus::Unusable(_) => 0,
    };
    let ordinals: Vec<usize> = match world.size() {
        1 => (0..placement.devices()).collect(),
        _ => vec![Launch::from_env().map_or(0, |launch| launch.local_rank)],
    };
    let instead = "`--emulate` trains it on CPU threads of this machine (the numbers the plan computes, not its speed), `kiln plan` shows the plan, and `parallel { mesh = cpu(N) }` plans for this CPU";
    let planned = e.parallel.mesh.describe_devices();
    if ordinals.iter().any(|&i| i >= visible) {
        return Err(RunError(format!(
            "`{}` is planned for {planned} ({} in this process) and this machine has {found}: {instead}",
            e.name,
            ordinals.len()
        )));
    }
    if let Err(why) = placement
        .gpu_executable()
        .and_then(|()| gpu::step::executable(&program.graph))
    {
        return Err(RunError(format!(
            "`{}` is planned for GPUs, but {why}: {instead}",
            e.name
        )));
    }
    const GIB: f64 = (1u64 << 30) as f64;
    if let Gpus::Found { gpus, .. } = &found {
        // The plan's estimate, with whole f32 gradients (the GPU executor sums them on the GPU
        // before ZeRO shards them): a lower bound, since it also keeps every activation.
        let memory = placement.memory.first();
        let gradients = 4.0 * program.graph.trainable_params() as f64;
        let needed = memory.map_or(0.0, |m| m.total - m.gradients) + gradients;
        for &i in &ordinals {
            if needed > gpus[i].memory_bytes as f64 {
                return Err(RunError(format!(
                    "`{}` needs at least {:.1} GiB on each GPU and GPU {i} ({}) has {:.1} GiB; `kiln plan` shows where the memory goes (shrink the model, batch, micro_batch or seq_len)",
                    e.name,
                    needed / GIB,
                    gpus[i].name,
                    gpus[i].memory_bytes as f64 / GIB
                )));
            }
        }
    }
    // The host keeps each hosted device's f32 weights, gradients and AdamW moments.
    let host_needed = ordinals.len() as f64
        * (4.0 * program.graph.total_params() as f64
            + 12.0 * program.graph.trainable_params() as f64);
    if let Some(available) = crate::host::available_memory() {
        if host_needed > available as f64 {
            return Err(RunError(format!(
                "`{}` keeps {:.1} GiB of weights, gradients and optimizer state in host memory for its {} GPUs and this machine has {:.1} GiB available; `kiln plan` shows the plan",
                e.name,
                host_needed / GIB,
                ordinals.len(),
                available as f64 / GIB
            )));
        }
    }
    ordinals
        .into_iter()
        .map(|i| {
            CudaDevice::open(i)
                .map(Accelerator::Cuda)
                .map_err(|err| RunError(format!("GPU {i}: {err}")))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// The plan's memory over the devices this process hosts (all of them, or in an MPI job its
/// own) against what the machine has available, so that a run too large fails with numbers
/// instead of an abort in the allocator.
fn check_host_memory(placement: &Placement, world: &World) -> Result<(), RunError> {
    let stages = placement.coordinates().into_iter().map(|(stage, ..)| stage);
    let hosted: Vec<usize> = match world.size() {
        1 => stages.collect(),
        _ => stages.skip(world.rank()).take(1).collect(),
    };
    let needed: f64 = hosted
        .iter()
        .map(|&stage| placement.memory.get(stage).map_or(0.0, |m| m.total))
        .sum();
    let Some(available) = crate::host::available_memory() else {
        return Ok(());
    };
    if needed > available as f64 {
        const GIB: f64 = (1u64 << 30) as f64;
        return Err(RunError(format!(
            "the plan needs {:.1} GiB over the {} devices of this process and this machine has {:.1} GiB available; `kiln plan` shows where the memory goes (shrink the model, batch, micro_batch or seq_len, or add recompute)",
            needed / GIB,
            hosted.len(),
            available as f64 / GIB
        )));
    }
    Ok(())
}

/// When the loop saves a checkpoint besides the end and interrupts: every `checkpoint_every`
/// steps, and once `checkpoint_minutes` have passed since the last save.
struct SavePolicy {
    every: Option<u64>,
    interval: std::time::Duration,
    last: Instant,
}

impl SavePolicy {
    fn new(e: &Experiment) -> Self {
        SavePolicy {
            every: e.train.checkpoint_every,
            // Longer than a Duration holds: never.
            interval: std::time::Duration::try_from_secs_f64(e.train.checkpoint_minutes * 60.0)
                .unwrap_or(std::time::Duration::MAX),
            last: Instant::now(),
        }
    }

    fn due(&self, step: u64) -> bool {
        self.every.is_some_and(|k| step.is_multiple_of(k)) || self.last.elapsed() >= self.interval
    }
}

/// Trains the program's experiment and writes metrics and checkpoints under `runs/<name>`,
/// which it holds alone while it runs; `start` says what to do with a run already there
/// (`Resume` continues it with identical results). `on_event` hears of the start, each step
/// and each evaluation, and may stop the run: it then saves a checkpoint and returns with the
/// steps done.
///
/// In an MPI job (`world`) every process calls this: each runs its device's share of every
/// step, and rank 0 alone owns the run directory (metrics, checkpoints, the plot). A stop asked
/// of any process stops them all at the same step.
pub fn run(
    program: &Program,
    world: &World,
    devices: Devices,
    runs: &Path,
    steps_override: Option<u64>,
    start: Start,
    mut on_event: impl FnMut(&Event) -> Control,
) -> Result<RunSummary, RunError> {
    let resolve = |p: &Option<String>, what: &str| -> Result<PathBuf, RunError> {
        p.as_ref()
            .map(PathBuf::from)
            .ok_or_else(|| RunError(format!("data.{what} is required to run this experiment")))
    };
    let (e, graph) = (&program.experiment, &program.graph);
    // Before anything is read or allocated: the plan must be runnable here and fit.
    let placement = placement(program, world, devices)?;
    let gpus = open_gpus(program, world, devices, &placement)?;
    let on: Vec<String> = gpus.iter().flatten().map(Accelerator::describe).collect();
    let run = runs.join(&e.name);
    let run_dir = match world.speaks() {
        true => Some(RunDir::lock(runs, &e.name)?),
        false => None,
    };
    let resumable = match (start, &run_dir) {
        // Rank 0 checks and prepares the directory; the others read the checkpoint it resumes.
        (Start::Resume, None) => latest_checkpoint(&run)?,
        (_, None) => None,
        (Start::Fresh, Some(run_dir)) => match run_dir.newest_step()? {
            Some(step) => {
                return Err(RunError(format!(
                    "{} already holds a run of `{}` (its checkpoint of step {step}): `--resume` continues it, `--restart` discards it and starts over",
                    run_dir.path().display(),
                    e.name,
                )))
            }
            None => None,
        },
        (Start::Resume, Some(run_dir)) => run_dir.latest()?,
        (Start::Restart, Some(run_dir)) => {
            run_dir.clear()?;
            None
        }
    };
    let tokenizer =
        load_tokenizer(&resolve(&e.data.tokenizer, "tokenizer").map_err(|err| {
            RunError(format!("{}; make one with `kiln tokenizer train`", err.0))
        })?)?;
    if tokenizer.get_vocab_size(true) as u64 > e.model.vocab {
        return Err(RunError(format!(
            "the tokenizer has {} tokens but the model's vocab is {}",
            tokenizer.get_vocab_size(true),
            e.model.vocab
        )));
    }
    let objective = task_data(&e.objective, &tokenizer)?;
    let seq_len = e.train.seq_len as usize;
    let examples = |path: &Path| {
        objective.examples(&Source {
            path,
            fields: &e.data.fields,
            tokenizer: &tokenizer,
            seq_len,
            seed: e.train.seed,
        })
    };
    let train_set = examples(&resolve(&e.data.train, "train")?)?;
    let eval_set = match &e.data.eval {
        Some(p) => Some(examples(Path::new(p))?),
        None => None,
    };
    // Sequences per record: reward pairs and PET's rows with their masked copies take two
    // rows, which must stay in one batch.
    let per_record = objective.rows_per_record();

    let files = named_checkpoints(e, graph, runs)?;
    let (mut values, initialised) = starting_values(e, graph, &files)?;
    let steps = match objective.feed() {
        Feed::Batches(inputs) => Steps::Batches(inputs),
        Feed::Rollouts(ppo) => {
            reference_weights(e, ppo, graph, &mut values, runs)?;
            let rollouts = Rollouts::new(program, ppo, runs, &files, &tokenizer)?;
            Steps::Rollouts(ppo, Box::new(rollouts))
        }
    };
    let mut states: Vec<Option<State>> = vec![None; values.len()];
    let mut progress = match &resumable {
        Some(checkpoint) => load_checkpoint(
            graph,
            &mut values,
            &mut states,
            checkpoint,
            e,
            train_set.len(),
        )?,
        None => Progress::start(e, train_set.len()),
    };
    let resumed_from = resumable.as_ref().map(|c| c.step);
    drop(resumable);

    let batch = e.train.batch as usize;
    // Rows per microbatch on the replicas of the stage that splits them finest.
    let micro = placement
        .grids
        .iter()
        .map(|grid| grid.micro_batch)
        .min()
        .unwrap_or(batch);
    if !micro.is_multiple_of(per_record) || !batch.is_multiple_of(per_record) {
        return Err(RunError(format!(
            "each record is {per_record} rows (a chosen/rejected pair, or PET's row and its masked copy) that share a micro-batch; batch {batch} and micro-batch {micro} must be multiples of {per_record}"
        )));
    }
    let rows_per_microbatch = placement.rows_per_microbatch;
    let total = steps_override.unwrap_or(match e.train.length {
        Length::Steps(n) => n,
        Length::Epochs(k) => k * (train_set.len().div_ceil(batch)) as u64,
    });
    progress.total = Some(total);
    let peak = match e.train.optimizer {
        Optimizer::Adamw { lr, .. } | Optimizer::Sgd { lr, .. } => lr,
    };
    let mut metrics = match &run_dir {
        Some(run_dir) => run_dir.metrics(resumed_from)?,
        None => MetricsLog::unkept(),
    };
    let evaluator = Evaluator {
        graph,
        e,
        set: eval_set.as_deref(),
        steps: &steps,
        chunk: (micro / per_record).max(1),
        token_loss: objective.token_loss(),
    };

    let started = Instant::now();
    let tokens_before = progress.tokens;
    let mut mesh = Mesh::new(graph, placement, &values, &states, world);
    drop(values);
    if let Some(gpus) = gpus {
        mesh.accelerate(gpus).map_err(RunError)?;
    }
    if Format::of(e.train.precision) == Format::F16 {
        progress.loss_scale = Some(progress.loss_scale.take().unwrap_or_default());
        mesh.scale_losses(progress.loss_scale.clone());
    }
    let mut saves = SavePolicy::new(e);
    let mut saved_step = resumed_from;
    let mut last_eval = None;
    let keep = e.train.keep_checkpoints;
    let frozen = unsourced_frozen(e, graph);
    let save = |mesh: &mut Mesh, progress: &Progress| {
        save_checkpoint(graph, mesh, progress, &run, run_dir.as_ref(), keep, &frozen)
    };
    let mut control = on_event(&Event::Started {
        resumed_from,
        total,
        initialised: &initialised,
        gpus: &on,
    });
    while progress.step < total && matches!(control, Control::Continue) {
        let s = progress.step;
        let lr = learning_rate(peak, &e.train.schedule, s, total);
        let (outcome, extra) = match &steps {
            Steps::Rollouts(ppo, rollouts) => {
                let prompts: Vec<&Example> = (0..batch)
                    .map(|_| &train_set[progress.next_record()][0])
                    .collect();
                // Draws keyed by the step: a resumed run samples what the whole run did.
                let key = Key::of(e.train.seed, Purpose::Sampling).fold(s);
                let kl_coef = progress.kl_coef.unwrap_or(ppo.kl);
                let values = mesh.values(graph)?;
                let rollout = rollouts.collect(&values, &prompts, key, kl_coef)?;
                progress.tokens += rollout.tokens();
                if let Some(target) = ppo.kl_target {
                    let next = adapt_kl_coef(kl_coef, rollout.kl, target, ppo.kl_horizon, batch);
                    progress.kl_coef = Some(next);
                }
                let micros = rollouts.batches(&rollout, rows_per_microbatch);
                let outcome = updates(&mut mesh, graph, e, ppo, &micros, lr, s)?;
                let figures = vec![
                    ("reward", rollout.reward),
                    ("kl", rollout.kl),
                    ("kl_coef", kl_coef),
                    ("response_length", rollout.response_length),
                ];
                (outcome, figures)
            }
            Steps::Batches(inputs) => {
                let micro_steps = mesh.microbatches();
                let mut micros = Vec::with_capacity(micro_steps);
                for m in 0..micro_steps {
                    let mut rows: Vec<&Example> = Vec::new();
                    for _ in 0..rows_per_microbatch / per_record {
                        rows.extend(&train_set[progress.next_record()]);
                    }
                    let mut b = inputs.batch(&rows, seq_len);
                    progress.tokens += b
                        .attention_mask
                        .iter()
                        .flatten()
                        .flatten()
                        .filter(|&&v| v == 1)
                        .count();
                    // Masks follow each row's place in the step, not the microbatch or device
                    // that computes it.
                    let first = (m * rows_per_microbatch) as u64;
                    let global = (first..first + rows.len() as u64).collect();
                    b.dropout = Some(DropoutKey::new(e.train.seed, s, global));
                    micros.push(b);
                }
                let shares = vec![1.0 / micros.len() as f64; micros.len()];
                share_label_counts(graph, &mut micros, &shares)?;
                let outcome = mesh
                    .step(graph, &e.train, &micros, lr, s + 1)
                    .map_err(RunError)?;
                (outcome, Vec::new())
            }
        };
        let StepOutcome {
            loss: loss_sum,
            grad_norm,
            overflowed,
            collective_seconds,
            stats,
        } = outcome;
        progress.step += 1;
        let step = progress.step;
        if progress.first_loss.is_nan() {
            progress.first_loss = loss_sum;
        }
        progress.loss = loss_sum;
        let tps =
            (progress.tokens - tokens_before) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let mut line = serde_json::json!({ "step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens_per_second": tps });
        // What the objective reports beside its loss (PPO: the rollout's reward and KL, the
        // loss's parts and clip fractions).
        for (key, value) in extra {
            line[key] = serde_json::json!(value);
        }
        for (key, value) in stats {
            line[key] = serde_json::json!(value);
        }
        if let Some(scale) = &progress.loss_scale {
            // The scale this step's backward used; an overflowing step changed no weight.
            line["loss_scale"] = serde_json::json!(scale.scale);
            if overflowed {
                line["skipped"] = serde_json::json!(true);
            }
        }
        progress.loss_scale = mesh.loss_scale().cloned();
        metrics.append(&line)?;
        control = on_event(&Event::Step(&StepReport {
            step,
            total,
            loss: loss_sum,
            tokens_per_second: tps,
            collective_seconds,
        }));
        if e.train.eval_every.is_some_and(|k| step.is_multiple_of(k)) && step < total {
            last_eval = evaluator.run(&mut mesh, step, &mut metrics, &mut on_event)?;
        }
        // The processes of a job stop and save together: a stop asked of one (an interrupt
        // reaches them at different steps) or a save one's clock says is due.
        let [stop, due] = mesh.anyone([matches!(control, Control::Stop), saves.due(step)])?;
        if stop {
            control = Control::Stop;
        }
        // A checkpoint at `total` is saved after the final evaluation, below.
        if step < total && (stop || due) {
            save(&mut mesh, &progress)?;
            saved_step = Some(step);
            saves.last = Instant::now();
        }
    }
    // A run resumed from its final checkpoint has its final evaluation already.
    if progress.step == total && resumed_from != Some(total) {
        last_eval = evaluator.run(&mut mesh, progress.step, &mut metrics, &mut on_event)?;
    }
    // Nothing to save before a first step (its loss is not a number yet).
    if progress.step > 0 && saved_step != Some(progress.step) {
        save(&mut mesh, &progress)?;
    }
    drop(metrics);
    let memory = mesh.memory();
    if let Some(run_dir) = &run_dir {
        plot_run(&e.name, run_dir.path())?;
    }
    if let Some(run_dir) = run_dir.as_ref().filter(|_| !memory.is_empty()) {
        let json = serde_json::to_string_pretty(&memory)
            .map_err(|err| RunError(format!("memory report: {err}")))?;
        write_atomic(&run_dir.path().join("memory.json"), json.as_bytes()).map_err(RunError)?;
    }
    let tokens_per_second =
        (progress.tokens - tokens_before) as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok(RunSummary {
        token_loss: objective.token_loss(),
        steps: progress.step,
        total,
        resumed_from,
        first_loss: progress.first_loss,
        last_loss: progress.loss,
        eval_loss: last_eval.as_ref().map(|e| e.loss),
        eval_accuracy: last_eval.and_then(|e| e.accuracy),
        tokens_per_second,
        run_dir: run,
        memory,
    })
}
