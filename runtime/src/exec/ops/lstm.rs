//! The LSTM (P-tuning's prompt encoder), as torch.nn.LSTM computes it.

use super::misrouted;
use crate::exec::interpreter::Interpreter;
use crate::exec::value::V;
use crate::exec::{err, ExecError, T3Taped, Tape, T3};
use dfdx::prelude::*;
use kiln_compiler::graph::Op;
use petgraph::graph::NodeIndex;

/// Computes node `n`, whose op is of this family.
pub(super) fn forward(it: &mut Interpreter<'_>, n: NodeIndex, op: Op) -> Result<V, ExecError> {
    match op {
        Op::Lstm {
            hidden,
            layers,
            bidirectional,
            params,
        } => {
            let x = it.input(n, 0)?.r3("x")?;
            lstm(
                it,
                x,
                hidden as usize,
                layers as usize,
                bidirectional,
                &params,
            )
        }
        other => Err(misrouted("lstm", &other)),
    }
}

/// torch.nn.LSTM (batch first, zero initial state) over `x`: per layer and direction, the
/// gates i, f, g, o = x·W_ihᵀ + b_ih + h·W_hhᵀ + b_hh; c = σ(f)·c + σ(i)·tanh(g);
/// h = σ(o)·tanh(c). A bidirectional layer's output is both directions' h side by side;
/// `params` are PyTorch's (weight_ih, weight_hh, bias_ih, bias_hh) per layer and direction.
fn lstm(
    it: &mut Interpreter<'_>,
    x: T3,
    hidden: usize,
    layers: usize,
    bidirectional: bool,
    params: &[usize],
) -> Result<V, ExecError> {
    let (b, steps, _) = *x.shape();
    let directions = if bidirectional { 2 } else { 1 };
    if params.len() != 4 * layers * directions {
        return err("the LSTM's parameters do not match its layers");
    }
    let mut input = x;
    for layer in 0..layers {
        let mut outputs: Vec<T3> = Vec::with_capacity(directions);
        for direction in 0..directions {
            let at = 4 * (layer * directions + direction);
            let w_ih = it.p2(params[at])?;
            let w_hh = it.p2(params[at + 1])?;
            let b_ih = it.p1(params[at + 2])?;
            let b_hh = it.p1(params[at + 3])?;
            let gates_shape = (b, steps, 4 * hidden);
            // The input's part of every step's gates at once.
            let tape = it.take_tape();
            let xw = input
                .clone()
                .put_tape(tape)
                .matmul(w_ih.permute::<_, Axes2<1, 0>>())
                + b_ih.broadcast_like::<_, Axes2<0, 1>>(&gates_shape)
                + b_hh.broadcast_like::<_, Axes2<0, 1>>(&gates_shape);
            let (xw, tape) = xw.split_tape();
            it.tape = tape;
            let order: Vec<usize> = if direction == 0 {
                (0..steps).collect()
            } else {
                (0..steps).rev().collect()
            };
            let (mut h, mut c): (Option<T3>, Option<T3>) = (None, None);
            let mut states = Vec::with_capacity(steps);
            for t in order {
                let tape = it.take_tape();
                let step = xw
                    .clone()
                    .put_tape(tape)
                    .slice((.., t..t + 1, ..))
                    .realize();
                let gates = match &h {
                    Some(prev) => {
                        let (step, tape) = step.split_tape();
                        prev.clone()
                            .put_tape(tape)
                            .matmul(w_hh.clone().permute::<_, Axes2<1, 0>>())
                            + step
                    }
                    None => step,
                };
                let (gates, tape) = gates.split_tape();
                let gate = |k: usize, tape: Tape| -> T3Taped {
                    gates
                        .clone()
                        .put_tape(tape)
                        .slice((.., .., k * hidden..(k + 1) * hidden))
                        .realize()
                };
                let (i, tape) = gate(0, tape).sigmoid().split_tape();
                let (f, tape) = gate(1, tape).sigmoid().split_tape();
                let (g, tape) = gate(2, tape).tanh().split_tape();
                let (o, tape) = gate(3, tape).sigmoid().split_tape();
                let cell = i.put_tape(tape) * g;
                let cell = match c.take() {
                    Some(prev) => {
                        let (ig, tape) = cell.split_tape();
                        f.put_tape(tape) * prev + ig
                    }
                    None => cell,
                };
                let (cell, tape) = cell.split_tape();
                let (squashed, tape) = cell.clone().put_tape(tape).tanh().split_tape();
                let (state, tape) = (o.put_tape(tape) * squashed).split_tape();
                it.tape = tape;
                states.push(state.clone());
                h = Some(state);
                c = Some(cell);
            }
            if direction == 1 {
                states.reverse();
            }
            let tape = it.take_tape();
            let mut states = states.into_iter();
            let first = states
                .next()
                .ok_or_else(|| ExecError("an LSTM over no steps".into()))?;
            let mut sequence: T3Taped = first.put_tape(tape);
            for state in states {
                sequence = (sequence, state).concat_along(Axis::<1>);
            }
            let (sequence, tape) = sequence.split_tape();
            it.tape = tape;
            outputs.push(sequence);
        }
        let mut outputs = outputs.into_iter();
        let forward = outputs
            .next()
            .ok_or_else(|| ExecError("an LSTM layer with no direction".into()))?;
        input = match outputs.next() {
            Some(backward) => {
                let tape = it.take_tape();
                let (both, tape) = (forward.put_tape(tape), backward)
                    .concat_along(Axis::<2>)
                    .split_tape();
                it.tape = tape;
                both
            }
            None => forward,
        };
    }
    Ok(V::R3(input))
}
