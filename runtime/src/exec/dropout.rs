//! Dropout masks: where each element's bit is drawn from (the run's seed, the step, the node,
//! the row's place in the step, the element's place in the row), and the mask's values.

use super::interpreter::Interpreter;
use super::ExecError;
use crate::rng::{Key, Purpose};
use petgraph::graph::NodeIndex;
use std::ops::Range;

/// The coordinates of a batch's dropout masks beside the element: the run's seed, the step,
/// and each row's place in the step (see `rng`), so that a row's masks are the same whichever
/// microbatch, data-parallel replica or tensor-parallel rank computes it.
#[derive(Clone, Debug)]
pub struct DropoutKey {
    step: Key,
    /// The global row of each of the batch's rows: its index among the step's rows, in the
    /// order they were drawn.
    rows: Vec<u64>,
}

impl DropoutKey {
    pub fn new(seed: u64, step: u64, rows: Vec<u64>) -> Self {
        DropoutKey {
            step: Key::of(seed, Purpose::Dropout).fold(step),
            rows,
        }
    }

    /// Each row's key for the masks of node `node`: what the bits of the row's elements are
    /// drawn from.
    pub(crate) fn row_keys(&self, node: NodeIndex) -> Vec<Key> {
        let node = self.step.fold(node.index() as u64);
        self.rows.iter().map(|&row| node.fold(row)).collect()
    }

    /// How many rows the key covers.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The key of rows `rows` of its batch (`None` past the batch's end).
    pub(super) fn rows(&self, rows: Range<usize>) -> Option<DropoutKey> {
        Some(DropoutKey {
            step: self.step,
            rows: self.rows.get(rows)?.to_vec(),
        })
    }
}

/// What inverted dropout multiplies kept values by.
pub(crate) fn dropout_scale(p: f64) -> f32 {
    1.0 / (1.0 - p) as f32
}

/// Dropout's probability as a bound on an element's 64 random bits: kept where they reach it.
pub(crate) fn dropout_threshold(p: f64) -> u64 {
    (p * u64::MAX as f64) as u64
}

/// An inverted-dropout mask's values (0 or 1/(1−p)) from which elements are kept.
pub(super) fn dropout_factors(keep: Vec<bool>, p: f64) -> Vec<f32> {
    let scale = dropout_scale(p);
    keep.into_iter()
        .map(|k| if k { scale } else { 0.0 })
        .collect()
}

impl Interpreter<'_> {
    /// The values of this node's inverted-dropout mask (0 or 1/(1−p)); see `dropout_keep`.
    pub(super) fn dropout_values(
        &self,
        p: f64,
        rows: usize,
        offset: usize,
        len: usize,
    ) -> Result<Option<Vec<f32>>, ExecError> {
        Ok(self
            .dropout_keep(p, rows, offset, len)?
            .map(|keep| dropout_factors(keep, p)))
    }

    /// Which elements dropout keeps of this node's value of `rows` rows, of which this device
    /// holds `len` elements a row from element `offset` of the whole value's row on (a share of
    /// the sequence, or of the heads). An element's bit depends on the batch's key, the node,
    /// the row's global index and the element's index in the whole row alone. `None` when
    /// dropout is off for this batch or `p` is zero.
    pub(super) fn dropout_keep(
        &self,
        p: f64,
        rows: usize,
        offset: usize,
        len: usize,
    ) -> Result<Option<Vec<bool>>, ExecError> {
        let Some(key) = self.batch.dropout_key(p, rows)? else {
            return Ok(None);
        };
        let threshold = dropout_threshold(p);
        Ok(Some(
            key.row_keys(self.current)
                .into_iter()
                .flat_map(|row| {
                    (offset..offset + len).map(move |i| row.bits(i as u64) >= threshold)
                })
                .collect(),
        ))
    }
}
