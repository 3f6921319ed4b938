//! One batch: the integer and real inputs a step feeds the graph, what its objective reads
//! beside them, and the rows of it one data-parallel replica computes.

use super::dropout::DropoutKey;
use super::ExecError;
use crate::tensor::HostTensor;
use petgraph::graph::NodeIndex;
use std::collections::BTreeMap;
use std::ops::Range;

/// One batch: integer inputs by the graph's input names (`input_ids`, `labels`, ...), plus what
/// the objective reads outside the graph's inputs.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// `[rows][positions]` integers per input name; labels use −100 for "no loss".
    pub ints: BTreeMap<String, Vec<Vec<i64>>>,
    /// Real-valued inputs by name (PPO's `rollout`).
    pub floats: BTreeMap<String, HostTensor>,
    /// 1 for real tokens, 0 for padding; all ones when absent.
    pub attention_mask: Option<Vec<Vec<i64>>>,
    /// The [MASK] position of each row (PET).
    pub mask_positions: Option<Vec<usize>>,
    /// Token ids of each class's verbalizer word (PET).
    pub class_token_ids: Option<Vec<usize>>,
    /// What this step's dropout masks are drawn from; `None` runs without dropout (evaluation).
    pub dropout: Option<DropoutKey>,
    /// What each cross-entropy node divides its sum by instead of this batch's count of
    /// labelled positions (`label_counts`): this batch's share of the count over every batch of
    /// the loss, so that the loss is the mean over all of their positions however they are cut
    /// into batches.
    pub label_counts: BTreeMap<NodeIndex, f32>,
}

impl Batch {
    /// The key dropout with probability `p` draws its masks of a value of `rows` rows from;
    /// `None` when dropout is off for this batch or `p` is zero.
    pub(crate) fn dropout_key(
        &self,
        p: f64,
        rows: usize,
    ) -> Result<Option<&DropoutKey>, ExecError> {
        let Some(key) = &self.dropout else {
            return Ok(None);
        };
        if p <= 0.0 {
            return Ok(None);
        }
        if key.len() != rows {
            return Err(ExecError(format!(
                "dropout over {rows} rows with the global rows of {}",
                key.len()
            )));
        }
        Ok(Some(key))
    }

    /// Rows `rows` of the batch: what one data-parallel replica computes of a microbatch. Its
    /// cross-entropies divide by its share of the microbatch's count, so that with the mesh's
    /// weight of each share (one over microbatches times replicas) the replicas' losses sum to
    /// the step's mean over all labelled positions.
    pub fn rows(&self, rows: Range<usize>) -> Result<Batch, ExecError> {
        let total = self
            .ints
            .values()
            .map(Vec::len)
            .chain(self.attention_mask.as_ref().map(Vec::len))
            .chain(
                self.floats
                    .values()
                    .filter_map(|t| t.shape.first().copied()),
            )
            .max()
            .unwrap_or(0);
        if rows == (0..total) {
            return Ok(self.clone());
        }
        let out_of_range = || {
            ExecError(format!(
                "rows {}..{} of a batch of {total} rows",
                rows.start, rows.end
            ))
        };
        let pick = |v: &Vec<Vec<i64>>| {
            v.get(rows.clone())
                .map(<[_]>::to_vec)
                .ok_or_else(out_of_range)
        };
        let ints = self
            .ints
            .iter()
            .map(|(name, v)| Ok((name.clone(), pick(v)?)))
            .collect::<Result<_, ExecError>>()?;
        let floats = self
            .floats
            .iter()
            .map(|(name, t)| {
                let per_row: usize = t.shape.iter().skip(1).product();
                let data = t
                    .data
                    .get(rows.start * per_row..rows.end * per_row)
                    .ok_or_else(out_of_range)?
                    .to_vec();
                let mut shape = t.shape.clone();
                *shape.first_mut().ok_or_else(|| {
                    ExecError(format!("`{name}` has no rows to take rows {rows:?} of"))
                })? = rows.len();
                Ok((name.clone(), HostTensor { shape, data }))
            })
            .collect::<Result<_, ExecError>>()?;
        let share = rows.len() as f32 / total as f32;
        Ok(Batch {
            ints,
            floats,
            attention_mask: self.attention_mask.as_ref().map(pick).transpose()?,
            mask_positions: match &self.mask_positions {
                Some(m) => Some(m.get(rows.clone()).ok_or_else(out_of_range)?.to_vec()),
                None => None,
            },
            class_token_ids: self.class_token_ids.clone(),
            dropout: match &self.dropout {
                Some(key) => Some(key.rows(rows.clone()).ok_or_else(out_of_range)?),
                None => None,
            },
            label_counts: self
                .label_counts
                .iter()
                .map(|(&n, &count)| (n, count * share))
                .collect(),
        })
    }
}
