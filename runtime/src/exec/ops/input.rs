//! Inputs: the batch's integer inputs by name (labels padded for virtual tokens), and PPO's
//! rollout.

use super::misrouted;
use crate::exec::interpreter::Interpreter;
use crate::exec::value::{Value, V};
use crate::exec::{err, ExecError};
use kiln_compiler::graph::{InputKind, Op};
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
        Op::Input { kind } => {
            let name = node.name.clone();
            let ints = match it.batch.ints.get(&name) {
                Some(v) => v.clone(),
                None if kind == InputKind::TokenTypes => {
                    vec![vec![0; it.g.seq as usize]; it.g.batch as usize]
                }
                None => return err(format!("the batch has no `{name}`")),
            };
            // Labels and token types made longer by prompt tuning take P leading −100 labels
            // and type-0 ids, as PEFT gives its virtual tokens (rows may be shorter than
            // `seq`: PPO's batches are as wide as their longest sequence).
            let (virtual_tokens, fill) = match (kind, node.out.shape.get(1)) {
                (InputKind::Labels, Some(&len)) => (len.saturating_sub(it.g.seq) as usize, -100),
                (InputKind::TokenTypes, Some(&len)) => (len.saturating_sub(it.g.seq) as usize, 0),
                _ => (0, 0),
            };
            let padded = ints
                .into_iter()
                .map(|row| {
                    std::iter::repeat_n(fill, virtual_tokens)
                        .chain(row)
                        .collect()
                })
                .collect();
            Ok(V::Ints(padded))
        }
        other => Err(misrouted("input", &other)),
    }
}
