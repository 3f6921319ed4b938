//! The training loop: parameter initialisation (or a Hugging Face checkpoint, or the run of the
//! pipeline stage it starts from), batches from the experiment's data (for PPO, rollouts:
//! `ppo`), steps on the mesh the plan lays out (`mesh`), the learning-rate schedule, metrics,
//! evaluation, and checkpoints (`run_dir`: complete or absent, verified on resume).

pub mod optim;
pub mod plot;
pub mod ppo;

use crate::data::pet::verbalizer_ids;
use crate::data::{load_examples, load_tokenizer, pad_batch, DataError, Example, PaddedBatch};
use crate::exec::{forward_backward, label_counts, Batch, DropoutKey, Stats};
use crate::parallel::mesh::{DeviceMemory, Mesh, StepOutcome};
use crate::parallel::placement::Placement;
use crate::rng::{Key, Purpose, Rng};
use crate::store::run_dir::{Checkpoint, MetricsLog, RunDir, StoreError};
use crate::store::safetensors::{parse_safetensors, safetensors_bytes, write_atomic};
use crate::store::starting_weights::{named_checkpoints, starting_values};
use crate::tensor::{param_shape, HostTensor};
use crate::train::optim::{learning_rate, State};
use crate::train::plot::{read_losses, write_loss_curve};
use crate::train::ppo::{adapt_kl_coef, reference_weights, Rollouts};
use kiln_compiler::graph::{Graph, Param, ParamRole};
use kiln_compiler::spec::{Experiment, Length, Objective, Optimizer, Ppo};
use kiln_compiler::Program;
use petgraph::graph::NodeIndex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug)]
pub struct RunError(pub String);

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RunError {}

impl From<DataError> for RunError {
    fn from(e: DataError) -> Self {
        RunError(e.0)
    }
}

impl From<StoreError> for RunError {
    fn from(e: StoreError) -> Self {
        RunError(e.0)
    }
}

/// How a run begins when its directory may already hold a run of the experiment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run; refused when the directory holds a checkpoint (nothing is overwritten).
    Fresh,
    /// Continue from the newest checkpoint, bit-exactly; from the beginning when there is none.
    Resume,
    /// Discard the directory's run (checkpoints and metrics) and start over.
    Restart,
}

/// What the loop tells its caller, which answers whether to go on.
pub enum Event<'a> {
    /// Training is about to begin: at `resumed_from` (a checkpoint's step), with `initialised`
    /// the parameters that started from fresh values though a checkpoint was named (task heads
    /// a bare model's checkpoint lacks; with `init_missing`, whatever it lacks).
    Started {
        resumed_from: Option<u64>,
        total: u64,
        initialised: &'a [String],
    },
    Step(&'a StepReport),
    Evaluated {
        step: u64,
        loss: f32,
    },
}

/// What a caller sees of each step (for a progress bar).
pub struct StepReport {
    pub step: u64,
    pub total: u64,
    pub loss: f32,
    pub tokens_per_second: f64,
    /// Seconds a device spent in collectives and transfers during the step (mean over devices).
    pub collective_seconds: f64,
}

#[derive(Debug)]
pub struct RunSummary {
    /// Whether the loss is a per-token cross-entropy (so that perplexity means something).
    pub token_loss: bool,
    /// Steps done, of `total` (fewer when the run was stopped).
    pub steps: u64,
    pub total: u64,
    /// The checkpoint's step a resumed run started from.
    pub resumed_from: Option<u64>,
    pub first_loss: f32,
    pub last_loss: f32,
    pub eval_loss: Option<f32>,
    /// Share of evaluation rows classified right (PET).
    pub eval_accuracy: Option<f32>,
    pub tokens_per_second: f64,
    pub run_dir: PathBuf,
    /// Each device's measured peak memory beside the plan's prediction (also written to
    /// `memory.json`); empty when the program does not count allocations.
    pub memory: Vec<DeviceMemory>,
}

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
/// microbatch in turn, on `cpu(1)`). Refused before anything is allocated when the plan is for
/// other hardware or does not fit this machine's memory.
fn placement(program: &Program) -> Result<Placement, RunError> {
    let e = &program.experiment;
    let device = &e.parallel.mesh.node.device.name;
    // The executor runs on this machine's CPU threads: a mesh of other devices is a plan to
    // study with `kiln plan`, not one to run here.
    if device != "cpu" {
        return Err(RunError(format!(
            "`{}` is planned for {} {device} devices; `kiln run` trains on this machine's CPU (`parallel {{ mesh = cpu(N) }}`): use `kiln plan` for this experiment, or give it a CPU mesh",
            e.name,
            e.parallel.mesh.devices()
        )));
    }
    let batch = e.train.batch as usize;
    let placement = Placement::from_plan(&program.graph, &program.plan)
        .map_err(|err| RunError(format!("the plan: {}", err.0)))?;
    check_host_memory(&placement)?;
    let (rows, microbatches) = (placement.rows_per_microbatch, placement.microbatches);
    if rows * microbatches != batch {
        return Err(RunError(format!(
            "a batch of {batch} does not split into {microbatches} microbatches of {rows} rows"
        )));
    }
    Ok(placement)
}

/// The plan's memory over all of its devices (they share this machine's memory) against what
/// the machine has available, so that a run too large fails with numbers instead of an abort
/// in the allocator.
fn check_host_memory(placement: &Placement) -> Result<(), RunError> {
    let needed: f64 = placement
        .memory
        .iter()
        .zip(&placement.grids)
        .map(|(m, grid)| m.total * grid.devices() as f64)
        .sum();
    let Some(available) = crate::host::available_memory() else {
        return Ok(());
    };
    if needed > available as f64 {
        const GIB: f64 = (1u64 << 30) as f64;
        return Err(RunError(format!(
            "the plan needs {:.1} GiB over its {} devices and this machine has {:.1} GiB available; `kiln plan` shows where the memory goes (shrink the model, batch, micro_batch or seq_len, or add recompute)",
            needed / GIB,
            placement.devices(),
            available as f64 / GIB
        )));
    }
    Ok(())
}

/// Loss and accuracy over an evaluation set.
struct Evaluation {
    loss: f32,
    accuracy: Option<f32>,
}

/// Evaluates the whole set, `chunk` records at a time, without dropout: the loss is the mean
/// over records (over labelled positions for cross-entropies), the accuracy the share of rows
/// whose highest class score is their class.
fn evaluate(
    graph: &Graph,
    values: &[HostTensor],
    set: &[Vec<Example>],
    chunk: usize,
    seq_len: usize,
    objective: &Objective,
    verbalizer: Option<&[usize]>,
) -> Result<Evaluation, RunError> {
    // Each chunk's rows and its share of the records.
    let (chunks, shares): (Vec<Vec<&Example>>, Vec<f64>) = set
        .chunks(chunk)
        .map(|records| {
            let share = records.len() as f64 / set.len() as f64;
            (records.iter().flatten().collect(), share)
        })
        .unzip();
    let mut batches: Vec<Batch> = chunks
        .iter()
        .map(|rows| batch_inputs(rows, seq_len, objective, verbalizer))
        .collect();
    share_label_counts(graph, &mut batches, &shares)?;
    let (mut loss, mut correct, mut classified) = (0.0f64, 0usize, 0usize);
    for ((b, rows), share) in batches.iter().zip(&chunks).zip(&shares) {
        let out = forward_backward(graph, values, b)
            .map_err(|err| RunError(format!("evaluation: {err}")))?;
        loss += f64::from(out.loss) * share;
        for (scores, row) in out.class_logits.iter().flatten().zip(rows) {
            // Rows without a class (PET's masked copies) carry only the auxiliary loss.
            let Some(class) = row.class else { continue };
            let best = (0..scores.len()).max_by(|&a, &b| scores[a].total_cmp(&scores[b]));
            correct += usize::from(best == Some(class as usize));
            classified += 1;
        }
    }
    Ok(Evaluation {
        loss: loss as f32,
        accuracy: (classified > 0).then(|| correct as f32 / classified as f32),
    })
}

/// Makes the cross-entropies of `batches`, the parts of one loss weighing `shares` in it, the
/// mean over all of their labelled positions: each part divides its sum by its share of the
/// count over them all. (A mean per part would weigh a position by how few others share its
/// part: the loss would depend on how a step is cut into microbatches.)
fn share_label_counts(g: &Graph, batches: &mut [Batch], shares: &[f64]) -> Result<(), RunError> {
    let mut total: BTreeMap<NodeIndex, f64> = BTreeMap::new();
    for b in batches.iter() {
        let counts = label_counts(g, b).map_err(|err| RunError(err.0))?;
        for (n, count) in counts {
            *total.entry(n).or_default() += count;
        }
    }
    for (b, share) in batches.iter_mut().zip(shares) {
        b.label_counts = total
            .iter()
            .map(|(&n, &count)| (n, (count * share) as f32))
            .collect();
    }
    Ok(())
}

/// Whether the objective's loss is a token cross-entropy alone, for which perplexity is defined
/// (not sums with NSP, nor pair losses).
fn token_loss(objective: &Objective) -> bool {
    matches!(
        objective,
        Objective::CausalLm | Objective::Sft { .. } | Objective::Mlm(_)
    )
}

/// The executor's inputs for a batch of examples: ids, token types, attention mask, and the
/// labels under the names the objective's loss reads.
fn batch_inputs(
    rows: &[&Example],
    seq_len: usize,
    objective: &Objective,
    verbalizer: Option<&[usize]>,
) -> Batch {
    let PaddedBatch {
        ids,
        types,
        labels,
        mask,
    } = pad_batch(rows, seq_len, 0);
    let mut b = Batch {
        attention_mask: Some(mask),
        ..Batch::default()
    };
    b.ints.insert("input_ids".into(), ids);
    b.ints.insert("token_type_ids".into(), types);
    let token_labels = match objective {
        Objective::Mlm(_) | Objective::MlmNsp { .. } => Some("mlm_labels"),
        Objective::Pvp(pvp) if pvp.mlm_weight > 0.0 => Some("mlm_labels"),
        Objective::Nsp { .. } | Objective::Pvp(_) => None,
        _ => Some("labels"),
    };
    if let Some(name) = token_labels {
        b.ints.insert(name.into(), labels);
    }
    if matches!(objective, Objective::Nsp { .. } | Objective::MlmNsp { .. }) {
        let classes = rows.iter().map(|r| vec![r.class.unwrap_or(-100)]).collect();
        b.ints.insert("next_sentence_labels".into(), classes);
    }
    if let Objective::Pvp(_) = objective {
        let classes = rows.iter().map(|r| vec![r.class.unwrap_or(-100)]).collect();
        b.ints.insert("class_labels".into(), classes);
        b.mask_positions = Some(rows.iter().map(|r| r.mask_position.unwrap_or(0)).collect());
        b.class_token_ids = verbalizer.map(<[usize]>::to_vec);
    }
    b
}

/// Initial values as the reference implementations initialise them: weights N(0, 0.02), biases
/// zero, norm weights one; LoRA A kaiming-uniform U(±1/√in) and B zero (PEFT); IA3 vectors one;
/// virtual-token tables N(0, 1).
pub fn initialise(g: &Graph, seed: u64) -> Vec<HostTensor> {
    let mut rng = Rng(seed ^ 0x5EED);
    g.params
        .iter()
        .map(|p| {
            let shape = param_shape(p);
            let n: usize = shape.iter().product();
            let name = p.name.as_str();
            let data: Vec<f32> = if name.ends_with("lora_B.weight")
                || matches!(p.role, ParamRole::Bias | ParamRole::NormBias)
                || name.ends_with(".bias")
            {
                vec![0.0; n]
            } else if name.ends_with("lora_A.weight") {
                let bound = 1.0 / (shape[1] as f64).sqrt();
                (0..n)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            } else if name.ends_with("ia3_l")
                || name.ends_with("lora_magnitude_vector")
                || p.role == ParamRole::Norm
            {
                vec![1.0; n]
            } else if name == "prompt_encoder.embedding.weight" {
                (0..n).map(|_| rng.normal() as f32).collect()
            } else {
                (0..n).map(|_| (rng.normal() * 0.02) as f32).collect()
            };
            HostTensor { shape, data }
        })
        .collect()
}

/// Where a run is: enough to continue it bit-exactly.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Progress {
    /// Steps completed.
    pub(crate) step: u64,
    /// The steps the run was to take when this was saved (a later stage starts only from a
    /// finished run).
    #[serde(default)]
    pub(crate) total: Option<u64>,
    loss: f32,
    first_loss: f32,
    /// The data order's generator, the current epoch's order and the position in it.
    rng: u64,
    order: Vec<usize>,
    cursor: usize,
    tokens: usize,
    /// PPO's KL coefficient under an adaptive controller (`kl_target`), as it has moved.
    #[serde(default)]
    kl_coef: Option<f64>,
    /// Fingerprint of everything that must not change between a run and its resumption.
    fingerprint: String,
}

impl Progress {
    /// The next training record, in a fresh seeded shuffle each epoch.
    fn next_record(&mut self) -> usize {
        if self.cursor == self.order.len() {
            let mut rng = Rng(self.rng);
            for i in (1..self.order.len()).rev() {
                self.order.swap(i, rng.below(i + 1));
            }
            self.rng = rng.0;
            self.cursor = 0;
        }
        self.cursor += 1;
        self.order[self.cursor - 1]
    }
}

/// FNV-1a over the parts of the experiment a checkpoint depends on (not the step count, which a
/// resumed run may extend).
fn fingerprint(e: &Experiment) -> String {
    // The mesh is left out: a run may move to another mesh, its numbers differing in the last
    // bits only (random draws follow each row's place in the step, not the device: `rng`).
    let relevant = serde_json::json!({
        "model": e.model, "adapters": e.adapters, "objective": e.objective, "data": e.data,
        "optimizer": e.train.optimizer, "schedule": e.train.schedule, "batch": e.train.batch,
        "micro_batch": e.train.micro_batch, "seq_len": e.train.seq_len, "seed": e.train.seed,
        "grad_clip": e.train.grad_clip, "precision": e.train.precision, "init": e.init,
    });
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in relevant.to_string().bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub(crate) const TRAINABLE_FILE: &str = "trainable.safetensors";
pub(crate) const FROZEN_FILE: &str = "frozen.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub(crate) const STATE_FILE: &str = "state.json";

/// The frozen parameters a checkpoint must hold itself: those of a model defined in Kiln, which
/// no file names (their values came from a seed, or from the stage the run started from), so
/// that a later stage, an export or a reader of the checkpoint gets the model the run trained
/// rather than a re-initialisation. PPO's reference copy is derived, not stored.
fn unsourced_frozen(e: &Experiment, g: &Graph) -> Vec<usize> {
    if e.model.checkpoint.is_some() {
        return Vec::new();
    }
    (0..g.params.len())
        .filter(|&i| !g.params[i].trainable && !g.params[i].is_reference_copy())
        .collect()
}

/// `params`' values as safetensors bytes, by name.
fn weights_bytes(g: &Graph, values: &[HostTensor], params: &[usize]) -> Result<Vec<u8>, RunError> {
    let weights = params
        .iter()
        .map(|&i| {
            (
                g.params[i].name.clone(),
                values[i].shape.clone(),
                values[i].data.as_slice(),
            )
        })
        .collect();
    safetensors_bytes(weights).map_err(RunError)
}

/// Saves trainable weights (and the `frozen` ones no file names), optimizer moments and
/// progress as one checkpoint of the run.
fn save_checkpoint(
    g: &Graph,
    mesh: &Mesh,
    progress: &Progress,
    dir: &RunDir,
    keep: u64,
    frozen: &[usize],
) -> Result<(), RunError> {
    let values = mesh.values(g);
    let states = mesh.states(g);
    let trainable: Vec<usize> = (0..g.params.len())
        .filter(|&i| g.params[i].trainable)
        .collect();
    let weights = weights_bytes(g, &values, &trainable)?;
    let frozen_weights = weights_bytes(g, &values, frozen)?;
    let mut moments = Vec::new();
    for &i in &trainable {
        if let Some(st) = &states[i] {
            moments.push((
                format!("{}.exp_avg", g.params[i].name),
                values[i].shape.clone(),
                st.m.as_slice(),
            ));
            moments.push((
                format!("{}.exp_avg_sq", g.params[i].name),
                values[i].shape.clone(),
                st.v.as_slice(),
            ));
        }
    }
    let moments = safetensors_bytes(moments).map_err(RunError)?;
    let state = serde_json::to_vec_pretty(progress)
        .map_err(|e| RunError(format!("cannot write the state: {e}")))?;
    let mut files = vec![
        (TRAINABLE_FILE, weights.as_slice()),
        (OPTIMIZER_FILE, moments.as_slice()),
        (STATE_FILE, state.as_slice()),
    ];
    if !frozen.is_empty() {
        files.push((FROZEN_FILE, frozen_weights.as_slice()));
    }
    dir.save(progress.step, &files, keep as usize)?;
    Ok(())
}

/// Restores weights, moments and progress from a verified checkpoint, refusing one that does
/// not belong to this experiment and data: every trainable tensor with its shape, moments of
/// the same shapes, and a data position inside the training set.
fn load_checkpoint(
    g: &Graph,
    values: &mut [HostTensor],
    states: &mut [Option<State>],
    checkpoint: &Checkpoint,
    e: &Experiment,
    train_records: usize,
) -> Result<Progress, RunError> {
    let dir = &checkpoint.dir;
    let refuse = |what: String| RunError(format!("cannot resume from {}: {what}", dir.display()));
    let progress: Progress = serde_json::from_slice(checkpoint.file(STATE_FILE)?)
        .map_err(|err| refuse(format!("{STATE_FILE} is damaged: {err}")))?;
    if progress.fingerprint != fingerprint(e) {
        return Err(refuse(
            "the experiment changed since that checkpoint (model, adapters, objective, data, optimizer, schedule, batch, sequence length, seed, gradient clipping, precision or the stage it starts from); start a new run (--restart), or restore the experiment".into(),
        ));
    }
    if progress.step != checkpoint.step {
        return Err(refuse(format!(
            "its state is of step {}, its manifest of step {}",
            progress.step, checkpoint.step
        )));
    }
    check_data_position(&progress, train_records).map_err(refuse)?;
    let file = |name: &str| {
        parse_safetensors(checkpoint.file(name)?, &dir.join(name))
            .map_err(|err| RunError(format!("cannot resume: {err}")))
    };
    let weights = file(TRAINABLE_FILE)?;
    let moments = file(OPTIMIZER_FILE)?;
    for (i, p) in g.params.iter().enumerate().filter(|(_, p)| p.trainable) {
        values[i] = shaped(&weights, &p.name, TRAINABLE_FILE, p)
            .map_err(refuse)?
            .ok_or_else(|| refuse(format!("{TRAINABLE_FILE} has no `{}`", p.name)))?
            .clone();
        let m = shaped(&moments, &format!("{}.exp_avg", p.name), OPTIMIZER_FILE, p);
        let v = shaped(
            &moments,
            &format!("{}.exp_avg_sq", p.name),
            OPTIMIZER_FILE,
            p,
        );
        let (m, v) = (m.map_err(refuse)?, v.map_err(refuse)?);
        states[i] = match (m, v) {
            (Some(m), Some(v)) => Some(State {
                m: m.data.clone(),
                v: v.data.clone(),
            }),
            // No step has updated it yet (moments appear with the first update).
            (None, None) => None,
            _ => {
                return Err(refuse(format!(
                    "{OPTIMIZER_FILE} has one of `{0}`'s two moments (exp_avg, exp_avg_sq)",
                    p.name
                )))
            }
        };
    }
    Ok(progress)
}

/// `file`'s tensor `key`, which must have parameter `p`'s shape; `None` when absent.
fn shaped<'t>(
    tensors: &'t BTreeMap<String, HostTensor>,
    key: &str,
    file: &str,
    p: &Param,
) -> Result<Option<&'t HostTensor>, String> {
    let expected = param_shape(p);
    match tensors.get(key) {
        Some(t) if t.shape == expected => Ok(Some(t)),
        Some(t) => Err(format!(
            "{file}'s `{key}` has shape {:?}; the experiment's `{}` is {expected:?}",
            t.shape, p.name
        )),
        None => Ok(None),
    }
}

/// A saved data position must index the training set as loaded now.
fn check_data_position(progress: &Progress, records: usize) -> Result<(), String> {
    let order = &progress.order;
    if order.len() != records {
        return Err(format!(
            "its data order covers {} records and the training set has {records}; did the data file change?",
            order.len()
        ));
    }
    if progress.cursor > order.len() {
        return Err(format!(
            "its data position {} is past the {} records",
            progress.cursor,
            order.len()
        ));
    }
    let mut seen = vec![false; records];
    for &i in order {
        if i >= records || std::mem::replace(&mut seen[i], true) {
            return Err(format!(
                "its data order is not an order of the {records} records (entry {i})"
            ));
        }
    }
    Ok(())
}

/// What to do after a step.
pub enum Control {
    Continue,
    /// Save a checkpoint and stop (as on an interrupt).
    Stop,
}

/// PPO's updates on one rollout (`micros`, the mesh's microbatches): `epochs` optimizer steps
/// over the whole of it (TRL's PPO epochs with one mini-batch), counted from 1 across the run
/// for Adam's bias correction. Loss, norm and figures are their means; collective time adds up.
fn ppo_updates(
    mesh: &mut Mesh,
    graph: &Graph,
    e: &Experiment,
    ppo: &Ppo,
    micros: &[Batch],
    lr: f64,
    step: u64,
) -> Result<StepOutcome, RunError> {
    let mut mean = StepOutcome {
        loss: 0.0,
        grad_norm: 0.0,
        collective_seconds: 0.0,
        stats: Stats::new(),
    };
    let share = 1.0 / ppo.epochs as f64;
    for epoch in 0..ppo.epochs {
        let update = step * ppo.epochs + epoch + 1;
        let out = mesh
            .step(graph, &e.train, micros, lr, update)
            .map_err(|err| RunError(format!("PPO step {} (update {update}): {err}", step + 1)))?;
        mean.loss += out.loss * share as f32;
        mean.grad_norm += out.grad_norm * share;
        mean.collective_seconds += out.collective_seconds;
        for (name, x) in out.stats {
            *mean.stats.entry(name).or_default() += x * share as f32;
        }
    }
    Ok(mean)
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
/// which it holds alone while it runs; `start` says what to do with a run already there (`Resume` continues it with
/// identical results). `on_event` hears of the start, each step and each evaluation, and may
/// stop the run: it then saves a checkpoint and returns with the steps done.
pub fn run(
    program: &Program,
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
    let placement = placement(program)?;
    let run_dir = RunDir::lock(runs, &e.name)?;
    let resumable = match start {
        Start::Fresh => match run_dir.newest_step()? {
            Some(step) => {
                return Err(RunError(format!(
                    "{} already holds a run of `{}` (its checkpoint of step {step}): `--resume` continues it, `--restart` discards it and starts over",
                    run_dir.path().display(),
                    e.name,
                )))
            }
            None => None,
        },
        Start::Resume => run_dir.latest()?,
        Start::Restart => {
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
    let verbalizer = match &e.objective {
        Objective::Pvp(pvp) => Some(verbalizer_ids(pvp, &tokenizer)?),
        _ => None,
    };
    let seq_len = e.train.seq_len as usize;
    let train_set = load_examples(
        &resolve(&e.data.train, "train")?,
        &e.objective,
        &e.data.fields,
        &tokenizer,
        seq_len,
        e.train.seed,
    )?;
    let eval_set = match &e.data.eval {
        Some(p) => Some(load_examples(
            Path::new(p),
            &e.objective,
            &e.data.fields,
            &tokenizer,
            seq_len,
            e.train.seed,
        )?),
        None => None,
    };
    // Sequences per record: reward pairs take two rows, which must stay in one batch.
    let per_record = train_set.first().map_or(1, Vec::len);

    let files = named_checkpoints(e, &graph, runs)?;
    let (mut values, initialised) = starting_values(e, &graph, &files)?;
    let rollouts = match &e.objective {
        Objective::Ppo(ppo) => {
            reference_weights(e, ppo, &graph, &mut values, runs)?;
            Some((ppo, Rollouts::new(program, ppo, runs, &files, &tokenizer)?))
        }
        _ => None,
    };
    let mut states: Vec<Option<State>> = vec![None; values.len()];
    let mut progress = match &resumable {
        Some(checkpoint) => load_checkpoint(
            &graph,
            &mut values,
            &mut states,
            checkpoint,
            e,
            train_set.len(),
        )?,
        None => Progress {
            step: 0,
            total: None,
            loss: f32::NAN,
            first_loss: f32::NAN,
            rng: e.train.seed,
            order: (0..train_set.len()).collect(),
            cursor: train_set.len(),
            tokens: 0,
            kl_coef: None,
            fingerprint: fingerprint(e),
        },
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
    if micro % per_record != 0 || batch % per_record != 0 {
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
    let mut metrics = run_dir.metrics(resumed_from)?;
    let evaluator = Evaluator {
        graph: &graph,
        e,
        set: eval_set.as_deref(),
        rollouts: rollouts.as_ref().map(|(_, r)| r),
        chunk: (micro / per_record).max(1),
        verbalizer: verbalizer.as_deref(),
    };

    let started = Instant::now();
    let tokens_before = progress.tokens;
    let mut mesh = Mesh::new(&graph, placement, &values, &states);
    drop(values);
    let mut saves = SavePolicy::new(e);
    let mut saved_step = resumed_from;
    let mut last_eval = None;
    let keep = e.train.keep_checkpoints;
    let frozen = unsourced_frozen(e, &graph);
    let mut control = on_event(&Event::Started {
        resumed_from,
        total,
        initialised: &initialised,
    });
    while progress.step < total && matches!(control, Control::Continue) {
        let s = progress.step;
        let lr = learning_rate(peak, &e.train.schedule, s, total);
        let (outcome, extra) = match &rollouts {
            Some((ppo, rollouts)) => {
                let prompts: Vec<&Example> = (0..batch)
                    .map(|_| &train_set[progress.next_record()][0])
                    .collect();
                // Draws keyed by the step: a resumed run samples what the whole run did.
                let key = Key::of(e.train.seed, Purpose::Sampling).fold(s);
                let kl_coef = progress.kl_coef.unwrap_or(ppo.kl);
                let rollout = rollouts.collect(&mesh.values(&graph), &prompts, key, kl_coef)?;
                progress.tokens += rollout.tokens();
                if let Some(target) = ppo.kl_target {
                    let next = adapt_kl_coef(kl_coef, rollout.kl, target, ppo.kl_horizon, batch);
                    progress.kl_coef = Some(next);
                }
                let micros = rollouts.batches(&rollout, rows_per_microbatch);
                let outcome = ppo_updates(&mut mesh, &graph, e, ppo, &micros, lr, s)?;
                let figures = vec![
                    ("reward", rollout.reward),
                    ("kl", rollout.kl),
                    ("kl_coef", kl_coef),
                    ("response_length", rollout.response_length),
                ];
                (outcome, figures)
            }
            None => {
                let micro_steps = mesh.microbatches();
                let mut micros = Vec::with_capacity(micro_steps);
                for m in 0..micro_steps {
                    let mut rows: Vec<&Example> = Vec::new();
                    for _ in 0..rows_per_microbatch / per_record {
                        rows.extend(&train_set[progress.next_record()]);
                    }
                    let mut b = batch_inputs(&rows, seq_len, &e.objective, verbalizer.as_deref());
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
                share_label_counts(&graph, &mut micros, &shares)?;
                let outcome = mesh
                    .step(&graph, &e.train, &micros, lr, s + 1)
                    .map_err(RunError)?;
                (outcome, Vec::new())
            }
        };
        let StepOutcome {
            loss: loss_sum,
            grad_norm,
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
        metrics.append(&line)?;
        control = on_event(&Event::Step(&StepReport {
            step,
            total,
            loss: loss_sum,
            tokens_per_second: tps,
            collective_seconds,
        }));
        if e.train.eval_every.is_some_and(|k| step.is_multiple_of(k)) && step < total {
            last_eval = evaluator.run(&mesh, step, &mut metrics, &mut on_event)?;
        }
        // A checkpoint at `total` is saved after the final evaluation, below.
        if step < total && (matches!(control, Control::Stop) || saves.due(step)) {
            save_checkpoint(&graph, &mesh, &progress, &run_dir, keep, &frozen)?;
            saved_step = Some(step);
            saves.last = Instant::now();
        }
    }
    // A run resumed from its final checkpoint has its final evaluation already.
    if progress.step == total && resumed_from != Some(total) {
        last_eval = evaluator.run(&mesh, progress.step, &mut metrics, &mut on_event)?;
    }
    // Nothing to save before a first step (its loss is not a number yet).
    if progress.step > 0 && saved_step != Some(progress.step) {
        save_checkpoint(&graph, &mesh, &progress, &run_dir, keep, &frozen)?;
    }
    drop(metrics);
    plot_run(&e.name, run_dir.path())?;
    let memory = mesh.memory();
    if !memory.is_empty() {
        let json = serde_json::to_string_pretty(&memory)
            .map_err(|err| RunError(format!("memory report: {err}")))?;
        write_atomic(&run_dir.path().join("memory.json"), json.as_bytes()).map_err(RunError)?;
    }
    let tokens_per_second =
        (progress.tokens - tokens_before) as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok(RunSummary {
        token_loss: token_loss(&e.objective),
        steps: progress.step,
        total,
        resumed_from,
        first_loss: progress.first_loss,
        last_loss: progress.loss,
        eval_loss: last_eval.as_ref().map(|e| e.loss),
        eval_accuracy: last_eval.and_then(|e| e.accuracy),
        tokens_per_second,
        run_dir: run_dir.path().to_path_buf(),
        memory,
    })
}

/// Evaluation during and after training: the loss (and accuracy) over `data.eval`, or for PPO
/// the mean reward of responses to its prompts; written to the metrics with the step.
struct Evaluator<'a> {
    graph: &'a Graph,
    e: &'a Experiment,
    set: Option<&'a [Vec<Example>]>,
    rollouts: Option<&'a Rollouts<'a>>,
    chunk: usize,
    verbalizer: Option<&'a [usize]>,
}

impl Evaluator<'_> {
    fn run(
        &self,
        mesh: &Mesh,
        step: u64,
        metrics: &mut MetricsLog,
        on_event: &mut impl FnMut(&Event) -> Control,
    ) -> Result<Option<Evaluation>, RunError> {
        let Some(set) = self.set else {
            return Ok(None);
        };
        let values = mesh.values(self.graph);
        if let Some(rollouts) = self.rollouts {
            let prompts: Vec<&Example> = set.iter().map(|r| &r[0]).collect();
            let key = Key::of(self.e.train.seed, Purpose::EvalSampling);
            let reward = rollouts.mean_reward(&values, &prompts, key)?;
            metrics.append(&serde_json::json!({ "step": step, "eval_reward": reward }))?;
            return Ok(None);
        }
        let eval = evaluate(
            self.graph,
            &values,
            set,
            self.chunk,
            self.e.train.seq_len as usize,
            &self.e.objective,
            self.verbalizer,
        )?;
        let mut line = serde_json::json!({ "step": step, "eval_loss": eval.loss });
        if token_loss(&self.e.objective) {
            line["perplexity"] = serde_json::json!((eval.loss as f64).exp());
        }
        if let Some(accuracy) = eval.accuracy {
            line["accuracy"] = serde_json::json!(accuracy);
        }
        metrics.append(&line)?;
        on_event(&Event::Evaluated {
            step,
            loss: eval.loss,
        });
        Ok(Some(eval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(order: Vec<usize>, cursor: usize) -> Progress {
        Progress {
            step: 1,
            total: None,
            loss: 0.0,
            first_loss: 0.0,
            rng: 0,
            order,
            cursor,
            tokens: 0,
            kl_coef: None,
            fingerprint: String::new(),
        }
    }

    #[test]
    fn a_saved_data_position_must_index_the_training_set() {
        assert!(check_data_position(&progress(vec![2, 0, 1], 3), 3).is_ok());
        let refused = |p: Progress, records| check_data_position(&p, records).unwrap_err();
        assert!(refused(progress(vec![0, 1], 1), 3).contains("covers 2 records"));
        assert!(refused(progress(vec![0, 1, 2], 4), 3).contains("past the 3 records"));
        assert!(refused(progress(vec![0, 3, 1], 0), 3).contains("entry 3"));
        assert!(refused(progress(vec![0, 1, 1], 0), 3).contains("entry 1"));
    }
}
