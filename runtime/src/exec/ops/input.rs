//! Inputs: the batch's integer inputs by name (labels padded for virtual tokens), and PPO's
//! rollout.

use super::misrouted;
use crate::exec::interpreter::Interpreter;
use crate::exec::value::{Value, V};
use crate::exec::{err, Batch, ExecError};
use kiln_compiler::graph::{Graph, InputKind, Op};
use petgraph::graph::NodeIndex;

/// Computes node `n`, whose op is of this family.
pub(super) fn forward(it: &mut Interpreter<'_>, n: NodeIndex, op: Op) -> Result<V, ExecError> {
    let node = &it.g.dag[n];
    match op {
        Op::Input {
            kind: InputKind::Rollout,
        } => match it.batch.floats.get(&node.name) {
            Some(t) if t.shape.len() == 3 => Ok(Value::from_host(t.clone())?.0),
            Some(t) => err(format!("a rollout of shape {:?}, not [b, s, 4]", t.shape)),
            None => err(format!("the batch has no `{}`", node.name)),
        },
        Op::Input { .. } => Ok(V::Ints(integer_input(it.g, n, it.batch)?)),
        other => Err(misrouted("input", &other)),
    }
}

/// Integer input node `n`'s rows from `batch`: its values by the node's name (token types
/// default to 0), labels and token types padded in front for the virtual tokens the graph
/// prepends (labels with −100, which no loss reads).
pub(crate) fn integer_input(
    g: &Graph,
    n: NodeIndex,
    batch: &Batch,
) -> Result<Vec<Vec<i64>>, ExecError> {
    let node = &g.dag[n];
    let Op::Input { kind } = node.op else {
        return Err(misrouted("input", &node.op));
    };
    let ints = match batch.ints.get(&node.name) {
        Some(v) => v.clone(),
        // Token types default to 0, over the rows and positions of the batch's token ids.
        None if kind == InputKind::TokenTypes => match batch.ints.get("input_ids") {
            Some(ids) => ids.iter().map(|row| vec![0; row.len()]).collect(),
            None => vec![vec![0; g.seq as usize]; g.batch as usize],
        },
        None => return err(format!("the batch has no `{}`", node.name)),
    };
    let (virtual_tokens, fill) = match (kind, node.out.shape.get(1)) {
        (InputKind::Labels, Some(&len)) => (len.saturating_sub(g.seq) as usize, -100),
        (InputKind::TokenTypes, Some(&len)) => (len.saturating_sub(g.seq) as usize, 0),
        _ => (0, 0),
    };
    Ok(ints
        .into_iter()
        .map(|row| {
            std::iter::repeat_n(fill, virtual_tokens)
                .chain(row)
                .collect()
        })
        .collect())
}
