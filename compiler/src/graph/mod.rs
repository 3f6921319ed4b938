//! The operator graph: IR, lowering of models, adapter and objective passes, costs, and the
//! `kiln graph` report.

pub mod adapters;
mod cost;
mod edit;
pub mod ir;
mod lower;
mod objectives;
mod report;
mod shape;

pub use cost::Totals;
pub use ir::*;
pub use report::{render_dot, render_json, render_table};

use crate::diagnostics::{Code, Diagnostic, Diagnostics};
use crate::spec::{Experiment, Precision};
use lower::Lowering;

/// Lowers a checked experiment to its operator graph, with adapters and the objective
/// applied and every node costed.
pub fn compile_graph(e: &Experiment) -> Result<Graph, Diagnostics> {
    let dtype = match e.train.precision {
        Precision::F32 | Precision::Tf32 => DType::F32,
        Precision::Bf16 => DType::Bf16,
        Precision::F16 => DType::F16,
    };
    let (b, s) = (e.train.batch, e.train.seq_len);
    let mut g = Graph::new(b, s, dtype);
    let qkv = adapters::qkv_layout(&e.adapters);
    let emb_layer = g.add_layer("embedding", LayerKind::Embedding);
    let tokens = g.add_input("input_ids", InputKind::TokenIds, vec![b, s], emb_layer);
    let types = (e.model.type_vocab > 0).then(|| {
        g.add_input(
            "token_type_ids",
            InputKind::TokenTypes,
            vec![b, s],
            emb_layer,
        )
    });

    let base = Lowering::new(&mut g, &e.model, "", qkv).model(tokens, types, emb_layer);
    // PPO compares against a frozen copy of the initial model, lowered beside it.
    let reference = objectives::needs_reference(&e.objective).then(|| {
        Lowering::new(&mut g, &e.model, REFERENCE_PREFIX, qkv).model(tokens, types, emb_layer)
    });
    let mut low = Lowering::new(&mut g, &e.model, "", qkv);
    let loss = objectives::lower_objective(&mut low, &base, &e.objective, reference.as_ref());
    g.loss = Some(loss);
    check(&g, "lowering")?;

    let cx = adapters::Context {
        model: &e.model,
        names: crate::hf::of(e.model.family).names(),
        qkv,
        tokens,
    };
    adapters::apply(&mut g, &cx, &e.adapters);
    check(&g, "adapter passes")?;

    cost::annotate(&mut g);
    g.verify().map_err(|why| internal("costing", &why))?;
    Ok(g)
}

/// Verifies after a pass in debug builds (and always reports shape problems).
fn check(g: &Graph, pass: &str) -> Result<(), Diagnostics> {
    if let Some(p) = g.problems.first() {
        return Err(internal(pass, p));
    }
    if cfg!(debug_assertions) {
        g.verify().map_err(|why| internal(pass, &why))?;
    }
    Ok(())
}

fn internal(pass: &str, why: &str) -> Diagnostics {
    let mut d = Diagnostics::default();
    d.push(
        Diagnostic::new(
            Code::Internal,
            format!("internal error after {pass}: {why}"),
        )
        .help("this is a bug in Kiln; please report it with the experiment file"),
    );
    d
}
