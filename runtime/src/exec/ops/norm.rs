//! Norms over the feature axis: layer norm and RMS norm (one CPU kernel for both).

use super::misrouted;
use crate::exec::interpreter::Interpreter;
use crate::exec::kernels;
use crate::exec::value::V;
use crate::exec::ExecError;
use dfdx::prelude::*;
use kiln_compiler::graph::Op;
use petgraph::graph::NodeIndex;

/// Computes node `n`, whose op is of this family: layer norm, or RMS norm (layer norm without
/// centring or bias).
pub(super) fn forward(it: &mut Interpreter<'_>, n: NodeIndex, op: Op) -> Result<V, ExecError> {
    let (weight, bias, eps, centred) = match op {
        Op::LayerNorm { weight, bias, eps } => (weight, bias, eps as f32, true),
        Op::RmsNorm { weight, eps } => (weight, None, eps as f32, false),
        other => return Err(misrouted("norm", &other)),
    };
    let x = it.input(n, 0)?.r3("x")?.put_tape(it.take_tape());
    let w = it.vector(weight)?;
    let bias = bias.map(|b| it.vector(b)).transpose()?;
    let centring = if centred {
        kernels::Centring::Centred
    } else {
        kernels::Centring::Uncentred
    };
    let y = kernels::norm(x, w, bias, eps, centring).map_err(ExecError)?;
    Ok(it.keep3(y))
}
