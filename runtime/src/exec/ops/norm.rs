//! Norms over the feature axis: layer norm and RMS norm (one CPU kernel for both).

use super::misrouted;
use crate::exec::interpreter::Interpreter;
#[cfg(not(feature = "cuda"))]
use crate::exec::kernels;
use crate::exec::value::V;
use crate::exec::ExecError;
use dfdx::prelude::*;
use kiln_compiler::graph::Op;
use petgraph::graph::NodeIndex;

/// Computes node `n`, whose op is of this family.
pub(super) fn forward(it: &mut Interpreter<'_>, n: NodeIndex, op: Op) -> Result<V, ExecError> {
    match op {
        Op::LayerNorm { weight, bias, eps } => {
            let x = it.input(n, 0)?.r3("x")?;
            let w = it.p1(weight)?;
            let tape = it.take_tape();
            #[cfg(not(feature = "cuda"))]
            {
                let bias = match bias {
                    Some(b) => Some(it.vector(b)?),
                    None => None,
                };
                let w = kernels::Vector {
                    v: w,
                    trainable: it.g.params[weight].trainable,
                };
                let y = kernels::norm(
                    x.put_tape(tape),
                    w,
                    bias,
                    eps as f32,
                    kernels::Centring::Centred,
                )
                .map_err(ExecError)?;
                Ok(it.keep3(y))
            }
            #[cfg(feature = "cuda")]
            {
                let shape = *x.shape();
                let mut y = x.put_tape(tape).normalize::<Axis<2>>(eps as f32)
                    * w.broadcast_like::<_, Axes2<0, 1>>(&shape);
                if let Some(b) = bias {
                    y = y + it.p1(b)?.broadcast_like::<_, Axes2<0, 1>>(&shape);
                }
                Ok(it.keep3(y))
            }
        }
        Op::RmsNorm { weight, eps } => {
            let x = it.input(n, 0)?.r3("x")?;
            let tape = it.take_tape();
            #[cfg(not(feature = "cuda"))]
            {
                let w = it.vector(weight)?;
                let y = kernels::norm(
                    x.put_tape(tape),
                    w,
                    None,
                    eps as f32,
                    kernels::Centring::Uncentred,
                )
                .map_err(ExecError)?;
                Ok(it.keep3(y))
            }
            #[cfg(feature = "cuda")]
            {
                let shape = *x.shape();
                let w = it.p1(weight)?;
                let (xs, tape) = x.put_tape(tape).split_tape();
                let ms = xs
                    .clone()
                    .put_tape(tape)
                    .square()
                    .mean::<(usize, usize), Axis<2>>();
                let inv = (ms + eps as f32)
                    .sqrt()
                    .recip()
                    .broadcast_like::<_, Axis<2>>(&shape);
                let y = inv * xs * w.broadcast_like::<_, Axes2<0, 1>>(&shape);
                Ok(it.keep3(y))
            }
        }
        other => Err(misrouted("norm", &other)),
    }
}
