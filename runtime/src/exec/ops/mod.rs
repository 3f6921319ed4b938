//! The ops, by family: each module computes its family's ops on the interpreter's values and
//! tape, with the CPU kernels or dfdx's ops; [`forward`] sends a node
//! to its family. What a tensor-parallel rank does differently, each family reads from the
//! interpreter's `RankOps`.

mod attention;
mod elementwise;
mod embedding;
pub(super) mod input;
mod linear;
pub(super) mod loss;
mod lstm;
mod norm;
mod shape;

use super::interpreter::Interpreter;
use super::value::V;
use super::{err, ExecError};
use kiln_compiler::graph::Op;
use petgraph::graph::NodeIndex;

/// Computes node `n` by its op's family.
pub(super) fn forward(it: &mut Interpreter<'_>, n: NodeIndex) -> Result<V, ExecError> {
    let op = it.g.dag[n].op.clone();
    match op {
        Op::Input { .. } => input::forward(it, n, op),
        Op::Embedding { .. } | Op::PositionEmbedding { .. } | Op::VirtualTokens { .. } => {
            embedding::forward(it, n, op)
        }
        Op::Linear { .. } => linear::forward(it, n, op),
        Op::Slice { .. } | Op::Concat { .. } | Op::SelectToken { .. } => shape::forward(it, n, op),
        Op::Rotary { .. } | Op::Attention { .. } => attention::forward(it, n, op),
        Op::LayerNorm { .. } | Op::RmsNorm { .. } => norm::forward(it, n, op),
        Op::Add
        | Op::Mul
        | Op::Scale { .. }
        | Op::ScaleBy { .. }
        | Op::Activation { .. }
        | Op::Dropout { .. } => elementwise::forward(it, n, op),
        Op::Lstm { .. } => lstm::forward(it, n, op),
        Op::GatherClasses { .. }
        | Op::CrossEntropy { .. }
        | Op::WeightedSum { .. }
        | Op::PairwiseLoss
        | Op::TokenLogProbs
        | Op::PpoLoss { .. } => loss::forward(it, n, op),
        other => err(format!(
            "the CPU executor does not run `{}` yet",
            other.kind()
        )),
    }
}

/// A family handed an op of another: what `forward` never does.
fn misrouted(family: &str, op: &Op) -> ExecError {
    ExecError(format!("`{}` is not a {family} op", op.kind()))
}
