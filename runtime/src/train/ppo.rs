//! PPO's rollouts, as InstructGPT (Ouyang et al. 2022) and TRL's `PPOTrainer` make them:
//! responses sampled from the policy after each prompt, the reward model's score of prompt and
//! response, per-token rewards −β·(log π − log π_ref) with the score added at the last response
//! token, GAE(γ, λ) advantages (whitened over the batch) and returns, and the batches the PPO
//! loss trains on. Sampling, scoring and the reward model run on the executor, forward only;
//! the updates on a rollout (`updates`) are optimizer steps on the mesh.

use crate::data::{Example, END_OF_TEXT};
use crate::exec::precision::Format;
use crate::exec::{Batch, ExecError, Params, Segment, Stats, Value};
use crate::parallel::mesh::{Mesh, StepOutcome};
use crate::rng::Key;
use crate::store::safetensors::{bind, check_tensors};
use crate::store::starting_weights::stage_weights;
use crate::tensor::HostTensor;
use crate::train::RunError;
use kiln_compiler::graph::{Graph, Op, REFERENCE_PREFIX};
use kiln_compiler::plan::sharding::RankOps;
use kiln_compiler::spec::{Experiment, Ppo};
use kiln_compiler::Program;
use petgraph::graph::NodeIndex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// A checkpoint file's tensors, with its path (what `checkpoint::bind` reads).
pub type Source = (PathBuf, BTreeMap<String, HostTensor>);

fn exec(e: ExecError) -> RunError {
    RunError(format!("rollout: {e}"))
}

/// The nodes of the PPO graph a rollout reads.
struct Nodes {
    /// The policy's last hidden states, which its LM and value heads read.
    hidden: NodeIndex,
    logits: NodeIndex,
    log_probs: NodeIndex,
    ref_log_probs: NodeIndex,
    values: NodeIndex,
    /// The inputs' names: the tokens whose log-probabilities are taken, and the rollout.
    taken: String,
    rollout: String,
}

impl Nodes {
    fn of(g: &Graph) -> Result<Nodes, RunError> {
        let unexpected = || {
            RunError("the PPO graph is not shaped as Kiln lowers PPO (policy and reference log-probabilities, values, rollout)".into())
        };
        let loss = g.loss.ok_or_else(unexpected)?;
        let ins = g.inputs(loss);
        let (Op::PpoLoss { .. }, &[log_probs, ref_log_probs, values, rollout]) =
            (&g.dag[loss].op, ins.as_slice())
        else {
            return Err(unexpected());
        };
        let (&[logits, taken], &[hidden]) =
            (g.inputs(log_probs).as_slice(), g.inputs(values).as_slice())
        else {
            return Err(unexpected());
        };
        Ok(Nodes {
            hidden,
            logits,
            log_probs,
            ref_log_probs,
            values,
            taken: g.dag[taken].name.clone(),
            rollout: g.dag[rollout].name.clone(),
        })
    }
}

/// `targets` and every node they depend on, in topological order.
fn ancestors(g: &Graph, targets: &[NodeIndex]) -> Vec<NodeIndex> {
    let mut needed = vec![false; g.dag.node_count()];
    let mut stack = targets.to_vec();
    while let Some(n) = stack.pop() {
        if !std::mem::replace(&mut needed[n.index()], true) {
            stack.extend(g.inputs(n));
        }
    }
    g.topo_order()
        .into_iter()
        .filter(|n| needed[n.index()])
        .collect()
}

/// The reward model: the policy's architecture with a scalar head (the graph Kiln's reward
/// objective lowers, as the reference copy is the policy's), weights from its stage's run.
struct RewardModel<'g> {
    graph: &'g Graph,
    params: Params,
    /// The score at each row's last token, and the nodes computing it.
    score: NodeIndex,
    nodes: Vec<NodeIndex>,
}

impl<'g> RewardModel<'g> {
    /// `graph` is the reward model's, `base` holds the weights the policy starts from, for
    /// what the reward stage froze.
    fn load(
        e: &Experiment,
        graph: &'g Graph,
        ppo: &Ppo,
        runs: &Path,
        base: &[Source],
    ) -> Result<Self, RunError> {
        let user = format!("`{}` uses the reward model of", e.name);
        let (path, tensors) = stage_weights(runs, &ppo.reward_model, &user)?;
        // A tensor without a place would be dropped silently: a reward model of another shape,
        // or one trained with adapters.
        check_tensors(&graph, &path, &tensors, true).map_err(|err| {
            RunError(format!(
                "{err} (PPO scores with a reward model of `{}`'s policy architecture, trained without adapters)",
                e.name
            ))
        })?;
        let sources: Vec<Source> = std::iter::once((path.clone(), tensors))
            .chain(base.iter().cloned())
            .collect();
        let bound = bind(&graph, &sources).map_err(|err| RunError(err.to_string()))?;
        let values = graph
            .params
            .iter()
            .zip(bound)
            .map(|(p, v)| {
                v.ok_or_else(|| {
                    RunError(format!(
                        "the reward model has no weights for `{}`: neither {} nor the policy's initial weights hold it",
                        p.name,
                        path.display()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let params = Params::new(&graph, &values, Format::of(e.train.precision)).map_err(exec)?;
        let score = graph
            .loss
            .and_then(|l| graph.inputs(l).first().copied())
            .ok_or_else(|| RunError("the reward model's graph has no score".into()))?;
        let nodes = ancestors(&graph, &[score]);
        Ok(RewardModel {
            graph,
            params,
            score,
            nodes,
        })
    }

    /// The score of each sequence (at its last token).
    fn scores(&self, seqs: &[Sequence]) -> Result<Vec<f64>, RunError> {
        let ops = RankOps::default();
        let batch = inputs(seqs);
        let out = Segment::forward(
            &self.graph,
            &self.params,
            &batch,
            &ops,
            &self.nodes,
            Vec::new(),
            None,
        )
        .map_err(exec)?;
        let scores = out
            .value(self.score)
            .map_err(exec)?
            .to_host()
            .map_err(exec)?;
        Ok(scores.data.iter().map(|&s| f64::from(s)).collect())
    }
}

/// The policy's weights where its reference copy (`ref.*`) has none of its own: the reference
/// starts as the policy does, or from `ppo.reference`'s run when it names a stage.
pub fn reference_weights(
    e: &Experiment,
    ppo: &Ppo,
    g: &Graph,
    values: &mut [HostTensor],
    runs: &Path,
) -> Result<(), RunError> {
    let stage = match &ppo.reference {
        Some(stage) => {
            let user = format!("`{}` uses the reference policy of", e.name);
            Some(stage_weights(runs, stage, &user)?)
        }
        None => None,
    };
    let ids: BTreeMap<&str, usize> = g
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    for (i, p) in g.params.iter().enumerate() {
        let Some(name) = p.name.strip_prefix(REFERENCE_PREFIX) else {
            continue;
        };
        let from_stage = stage.as_ref().and_then(|(_, t)| t.get(name));
        let value = match (from_stage, ids.get(name)) {
            (Some(t), _) => t.clone(),
            (None, Some(&policy)) => values[policy].clone(),
            (None, None) => {
                return Err(RunError(format!(
                    "the reference's `{}` has no counterpart in the policy",
                    p.name
                )))
            }
        };
        if value.shape != values[i].shape {
            return Err(RunError(format!(
                "the reference's `{name}` has shape {:?}, the model needs {:?}",
                value.shape, values[i].shape
            )));
        }
        values[i] = value;
    }
    Ok(())
}

/// A prompt and the response sampled after it.
struct Sequence {
    ids: Vec<i64>,
    prompt: usize,
}

impl Sequence {
    /// Positions whose outputs chose the response's tokens (position t chooses token t + 1).
    fn choices(&self) -> std::ops::Range<usize> {
        self.prompt - 1..self.ids.len() - 1
    }
}

/// Token ids (padded with 0) and the attention mask of `seqs`, as wide as the longest.
fn inputs<'a>(seqs: impl IntoIterator<Item = &'a Sequence>) -> Batch {
    let seqs: Vec<&Sequence> = seqs.into_iter().collect();
    let width = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let pad = |row: &[i64], fill: i64| {
        let mut row = row.to_vec();
        row.resize(width, fill);
        row
    };
    let mut b = Batch {
        attention_mask: Some(seqs.iter().map(|s| pad(&vec![1; s.ids.len()], 0)).collect()),
        ..Batch::default()
    };
    b.ints.insert(
        "input_ids".into(),
        seqs.iter().map(|s| pad(&s.ids, 0)).collect(),
    );
    b
}

/// Each sequence's next token at the positions that chose its response, −100 elsewhere.
fn taken_tokens(seqs: &[Sequence], width: usize) -> Vec<Vec<i64>> {
    seqs.iter()
        .map(|s| {
            let mut row = vec![-100; width];
            for t in s.choices() {
                row[t] = s.ids[t + 1];
            }
            row
        })
        .collect()
}

/// A token drawn from softmax(logits) with `u` uniform in [0, 1): the policy's own
/// distribution (its logits already divided by the temperature), which PPO's probability ratio
/// assumes the samples come from (no top-k or top-p, as TRL's PPO samples).
fn draw(logits: &[f32], u: f64) -> usize {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let mut u = u * weights.iter().sum::<f64>();
    for (i, &w) in weights.iter().enumerate() {
        if u < w {
            return i;
        }
        u -= w;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// GAE(γ, λ) over one response: δ_t = r_t + γ·V_{t+1} − V_t (the value after the last token
/// is 0), A_t = δ_t + γλ·A_{t+1}; the returns are A_t + V_t.
fn gae(rewards: &[f64], values: &[f64], gamma: f64, lambda: f64) -> (Vec<f64>, Vec<f64>) {
    let mut advantages = vec![0.0; rewards.len()];
    let (mut next_advantage, mut next_value) = (0.0, 0.0);
    for t in (0..rewards.len()).rev() {
        let delta = rewards[t] + gamma * next_value - values[t];
        advantages[t] = delta + gamma * lambda * next_advantage;
        (next_advantage, next_value) = (advantages[t], values[t]);
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// The KL coefficient after a rollout of `sequences` whose KL was `kl` (Ziegler et al. 2019;
/// TRL's `AdaptiveKLController.update`): raised when the KL is above `target`, lowered when
/// below, by at most 20% of `sequences / horizon` per rollout.
pub fn adapt_kl_coef(coef: f64, kl: f64, target: f64, horizon: u64, sequences: usize) -> f64 {
    let error = (kl / target - 1.0).clamp(-0.2, 0.2);
    coef * (1.0 + error * sequences as f64 / horizon as f64)
}

/// (x − mean)/√(var + 1e-8) with the unbiased variance: TRL's `masked_whiten`.
fn whiten(xs: &mut [f64]) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let scale = 1.0 / (var + 1e-8).sqrt();
    xs.iter_mut().for_each(|x| *x = (*x - mean) * scale);
}

/// A batch of sampled sequences with what PPO trains on, and what to report of it.
pub struct Rollout {
    sequences: Vec<Sequence>,
    /// Per sequence and response token: advantage, return, log-probability and value at
    /// sampling time (the rollout input's channels).
    channels: Vec<Vec<[f32; 4]>>,
    /// Mean reward-model score.
    pub reward: f64,
    /// Mean over sequences of Σ_t (log π − log π_ref) over the response (TRL's `objective/kl`).
    pub kl: f64,
    /// Mean response length in tokens.
    pub response_length: f64,
}

impl Rollout {
    /// Tokens of prompts and responses.
    pub fn tokens(&self) -> usize {
        self.sequences.iter().map(|s| s.ids.len()).sum()
    }
}

/// What a PPO run samples and scores with: its graph, the reward model, the knobs.
pub struct Rollouts<'g> {
    graph: &'g Graph,
    nodes: Nodes,
    /// Nodes up to the policy's last hidden states, and from them to its logits (run on the
    /// last position only while sampling).
    trunk: Vec<NodeIndex>,
    head: Vec<NodeIndex>,
    /// Nodes computing both policies' log-probabilities and the values.
    scoring: Vec<NodeIndex>,
    reward: RewardModel<'g>,
    ppo: Ppo,
    eos: Option<i64>,
    seq_len: usize,
    /// The number format the policy samples in: the run's.
    format: Format,
}

impl<'g> Rollouts<'g> {
    /// For `program` training with `ppo`; the reward model's weights come from its stage's
    /// run under `runs`, falling back on `base` (the policy's initial weights).
    pub fn new(
        program: &'g Program,
        ppo: &Ppo,
        runs: &Path,
        base: &[Source],
        tokenizer: &Tokenizer,
    ) -> Result<Self, RunError> {
        let (e, g) = (&program.experiment, &program.graph);
        let reward_graph = program.reward_model.as_ref().ok_or_else(|| {
            RunError(format!(
                "`{}` was compiled without its reward model",
                e.name
            ))
        })?;
        let nodes = Nodes::of(g)?;
        let trunk = ancestors(g, &[nodes.hidden]);
        let head = ancestors(g, &[nodes.logits])
            .into_iter()
            .filter(|n| !trunk.contains(n))
            .collect();
        let scoring = ancestors(g, &[nodes.log_probs, nodes.ref_log_probs, nodes.values]);
        Ok(Rollouts {
            graph: g,
            nodes,
            trunk,
            head,
            scoring,
            reward: RewardModel::load(e, reward_graph, ppo, runs, base)?,
            ppo: ppo.clone(),
            eos: tokenizer.token_to_id(END_OF_TEXT).map(i64::from),
            seq_len: e.train.seq_len as usize,
            format: Format::of(e.train.precision),
        })
    }

    /// Samples a response after each prompt, up to `response_length` tokens, the end-of-text
    /// token or `seq_len`, whichever comes first. The draw of row r's token at position t is
    /// `key`'s (r, t), whatever else is sampled with it.
    fn sample(
        &self,
        params: &Params,
        prompts: &[&Example],
        key: Key,
    ) -> Result<Vec<Sequence>, RunError> {
        let ops = RankOps::default();
        let mut seqs: Vec<Sequence> = prompts
            .iter()
            .map(|p| {
                // Room for a response; a long prompt keeps its end, which leads into it.
                let ids = p.ids[p.ids.len().saturating_sub(self.seq_len - 1)..].to_vec();
                Sequence {
                    prompt: ids.len(),
                    ids,
                }
            })
            .collect();
        let limit = |s: &Sequence| (s.prompt + self.ppo.response_length as usize).min(self.seq_len);
        let mut active: Vec<usize> = (0..seqs.len()).collect();
        while !active.is_empty() {
            let batch = inputs(active.iter().map(|&r| &seqs[r]));
            let trunk = Segment::forward(
                self.graph,
                params,
                &batch,
                &ops,
                &self.trunk,
                Vec::new(),
                None,
            )
            .map_err(exec)?;
            let hidden = trunk
                .value(self.nodes.hidden)
                .map_err(exec)?
                .to_host()
                .map_err(exec)?;
            drop(trunk);
            // Only each row's last position chooses a token: the head runs on those alone.
            let (width, h) = (hidden.shape[1], hidden.shape[2]);
            let last: Vec<f32> = active
                .iter()
                .enumerate()
                .flat_map(|(i, &r)| {
                    let at = (i * width + seqs[r].ids.len() - 1) * h;
                    hidden.data[at..at + h].iter().copied()
                })
                .collect();
            let last = HostTensor {
                shape: vec![active.len(), 1, h],
                data: last,
            };
            let received = vec![(self.nodes.hidden, Value::from_host(last).map_err(exec)?)];
            let head =
                Segment::forward(self.graph, params, &batch, &ops, &self.head, received, None)
                    .map_err(exec)?;
            let logits = head
                .value(self.nodes.logits)
                .map_err(exec)?
                .to_host()
                .map_err(exec)?;
            let vocab = logits.shape[2];
            for (i, &r) in active.iter().enumerate() {
                let u = key.fold(r as u64).uniform(seqs[r].ids.len() as u64);
                let token = draw(&logits.data[i * vocab..(i + 1) * vocab], u);
                seqs[r].ids.push(token as i64);
            }
            active.retain(|&r| {
                let s = &seqs[r];
                s.ids.last().copied() != self.eos && s.ids.len() < limit(s)
            });
        }
        Ok(seqs)
    }

    /// Samples responses to `prompts` with the policy's current `values` and scores them: the
    /// rollout PPO's next updates train on, its KL penalty weighted by `kl_coef`.
    pub fn collect(
        &self,
        values: &[HostTensor],
        prompts: &[&Example],
        key: Key,
        kl_coef: f64,
    ) -> Result<Rollout, RunError> {
        let params = Params::new(self.graph, values, self.format).map_err(exec)?;
        let sequences = self.sample(&params, prompts, key)?;
        let scores = self.reward.scores(&sequences)?;
        let width = sequences.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let mut batch = inputs(&sequences);
        batch
            .ints
            .insert(self.nodes.taken.clone(), taken_tokens(&sequences, width));
        let ops = RankOps::default();
        let out = Segment::forward(
            self.graph,
            &params,
            &batch,
            &ops,
            &self.scoring,
            Vec::new(),
            None,
        )
        .map_err(exec)?;
        let read = |n: NodeIndex| -> Result<Vec<f64>, RunError> {
            let t = out.value(n).map_err(exec)?.to_host().map_err(exec)?;
            Ok(t.data.iter().map(|&x| f64::from(x)).collect())
        };
        let log_probs = read(self.nodes.log_probs)?;
        let ref_log_probs = read(self.nodes.ref_log_probs)?;
        let values = read(self.nodes.values)?;
        let (mut all_advantages, mut per_row, mut kl) = (Vec::new(), Vec::new(), 0.0);
        for ((r, seq), score) in sequences.iter().enumerate().zip(&scores) {
            let at: Vec<usize> = seq.choices().map(|t| r * width + t).collect();
            let penalty: Vec<f64> = at
                .iter()
                .map(|&i| log_probs[i] - ref_log_probs[i])
                .collect();
            kl += penalty.iter().sum::<f64>();
            let mut rewards: Vec<f64> = penalty.iter().map(|k| -kl_coef * k).collect();
            if let Some(last) = rewards.last_mut() {
                *last += score;
            }
            let v: Vec<f64> = at.iter().map(|&i| values[i]).collect();
            let (advantages, returns) = gae(&rewards, &v, self.ppo.gamma, self.ppo.lambda);
            all_advantages.extend(advantages);
            per_row.push((at, returns, v));
        }
        whiten(&mut all_advantages);
        let mut whitened = all_advantages.into_iter();
        let channels = per_row
            .into_iter()
            .map(|(at, returns, v)| {
                at.iter()
                    .zip(returns)
                    .zip(v)
                    .map(|((&i, ret), v)| {
                        let advantage = whitened.next().unwrap_or_default();
                        [advantage, ret, log_probs[i], v].map(|x| x as f32)
                    })
                    .collect()
            })
            .collect();
        let n = sequences.len().max(1) as f64;
        let response_length = sequences
            .iter()
            .map(|s| (s.ids.len() - s.prompt) as f64)
            .sum::<f64>()
            / n;
        Ok(Rollout {
            sequences,
            channels,
            reward: scores.iter().sum::<f64>() / n,
            kl: kl / n,
            response_length,
        })
    }

    /// The rollout as the PPO graph's batches of `micro` sequences each, without dropout (the
    /// ratio to the sampling policy must start at 1).
    pub fn batches(&self, rollout: &Rollout, micro: usize) -> Vec<Batch> {
        rollout
            .sequences
            .chunks(micro)
            .zip(rollout.channels.chunks(micro))
            .map(|(seqs, channels)| {
                let width = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
                let mut data = vec![0.0f32; seqs.len() * width * 4];
                for (r, (s, row)) in seqs.iter().zip(channels).enumerate() {
                    for (t, c) in s.choices().zip(row) {
                        let at = (r * width + t) * 4;
                        data[at..at + 4].copy_from_slice(c);
                    }
                }
                let mut b = inputs(seqs);
                b.ints
                    .insert(self.nodes.taken.clone(), taken_tokens(seqs, width));
                b.floats.insert(
                    self.nodes.rollout.clone(),
                    HostTensor {
                        shape: vec![seqs.len(), width, 4],
                        data,
                    },
                );
                b
            })
            .collect()
    }

    /// The mean reward-model score of responses sampled to `prompts` (for evaluation).
    pub fn mean_reward(
        &self,
        values: &[HostTensor],
        prompts: &[&Example],
        key: Key,
    ) -> Result<f64, RunError> {
        let params = Params::new(self.graph, values, self.format).map_err(exec)?;
        let sequences = self.sample(&params, prompts, key)?;
        let scores = self.reward.scores(&sequences)?;
        Ok(scores.iter().sum::<f64>() / scores.len().max(1) as f64)
    }
}

/// PPO's updates on one rollout (`micros`, the mesh's microbatches): `epochs` optimizer steps
/// over the whole of it (TRL's PPO epochs with one mini-batch), counted from 1 across the run
/// for Adam's bias correction. Loss, norm and figures are their means; collective time adds up.
pub(super) fn updates(
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
        overflowed: false,
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
        mean.overflowed |= out.overflowed;
        mean.collective_seconds += out.collective_seconds;
        for (name, x) in out.stats {
            *mean.stats.entry(name).or_default() += x * share as f32;
        }
    }
    Ok(mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gae_with_lambda_one_is_the_reward_to_go_minus_the_value() {
        let rewards = [0.5, -0.25, 2.0];
        let values = [0.1, 0.2, 0.3];
        let (adv, ret) = gae(&rewards, &values, 1.0, 1.0);
        let to_go = [2.25, 1.75, 2.0];
        for t in 0..3 {
            assert!((adv[t] - (to_go[t] - values[t])).abs() < 1e-12);
            assert!((ret[t] - to_go[t]).abs() < 1e-12);
        }
        // λ = 0: one-step temporal differences, discounted by γ.
        let (adv, _) = gae(&rewards, &values, 0.9, 0.0);
        assert!((adv[0] - (0.5 + 0.9 * 0.2 - 0.1)).abs() < 1e-12);
        assert!((adv[2] - (2.0 - 0.3)).abs() < 1e-12);
    }

    #[test]
    fn the_adaptive_kl_coefficient_moves_as_trl_moves_it() {
        // 256 sequences over a horizon of 10,000, the error clipped to ±0.2 either way.
        let up = adapt_kl_coef(0.2, 8.0, 6.0, 10_000, 256);
        assert!((up - 0.2 * (1.0 + 0.2 * 0.0256)).abs() < 1e-15, "{up}");
        let down = adapt_kl_coef(0.2, 3.0, 6.0, 10_000, 256);
        assert!((down - 0.2 * (1.0 - 0.2 * 0.0256)).abs() < 1e-15, "{down}");
        // Inside the band the error is proportional: 6.6 is 10% over.
        let near = adapt_kl_coef(0.2, 6.6, 6.0, 10_000, 256);
        assert!((near - 0.2 * (1.0 + 0.1 * 0.0256)).abs() < 1e-12, "{near}");
    }

    #[test]
    fn whitening_centres_and_scales_with_the_unbiased_variance() {
        let mut xs = vec![1.0, 2.0, 3.0, 6.0];
        whiten(&mut xs);
        let mean: f64 = xs.iter().sum::<f64>() / 4.0;
        let var: f64 = xs.iter().map(|x| x * x).sum::<f64>() / 3.0;
        assert!(mean.abs() < 1e-12);
        assert!((var - 1.0).abs() < 1e-6, "{var}");
    }

    #[test]
    fn draws_follow_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let key = Key::of(7, crate::rng::Purpose::Sampling);
        let counts = (0..4000).fold([0usize; 3], |mut c, i| {
            c[draw(&logits, key.uniform(i))] += 1;
            c
        });
        assert_eq!(counts[2], 0);
        let share = counts[1] as f64 / 4000.0;
        assert!((share - 0.75).abs() < 0.03, "{share}");
    }
}
