//! Objectives: cross-entropy (and how many labelled positions it averages over), the
//! log-probabilities of taken tokens, PET's class logits, the reward model's pairwise loss,
//! PPO's clipped losses, and weighted sums of losses; with a vocabulary-parallel shard, the
//! cross-entropy and log-probabilities of a rank's columns of the vocabulary.

use super::misrouted;
use crate::exec::interpreter::Interpreter;
use crate::exec::kernels;
use crate::exec::value::V;
use crate::exec::{err, Batch, Dev, ExecError, Stats, Tape, T2, T3};
use crate::parallel::tensor_parallel::VocabShard;
use dfdx::prelude::*;
use kiln_compiler::graph::{Graph, Op};
use petgraph::graph::NodeIndex;
use std::collections::BTreeMap;

/// Computes node `n`, whose op is of this family.
pub(super) fn forward(it: &mut Interpreter<'_>, n: NodeIndex, op: Op) -> Result<V, ExecError> {
    match op {
        Op::GatherClasses { .. } => gather_classes(it, n),
        Op::CrossEntropy { .. } => cross_entropy(it, n, None),
        Op::WeightedSum { weights } => weighted_sum(it, n, &weights),
        Op::PairwiseLoss => pairwise_loss(it, n),
        Op::TokenLogProbs => token_log_probs(it, n, None),
        Op::PpoLoss {
            clip,
            value_clip,
            value_coef,
            ..
        } => {
            let knobs = PpoKnobs {
                clip: clip as f32,
                value_clip: value_clip as f32,
                value_coef: value_coef as f32,
            };
            ppo_loss(it, n, knobs)
        }
        other => Err(misrouted("loss", &other)),
    }
}

/// Node `n` computed from this rank's columns of the vocabulary (`RankOps::vocab_parallel`):
/// token log-probabilities, or a cross-entropy.
pub(in crate::exec) fn forward_sharded(
    it: &mut Interpreter<'_>,
    n: NodeIndex,
    shard: VocabShard,
) -> Result<V, ExecError> {
    match it.g.dag[n].op {
        Op::TokenLogProbs => token_log_probs(it, n, Some(shard)),
        _ => cross_entropy(it, n, Some(shard)),
    }
}

/// Per-row class scores, when `values` holds them (PET's verbalizer logits).
pub(in crate::exec) fn class_logits(g: &Graph, values: &[Option<V>]) -> Option<Vec<Vec<f32>>> {
    g.dag
        .node_indices()
        .find(|&n| matches!(g.dag[n].op, Op::GatherClasses { .. }))
        .and_then(|n| match &values[n.index()] {
            Some(V::R2(t)) => {
                let (_, classes) = *t.shape();
                Some(t.as_vec().chunks(classes).map(<[f32]>::to_vec).collect())
            }
            _ => None,
        })
}

/// PET's class scores: the logits of each class's verbalizer token, `[b, V]` → `[b, classes]`.
fn gather_classes(it: &mut Interpreter<'_>, n: NodeIndex) -> Result<V, ExecError> {
    let x = it.input(n, 0)?.r2("logits")?;
    let ids = it
        .batch
        .class_token_ids
        .clone()
        .ok_or_else(|| ExecError("the batch has no verbalizer token ids".into()))?;
    let c = ids.len();
    let idx: Tensor<(usize,), usize, Dev> = it.dev.tensor_from_vec(ids, (c,));
    let tape = it.take_tape();
    let picked: Tensor<(usize, usize), f32, Dev, Tape> =
        x.put_tape(tape).permute::<_, Axes2<1, 0>>().gather(idx);
    Ok(it.keep2(picked.permute::<_, Axes2<1, 0>>()))
}

/// `Σ wᵢ·lossᵢ` of scalar losses.
fn weighted_sum(it: &mut Interpreter<'_>, n: NodeIndex, weights: &[f64]) -> Result<V, ExecError> {
    let mut parts = Vec::new();
    for (i, w) in weights.iter().enumerate() {
        parts.push((it.input(n, i)?.scalar("loss")?, *w as f32));
    }
    let mut iter = parts.into_iter();
    let Some((first, w0)) = iter.next() else {
        return err("empty weighted sum");
    };
    let mut total = first.put_tape(it.take_tape()) * w0;
    for (t, w) in iter {
        // The tape goes on the left of every product, so each term is recorded.
        let (sum, tape) = total.split_tape();
        total = t.put_tape(tape) * w + sum;
    }
    Ok(it.keep0(total))
}

/// The reward model's loss over rows that alternate chosen, rejected: −log σ(r_chosen −
/// r_rejected), averaged over the pairs.
fn pairwise_loss(it: &mut Interpreter<'_>, n: NodeIndex) -> Result<V, ExecError> {
    let rewards = it.input(n, 0)?.r2("rewards")?;
    let rows = rewards.shape().0;
    if rows % 2 != 0 {
        return err("a reward batch holds chosen/rejected pairs: it needs an even number of rows");
    }
    let pairs = rows / 2;
    let (x, tape) = rewards
        .put_tape(it.take_tape())
        .reshape_like(&(pairs, 2))
        .split_tape();
    let (chosen, tape) = x
        .clone()
        .put_tape(tape)
        .slice((.., 0..1))
        .realize::<(usize, usize)>()
        .split_tape();
    let (rejected, tape) = x
        .put_tape(tape)
        .slice((.., 1..2))
        .realize::<(usize, usize)>()
        .split_tape();
    let margin = chosen.put_tape(tape) - rejected;
    let loss = (margin.negate().exp() + 1.0).ln().mean::<(), _>();
    Ok(it.keep0(loss))
}

/// Cross-entropy node `n`: over every position of `[b, s, vocab]` logits (shifted for
/// causal LM), or over `[b, classes]` logits; with a shard, of this rank's columns of the
/// vocabulary (see [`VocabShard`]).
fn cross_entropy(
    it: &mut Interpreter<'_>,
    n: NodeIndex,
    shard: Option<VocabShard>,
) -> Result<V, ExecError> {
    let Op::CrossEntropy { shift } = it.g.dag[n].op else {
        return err("not a cross-entropy");
    };
    let labels = it.input(n, 1)?.ints("labels")?.clone();
    let count = it.batch.label_counts.get(&n).copied();
    match it.input(n, 0)?.clone() {
        V::R3(logits) => token_cross_entropy(it, logits, &labels, shift, count, shard),
        V::R2(logits) => {
            let (b, c) = *logits.shape();
            // Reshaping may copy: do it on the tape so the gradient reaches `logits`.
            let (logits, tape) = logits
                .put_tape(it.take_tape())
                .reshape_like(&(b, 1, c))
                .split_tape();
            it.tape = tape;
            token_cross_entropy(it, logits, &labels, false, count, shard)
        }
        _ => err("cross-entropy of an unsupported rank"),
    }
}

/// Cross-entropy summed over positions whose label is not −100, divided by `count` (by
/// their number when `None`).
fn token_cross_entropy(
    it: &mut Interpreter<'_>,
    logits: T3,
    labels: &[Vec<i64>],
    shift: bool,
    count: Option<f32>,
    shard: Option<VocabShard>,
) -> Result<V, ExecError> {
    let (b, s, width) = *logits.shape();
    let vocab = shard.as_ref().map_or(width, |sh| sh.at.vocab);
    let (positions, offset) = if shift { (s - 1, 1) } else { (s, 0) };
    let labelled = position_targets(labels, b, positions, offset, vocab)?;
    let targets: Vec<usize> = labelled.iter().map(|t| t.unwrap_or(0)).collect();
    let weights: Vec<f32> = labelled
        .iter()
        .map(|t| f32::from(u8::from(t.is_some())))
        .collect();
    let count = count.unwrap_or_else(|| weights.iter().sum());
    if count == 0.0 {
        return err("no position has a label");
    }
    let logits = logits.put_tape(it.take_tape());
    let loss = kernels::cross_entropy(logits, positions, targets, weights, count, shard)
        .map_err(ExecError)?;
    Ok(it.keep0(loss))
}

/// `log softmax(logits)[token]` at each position, 0 where the token is −100.
fn token_log_probs(
    it: &mut Interpreter<'_>,
    n: NodeIndex,
    shard: Option<VocabShard>,
) -> Result<V, ExecError> {
    let logits = it.input(n, 0)?.r3("logits")?;
    let taken = it.input(n, 1)?.ints("tokens")?.clone();
    let (b, s, width) = *logits.shape();
    let vocab = shard.as_ref().map_or(width, |sh| sh.at.vocab);
    if taken.len() != b || taken.iter().any(|row| row.len() != s) {
        return err("the taken tokens do not match the logits' positions");
    }
    let mut targets = Vec::with_capacity(b * s);
    for &t in taken.iter().flatten() {
        if t >= vocab as i64 {
            return err(format!("token {t} is outside the vocabulary of {vocab}"));
        }
        targets.push(usize::try_from(t).ok());
    }
    let logits = logits.put_tape(it.take_tape());
    let out = kernels::token_log_probs(logits, targets, shard).map_err(ExecError)?;
    Ok(it.keep2(out))
}

/// TRL's PPO loss over the response tokens (where the policy's log-probs have a taken token),
/// as means over them:
/// max(−A·r, −A·clip(r, 1 ± ε)) with r = exp(log π − log π_old), plus `value_coef` ·
/// ½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²). The branch each max takes is
/// decided here from the forward values: the gradient of the max is the gradient of that
/// branch, and a clipped branch is constant in the parameters, so the taped loss is the
/// unclipped terms where they win plus constants (same value, same gradient, plain ops on
/// either device).
fn ppo_loss(it: &mut Interpreter<'_>, node: NodeIndex, knobs: PpoKnobs) -> Result<V, ExecError> {
    let logp = it.input(node, 0)?.r2("log-probs")?;
    let values = it.input(node, 2)?.r3("values")?;
    let rollout = it.input(node, 3)?.r3("rollout")?;
    // Response tokens are where the policy's log-probs have a taken token.
    let taken = it.g.inputs(it.g.inputs(node)[0])[1];
    if it.values[taken.index()].is_none() {
        it.compute(taken)?;
    }
    let response: Vec<bool> = it.values[taken.index()]
        .as_ref()
        .ok_or_else(|| ExecError("the taken tokens are not computed".into()))?
        .ints("tokens")?
        .iter()
        .flatten()
        .map(|&t| t >= 0)
        .collect();
    let (b, s) = *logp.shape();
    if *values.shape() != (b, s, 1) || *rollout.shape() != (b, s, 4) || response.len() != b * s {
        return err(format!(
            "log-probs {:?}, values {:?} and rollout {:?} do not match",
            logp.shape(),
            values.shape(),
            rollout.shape()
        ));
    }
    let tokens = response.iter().filter(|&&r| r).count();
    if tokens == 0 {
        return err("the batch has no response token");
    }
    let n = tokens as f32;
    let (lp, v, roll) = (logp.as_vec(), values.as_vec(), rollout.as_vec());
    let PpoKnobs {
        clip,
        value_clip,
        value_coef,
    } = knobs;
    // Per token: the old log-prob, the return, and each unclipped term's weight where it
    // is the max (0 elsewhere); the clipped terms that win add constants.
    let (mut old, mut ret) = (vec![0.0f32; b * s], vec![0.0f32; b * s]);
    let (mut policy_w, mut value_w) = (vec![0.0f32; b * s], vec![0.0f32; b * s]);
    let (mut constant, mut policy, mut value, mut kl) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let (mut clipped, mut value_clipped) = (0usize, 0usize);
    for i in (0..b * s).filter(|&i| response[i]) {
        let [adv, target, old_lp, old_v] = [0, 1, 2, 3].map(|c| roll[4 * i + c]);
        (old[i], ret[i]) = (old_lp, target);
        let ratio = (lp[i] - old_lp).exp();
        let (free, held) = (-adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + clip));
        if held > free {
            clipped += 1;
            constant += f64::from(held) / f64::from(n);
        } else {
            policy_w[i] = -adv / n;
        }
        policy += f64::from(free.max(held));
        let v_held = old_v + (v[i] - old_v).clamp(-value_clip, value_clip);
        let (free, held) = ((v[i] - target).powi(2), (v_held - target).powi(2));
        if held > free {
            value_clipped += 1;
            constant += f64::from(value_coef * 0.5 * held / n);
        } else {
            value_w[i] = value_coef * 0.5 / n;
        }
        value += f64::from(free.max(held));
        kl += f64::from((lp[i] - old_lp).powi(2));
    }
    let tokens = tokens as f64;
    it.stats = Stats::from([
        ("policy_loss", (policy / tokens) as f32),
        ("value_loss", (0.5 * value / tokens) as f32),
        ("clip_fraction", (clipped as f64 / tokens) as f32),
        (
            "value_clip_fraction",
            (value_clipped as f64 / tokens) as f32,
        ),
        // TRL's `approxkl` between the sampling policy and this one.
        ("approx_kl", (0.5 * kl / tokens) as f32),
    ]);
    let tensor = |data: Vec<f32>| -> T2 { it.dev.tensor_from_vec(data, (b, s)) };
    let (old, ret, policy_w, value_w) =
        (tensor(old), tensor(ret), tensor(policy_w), tensor(value_w));
    let tape = it.take_tape();
    let (policy, tape) = ((logp.put_tape(tape) - old).exp() * policy_w)
        .sum::<(), _>()
        .split_tape();
    let values = values.put_tape(tape).reshape_like(&(b, s));
    let value = ((values - ret).square() * value_w).sum::<(), _>();
    Ok(it.keep0(value + policy + constant as f32))
}

/// The clipping ranges of PPO's policy ratio and value, and the value loss's weight.
struct PpoKnobs {
    clip: f32,
    value_clip: f32,
    value_coef: f32,
}

/// The label a cross-entropy over `positions` positions of `rows` rows reads at each: the
/// row's from `offset` on (the next token's under a shift; a class's at 0), −100 (none) past
/// its end.
fn position_labels(
    labels: &[Vec<i64>],
    rows: usize,
    positions: usize,
    offset: usize,
) -> impl Iterator<Item = i64> + '_ {
    labels.iter().take(rows).flat_map(move |row| {
        (0..positions).map(move |t| row.get(t + offset).copied().unwrap_or(-100))
    })
}

/// The token each of `positions` positions of `rows` rows predicts (labels from `offset` on),
/// checked against the vocabulary; `None` where the label is −100 (no loss there).
pub(crate) fn position_targets(
    labels: &[Vec<i64>],
    rows: usize,
    positions: usize,
    offset: usize,
    vocab: usize,
) -> Result<Vec<Option<usize>>, ExecError> {
    position_labels(labels, rows, positions, offset)
        .map(|label| match usize::try_from(label) {
            Err(_) => Ok(None),
            Ok(t) if t < vocab => Ok(Some(t)),
            Ok(_) => err(format!(
                "label {label} is outside the vocabulary of {vocab}"
            )),
        })
        .collect()
}

/// How many labelled positions each cross-entropy node of `g` averages over in `batch` (what
/// it divides by unless the batch says otherwise: `Batch::label_counts`).
pub fn label_counts(g: &Graph, batch: &Batch) -> Result<BTreeMap<NodeIndex, f64>, ExecError> {
    let mut counts = BTreeMap::new();
    for n in g.dag.node_indices() {
        let Op::CrossEntropy { shift } = g.dag[n].op else {
            continue;
        };
        let &[logits, labels] = g.inputs(n).as_slice() else {
            return err(format!(
                "`{}` does not read logits and labels",
                g.dag[n].name
            ));
        };
        let name = &g.dag[labels].name;
        let Some(labels) = batch.ints.get(name) else {
            return err(format!("the batch has no `{name}`"));
        };
        // Token logits `[b, s, vocab]` (shifted for causal LM), or class logits `[b, classes]`.
        let (positions, offset) = match g.dag[logits].out.shape[..] {
            [_, s, _] if shift => (s as usize - 1, 1),
            [_, s, _] => (s as usize, 0),
            _ => (1, 0),
        };
        let labelled = position_labels(labels, labels.len(), positions, offset)
            .filter(|&l| l >= 0)
            .count();
        counts.insert(n, labelled as f64);
    }
    Ok(counts)
}
