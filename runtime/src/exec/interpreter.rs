//! The interpreter: the table of node values, the one gradient tape threaded through the ops
//! (each op takes it from here and puts it back with its result), and the parameters the
//! segment reads. What each op computes is its family's (`ops`).

use super::ops;
use super::precision::Format;
use super::value::{P, V};
use super::{err, Batch, Dev, ExecError, Stats, Tape, T1, T2, T3};
use dfdx::prelude::*;
use kiln_compiler::graph::Graph;
use kiln_compiler::plan::sharding::RankOps;
use petgraph::graph::NodeIndex;

/// What a segment computes with: the graph, the batch, its parameters, each node's value once
/// computed, and the tape recording every op since the segment began.
pub(super) struct Interpreter<'g> {
    pub(super) g: &'g Graph,
    /// The node being computed: dropout masks are drawn from a stream of their own per node,
    /// so they do not depend on how the graph is split across devices.
    pub(super) current: NodeIndex,
    pub(super) dev: Dev,
    pub(super) tape: Tape,
    /// The parameters this part of the graph reads (`None`: held by another device).
    pub(super) params: Vec<Option<P>>,
    /// The number format matrix products read and yield.
    pub(super) format: Format,
    pub(super) values: Vec<Option<V>>,
    pub(super) batch: &'g Batch,
    /// What this tensor-parallel rank does differently (nothing on one device).
    pub(super) ops: &'g RankOps,
    pub(super) stats: Stats,
}

impl<'g> Interpreter<'g> {
    /// Nothing computed yet, on an empty tape.
    pub(super) fn new(
        g: &'g Graph,
        params: Vec<Option<P>>,
        format: Format,
        batch: &'g Batch,
        ops: &'g RankOps,
    ) -> Self {
        Interpreter {
            g,
            current: NodeIndex::new(0),
            dev: Dev::default(),
            tape: Tape::default(),
            params,
            format,
            values: vec![None; g.dag.node_count()],
            batch,
            ops,
            stats: Stats::new(),
        }
    }

    /// The value of node `n`'s input `slot`.
    pub(super) fn input(&self, n: NodeIndex, slot: usize) -> Result<&V, ExecError> {
        let i = *self
            .g
            .inputs(n)
            .get(slot)
            .ok_or_else(|| ExecError(format!("no input {slot}")))?;
        self.values[i.index()]
            .as_ref()
            .ok_or_else(|| ExecError("input not computed".into()))
    }

    /// Computes node `n` and keeps its value.
    pub(super) fn compute(&mut self, n: NodeIndex) -> Result<(), ExecError> {
        self.compute_with(n, |it| ops::forward(it, n))
    }

    /// Computes node `n` with `run` and keeps its value.
    pub(super) fn compute_with(
        &mut self,
        n: NodeIndex,
        run: impl FnOnce(&mut Self) -> Result<V, ExecError>,
    ) -> Result<(), ExecError> {
        self.current = n;
        let v = run(self).map_err(|e| ExecError(format!("{}: {}", self.g.dag[n].name, e.0)))?;
        self.values[n.index()] = Some(v);
        Ok(())
    }

    /// Parameter `id`, when this device holds it.
    pub(super) fn param(&self, id: usize) -> Result<&P, ExecError> {
        self.params[id].as_ref().ok_or_else(|| {
            ExecError(format!(
                "parameter `{}` is not on this device",
                self.g.params[id].name
            ))
        })
    }

    /// Parameter `id` as a vector.
    pub(super) fn p1(&self, id: usize) -> Result<T1, ExecError> {
        match self.param(id)? {
            P::R1(t) => Ok(t.clone()),
            P::R2(t) => {
                // IA3 vectors are stored [n, 1] or [1, n]: read them flat (same values).
                let (a, b) = *t.shape();
                Ok(t.clone().reshape_like(&(a * b,)))
            }
        }
    }

    /// A vector parameter for the CPU kernels, with whether it is trained.
    pub(super) fn vector(&self, id: usize) -> Result<super::kernels::Vector, ExecError> {
        Ok(super::kernels::Vector {
            v: self.p1(id)?,
            trainable: self.g.params[id].trainable,
        })
    }

    /// Parameter `id` as a matrix.
    pub(super) fn p2(&self, id: usize) -> Result<T2, ExecError> {
        match self.param(id)? {
            P::R2(t) => Ok(t.clone()),
            P::R1(_) => err(format!(
                "parameter `{}` is not a matrix",
                self.g.params[id].name
            )),
        }
    }

    /// `t` rounded to the run's number format, as a matrix product's operand or result, on the
    /// tape.
    pub(super) fn rounded(&mut self, t: T3) -> Result<T3, ExecError> {
        let (t, tape) =
            super::kernels::rounded(t.put_tape(self.take_tape()), self.format).split_tape();
        self.tape = tape;
        Ok(t)
    }

    /// The tape, for the op computed next to record itself on (it puts the tape back with
    /// its result: `keep3`, `keep2`, `keep0`).
    pub(super) fn take_tape(&mut self) -> Tape {
        std::mem::take(&mut self.tape)
    }

    /// Puts the result's tape back and keeps its value.
    pub(super) fn keep3(&mut self, t: Tensor<(usize, usize, usize), f32, Dev, Tape>) -> V {
        let (v, tape) = t.split_tape();
        self.tape = tape;
        V::R3(v)
    }
    pub(super) fn keep2(&mut self, t: Tensor<(usize, usize), f32, Dev, Tape>) -> V {
        let (v, tape) = t.split_tape();
        self.tape = tape;
        V::R2(v)
    }
    pub(super) fn keep0(&mut self, t: Tensor<(), f32, Dev, Tape>) -> V {
        let (v, tape) = t.split_tape();
        self.tape = tape;
        V::S(v)
    }
}
