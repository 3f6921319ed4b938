//! Parameter-efficient adapters, and module names: Kiln's own and each family's Hugging Face
//! names, resolved to Kiln's family-independent [`Target`]s.

use super::limits;
use super::read::*;
use super::types::*;
use crate::diagnostics::{did_you_mean, Code, Diagnostic};
use crate::hf;
use crate::resolve::{RecordKind, Spanned, Value};
use std::rc::Rc;

const ADAPTERS: &[&str] = &[
    "lora",
    "prefix",
    "prompt",
    "ptuning",
    "ptuning_v2",
    "bottleneck",
    "ia3",
    "freeze",
];

const KILN_TARGETS: &[(&str, &[Target])] = &[
    ("qkv", &[Target::Qkv]),
    ("query", &[Target::Query]),
    ("key", &[Target::Key]),
    ("value", &[Target::Value]),
    ("attn_out", &[Target::AttnOut]),
    ("ffn_up", &[Target::FfnUp]),
    ("ffn_gate", &[Target::FfnGate]),
    ("ffn_down", &[Target::FfnDown]),
];

/// The family's Hugging Face module paths inside a block, as PEFT matches target names.
fn hf_modules(family: Family) -> Vec<(&'static str, Target)> {
    let f = hf::of(family);
    f.peft().modules(f.names())
}

/// The Kiln targets a name denotes in a family, or `None` if it names nothing there.
pub fn resolve_target(name: &str, model: &Model) -> Option<Vec<Target>> {
    if name == "all_linear" || name == "all-linear" {
        return Some(
            hf_modules(model.family)
                .iter()
                .map(|(_, t)| *t)
                .filter(|t| *t != Target::FfnGate || model.mlp == Mlp::Gated)
                .collect(),
        );
    }
    if let Some((_, targets)) = KILN_TARGETS.iter().find(|(n, _)| *n == name) {
        // Where the family has no fused projection (only GPT-2 has), `qkv` means all three.
        let fused = hf_modules(model.family)
            .iter()
            .any(|(_, t)| *t == Target::Qkv);
        if targets == &[Target::Qkv] && !fused {
            return Some(vec![Target::Query, Target::Key, Target::Value]);
        }
        if targets == &[Target::FfnGate] && model.mlp != Mlp::Gated {
            return None;
        }
        return Some(targets.to_vec());
    }
    let matched: Vec<Target> = hf_modules(model.family)
        .iter()
        .filter(|(path, _)| *path == name || path.ends_with(&format!(".{name}")))
        .map(|(_, t)| *t)
        .collect();
    (!matched.is_empty()).then_some(matched)
}

fn target_names(model: &Model) -> Vec<&'static str> {
    let mut names: Vec<&str> = KILN_TARGETS.iter().map(|(n, _)| *n).collect();
    for (path, _) in hf_modules(model.family) {
        names.push(path);
        names.push(path.rsplit('.').next().unwrap_or(path));
    }
    names.push("all_linear");
    names
}

/// A list of module names resolved to sorted, de-duplicated targets.
pub fn targets(cx: &Cx, v: &Spanned, model: Option<&Model>) -> Option<Vec<Target>> {
    let mut out = Vec::new();
    let mut ok = true;
    for item in list(v) {
        let Some(name) = name_like(cx, &item) else {
            ok = false;
            continue;
        };
        // Without a model (an adapter defined on its own) names are checked at use.
        let Some(model) = model else { continue };
        match resolve_target(&name, model) {
            Some(ts) => out.extend(ts),
            None => {
                let family = FAMILY_NAMES
                    .iter()
                    .find(|(_, f)| *f == model.family)
                    .map_or("this", |(n, _)| n);
                let mut d = Diagnostic::new(
                    Code::Target,
                    format!("{family} models have no module `{name}`"),
                )
                .at(item.span, "unknown module");
                d = match equivalent_in_family(&name, model) {
                    Some(hint) => d.help(hint),
                    None => match did_you_mean(&name, target_names(model)) {
                        Some(s) => d.help(format!("did you mean `{s}`?")),
                        None => d.help(format!("modules: {}", target_names(model).join(", "))),
                    },
                };
                cx.report(d);
                ok = false;
            }
        }
    }
    out.sort();
    out.dedup();
    if ok && out.is_empty() && model.is_some() {
        cx.report(Diagnostic::new(Code::Target, "no modules to adapt").at(v.span, "empty list"));
        return None;
    }
    ok.then_some(out)
}

/// For a module name of another family (`q_proj` on GPT-2), the name of the same module here.
fn equivalent_in_family(name: &str, model: &Model) -> Option<String> {
    let target = hf::FAMILIES
        .iter()
        .filter(|f| **f != model.family)
        .find_map(|f| {
            hf_modules(*f)
                .into_iter()
                .find(|(path, _)| *path == name || path.ends_with(&format!(".{name}")))
                .map(|(_, t)| t)
        })?;
    let here: Vec<(&str, Target)> = hf_modules(model.family)
        .into_iter()
        .filter(|(_, t)| {
            // GPT-2's fused projection corresponds to all three of the others'.
            let qkv = |x: &Target| matches!(x, Target::Query | Target::Key | Target::Value);
            *t == target || (*t == Target::Qkv && qkv(&target)) || (target == Target::Qkv && qkv(t))
        })
        .collect();
    let kiln = target.name();
    Some(match here.as_slice() {
        [] => format!("`{name}` is the `{kiln}` projection, which this model does not have"),
        [(path, Target::Qkv)] => format!(
            "`{name}` is the `{kiln}` projection; {} fuses query, key and value in `{}` (or write `{kiln}` to adapt it alone)",
            hf::of(model.family).title(),
            path.rsplit('.').next().unwrap_or(path)
        ),
        paths => {
            let paths: Vec<&str> = paths.iter().map(|(path, _)| *path).collect();
            format!("`{name}` is the `{kiln}` projection; here it is `{}` (or Kiln's `{kiln}`)", paths.join("`, `"))
        }
    })
}

const FAMILY_NAMES: &[(&str, Family)] = super::model::FAMILIES;

/// The family's defaults, as PEFT's (gpt2 `c_attn`; bert `query, value`; llama `q_proj, v_proj`).
fn default_lora_targets(model: &Model) -> Vec<Target> {
    hf::of(model.family).peft().lora.to_vec()
}

fn default_ia3(model: &Model) -> (Vec<Target>, Vec<Target>) {
    let (targets, feedforward) = hf::of(model.family).peft().ia3;
    (targets.to_vec(), feedforward.to_vec())
}

/// One adapter or a list of several.
/// The adapters of an experiment, and the weight directories of those read with `peft("dir")`.
pub fn adapters(
    cx: &Cx,
    v: &Spanned,
    path: &str,
    model: Option<&Model>,
) -> Option<(Vec<Adapter>, Vec<String>)> {
    let items = list(v);
    let mut out = Vec::new();
    let mut weights = Vec::new();
    let mut ok = true;
    let mut prepending: Option<(String, crate::diagnostics::Span)> = None;
    for (i, item) in items.iter().enumerate() {
        let item_path = if matches!(v.value, Value::List(_)) {
            format!("{path}.{i}")
        } else {
            format!("{path}.0")
        };
        cx.origins.borrow_mut().source(&item_path, item.span);
        match adapter(cx, item, &item_path, model) {
            Some((a, dir)) => {
                if dir.is_some() {
                    cx.origins.borrow_mut().source("adapter_weights", item.span);
                }
                weights.extend(dir);
                if a.prepends_tokens() {
                    if let Some((first, span)) = &prepending {
                        cx.report(
                            Diagnostic::new(
                                Code::Conflict,
                                format!("`{}` and `{first}` both prepend virtual tokens", a.name()),
                            )
                            .at(item.span, "second prompt-style adapter")
                            .also(*span, "first one")
                            .help("use one of prefix, prompt, ptuning and ptuning_v2"),
                        );
                        ok = false;
                    }
                    prepending = Some((a.name().to_string(), item.span));
                }
                out.push(a);
            }
            None => ok = false,
        }
    }
    ok.then_some((out, weights))
}

fn adapter(
    cx: &Cx,
    v: &Spanned,
    path: &str,
    model: Option<&Model>,
) -> Option<(Adapter, Option<String>)> {
    let var = variant(cx, v, "adapter", ADAPTERS)?;
    let record = var.record.clone().unwrap_or_else(|| {
        Rc::new(crate::resolve::Record {
            kind: RecordKind::Plain,
            span: v.span,
            fields: Default::default(),
        })
    });
    let mut r = Rec::new(cx, record, path, var.name.clone());
    // Where trained weights for this adapter are (`peft("dir")` sets it).
    let weights = r.opt("checkpoint", string);
    // Cross-field failures set `ok`, so that unknown fields are still reported below.
    let mut ok = true;
    let out = match var.name.as_str() {
        "lora" => {
            let rank = r.or("rank", 8, size(limits::LORA_RANK));
            let alpha = r.or_derived("alpha", rank.map(|x| x as f64), positive_number);
            let dropout_rate = r.or("dropout", 0.0, dropout);
            let default_targets = model.map(default_lora_targets).unwrap_or_default();
            let targets = r.or("targets", default_targets, |cx, v| targets(cx, v, model));
            let rslora = r.or("rslora", false, boolean);
            let dora = r.or("dora", false, boolean);
            let bias = r.or("bias", LoraBias::None, |cx, v| {
                choice(
                    cx,
                    v,
                    "LoRA bias mode",
                    &[
                        ("none", LoraBias::None),
                        ("all", LoraBias::All),
                        ("lora_only", LoraBias::LoraOnly),
                    ],
                )
            });
            Some(Adapter::Lora(Lora {
                rank: rank?,
                alpha: alpha?,
                dropout: dropout_rate?,
                targets: targets?,
                rslora: rslora?,
                dora: dora?,
                bias: bias?,
            }))
        }
        "prefix" => {
            let tokens = r.or("tokens", 20, size(limits::VIRTUAL_TOKENS));
            let projection = r.opt("projection", size(limits::PREFIX_PROJECTION));
            Some(Adapter::Prefix {
                tokens: tokens?,
                projection: projection?,
            })
        }
        "prompt" => {
            let tokens = r.or("tokens", 20, size(limits::VIRTUAL_TOKENS));
            let init = r.or("init", PromptInit::Random, prompt_init);
            Some(Adapter::Prompt {
                tokens: tokens?,
                init: init?,
            })
        }
        "ptuning" => {
            let tokens = r.or("tokens", 20, size(limits::VIRTUAL_TOKENS));
            let encoder = r.or("encoder", PromptEncoder::Mlp, |cx, v| {
                choice(
                    cx,
                    v,
                    "prompt encoder",
                    &[("mlp", PromptEncoder::Mlp), ("lstm", PromptEncoder::Lstm)],
                )
            });
            let hidden = r.or_derived(
                "hidden",
                model.map(|m| m.hidden).or(Some(128)),
                size(limits::PROMPT_ENCODER_HIDDEN),
            );
            Some(Adapter::Ptuning {
                tokens: tokens?,
                encoder: encoder?,
                hidden: hidden?,
            })
        }
        "ptuning_v2" => r
            .or("tokens", 20, size(limits::VIRTUAL_TOKENS))
            .map(|tokens| Adapter::PtuningV2 { tokens }),
        "bottleneck" => {
            let placement = r.or("placement", Placement::Pfeiffer, |cx, v| {
                choice(
                    cx,
                    v,
                    "adapter placement",
                    &[
                        ("houlsby", Placement::Houlsby),
                        ("pfeiffer", Placement::Pfeiffer),
                    ],
                )
            });
            let default_activation = match placement {
                Some(Placement::Houlsby) => Activation::Silu,
                _ => Activation::Relu,
            };
            let reduction = r.or("reduction", 16, positive);
            let reduction_span = r.span_of("reduction");
            let activation = r.or("activation", default_activation, |cx, v| {
                choice(cx, v, "activation", super::model::ACTIVATIONS)
            });
            if let (Some(red), Some(m)) = (reduction, model) {
                if m.hidden % red != 0 {
                    cx.report(
                        Diagnostic::new(
                            Code::Divisibility,
                            format!("reduction = {red} does not divide hidden = {}", m.hidden),
                        )
                        .at(reduction_span, "the bottleneck width is hidden / reduction"),
                    );
                    ok = false;
                }
            }
            Some(Adapter::Bottleneck {
                placement: placement?,
                reduction: reduction?,
                activation: activation?,
            })
        }
        "ia3" => {
            let (dt, dff) = model.map(default_ia3).unwrap_or_default();
            let targets_v = r.or("targets", dt, |cx, v| targets(cx, v, model));
            let ff_span = r.span_of("feedforward");
            // Without `feedforward`, the family's default among the targets given.
            let dff: Vec<Target> = match &targets_v {
                Some(t) => dff.into_iter().filter(|f| t.contains(f)).collect(),
                None => dff,
            };
            let feedforward = r.or("feedforward", dff, |cx, v| targets(cx, v, model));
            if let (Some(t), Some(ff)) = (&targets_v, &feedforward) {
                if let Some(extra) = ff.iter().find(|f| !t.contains(f)) {
                    cx.report(
                        Diagnostic::new(
                            Code::Conflict,
                            format!(
                                "feed-forward module `{}` is not among the IA3 targets",
                                extra.name()
                            ),
                        )
                        .at(ff_span, "must be a subset of `targets`")
                        .help("PEFT requires feedforward_modules to be a subset of target_modules"),
                    );
                    ok = false;
                }
            }
            Some(Adapter::Ia3 {
                targets: targets_v?,
                feedforward: feedforward?,
            })
        }
        _ => {
            let layers = r.or("layers", 0, non_negative);
            let layers_span = r.span_of("layers");
            let biases_only = r.or("biases_only", false, boolean);
            let norms_only = r.or("norms_only", false, boolean);
            let embeddings = r.or("embeddings", false, boolean);
            if let (Some(l), Some(m)) = (layers, model) {
                if l > m.layers {
                    cx.report(
                        Diagnostic::new(
                            Code::Range,
                            format!("cannot freeze {l} layers of a {}-layer model", m.layers),
                        )
                        .at(layers_span, format!("at most {}", m.layers)),
                    );
                    ok = false;
                }
            }
            Some(Adapter::Freeze(Freeze {
                layers: layers?,
                biases_only: biases_only?,
                norms_only: norms_only?,
                embeddings: embeddings?,
            }))
        }
    };
    r.finish();
    Some((out.filter(|_| ok)?, weights?))
}

fn prompt_init(cx: &Cx, v: &Spanned) -> Option<PromptInit> {
    let var = variant(cx, v, "prompt initialisation", &["random", "vocab", "text"])?;
    match var.name.as_str() {
        "random" => Some(PromptInit::Random),
        "vocab" => Some(PromptInit::Vocab),
        _ => match var.args.as_slice() {
            [text] => string(cx, text).map(PromptInit::Text),
            _ => {
                cx.report(
                    Diagnostic::new(Code::Type, "`text` takes the initialisation text")
                        .at(v.span, "write `text(\"Classify the review:\")`"),
                );
                None
            }
        },
    }
}
