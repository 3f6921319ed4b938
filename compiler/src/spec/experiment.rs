//! Experiments: the model, data, objective, adapters, parallel plan and training settings
//! read together, and the checks that span them.

use super::adapter::adapters;
use super::cluster::expect_def;
use super::model::model;
use super::objective::{default_fields, objective, placeholders, required_heads};
use super::parallel::parallel;
use super::read::*;
use super::train::train;
use super::types::*;
use crate::diagnostics::{Code, Diagnostic, Span};
use crate::resolve::Spanned;
use crate::syntax::DefKind;
use std::collections::BTreeMap;

pub fn experiment(cx: &Cx, v: &Spanned) -> Option<Experiment> {
    let mut r = expect_def(cx, v, DefKind::Experiment, "")?;
    let name = r.record.kind.name().unwrap_or("experiment").to_string();
    let model_v = r.required("model");
    let model_span = model_v.as_ref().map_or(r.span(), |v| v.span);
    let model = model_v.and_then(|v| model(cx, &v, "model"));
    let objective_v = r.get("objective");
    let objective_span = objective_v.as_ref().map_or(r.span(), |v| v.span);
    let objective = match &objective_v {
        Some(v) => objective(cx, v, "objective"),
        None if r.has("objective") => None,
        None => {
            r.defaulted("objective");
            Some(Objective::CausalLm)
        }
    };
    let data_span = r.span_of("data");
    let data = match r.get("data") {
        Some(v) => data(cx, &v, objective.as_ref()),
        None if r.has("data") => None,
        None => Some(Data {
            fields: objective.as_ref().map(field_map).unwrap_or_default(),
            ..Data::default()
        }),
    };
    if let (Some(o), Some(d)) = (&objective, &data) {
        check_placeholders(cx, o, d, r.has("data").then_some(data_span));
    }
    let adapters = r.or("adapter", (Vec::new(), Vec::new()), |cx, v| {
        adapters(cx, v, "adapters", model.as_ref())
    });
    let (adapters, adapter_weights) = match adapters {
        Some((a, w)) => (Some(a), Some(w)),
        None => (None, None),
    };
    let parallel = match r.get("parallel") {
        Some(v) => record(cx, &v, "parallel", "parallel settings").and_then(|mut p| {
            let out = parallel(&mut p, model.as_ref());
            p.finish();
            out
        }),
        None if r.has("parallel") => None,
        None => parallel(
            &mut Rec::new(cx, empty(r.span()), "parallel", "parallel"),
            model.as_ref(),
        ),
    };
    // By default a sequence fills the learned positions the virtual tokens leave.
    let virtual_tokens = adapters
        .iter()
        .flatten()
        .find_map(Adapter::virtual_tokens)
        .unwrap_or(0);
    let positions = model
        .as_ref()
        .map(|m| m.positions.saturating_sub(virtual_tokens).max(1));
    let train = match r.get("train") {
        Some(v) => record(cx, &v, "train", "training settings").and_then(|mut t| {
            let out = train(
                &mut t,
                positions,
                parallel.as_ref().map(|p| (p, r_parallel_spans(cx))),
            );
            t.finish();
            out
        }),
        None if r.has("train") => None,
        None => train(
            &mut Rec::new(cx, empty(r.span()), "train", "train"),
            positions,
            None,
        ),
    };
    let init = r.opt("init", super::objective::experiment_name);
    cx.origins.borrow_mut().rename("adapter", "adapters");
    let experiment_span = r.span();
    let adapter_span = r.span_of("adapter");
    r.finish();

    if let (Some(Objective::Ppo(_)), Some(list)) = (&objective, &adapters) {
        if let Some(a) = list
            .iter()
            .find(|a| matches!(a, Adapter::Prompt { .. } | Adapter::Ptuning { .. }))
        {
            cx.report(
                Diagnostic::new(Code::Conflict, format!("PPO cannot train `{}`: the reference policy would see a different sequence", a.name()))
                    .at(adapter_span, "prepends virtual tokens to the policy's input")
                    .also(objective_span, "compares the policy with the reference token by token")
                    .help("use lora, ia3 or prefix (which leaves the sequence unchanged) with ppo"),
            );
        }
    }
    if let (Some(m), Some(o)) = (&model, &objective) {
        for head in required_heads(o) {
            if !m.output_heads.iter().any(|h| h.name() == *head) {
                let have: Vec<&str> = m.output_heads.iter().map(OutputHead::name).collect();
                cx.report(
                    Diagnostic::new(Code::Head, format!("this objective trains through the `{head}` head, which model `{}` does not have", m.name))
                        .at(objective_span, format!("needs the `{head}` head"))
                        .also(model_span, format!("output_heads = [{}]", have.join(", ")))
                        .help(format!("add it to the model: `{} {{ output_heads = [{}] }}`", m.name, with_head(&have, head))),
                );
            }
        }
    }
    if let (Some(m), Some(t)) = (&model, &train) {
        let adapters = adapters.as_deref().unwrap_or_default();
        check_positions(cx, m, t, adapters, experiment_span, model_span);
    }
    Some(Experiment {
        name,
        init: init?,
        model: model?,
        data: data?,
        objective: objective?,
        adapters: adapters?,
        adapter_weights: adapter_weights?,
        parallel: parallel?,
        train: train?,
        origins: cx.origins.borrow().clone(),
    })
}

/// Learned positions must cover the sequence, and the virtual tokens of a prefix, prompt or
/// P-tuning adapter before it: lowering starts the real tokens' positions after them, as
/// Hugging Face does (a prefix is a past of that length; a prompt is part of the input).
fn check_positions(
    cx: &Cx,
    m: &Model,
    t: &Train,
    adapters: &[Adapter],
    experiment_span: Span,
    model_span: Span,
) {
    let virtual_tokens = adapters
        .iter()
        .enumerate()
        .find_map(|(i, a)| Some((i, a.name(), a.virtual_tokens()?)));
    let needed = t
        .seq_len
        .saturating_add(virtual_tokens.map_or(0, |(_, _, n)| n));
    if m.position != Position::Learned || needed <= m.positions {
        return;
    }
    let origins = cx.origins.borrow();
    // A default seq_len leaves room for the virtual tokens; only they can be too many then.
    let seq_len_span = origins.span("train.seq_len");
    let positions_span = origins.span("model.positions").unwrap_or(model_span);
    let d = match virtual_tokens {
        None => Diagnostic::new(
            Code::Range,
            format!(
                "seq_len = {} is longer than the model's {} learned positions",
                t.seq_len, m.positions
            ),
        )
        .at(seq_len_span.unwrap_or(experiment_span), "too long")
        .help(format!("use seq_len <= {}", m.positions)),
        Some((i, name, tokens)) => {
            let tokens_span = origins
                .span(&format!("adapters.{i}.tokens"))
                .or_else(|| origins.span(&format!("adapters.{i}")))
                .unwrap_or(experiment_span);
            let tokens_label =
                format!("`{name}` places {tokens} virtual tokens before the sequence");
            let d = match seq_len_span {
                Some(span) => Diagnostic::new(
                    Code::Range,
                    format!(
                        "seq_len = {} and {tokens} virtual tokens need {needed} positions, more than the model's {} learned positions",
                        t.seq_len, m.positions
                    ),
                )
                .at(span, format!("{needed} positions with the virtual tokens"))
                .also(tokens_span, tokens_label),
                None => Diagnostic::new(
                    Code::Range,
                    format!(
                        "{tokens} virtual tokens leave no room for a sequence in the model's {} learned positions",
                        m.positions
                    ),
                )
                .at(tokens_span, tokens_label),
            };
            let mut fixes = Vec::new();
            if tokens < m.positions {
                fixes.push(format!("seq_len <= {}", m.positions - tokens));
            }
            if t.seq_len < m.positions {
                fixes.push(format!("tokens <= {}", m.positions - t.seq_len));
            }
            fixes.push(format!("a model with positions >= {needed}"));
            d.help(format!(
                "the real tokens' positions start after the virtual tokens; use {}",
                fixes.join(", or ")
            ))
        }
    };
    cx.report(d.also(positions_span, "positions"));
}

fn with_head(have: &[&str], head: &str) -> String {
    let mut all: Vec<&str> = have.to_vec();
    all.push(head);
    all.join(", ")
}

/// Spans the training checks need from the parallel block (data degree), read back from
/// the recorded origins.
fn r_parallel_spans(cx: &Cx) -> Option<Span> {
    cx.origins.borrow().span("parallel.plan.data")
}

fn field_map(objective: &Objective) -> BTreeMap<String, String> {
    default_fields(objective)
        .into_iter()
        .map(|f| (f.clone(), f))
        .collect()
}

fn data(cx: &Cx, v: &Spanned, objective: Option<&Objective>) -> Option<Data> {
    let mut r = record(cx, v, "data", "data settings")?;
    // A path is relative to the file it is written in (an inherited experiment keeps its
    // parent's data); the spec stores it joined with that file's directory.
    let path = |r: &mut Rec, name: &'static str| {
        r.opt(name, |cx, v| {
            let p = string(cx, v)?;
            let dir = cx.ev.program.modules.iter().find(|m| m.file == v.span.file).and_then(|m| m.dir.clone());
            let Some(dir) = dir else { return Some(p) };
            let joined = dir.join(&p);
            if !joined.exists() {
                cx.report(
                    Diagnostic::new(Code::Io, format!("{name} file `{p}` does not exist"))
                        .at(v.span, "not found")
                        .help(format!("paths are relative to the directory of the file that names them (`{}`)", crate::diagnostics::display_dir(&dir))),
                );
                return None;
            }
            Some(joined.display().to_string())
        })
    };
    let train = path(&mut r, "train");
    let eval = path(&mut r, "eval");
    let tokenizer = path(&mut r, "tokenizer");
    let mut fields = objective.map(field_map).unwrap_or_default();
    let custom = r.opt("fields", |cx, v| {
        let f = record(cx, v, "data.fields", "a record of field = \"key\"")?;
        let mut out = BTreeMap::new();
        for name in f.record.fields.keys() {
            let value = cx.ev.field(&f.record, name)?;
            out.insert(name.clone(), string(cx, &value)?);
            cx.origins
                .borrow_mut()
                .source(&format!("data.fields.{name}"), value.span);
        }
        Some(out)
    });
    if let Some(Some(custom)) = &custom {
        fields.extend(custom.clone());
    }
    r.finish();
    Some(Data {
        train: train?,
        eval: eval?,
        tokenizer: tokenizer?,
        fields,
    })
}

/// Every `{placeholder}` of a PET pattern must be a field of the data records.
fn check_placeholders(cx: &Cx, objective: &Objective, data: &Data, data_span: Option<Span>) {
    let Objective::Pvp(pvp) = objective else {
        return;
    };
    let Some(span) = cx.origins.borrow().span("objective.pattern") else {
        return;
    };
    for (name, at) in placeholders(cx, &pvp.pattern, span) {
        if data.fields.contains_key(&name) {
            continue;
        }
        let known: Vec<&str> = data.fields.keys().map(String::as_str).collect();
        let mut d = Diagnostic::new(
            Code::Pattern,
            format!("placeholder `{{{name}}}` is not a data field"),
        )
        .at(at, "not a field of the data records");
        d = match data_span {
            Some(span) => d.also(span, format!("data fields: {}", known.join(", "))),
            None => d.note(format!("data fields: {}", known.join(", "))),
        };
        d = match crate::diagnostics::did_you_mean(&name, known.iter().copied()) {
            Some(s) => d.help(format!("did you mean `{{{s}}}`?")),
            None => d.help(format!(
                "declare it: data {{ fields = {{ {name} = \"{name}\" }} }}"
            )),
        };
        cx.report(d);
    }
}

pub fn pipeline(cx: &Cx, v: &Spanned) -> Option<Pipeline> {
    let mut r = expect_def(cx, v, DefKind::Pipeline, "")?;
    let name = r.record.kind.name().unwrap_or("pipeline").to_string();
    let stages_v = r.required("stages");
    r.finish();
    let stages_v = stages_v?;
    let items = list(&stages_v);
    if items.is_empty() {
        cx.report(
            Diagnostic::new(Code::Missing, "a pipeline needs at least one stage")
                .at(stages_v.span, "empty"),
        );
        return None;
    }
    let mut stages: Vec<Experiment> = Vec::new();
    let mut ok = true;
    for item in &items {
        cx.origins.replace(super::Origins::default());
        let Some(mut e) = experiment(cx, item) else {
            ok = false;
            continue;
        };
        let earlier: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
        if earlier.contains(&e.name.as_str()) {
            cx.report(
                Diagnostic::new(Code::Duplicate, format!("stage `{}` appears twice", e.name))
                    .at(item.span, "again here"),
            );
            ok = false;
        }
        // Each reference to another stage must point backwards: a stage starts from, and
        // compares against, outputs that already exist.
        let mut references = vec![("starts from", e.init.clone())];
        if let Objective::Ppo(ppo) = &e.objective {
            references.push(("uses the reward model of", Some(ppo.reward_model.clone())));
            references.push(("uses the reference policy of", ppo.reference.clone()));
        }
        for (what, target) in references {
            let Some(target) = target else { continue };
            if !earlier.contains(&target.as_str()) {
                cx.report(
                    Diagnostic::new(
                        Code::Conflict,
                        format!(
                            "stage `{}` {what} `{target}`, which is not an earlier stage",
                            e.name
                        ),
                    )
                    .at(item.span, "this stage")
                    .help(
                        "order the stages so that each one only uses outputs of stages before it",
                    ),
                );
                ok = false;
            }
        }
        if e.init.is_none() {
            e.init = stages.last().map(|prev| prev.name.clone());
        }
        stages.push(e);
    }
    ok.then_some(Pipeline { name, stages })
}
