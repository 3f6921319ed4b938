//! Values crossing a pipeline-stage boundary: activations forward, their gradients back.
//!
//! When every stage has the same grid, devices pair up stage to stage (same data and tensor
//! rank) and a value goes as it is. When stages have grids of their own (Alpa's submeshes), a
//! value is resharded: the sending stage makes its rows whole over its tensor-parallel group
//! (gathering a share of the sequence or of the features, summing a partial sum), its first
//! tensor rank sends each replica of the receiving stage the rows they share, and every rank
//! there takes its own form of the value (the layout of its stage says which).

use super::convert::{gathered, sequence_of, summed};
use super::schedule::StepContext;
use super::{Failure, Links};
use crate::comm::{Collective, Payload, Tag};
use crate::parallel::placement::by_rows;
use crate::parallel::tensor_parallel::Shards;
use crate::tensor::HostTensor;
use kiln_compiler::plan::sharding::{last_axis, sequence_axis, Form};
use petgraph::graph::NodeIndex;

/// One value crossing from virtual stage `from` to virtual stage `to` (for a gradient, from the
/// reader back to the producer).
#[derive(Clone, Copy, Debug)]
pub(super) struct Crossing {
    payload: Payload,
    microbatch: usize,
    node: NodeIndex,
    from: usize,
    to: usize,
}

impl Crossing {
    pub(super) fn new(
        payload: Payload,
        microbatch: usize,
        node: NodeIndex,
        from: usize,
        to: usize,
    ) -> Self {
        Crossing {
            payload,
            microbatch,
            node,
            from,
            to,
        }
    }

    fn tag(&self, sender: usize) -> Tag {
        Tag {
            payload: self.payload,
            microbatch: self.microbatch,
            node: self.node.index(),
            from: self.from,
            to: self.to,
            sender,
        }
    }
}

impl StepContext<'_> {
    /// Sends `value` (this device's form of it) across the boundary.
    pub(super) fn send(
        &self,
        device: &super::Device,
        links: &mut Links,
        crossing: Crossing,
        value: &HostTensor,
    ) -> Result<(), Failure> {
        let p = self.placement;
        let me = p.device(device.stage, device.rank, device.part);
        let to_stage = p.virtual_stages[crossing.to].stage;
        if p.uniform {
            let to = p.device(to_stage, device.rank, device.part);
            links.mail.send(to, crossing.tag(me), value.clone())?;
            return Ok(());
        }
        let grid = &p.grids[device.stage];
        let form = &grid.tensor.forms[crossing.node.index()];
        let whole = whole(&mut *links.tensor, crossing.payload, form, value)?;
        if device.part != 0 {
            return Ok(());
        }
        let (mine, theirs) = (grid.rows(device.rank), &p.grids[to_stage]);
        let per_row = self.per_row(crossing.node);
        for rank in 0..theirs.data {
            let piece = if per_row {
                let rows = theirs.rows(rank);
                let (lo, hi) = (rows.start.max(mine.start), rows.end.min(mine.end));
                if lo >= hi {
                    continue;
                }
                slice_rows(&whole, lo - mine.start..hi - mine.start)
            } else {
                return Err(Failure::Own(format!(
                    "`{}` is not split by rows and crosses to a stage on another grid",
                    self.g.dag[crossing.node].name
                )));
            };
            for part in 0..theirs.tensor.size {
                let to = p.device(to_stage, rank, part);
                links.mail.send(to, crossing.tag(me), piece.clone())?;
            }
        }
        Ok(())
    }

    /// Receives a value from across the boundary, in this device's form of it.
    pub(super) fn receive(
        &self,
        device: &super::Device,
        links: &mut Links,
        crossing: Crossing,
    ) -> Result<HostTensor, Failure> {
        let p = self.placement;
        let from_stage = p.virtual_stages[crossing.from].stage;
        if p.uniform {
            let from = p.device(from_stage, device.rank, device.part);
            return Ok(links.mail.recv(crossing.tag(from))?);
        }
        let (grid, theirs) = (&p.grids[device.stage], &p.grids[from_stage]);
        let mine = grid.rows(device.rank);
        let mut pieces = Vec::new();
        for rank in 0..theirs.data {
            let rows = theirs.rows(rank);
            if rows.start.max(mine.start) < rows.end.min(mine.end) {
                let from = p.device(from_stage, rank, 0);
                pieces.push(links.mail.recv(crossing.tag(from))?);
            }
        }
        let whole = concat_rows(pieces).map_err(Failure::Own)?;
        let form = &grid.tensor.forms[crossing.node.index()];
        Ok(part(
            crossing.payload,
            form,
            whole,
            device.part,
            grid.tensor.size,
        ))
    }

    /// Whether a value has a row per sequence of the batch (activations), rather than one
    /// broadcast over it. Only the former cross between grids (`Placement::from_plan` checks).
    fn per_row(&self, n: NodeIndex) -> bool {
        by_rows(self.g, n)
    }
}

/// The whole value (for its rows) from this rank's form of it, over the tensor-parallel group.
fn whole(
    ring: &mut dyn Collective,
    payload: Payload,
    form: &Form,
    value: &HostTensor,
) -> Result<HostTensor, Failure> {
    let size = ring.size();
    Ok(match form {
        Form::Sequence => gathered(ring, sequence_of(value, size), value)?,
        Form::Split(sections) => gathered(ring, last_axis(&value.shape, sections), value)?,
        // Addends of an activation are summed; the gradient of each is already the whole one.
        Form::Partial if payload == Payload::Activation => summed(ring, value.clone())?,
        Form::Whole | Form::Replicated | Form::Partial => value.clone(),
    })
}

/// Rank `rank`'s form of a whole value.
fn part(payload: Payload, form: &Form, whole: HostTensor, rank: usize, size: usize) -> HostTensor {
    match form {
        Form::Sequence => sequence_axis(&whole.shape).shard(&whole, rank, size),
        Form::Split(sections) => last_axis(&whole.shape, sections).shard(&whole, rank, size),
        // One rank carries a partial sum's value, the others zeros.
        Form::Partial if payload == Payload::Activation && rank > 0 => HostTensor {
            data: vec![0.0; whole.data.len()],
            shape: whole.shape,
        },
        Form::Whole | Form::Replicated | Form::Partial => whole,
    }
}

/// Rows `rows` (along the first axis) of `t`.
fn slice_rows(t: &HostTensor, rows: std::ops::Range<usize>) -> HostTensor {
    let per_row: usize = t.shape.iter().skip(1).product();
    let mut shape = t.shape.clone();
    shape[0] = rows.len();
    HostTensor {
        data: t.data[rows.start * per_row..rows.end * per_row].to_vec(),
        shape,
    }
}

/// Row blocks stacked along the first axis.
fn concat_rows(pieces: Vec<HostTensor>) -> Result<HostTensor, String> {
    let mut pieces = pieces.into_iter();
    let mut out = pieces
        .next()
        .ok_or("nothing arrived across the stage boundary")?;
    for piece in pieces {
        if piece.shape.get(1..) != out.shape.get(1..) {
            return Err(format!(
                "rows of shape {:?} and {:?} arrived for one value across the stage boundary",
                out.shape, piece.shape
            ));
        }
        out.shape[0] += piece.shape[0];
        out.data.extend(piece.data);
    }
    Ok(out)
}
