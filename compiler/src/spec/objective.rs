//! Objectives, and the checks a compiler can make of a PET pattern-verbalizer pair.

use super::limits;
use super::read::*;
use super::types::*;
use crate::diagnostics::{Code, Diagnostic, Span};
use crate::resolve::{RecordKind, Spanned, Value};
use crate::syntax::DefKind;

const OBJECTIVES: &[&str] = &["causal_lm", "mlm", "nsp", "pvp", "sft", "reward", "ppo"];

/// An objective and the span it was written at.
pub fn objective(cx: &Cx, v: &Spanned, path: &str) -> Option<Objective> {
    if let Value::Sum(parts) = &v.value {
        return sum(cx, v, parts, path);
    }
    let var = variant(cx, v, "objective", OBJECTIVES)?;
    let mut r = match &var.record {
        Some(record) => Rec::new(cx, record.clone(), path, var.name.clone()),
        None => Rec::new(cx, empty(v.span), path, var.name.clone()),
    };
    let out = match var.name.as_str() {
        "causal_lm" => Some(Objective::CausalLm),
        "mlm" => mlm(&mut r).map(Objective::Mlm),
        "nsp" => r
            .or("random_next", 0.5, probability)
            .map(|random_next| Objective::Nsp { random_next }),
        "pvp" => pvp(&mut r).map(Objective::Pvp),
        "sft" => {
            let prompt = r.or("prompt", "prompt".to_string(), string);
            let response = r.or("response", "response".to_string(), string);
            Some(Objective::Sft {
                prompt: prompt?,
                response: response?,
            })
        }
        "reward" => {
            let chosen = r.or("chosen", "chosen".to_string(), string);
            let rejected = r.or("rejected", "rejected".to_string(), string);
            Some(Objective::Reward {
                chosen: chosen?,
                rejected: rejected?,
            })
        }
        _ => ppo(&mut r).map(Objective::Ppo),
    };
    r.finish();
    out
}

fn empty(span: Span) -> std::rc::Rc<crate::resolve::Record> {
    std::rc::Rc::new(crate::resolve::Record {
        kind: RecordKind::Plain,
        span,
        fields: Default::default(),
    })
}

/// `mlm + nsp`, the one composition BERT pretraining needs.
fn sum(cx: &Cx, v: &Spanned, parts: &[Spanned], path: &str) -> Option<Objective> {
    let mut mlm_part = None;
    let mut nsp_part = None;
    for part in parts {
        match objective(cx, part, path)? {
            Objective::Mlm(m) if mlm_part.is_none() => mlm_part = Some(m),
            Objective::Nsp { random_next } if nsp_part.is_none() => nsp_part = Some(random_next),
            _ => {
                let d = Diagnostic::new(
                    Code::Conflict,
                    "objectives can only be combined as `mlm + nsp`",
                )
                .at(part.span, "cannot be combined here");
                let d = if parts.iter().any(|p| cx.text(p.span).starts_with("pvp")) {
                    d.help("PET's auxiliary MLM loss is `pvp { mlm_weight = ... }`, not a sum")
                } else {
                    d.help("BERT pretraining is `mlm + nsp`; other objectives train alone")
                };
                cx.report(d);
                return None;
            }
        }
    }
    match (mlm_part, nsp_part) {
        (Some(mlm), Some(random_next)) => Some(Objective::MlmNsp { mlm, random_next }),
        _ => {
            cx.report(
                Diagnostic::new(
                    Code::Conflict,
                    "objectives can only be combined as `mlm + nsp`",
                )
                .at(v.span, "this sum"),
            );
            None
        }
    }
}

fn mlm(r: &mut Rec) -> Option<Mlm> {
    let prob = r.or("prob", 0.15, |cx, v| {
        number_where(cx, v, "in (0, 1)", |x| x > 0.0 && x < 1.0)
    });
    let strategy = r.or("strategy", MaskStrategy::Token, |cx, v| {
        choice(
            cx,
            v,
            "masking strategy",
            &[
                ("token", MaskStrategy::Token),
                ("whole_word", MaskStrategy::WholeWord),
                ("entity", MaskStrategy::Entity),
                ("span", MaskStrategy::Span),
            ],
        )
    });
    let replace = r.or("replace", [0.8, 0.1, 0.1], replace_split);
    let max_predictions = r.or("max_predictions", 20, size(limits::MAX_PREDICTIONS));
    Some(Mlm {
        prob: prob?,
        strategy: strategy?,
        replace: replace?,
        max_predictions: max_predictions?,
    })
}

/// `[80%, 10%, 10%]`: masked, random, kept; must add up to one.
fn replace_split(cx: &Cx, v: &Spanned) -> Option<[f64; 3]> {
    let items = match &v.value {
        Value::List(items) if items.len() == 3 => items.clone(),
        _ => {
            cx.report(
                Diagnostic::new(
                    Code::Type,
                    "`replace` is three fractions: [MASK], random token, unchanged",
                )
                .at(v.span, "expected a list of three")
                .help("BERT's split is `replace = [80%, 10%, 10%]`"),
            );
            return None;
        }
    };
    let mut out = [0.0; 3];
    for (slot, item) in out.iter_mut().zip(items.iter()) {
        *slot = probability(cx, item)?;
    }
    if (out.iter().sum::<f64>() - 1.0).abs() > 1e-9 {
        cx.report(
            Diagnostic::new(
                Code::Range,
                format!(
                    "the replacement split adds up to {}%, not 100%",
                    (out.iter().sum::<f64>() * 100.0).round()
                ),
            )
            .at(v.span, "must add up to 100%"),
        );
        return None;
    }
    Some(out)
}

fn pvp(r: &mut Rec) -> Option<Pvp> {
    let pattern = r.req("pattern", string);
    let pattern_span = r.span_of("pattern");
    let verbalizer = r.required("verbalizer").and_then(|v| verbalizer(r.cx, &v));
    let mlm_weight = r.or("mlm_weight", 1e-4, |cx, v| {
        number_where(cx, v, "in [0, 1)", |x| (0.0..1.0).contains(&x))
    });
    let pattern = pattern?;
    check_mask_count(r.cx, &pattern, pattern_span);
    Some(Pvp {
        pattern,
        verbalizer: verbalizer?,
        mlm_weight: mlm_weight?,
    })
}

fn check_mask_count(cx: &Cx, pattern: &str, span: Span) {
    let masks = pattern.matches("[MASK]").count();
    if masks != 1 {
        let what = if masks == 0 {
            "no [MASK]".to_string()
        } else {
            format!("{masks} [MASK]s")
        };
        cx.report(
            Diagnostic::new(
                Code::Pattern,
                format!("a PET pattern needs exactly one [MASK]; this one has {what}"),
            )
            .at(span, "the verbalizer word is predicted at the one [MASK]")
            .help("for example: \"{text} All in all, it was [MASK].\""),
        );
    }
}

/// The `{placeholders}` of a pattern with their spans in the source, and unclosed braces.
pub fn placeholders(cx: &Cx, pattern: &str, span: Span) -> Vec<(String, Span)> {
    // Offsets map into the source only when the value was written right there as a literal
    // without escapes (not through a `let`, not with `\"`).
    let exact = cx.text(span) == format!("\"{pattern}\"");
    let at = |start: usize, end: usize| {
        if exact {
            Span {
                file: span.file,
                start: span.start + 1 + start,
                end: span.start + 1 + end,
            }
        } else {
            span
        }
    };
    let mut out = Vec::new();
    let mut rest = 0;
    while let Some(open) = pattern[rest..].find('{') {
        let open = rest + open;
        match pattern[open..].find('}') {
            Some(close) => {
                let close = open + close;
                out.push((pattern[open + 1..close].to_string(), at(open, close + 1)));
                rest = close + 1;
            }
            None => {
                cx.report(
                    Diagnostic::new(Code::Pattern, "unclosed `{` in PET pattern")
                        .at(at(open, pattern.len()), "placeholder is not closed")
                        .help("placeholders look like {text}"),
                );
                break;
            }
        }
    }
    out
}

fn verbalizer(cx: &Cx, v: &Spanned) -> Option<Vec<(String, String)>> {
    let r = record(cx, v, "", "a record of label: word")?;
    let mut out: Vec<(String, String)> = Vec::new();
    let mut spans: Vec<Span> = Vec::new();
    let mut ok = true;
    for label in r.record.fields.keys() {
        let Some(word) = cx.ev.field(&r.record, label) else {
            ok = false;
            continue;
        };
        let Some(text) = string(cx, &word) else {
            ok = false;
            continue;
        };
        if text.trim().is_empty() || text.split_whitespace().count() > 1 {
            cx.report(
                Diagnostic::new(
                    Code::Verbalizer,
                    format!("the verbalizer word for `{label}` must be one word"),
                )
                .at(word.span, "one word, predicted at the mask"),
            );
            ok = false;
        }
        if let Some(i) = out.iter().position(|(_, w)| *w == text) {
            cx.report(
                Diagnostic::new(
                    Code::Verbalizer,
                    format!(
                        "labels `{}` and `{label}` share the word \"{text}\"",
                        out[i].0
                    ),
                )
                .at(word.span, "used again here")
                .also(spans[i], "first used here")
                .help("each label needs its own word, or the classes cannot be told apart"),
            );
            ok = false;
        }
        out.push((label.clone(), text));
        spans.push(word.span);
    }
    if out.len() < 2 {
        cx.report(
            Diagnostic::new(Code::Verbalizer, "a verbalizer needs at least two labels")
                .at(v.span, "here"),
        );
        return None;
    }
    ok.then_some(out)
}

fn ppo(r: &mut Rec) -> Option<Ppo> {
    let kl = r.or("kl", 0.1, |cx, v| {
        number_where(cx, v, "at least 0", |x| x >= 0.0)
    });
    let kl_target = r.opt("kl_target", positive_number);
    let kl_horizon = r.or("kl_horizon", DEFAULT_KL_HORIZON, positive);
    let clip = r.or("clip", 0.2, positive_number);
    let value_clip = r.or("value_clip", 0.2, positive_number);
    let gamma = r.or("gamma", 1.0, probability);
    let lambda = r.or("lambda", 0.95, probability);
    let epochs = r.or("epochs", 4, positive);
    let value_coef = r.or("value_coef", 0.1, |cx, v| {
        number_where(cx, v, "at least 0", |x| x >= 0.0)
    });
    let response_length = r.or("response_length", 48, size(limits::RESPONSE_LENGTH));
    let temperature = r.or("temperature", 1.0, positive_number);
    let reward_model = r.req("reward_model", experiment_name);
    let reference = r.opt("reference", experiment_name);
    Some(Ppo {
        kl: kl?,
        kl_target: kl_target?,
        kl_horizon: kl_horizon?,
        clip: clip?,
        value_clip: value_clip?,
        gamma: gamma?,
        lambda: lambda?,
        epochs: epochs?,
        value_coef: value_coef?,
        response_length: response_length?,
        temperature: temperature?,
        reward_model: reward_model?,
        reference: reference?,
    })
}

/// A reference to an experiment (a pipeline stage), by name.
pub fn experiment_name(cx: &Cx, v: &Spanned) -> Option<String> {
    match &v.value {
        Value::Record(r) => match &r.kind {
            RecordKind::Def {
                kind: DefKind::Experiment,
                name,
                ..
            } => Some(name.clone()),
            _ => {
                cx.type_error(v, "an experiment");
                None
            }
        },
        Value::Symbol { name, module } => {
            let names = cx.ev.visible_names(*module, Some(DefKind::Experiment));
            let mut d = Diagnostic::new(Code::UnknownName, format!("unknown experiment `{name}`"))
                .at(v.span, "no experiment of this name");
            if let Some(s) = crate::diagnostics::did_you_mean(name, names.iter().copied()) {
                d = d.help(format!("did you mean `{s}`?"));
            }
            cx.report(d);
            None
        }
        _ => {
            cx.type_error(v, "an experiment");
            None
        }
    }
}

/// The output head an objective trains through, for checking against the model.
pub fn required_heads(objective: &Objective) -> &'static [&'static str] {
    match objective {
        Objective::CausalLm | Objective::Sft { .. } | Objective::Ppo(_) => &["lm"],
        Objective::Mlm(_) | Objective::Pvp(_) => &["mlm"],
        Objective::Nsp { .. } => &["nsp"],
        Objective::MlmNsp { .. } => &["mlm", "nsp"],
        Objective::Reward { .. } => &["reward"],
    }
}

/// Data fields an objective reads from each record, by default.
pub fn default_fields(objective: &Objective) -> Vec<String> {
    let v: Vec<&str> = match objective {
        Objective::CausalLm
        | Objective::Mlm(_)
        | Objective::Nsp { .. }
        | Objective::MlmNsp { .. } => vec!["text"],
        Objective::Pvp(_) => vec!["text", "label"],
        Objective::Sft { prompt, response } => return vec![prompt.clone(), response.clone()],
        Objective::Reward { chosen, rejected } => {
            return vec!["prompt".into(), chosen.clone(), rejected.clone()]
        }
        Objective::Ppo(_) => vec!["prompt"],
    };
    v.into_iter().map(String::from).collect()
}
