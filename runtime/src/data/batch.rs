//! Batches: an objective's examples padded or truncated to the sequence length (labels −100 and
//! attention mask 0 on padding), and the executor's [`Batch`] of them, with the labels under the
//! names the objective's loss reads ([`Inputs`]).

use crate::data::Example;
use crate::exec::Batch;

/// What a batch of an objective's examples holds besides `input_ids`, `token_type_ids` and the
/// attention mask: the inputs its loss reads.
pub struct Inputs<'o> {
    /// The name of the per-token labels (`labels`, `mlm_labels`), when the loss reads them.
    pub tokens: Option<&'static str>,
    /// The name of each row's class (`next_sentence_labels`, `class_labels`; −100 for a row
    /// without one), when the loss reads them.
    pub classes: Option<&'static str>,
    /// PET: the token of each class's verbalizer word, whose logits at each row's [MASK]
    /// position are the class scores.
    pub verbalizer: Option<&'o [usize]>,
}

impl Inputs<'_> {
    /// The executor's inputs for `rows`, padded or truncated to `seq_len`.
    pub fn batch(&self, rows: &[&Example], seq_len: usize) -> Batch {
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
        if let Some(name) = self.tokens {
            b.ints.insert(name.into(), labels);
        }
        if let Some(name) = self.classes {
            let classes = rows.iter().map(|r| vec![r.class.unwrap_or(-100)]).collect();
            b.ints.insert(name.into(), classes);
        }
        if let Some(verbalizer) = self.verbalizer {
            b.mask_positions = Some(rows.iter().map(|r| r.mask_position.unwrap_or(0)).collect());
            b.class_token_ids = Some(verbalizer.to_vec());
        }
        b
    }
}

/// Rows of a batch, padded or truncated to one length.
struct PaddedBatch {
    ids: Vec<Vec<i64>>,
    types: Vec<Vec<i64>>,
    /// −100 on padding.
    labels: Vec<Vec<i64>>,
    mask: Vec<Vec<i64>>,
}

/// Pads (or truncates) `examples` to `seq_len`.
fn pad_batch(examples: &[&Example], seq_len: usize, pad: i64) -> PaddedBatch {
    let mut out = PaddedBatch {
        ids: Vec::new(),
        types: Vec::new(),
        labels: Vec::new(),
        mask: Vec::new(),
    };
    for ex in examples {
        let real = ex.ids.len().min(seq_len);
        let mut ids = ex.ids[..real].to_vec();
        let mut labels: Vec<i64> = ex.labels.iter().take(real).copied().collect();
        let mut mask = vec![1; real];
        ids.resize(seq_len, pad);
        labels.resize(seq_len, -100);
        mask.resize(seq_len, 0);
        let mut types: Vec<i64> = ex.types.iter().take(real).copied().collect();
        types.resize(seq_len, 0);
        out.ids.push(ids);
        out.types.push(types);
        out.labels.push(labels);
        out.mask.push(mask);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_pad_with_ignored_labels_and_truncate() {
        let a = Example {
            ids: vec![5, 6, 7],
            labels: vec![-100, 6, 7],
            ..Example::default()
        };
        let b = Example {
            ids: vec![1, 2, 3, 4, 5, 6],
            labels: vec![1, 2, 3, 4, 5, 6],
            ..Example::default()
        };
        let PaddedBatch {
            ids, labels, mask, ..
        } = pad_batch(&[&a, &b], 4, 0);
        assert_eq!(ids, vec![vec![5, 6, 7, 0], vec![1, 2, 3, 4]]);
        assert_eq!(labels, vec![vec![-100, 6, 7, -100], vec![1, 2, 3, 4]]);
        assert_eq!(mask, vec![vec![1, 1, 1, 0], vec![1, 1, 1, 1]]);
    }
}
