//! The training loop: parameter initialisation (or a Hugging Face checkpoint, or the run of the
//! pipeline stage it starts from), batches from the experiment's data (for PPO, rollouts:
//! `ppo`), steps on the mesh the plan lays out (`mesh`), the learning-rate schedule, metrics,
//! evaluation, and checkpoints written atomically.

use crate::checkpoint::{
    bind, param_shape, read_safetensors, safetensors_bytes, write_atomic, HostTensor,
};
use crate::data::{load_examples, load_tokenizer, pad_batch, DataError, Example, PaddedBatch};
use crate::exec::{forward_backward, Batch, Stats};
use crate::mesh::{DeviceMemory, Mesh, StepOutcome};
use crate::optim::{learning_rate, State};
use crate::pet::verbalizer_ids;
use crate::placement::Placement;
use crate::plot::{read_losses, write_loss_curve};
use crate::ppo::{adapt_kl_coef, reference_weights, Rollouts, Source};
use crate::rng::Rng;
use kiln_compiler::graph::{compile_graph, Graph, ParamRole};
use kiln_compiler::plan::compile_plan;
use kiln_compiler::spec::{Experiment, Length, Objective, Optimizer, Ppo};
use std::collections::BTreeMap;
use std::io::Write;
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
    pub steps: u64,
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
    write_loss_curve(name, &steps, eval, &run_dir.join("loss.svg"))
        .map_err(|err| RunError(format!("loss curve: {err}")))
}

/// How `kiln run` spreads a step: as the plan places it (one device running every microbatch
/// in turn, on `cpu(1)`).
fn placement(e: &Experiment, g: &Graph) -> Result<Placement, RunError> {
    let batch = e.train.batch as usize;
    let plan = compile_plan(e).map_err(|d| {
        let problems: Vec<String> = d
            .items
            .iter()
            .map(|item| {
                let mut line = item.message.clone();
                line.extend(item.notes.iter().map(|n| format!("; {n}")));
                line.extend(item.help.iter().map(|h| format!(" ({h})")));
                line
            })
            .collect();
        RunError(format!(
            "the experiment cannot be planned on its mesh: {} (`kiln plan` shows where)",
            problems.join("; ")
        ))
    })?;
    let placement =
        Placement::from_plan(g, &plan).map_err(|err| RunError(format!("the plan: {}", err.0)))?;
    let (micro, per_step) = (
        placement.micro_batch,
        placement.microbatches * placement.data,
    );
    if micro * per_step != batch {
        return Err(RunError(format!(
            "a batch of {batch} does not split into {per_step} microbatches of {micro} over {} data-parallel devices",
            placement.data
        )));
    }
    Ok(placement)
}

/// Loss and accuracy over an evaluation set.
struct Evaluation {
    loss: f32,
    accuracy: Option<f32>,
}

/// Evaluates the whole set, `chunk` records at a time, without dropout: the loss is the mean
/// over records, the accuracy the share of rows whose highest class score is their class.
fn evaluate(
    graph: &Graph,
    values: &[HostTensor],
    set: &[Vec<Example>],
    chunk: usize,
    seq_len: usize,
    objective: &Objective,
    verbalizer: Option<&[usize]>,
) -> Result<Evaluation, RunError> {
    let (mut loss, mut correct, mut classified) = (0.0f64, 0usize, 0usize);
    for records in set.chunks(chunk) {
        let rows: Vec<&Example> = records.iter().flatten().collect();
        let b = batch_inputs(&rows, seq_len, objective, verbalizer);
        let out = forward_backward(graph, values, &b)
            .map_err(|err| RunError(format!("evaluation: {err}")))?;
        loss += f64::from(out.loss) * records.len() as f64;
        for (scores, row) in out.class_logits.iter().flatten().zip(&rows) {
            // Rows without a class (PET's masked copies) carry only the auxiliary loss.
            let Some(class) = row.class else { continue };
            let best = (0..scores.len()).max_by(|&a, &b| scores[a].total_cmp(&scores[b]));
            correct += usize::from(best == Some(class as usize));
            classified += 1;
        }
    }
    Ok(Evaluation {
        loss: (loss / set.len() as f64) as f32,
        accuracy: (classified > 0).then(|| correct as f32 / classified as f32),
    })
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
struct Progress {
    /// Steps completed.
    step: u64,
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
    let relevant = serde_json::json!({
        "model": e.model, "adapters": e.adapters, "objective": e.objective, "data": e.data,
        "optimizer": e.train.optimizer, "schedule": e.train.schedule, "batch": e.train.batch,
        "micro_batch": e.train.micro_batch, "seq_len": e.train.seq_len, "seed": e.train.seed,
    });
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in relevant.to_string().bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Trainable weights, optimizer moments and progress, each file replaced atomically (the
/// state file last, so a complete state always describes complete weights).
fn save_checkpoint(
    g: &Graph,
    mesh: &Mesh,
    progress: &Progress,
    dir: &Path,
) -> Result<(), RunError> {
    let values = mesh.values(g);
    let states = mesh.states(g);
    std::fs::create_dir_all(dir).map_err(|e| RunError(format!("{}: {e}", dir.display())))?;
    let trainable: Vec<usize> = (0..g.params.len())
        .filter(|&i| g.params[i].trainable)
        .collect();
    let weights = trainable
        .iter()
        .map(|&i| {
            (
                g.params[i].name.clone(),
                values[i].shape.clone(),
                values[i].data.as_slice(),
            )
        })
        .collect();
    write_atomic(
        &dir.join("trainable.safetensors"),
        &safetensors_bytes(weights).map_err(RunError)?,
    )
    .map_err(RunError)?;
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
    write_atomic(
        &dir.join("optimizer.safetensors"),
        &safetensors_bytes(moments).map_err(RunError)?,
    )
    .map_err(RunError)?;
    let state = serde_json::to_string_pretty(progress)
        .map_err(|e| RunError(format!("cannot write the state: {e}")))?;
    write_atomic(&dir.join("state.json"), state.as_bytes()).map_err(RunError)
}

/// Restores weights, moments and progress from a checkpoint directory.
fn load_checkpoint(
    g: &Graph,
    values: &mut [HostTensor],
    states: &mut [Option<State>],
    dir: &Path,
    e: &Experiment,
) -> Result<Progress, RunError> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .map_err(|err| RunError(format!("cannot resume: {}: {err}", state_path.display())))?;
    let progress: Progress = serde_json::from_str(&text).map_err(|err| {
        RunError(format!(
            "cannot resume: {} is damaged: {err}",
            state_path.display()
        ))
    })?;
    if progress.fingerprint != fingerprint(e) {
        return Err(RunError(format!(
            "cannot resume from {}: the experiment changed since that checkpoint (model, adapters, objective, data, optimizer, schedule, batch, sequence length or seed); start a new run, or restore the experiment",
            dir.display()
        )));
    }
    let weights = read_safetensors(&dir.join("trainable.safetensors"))
        .map_err(|err| RunError(err.to_string()))?;
    let moments = read_safetensors(&dir.join("optimizer.safetensors"))
        .map_err(|err| RunError(err.to_string()))?;
    for (i, p) in g.params.iter().enumerate().filter(|(_, p)| p.trainable) {
        let w = weights.get(&p.name).ok_or_else(|| {
            RunError(format!("cannot resume: the checkpoint has no `{}`", p.name))
        })?;
        values[i] = w.clone();
        if let (Some(m), Some(v)) = (
            moments.get(&format!("{}.exp_avg", p.name)),
            moments.get(&format!("{}.exp_avg_sq", p.name)),
        ) {
            states[i] = Some(State {
                m: m.data.clone(),
                v: v.data.clone(),
            });
        }
    }
    Ok(progress)
}

/// The trained weights a stage's run left under `runs` (its checkpoint's trainable tensors);
/// `user` says who needs them and how ("`rlhf_ppo` uses the reward model of"), for the error
/// that names the stage to run first.
pub(crate) fn stage_weights(
    runs: &Path,
    stage: &str,
    user: &str,
) -> Result<(PathBuf, BTreeMap<String, HostTensor>), RunError> {
    let path = runs
        .join(stage)
        .join("checkpoint")
        .join("trainable.safetensors");
    if !path.exists() {
        return Err(RunError(format!(
            "{user} `{stage}`, which has no run yet ({} is missing): run that stage first (`kiln run FILE --experiment {stage}`)",
            path.display()
        )));
    }
    let tensors = read_safetensors(&path).map_err(|err| RunError(err.to_string()))?;
    Ok((path, tensors))
}

/// What to do after a step.
pub enum Control {
    Continue,
    /// Save a checkpoint and stop (as on an interrupt).
    Stop,
}

/// Where `e`'s weights start, first match winning: the run of the stage it starts from (`init`),
/// pretrained weights (`hf("dir")`) and trained adapters (`peft("dir")`); each replaces the
/// initial values it names.
fn initial_weights(e: &Experiment, graph: &Graph, runs: &Path) -> Result<Vec<Source>, RunError> {
    let mut files = Vec::new();
    if let Some(stage) = &e.init {
        files.push(stage_weights(
            runs,
            stage,
            &format!("`{}` starts from", e.name),
        )?);
    }
    for path in e
        .model
        .checkpoint
        .iter()
        .map(|dir| Path::new(dir).join("model.safetensors"))
        .chain(
            e.adapter_weights
                .iter()
                .map(|dir| Path::new(dir).join("adapter_model.safetensors")),
        )
    {
        let tensors = read_safetensors(&path).map_err(|err| RunError(err.to_string()))?;
        // A virtual-token adapter's file holds its prompt under PEFT's name.
        let tensors = crate::prompt::from_peft(graph, tensors)
            .map_err(|err| RunError(format!("{}: {err}", path.display())))?;
        files.push((path, tensors));
    }
    Ok(files)
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

/// The evaluation rollouts' draws: the same whatever the run's length, so that runs compare.
const EVAL_SEED: u64 = 0x5EED_E7A1;

/// Trains `e` and writes metrics and checkpoints under `runs`;
/// with `resume`, continues the run from its checkpoint with identical results.
pub fn run(
    e: &Experiment,
    runs: &Path,
    steps_override: Option<u64>,
    resume: bool,
    mut on_step: impl FnMut(&StepReport) -> Control,
) -> Result<RunSummary, RunError> {
    let resolve = |p: &Option<String>, what: &str| -> Result<PathBuf, RunError> {
        p.as_ref()
            .map(PathBuf::from)
            .ok_or_else(|| RunError(format!("data.{what} is required to run this experiment")))
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

    let graph = compile_graph(e).map_err(|d| RunError(format!("{:?}", d.items)))?;
    let mut values = initialise(&graph, e.train.seed);
    let files = initial_weights(e, &graph, runs)?;
    for (slot, bound) in values
        .iter_mut()
        .zip(bind(&graph, &files).map_err(|err| RunError(err.to_string()))?)
    {
        if let Some(t) = bound {
            *slot = t;
        }
    }
    let rollouts = match &e.objective {
        Objective::Ppo(ppo) => {
            reference_weights(e, ppo, &graph, &mut values, runs)?;
            Some((
                ppo,
                Rollouts::new(e, ppo, &graph, runs, &files, &tokenizer)?,
            ))
        }
        _ => None,
    };
    let mut states: Vec<Option<State>> = vec![None; values.len()];
    let run_dir = runs.join(&e.name);
    let checkpoint_dir = run_dir.join("checkpoint");
    let mut progress = if resume {
        load_checkpoint(&graph, &mut values, &mut states, &checkpoint_dir, e)?
    } else {
        Progress {
            step: 0,
            loss: f32::NAN,
            first_loss: f32::NAN,
            rng: e.train.seed,
            order: (0..train_set.len()).collect(),
            cursor: train_set.len(),
            tokens: 0,
            kl_coef: None,
            fingerprint: fingerprint(e),
        }
    };

    let batch = e.train.batch as usize;
    let placement = placement(e, &graph)?;
    let micro = placement.micro_batch;
    if micro % per_record != 0 || batch % per_record != 0 {
        return Err(RunError(format!(
            "each record is {per_record} rows (a chosen/rejected pair, or PET's row and its masked copy) that share a micro-batch; batch {batch} and micro-batch {micro} must be multiples of {per_record}"
        )));
    }
    let total = steps_override.unwrap_or(match e.train.length {
        Length::Steps(n) => n,
        Length::Epochs(k) => k * (train_set.len().div_ceil(batch)) as u64,
    });
    let peak = match e.train.optimizer {
        Optimizer::Adamw { lr, .. } | Optimizer::Sgd { lr, .. } => lr,
    };
    std::fs::create_dir_all(&run_dir)
        .map_err(|err| RunError(format!("{}: {err}", run_dir.display())))?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(resume)
        .write(true)
        .truncate(!resume)
        .open(run_dir.join("metrics.jsonl"))
        .map_err(|err| RunError(format!("{}: {err}", run_dir.display())))?;

    let started = Instant::now();
    let tokens_before = progress.tokens;
    let mut mesh = Mesh::new(&graph, placement, &values, &states);
    while progress.step < total {
        let s = progress.step;
        let lr = learning_rate(peak, &e.train.schedule, s, total);
        let (outcome, extra) = match &rollouts {
            Some((ppo, rollouts)) => {
                let prompts: Vec<&Example> = (0..batch)
                    .map(|_| &train_set[progress.next_record()][0])
                    .collect();
                // Draws seeded by the step: a resumed run samples what the whole run did.
                let seed = e.train.seed ^ (s * 1_000_003);
                let kl_coef = progress.kl_coef.unwrap_or(ppo.kl);
                let rollout = rollouts.collect(&mesh.values(&graph), &prompts, seed, kl_coef)?;
                progress.tokens += rollout.tokens();
                if let Some(target) = ppo.kl_target {
                    let next = adapt_kl_coef(kl_coef, rollout.kl, target, ppo.kl_horizon, batch);
                    progress.kl_coef = Some(next);
                }
                let micros = rollouts.batches(&rollout, micro);
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
                    for _ in 0..micro.min(batch - m * micro) / per_record {
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
                    // Seeded by the micro-batch's place in the step, not by the device that runs it.
                    b.dropout_seed = Some(e.train.seed ^ (s * 1_000_003 + m as u64));
                    micros.push(b);
                }
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
        if progress.first_loss.is_nan() {
            progress.first_loss = loss_sum;
        }
        progress.loss = loss_sum;
        let tps =
            (progress.tokens - tokens_before) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let mut line = serde_json::json!({ "step": s + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens_per_second": tps });
        // What the objective reports beside its loss (PPO: the rollout's reward and KL, the
        // loss's parts and clip fractions).
        for (key, value) in extra {
            line[key] = serde_json::json!(value);
        }
        for (key, value) in stats {
            line[key] = serde_json::json!(value);
        }
        writeln!(metrics, "{line}").map_err(|err| RunError(format!("metrics: {err}")))?;
        let control = on_step(&StepReport {
            step: s + 1,
            total,
            loss: loss_sum,
            tokens_per_second: tps,
            collective_seconds,
        });
        let stop = matches!(control, Control::Stop);
        if stop || e.train.checkpoint_every.is_some_and(|k| (s + 1) % k == 0) {
            save_checkpoint(&graph, &mesh, &progress, &checkpoint_dir)?;
        }
        if stop {
            break;
        }
    }
    let eval = match (&eval_set, progress.step == total, &rollouts) {
        (Some(set), true, Some((_, rollouts))) => {
            let prompts: Vec<&Example> = set.iter().map(|r| &r[0]).collect();
            let reward =
                rollouts.mean_reward(&mesh.values(&graph), &prompts, e.train.seed ^ EVAL_SEED)?;
            let line = serde_json::json!({ "eval_reward": reward });
            writeln!(metrics, "{line}").map_err(|err| RunError(format!("metrics: {err}")))?;
            None
        }
        (Some(set), true, None) => {
            let eval = evaluate(
                &graph,
                &mesh.values(&graph),
                set,
                (micro / per_record).max(1),
                seq_len,
                &e.objective,
                verbalizer.as_deref(),
            )?;
            let mut line = serde_json::json!({ "eval_loss": eval.loss });
            if token_loss(&e.objective) {
                line["perplexity"] = serde_json::json!((eval.loss as f64).exp());
            }
            if let Some(accuracy) = eval.accuracy {
                line["accuracy"] = serde_json::json!(accuracy);
            }
            writeln!(metrics, "{line}").map_err(|err| RunError(format!("metrics: {err}")))?;
            Some(eval)
        }
        _ => None,
    };
    save_checkpoint(&graph, &mesh, &progress, &checkpoint_dir)?;
    drop(metrics);
    plot_run(&e.name, &run_dir)?;
    let memory = mesh.memory();
    if !memory.is_empty() {
        let json = serde_json::to_string_pretty(&memory)
            .map_err(|err| RunError(format!("memory report: {err}")))?;
        write_atomic(&run_dir.join("memory.json"), json.as_bytes()).map_err(RunError)?;
    }
    let tokens_per_second =
        (progress.tokens - tokens_before) as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok(RunSummary {
        token_loss: token_loss(&e.objective),
        steps: progress.step,
        first_loss: progress.first_loss,
        last_loss: progress.loss,
        eval_loss: eval.as_ref().map(|e| e.loss),
        eval_accuracy: eval.and_then(|e| e.accuracy),
        tokens_per_second,
        run_dir,
        memory,
    })
}
