//! The typed spec: checking evaluated definitions against what each kind means, with every
//! default filled in and the origin of every value kept.

mod adapter;
mod cluster;
mod emit;
mod experiment;
pub mod limits;
mod model;
mod objective;
mod origins;
mod parallel;
mod read;
mod train;
mod types;

pub use adapter::resolve_target;
pub use emit::{emit, Format};
pub use model::ACTIVATIONS;
pub use origins::{Origin, Origins};
pub use types::*;

use crate::resolve::{Evaluator, ModuleId, Spanned, Value};
use crate::syntax::DefKind;
use read::Cx;

/// A checked value with the provenance of its fields.
#[derive(Debug)]
pub struct Checked<T> {
    pub value: T,
    pub origins: Origins,
}

/// What one file defines, checked. Definitions that failed are absent (their errors are in
/// the program's diagnostics).
#[derive(Debug, Default)]
pub struct CheckedModule {
    pub experiments: Vec<Checked<Experiment>>,
    pub pipelines: Vec<Checked<Pipeline>>,
    pub models: Vec<Checked<Model>>,
    pub clusters: Vec<Checked<Cluster>>,
}

impl CheckedModule {
    /// Every experiment, the stages of pipelines included, in definition order.
    pub fn all_experiments(&self) -> Vec<&Experiment> {
        self.experiments
            .iter()
            .map(|e| &e.value)
            .chain(self.pipelines.iter().flat_map(|p| p.value.stages.iter()))
            .collect()
    }
}

/// Checks every definition of a module by its kind.
pub fn check_module(ev: &Evaluator, module: ModuleId) -> CheckedModule {
    let mut out = CheckedModule::default();
    for def in ev.program.module(module).defs.values() {
        let Some(value) = ev.definition(module, def) else {
            continue;
        };
        let cx = Cx::new(ev);
        cx.origins.borrow_mut().source("name", def.name.span);
        let path = def.name.name.as_str();
        match def.kind {
            DefKind::Experiment => {
                if let Some(e) = experiment::experiment(&cx, &value) {
                    out.experiments.push(Checked {
                        value: e,
                        origins: cx.origins.take(),
                    });
                }
            }
            DefKind::Pipeline => {
                if let Some(p) = experiment::pipeline(&cx, &value) {
                    let mut origins = Origins::default();
                    origins.source("name", def.name.span);
                    for (i, stage) in p.stages.iter().enumerate() {
                        origins.extend_under(&format!("stages.{i}"), &stage.origins);
                    }
                    out.pipelines.push(Checked { value: p, origins });
                }
            }
            DefKind::Model => {
                if let Some(m) = model::model(&cx, &value, "") {
                    out.models.push(Checked {
                        value: m,
                        origins: cx.origins.take(),
                    });
                }
            }
            DefKind::Device => {
                cluster::device(&cx, &value, path);
            }
            DefKind::Node => {
                cluster::node(&cx, &value, path);
            }
            DefKind::Cluster => {
                if let Some(c) = cluster::cluster(&cx, &value, "") {
                    out.clusters.push(Checked {
                        value: c,
                        origins: cx.origins.take(),
                    });
                }
            }
            DefKind::Objective => {
                objective::objective(&cx, &value, "");
            }
            DefKind::Adapter => {
                adapter::adapters(&cx, &value, "", None);
            }
            DefKind::Let => force(ev, &value),
        }
    }
    out
}

/// Evaluates every field of a plain value so that its errors are reported.
fn force(ev: &Evaluator, value: &Spanned) {
    stacker::maybe_grow(64 * 1024, 1024 * 1024, || force_inner(ev, value));
}

fn force_inner(ev: &Evaluator, value: &Spanned) {
    match &value.value {
        Value::Record(r) => {
            for name in r.fields.keys() {
                if let Some(v) = ev.field(r, name) {
                    force(ev, &v);
                }
            }
        }
        Value::List(items) => items.iter().for_each(|v| force(ev, v)),
        Value::Sum(items) => items.iter().for_each(|v| force(ev, v)),
        Value::Call { args, .. } => args.iter().for_each(|v| force(ev, v)),
        _ => {}
    }
}
