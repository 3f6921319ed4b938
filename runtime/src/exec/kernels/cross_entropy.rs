//! Log-softmax at a target per row, in one pass over the logits: cross-entropy losses and the
//! log-probabilities of taken tokens, whole or over a rank's columns of a vocabulary split
//! across a tensor-parallel group.

use super::buffer::{elements, row_major, vectorized, Shared};
use super::math::exp;
use super::{Taped, R3};
use crate::comm::Collective;
use crate::parallel::tensor_parallel::VocabShard;
use dfdx::prelude::*;
use rayon::prelude::*;

/// Σ weight·(−log softmax(logits)[target]) / count over rows of `logits` `[b, s, vocab]`,
/// reading the first `positions` of each sequence; `targets` and `weights` are `[b·positions]`.
///
/// With a `shard`, `logits` holds the shard's columns of the vocabulary: each rank's log Σ exp
/// and target logit per row are all-gathered (two values a row) and combined in rank order, so
/// every rank computes the same loss, and the backward needs no communication.
pub fn cross_entropy(
    logits: Taped<R3>,
    positions: usize,
    targets: Vec<usize>,
    weights: Vec<f32>,
    count: f32,
    shard: Option<VocabShard>,
) -> Result<Taped<()>, String> {
    let (b, s, width) = *logits.shape();
    let read = TargetRows {
        starts: (0..targets.len())
            .map(|i| (i / positions.max(1) * s + i % positions.max(1)) * width)
            .collect(),
        // Rows without weight are not read.
        targets: targets
            .iter()
            .zip(&weights)
            .map(|(&t, &w)| (w != 0.0).then_some(t))
            .collect(),
        ..TargetRows::over(width, shard.as_ref())
    };
    // Rows are written by parallel tasks through a raw pointer: each target must name its own
    // row and a word of the vocabulary.
    if positions == 0
        || positions > s
        || targets.len() != weights.len()
        || targets.len() > b * positions
        || targets.len() % positions != 0
        || !read.fits(&targets)
    {
        return Err(format!(
            "cross-entropy of {} targets over {positions} of {s} positions, vocabulary {} ({width} columns here)",
            targets.len(),
            read.vocab
        ));
    }
    let (logits, mut tape) = row_major(logits).split_tape();
    let (lse, picked) = read.statistics(&elements(&logits), shard)?;
    let loss = {
        let total: f64 = (0..targets.len())
            .map(|i| f64::from(weights[i] * (lse[i] - picked[i])))
            .sum();
        (total / f64::from(count)) as f32
    };
    let out = logits.device().tensor(loss);
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    tape.add_backward_op(move |grads| {
        let g = grads.get_or_alloc_mut(&out)?[0] / count;
        let xs = elements(&logits);
        // Written straight into the logits' gradient: over a large vocabulary it is the
        // biggest buffer of the step, and a second one would double the head's memory.
        let acc = grads.get_or_alloc_mut(&logits)?;
        read.add_gradient(acc, &xs, &lse, |i| g * weights[i]);
        Ok(())
    });
    Ok(result.put_tape(tape))
}

/// The rows of `[.., width]` logits a log-softmax reads at a target: where each row starts and
/// its target (`None`: the row is not read), over this rank's columns of the vocabulary.
struct TargetRows {
    starts: Vec<usize>,
    targets: Vec<Option<usize>>,
    width: usize,
    /// The global vocabulary ids of the logits' columns, and the whole vocabulary.
    columns: std::ops::Range<usize>,
    vocab: usize,
}

impl TargetRows {
    /// No rows yet, over all `width` columns or a shard's.
    fn over(width: usize, shard: Option<&VocabShard>) -> TargetRows {
        TargetRows {
            starts: Vec::new(),
            targets: Vec::new(),
            width,
            columns: shard.map_or(0..width, |sh| sh.at.columns.clone()),
            vocab: shard.map_or(width, |sh| sh.at.vocab),
        }
    }

    /// Whether the columns match the logits and every target names a word of the vocabulary.
    fn fits(&self, targets: &[usize]) -> bool {
        self.columns.len() == self.width
            && self.columns.end <= self.vocab
            && targets.iter().all(|&t| t < self.vocab)
    }

    /// The target's column here, if this rank holds it.
    fn local(&self, t: usize) -> Option<usize> {
        self.columns.contains(&t).then(|| t - self.columns.start)
    }

    /// Per row, log Σ exp over the whole vocabulary and the target's logit (0 for rows not
    /// read); over a shard, combined across its group (see [`combine_shards`]).
    fn statistics(
        &self,
        xs: &[f32],
        shard: Option<VocabShard>,
    ) -> Result<(Vec<f32>, Vec<f32>), String> {
        let (lse, picked): (Vec<f32>, Vec<f32>) = self
            .targets
            .par_iter()
            .zip(&self.starts)
            .map(|(t, &at)| match t {
                Some(t) => {
                    let x = &xs[at..at + self.width];
                    let target = self.local(*t).map_or(0.0, |t| x[t]);
                    (vectorized(|| log_sum_exp(x)), target)
                }
                None => (0.0, 0.0),
            })
            .unzip();
        match shard {
            Some(shard) => combine_shards(shard.group, &lse, &picked),
            None => Ok((lse, picked)),
        }
    }

    /// `acc += coef(i) · (softmax(x) − onehot(target))` on each row read: the gradient of
    /// −coef · log softmax(x)[target], over this rank's columns.
    fn add_gradient(
        &self,
        acc: &mut [f32],
        xs: &[f32],
        lse: &[f32],
        coef: impl Fn(usize) -> f32 + Sync,
    ) {
        let shared = Shared(acc.as_mut_ptr());
        self.targets.par_iter().enumerate().for_each(|(i, t)| {
            let Some(t) = *t else { return };
            let at = self.starts[i];
            let scale = coef(i);
            let dst = shared;
            // SAFETY: each row read is written by its task alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.0.add(at), self.width) };
            vectorized(|| add_softmax(dst, &xs[at..at + self.width], lse[i], scale));
            if let Some(t) = self.local(t) {
                dst[t] -= scale;
            }
        });
    }
}

/// Every rank's per-row log Σ exp and target logit, all-gathered and combined in rank order
/// (the same arithmetic on every rank): the log Σ exp over the whole vocabulary, and the
/// target's logit from the rank holding it (the others hold 0).
fn combine_shards(
    group: &mut dyn Collective,
    lse: &[f32],
    picked: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let (rows, size) = (lse.len(), group.size());
    let mut buf = vec![0.0; 2 * rows * size];
    let mine = group.shard(buf.len());
    if mine.len() != 2 * rows {
        return Err(format!(
            "a vocabulary shard of {} values, not {}",
            mine.len(),
            2 * rows
        ));
    }
    buf[mine.clone()][..rows].copy_from_slice(lse);
    buf[mine][rows..].copy_from_slice(picked);
    group.all_gather(&mut buf).map_err(|e| e.0)?;
    let shards: Vec<&[f32]> = (0..size)
        .map(|r| &buf[group.shard_of(buf.len(), r)])
        .collect();
    let lse = (0..rows)
        .map(|i| {
            let max = shards.iter().fold(f32::NEG_INFINITY, |m, sh| m.max(sh[i]));
            max + shards.iter().map(|sh| exp(sh[i] - max)).sum::<f32>().ln()
        })
        .collect();
    let picked = (0..rows)
        .map(|i| shards.iter().map(|sh| sh[rows + i]).sum())
        .collect();
    Ok((lse, picked))
}

/// log Σ exp over a row of logits.
#[inline(always)]
fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    max + x.iter().map(|v| exp(v - max)).sum::<f32>().ln()
}

/// `dst += scale · softmax(x)`, from the row's log Σ exp: the part of a log-softmax's gradient
/// every logit gets (the target's one-hot part is the caller's).
#[inline(always)]
fn add_softmax(dst: &mut [f32], x: &[f32], lse: f32, scale: f32) {
    for (d, &x) in dst.iter_mut().zip(x) {
        *d += scale * exp(x - lse);
    }
}

/// `log softmax(logits)[target]` at every position of `logits` `[b, s, vocab]` (`targets` is
/// `[b·s]`), 0 where there is no target. One pass per row, no `[b, s, vocab]` intermediate
/// (dfdx's log-softmax allocates several). With a `shard`, `logits` holds the shard's columns
/// of the vocabulary, as in [`cross_entropy`].
pub fn token_log_probs(
    logits: Taped<R3>,
    targets: Vec<Option<usize>>,
    shard: Option<VocabShard>,
) -> Result<Taped<(usize, usize)>, String> {
    let (logits, mut tape) = row_major(logits).split_tape();
    let (b, s, width) = *logits.shape();
    let named: Vec<usize> = targets.iter().flatten().copied().collect();
    let read = TargetRows {
        starts: (0..targets.len()).map(|i| i * width).collect(),
        targets,
        ..TargetRows::over(width, shard.as_ref())
    };
    if read.targets.len() != b * s || !read.fits(&named) {
        return Err(format!(
            "log-probabilities of {} tokens at {b}×{s} positions, vocabulary {} ({width} columns here)",
            read.targets.len(),
            read.vocab
        ));
    }
    let (lse, picked) = read.statistics(&elements(&logits), shard)?;
    let log_probs: Vec<f32> = read
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| t.map_or(0.0, |_| picked[i] - lse[i]))
        .collect();
    let out = logits.device().tensor_from_vec(log_probs, (b, s));
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let xs = elements(&logits);
        // d log p_t / d x = onehot(t) − softmax(x), written straight into the logits' gradient.
        let acc = grads.get_or_alloc_mut(&logits)?;
        read.add_gradient(acc, &xs, &lse, |i| -dy[i]);
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    Ok(result.put_tape(tape))
}

/// Each kernel against the same computation written with dfdx's own ops: values and the

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::kernels::testing::*;

    #[test]
    fn inconsistent_shapes_are_errors_not_out_of_bounds_accesses() {
        let logits = t3((2, 3, 4), 63);
        for (positions, targets) in [(4, vec![0; 8]), (3, vec![0; 9]), (3, vec![4; 6])] {
            let weights = vec![1.0; targets.len()];
            let run = cross_entropy(
                logits.clone().leaky_traced(),
                positions,
                targets,
                weights,
                1.0,
                None,
            );
            assert!(run.is_err(), "{positions} positions");
        }
    }

    /// Three ranks holding uneven column ranges of the vocabulary (as the tensor-parallel
    /// layout cuts 11 words) compute the loss of the whole logits, each the same, and together
    /// its gradient, with nothing but two numbers a row exchanged.
    #[test]
    fn vocabulary_parallel_cross_entropy_equals_the_whole_one() {
        use crate::comm::cpu_ring;
        use crate::parallel::tensor_parallel::VocabShard;
        use kiln_compiler::plan::sharding::VocabColumns;
        let (b, s, vocab, size) = (2, 5, 11, 3);
        let whole: Vec<f32> = values(b * s * vocab, 31).iter().map(|v| v * 6.0).collect();
        let positions = s - 1;
        let targets: Vec<usize> = (0..b * positions).map(|i| (i * 5 + 2) % vocab).collect();
        let weights: Vec<f32> = (0..b * positions)
            .map(|i| if i % 3 == 2 { 0.0 } else { 1.0 })
            .collect();
        let count: f32 = weights.iter().sum();
        let logits = Cpu::default().tensor_from_vec(whole.clone(), (b, s, vocab));
        let (ref_loss, ref_grad) = whole_cross_entropy(&logits, positions, &targets, &weights);
        let ranks: Vec<(f32, Vec<f32>, std::ops::Range<usize>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = cpu_ring(size)
                .into_iter()
                .enumerate()
                .map(|(rank, mut ring)| {
                    let (whole, targets, weights) = (&whole, targets.clone(), weights.clone());
                    scope.spawn(move || {
                        let columns = rank * vocab / size..(rank + 1) * vocab / size;
                        let local: Vec<f32> = whole
                            .chunks(vocab)
                            .flat_map(|row| row[columns.clone()].to_vec())
                            .collect();
                        let logits = Cpu::default().tensor_from_vec(local, (b, s, columns.len()));
                        let at = VocabColumns {
                            columns: columns.clone(),
                            vocab,
                        };
                        let loss = cross_entropy(
                            logits.clone().leaky_traced(),
                            positions,
                            targets,
                            weights,
                            count,
                            Some(VocabShard {
                                at: &at,
                                group: &mut ring,
                            }),
                        )
                        .unwrap();
                        let value = loss.as_vec()[0];
                        (value, loss.backward().get(&logits).as_vec(), columns)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (loss, grad, columns) in &ranks {
            close("loss", &[*loss], &[ref_loss], 1e-6);
            let want: Vec<f32> = ref_grad
                .chunks(vocab)
                .flat_map(|row| row[columns.clone()].to_vec())
                .collect();
            close("gradient", grad, &want, 1e-6);
        }
    }

    #[test]
    fn cross_entropy_matches_log_softmax_with_shift_and_ignored_positions() {
        let (b, s, vocab) = (3, 6, 11);
        let logits = Cpu::default().tensor_from_vec(
            values(b * s * vocab, 30).iter().map(|v| v * 8.0).collect(),
            (b, s, vocab),
        );
        let positions = s - 1;
        let targets: Vec<usize> = (0..b * positions).map(|i| (i * 7) % vocab).collect();
        let weights: Vec<f32> = (0..b * positions)
            .map(|i| if i % 4 == 1 { 0.0 } else { 1.0 })
            .collect();
        let count: f32 = weights.iter().sum();
        let (fast_loss, fast_grad) = whole_cross_entropy(&logits, positions, &targets, &weights);
        let dev = Cpu::default();
        let picked: Taped<(usize, usize)> = logits
            .clone()
            .leaky_traced()
            .slice((.., 0..positions, ..))
            .realize::<R3>()
            .log_softmax::<Axis<2>>()
            .select(dev.tensor_from_vec(targets, (b, positions)));
        let reference = (picked * dev.tensor_from_vec(weights, (b, positions)))
            .sum::<(), _>()
            .negate()
            / count;
        let ref_loss = reference.as_vec()[0];
        let ref_grads = reference.backward();
        close("loss", &[fast_loss], &[ref_loss], 1e-6);
        close(
            "dlogits",
            &fast_grad,
            &ref_grads.get(&logits).as_vec(),
            1e-5,
        );
    }

    /// The kernel's loss over all of `logits` and its gradient.
    fn whole_cross_entropy(
        logits: &T3,
        positions: usize,
        targets: &[usize],
        weights: &[f32],
    ) -> (f32, Vec<f32>) {
        let count = weights.iter().sum();
        let loss = cross_entropy(
            logits.clone().leaky_traced(),
            positions,
            targets.to_vec(),
            weights.to_vec(),
            count,
            None,
        )
        .unwrap();
        let value = loss.as_vec()[0];
        (value, loss.backward().get(logits).as_vec())
    }

    #[test]
    fn token_log_probs_match_log_softmax_and_skip_positions_without_a_token() {
        let (b, s, vocab) = (3, 5, 13);
        let logits = t3((b, s, vocab), 31);
        let logits = Cpu::default().tensor_from_vec(
            logits.as_vec().iter().map(|v| v * 6.0).collect(),
            (b, s, vocab),
        );
        let targets: Vec<Option<usize>> = (0..b * s)
            .map(|i| (i % 3 != 0).then_some((i * 5) % vocab))
            .collect();
        let (fast, fast_g) = probe(
            token_log_probs(logits.clone().leaky_traced(), targets.clone(), None).unwrap(),
            32,
        );
        let dev = Cpu::default();
        let ids = targets.iter().map(|t| t.unwrap_or(0)).collect();
        let used = targets
            .iter()
            .map(|t| if t.is_some() { 1.0 } else { 0.0 })
            .collect();
        let picked: Taped<(usize, usize)> = logits
            .clone()
            .leaky_traced()
            .log_softmax::<Axis<2>>()
            .select(dev.tensor_from_vec(ids, (b, s)));
        let (reference, ref_g) = probe(picked * dev.tensor_from_vec(used, (b, s)), 32);
        close("log-probs", &fast, &reference, 1e-6);
        assert!(fast.iter().step_by(3).all(|&v| v == 0.0));
        close(
            "dlogits",
            &fast_g.get(&logits).as_vec(),
            &ref_g.get(&logits).as_vec(),
            1e-5,
        );
    }
}
