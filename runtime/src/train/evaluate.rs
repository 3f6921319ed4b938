//! Evaluation during and after training: the loss (and PET's accuracy) over `data.eval` without
//! dropout, or for PPO the mean reward of responses to its prompts, written to the metrics with
//! the step.

use crate::data::{Example, Inputs};
use crate::exec::precision::Format;
use crate::exec::{forward_backward, Batch};
use crate::gpu::Accelerator;
use crate::parallel::mesh::Mesh;
use crate::rng::{Key, Purpose};
use crate::store::run_dir::MetricsLog;
use crate::tensor::HostTensor;
use crate::train::{share_label_counts, Control, Event, RunError, Steps};
use kiln_compiler::graph::Graph;
use kiln_compiler::spec::Experiment;

/// Loss and accuracy over an evaluation set.
pub(super) struct Evaluation {
    pub(super) loss: f32,
    pub(super) accuracy: Option<f32>,
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
    inputs: &Inputs,
    format: Format,
    gpu: Option<&Accelerator>,
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
        .map(|rows| inputs.batch(rows, seq_len))
        .collect();
    share_label_counts(graph, &mut batches, &shares)?;
    // On the run's GPU: the losses alone (the GPU executor runs no classifying objective).
    if let Some(gpu) = gpu {
        let losses = gpu
            .losses(graph, values, &batches, format)
            .map_err(|err| RunError(format!("evaluation: {err}")))?;
        let loss: f64 = losses
            .iter()
            .zip(&shares)
            .map(|(&l, share)| f64::from(l) * share)
            .sum();
        return Ok(Evaluation {
            loss: loss as f32,
            accuracy: None,
        });
    }
    let (mut loss, mut correct, mut classified) = (0.0f64, 0usize, 0usize);
    for ((b, rows), share) in batches.iter().zip(&chunks).zip(&shares) {
        let out = forward_backward(graph, values, b, format)
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

/// Evaluation during and after training: the loss (and accuracy) over `data.eval`, or for PPO
/// the mean reward of responses to its prompts; written to the metrics with the step.
pub(super) struct Evaluator<'a> {
    pub(super) graph: &'a Graph,
    pub(super) e: &'a Experiment,
    pub(super) set: Option<&'a [Vec<Example>]>,
    pub(super) steps: &'a Steps<'a>,
    /// Records per evaluation batch.
    pub(super) chunk: usize,
    /// Whether the loss is a token cross-entropy (its perplexity is written too).
    pub(super) token_loss: bool,
}

impl Evaluator<'_> {
    pub(super) fn run(
        &self,
        mesh: &mut Mesh,
        step: u64,
        metrics: &mut MetricsLog,
        on_event: &mut impl FnMut(&Event) -> Control,
    ) -> Result<Option<Evaluation>, RunError> {
        let Some(set) = self.set else {
            return Ok(None);
        };
        let values = mesh.values(self.graph)?;
        let inputs = match self.steps {
            Steps::Batches(inputs) => inputs,
            Steps::Rollouts(_, rollouts) => {
                let prompts: Vec<&Example> = set.iter().map(|r| &r[0]).collect();
                let key = Key::of(self.e.train.seed, Purpose::EvalSampling);
                let reward = rollouts.mean_reward(&values, &prompts, key)?;
                metrics.append(&serde_json::json!({ "step": step, "eval_reward": reward }))?;
                return Ok(None);
            }
        };
        let eval = evaluate(
            self.graph,
            &values,
            set,
            self.chunk,
            self.e.train.seq_len as usize,
            inputs,
            Format::of(self.e.train.precision),
            mesh.accelerator(),
        )?;
        let mut line = serde_json::json!({ "step": step, "eval_loss": eval.loss });
        if self.token_loss {
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
