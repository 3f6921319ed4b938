//! Models: the transformer's knobs, and the shape checks between them.

use super::cluster::expect_def;
use super::limits;
use super::read::*;
use super::types::*;
use crate::diagnostics::{Code, Diagnostic};
use crate::resolve::Spanned;
use crate::syntax::DefKind;

pub const FAMILIES: &[(&str, Family)] = &[
    ("gpt2", Family::Gpt2),
    ("bert", Family::Bert),
    ("llama", Family::Llama),
];
pub const ACTIVATIONS: &[(&str, Activation)] = &[
    ("gelu", Activation::Gelu),
    ("gelu_tanh", Activation::GeluTanh),
    ("relu", Activation::Relu),
    ("silu", Activation::Silu),
];

pub fn model(cx: &Cx, v: &Spanned, path: &str) -> Option<Model> {
    let mut r = expect_def(cx, v, DefKind::Model, path)?;
    let name = r.record.kind.name().unwrap_or("model").to_string();
    let family = r.req("family", |cx, v| choice(cx, v, "model family", FAMILIES));
    let vocab = r.req("vocab", size(limits::VOCAB));
    let positions = r.req("positions", size(limits::POSITIONS));
    let hidden = r.req("hidden", size(limits::HIDDEN));
    let layers = r.req("layers", size(limits::LAYERS));
    let heads = r.req("heads", size(limits::HEADS));
    let kv_heads = r.or_derived("kv_heads", heads, size(limits::KV_HEADS));
    let ffn = r.or_derived("ffn", hidden.map(|h| 4 * h), size(limits::FFN));
    let norm = r.or("norm", Norm::Layernorm { eps: 1e-5 }, norm);
    let activation = r.or("activation", Activation::Gelu, |cx, v| {
        choice(cx, v, "activation", ACTIVATIONS)
    });
    let mlp = r.or("mlp", Mlp::Plain, |cx, v| {
        choice(
            cx,
            v,
            "MLP kind",
            &[("plain", Mlp::Plain), ("gated", Mlp::Gated)],
        )
    });
    let position = r.or("position", Position::Learned, position);
    let block = r.or("block", Block::PreNorm, |cx, v| {
        choice(
            cx,
            v,
            "block layout",
            &[("pre_norm", Block::PreNorm), ("post_norm", Block::PostNorm)],
        )
    });
    let bias = r.or("bias", true, boolean);
    let tie_embeddings = r.or("tie_embeddings", true, boolean);
    let type_vocab = r.or("type_vocab", 0, count(limits::TYPE_VOCAB));
    let output_heads = r.or("output_heads", vec![OutputHead::Lm], output_heads);
    let dropout_rate = r.or("dropout", 0.0, dropout);
    let checkpoint = r.opt("checkpoint", string);

    // Shape checks, each pointing at both fields.
    if let (Some(h), Some(a)) = (hidden, heads) {
        if h % a != 0 {
            cx.report(
                Diagnostic::new(
                    Code::Divisibility,
                    format!("heads = {a} does not divide hidden = {h}"),
                )
                .at(r.span_of("heads"), format!("{a} heads"))
                .also(r.span_of("hidden"), format!("hidden = {h}"))
                .help(match divisors_near(h, a) {
                    Some(d) => format!("each head gets hidden / heads dimensions; try heads = {d}"),
                    None => "each head gets hidden / heads dimensions".to_string(),
                }),
            );
        }
    }
    if let (Some(a), Some(kv)) = (heads, kv_heads) {
        if kv > a || a % kv != 0 {
            cx.report(
                Diagnostic::new(Code::Divisibility, format!("kv_heads = {kv} does not divide heads = {a}"))
                    .at(r.span_of("kv_heads"), format!("{kv} key/value heads"))
                    .also(r.span_of("heads"), format!("heads = {a}"))
                    .help("grouped-query attention shares each key/value head among heads / kv_heads query heads"),
            );
        }
    }
    r.finish();
    Some(Model {
        name,
        family: family?,
        vocab: vocab?,
        positions: positions?,
        hidden: hidden?,
        layers: layers?,
        heads: heads?,
        kv_heads: kv_heads?,
        ffn: ffn?,
        norm: norm?,
        activation: activation?,
        mlp: mlp?,
        position: position?,
        block: block?,
        bias: bias?,
        tie_embeddings: tie_embeddings?,
        type_vocab: type_vocab?,
        output_heads: output_heads?,
        dropout: dropout_rate?,
        checkpoint: checkpoint?,
    })
}

/// The divisor of `n` closest to `near`, for suggestions.
fn divisors_near(n: u64, near: u64) -> Option<u64> {
    // Divisors come in pairs (d, n/d) with d ≤ √n; beyond a few million the hint is not
    // worth the search.
    let limit = (n as f64).sqrt() as u64;
    if limit > 1 << 22 {
        return None;
    }
    (1..=limit)
        .filter(|d| n % d == 0)
        .flat_map(|d| [d, n / d])
        .min_by_key(|d| (d.abs_diff(near), *d))
}

fn norm(cx: &Cx, v: &Spanned) -> Option<Norm> {
    let var = variant(cx, v, "normalisation", &["layernorm", "rmsnorm"])?;
    let default = if var.name == "rmsnorm" { 1e-6 } else { 1e-5 };
    let eps = match var.record {
        Some(record) => {
            let mut r = Rec::new(cx, record, "", var.name.clone());
            let eps = r.or("eps", default, positive_number);
            r.finish();
            eps?
        }
        None => default,
    };
    Some(if var.name == "rmsnorm" {
        Norm::Rmsnorm { eps }
    } else {
        Norm::Layernorm { eps }
    })
}

fn position(cx: &Cx, v: &Spanned) -> Option<Position> {
    let var = variant(cx, v, "position encoding", &["learned", "rotary", "none"])?;
    if var.name != "rotary" && var.record.is_some() {
        cx.report(
            Diagnostic::new(Code::Type, format!("`{}` takes no settings", var.name))
                .at(v.span, "remove the braces"),
        );
        return None;
    }
    Some(match var.name.as_str() {
        "rotary" => {
            let theta = match var.record {
                Some(record) => {
                    let mut r = Rec::new(cx, record, "", "rotary");
                    let theta = r.or("theta", 10000.0, positive_number);
                    r.finish();
                    theta?
                }
                None => 10000.0,
            };
            Position::Rotary { theta }
        }
        "learned" => Position::Learned,
        _ => Position::None,
    })
}

fn output_heads(cx: &Cx, v: &Spanned) -> Option<Vec<OutputHead>> {
    let mut out: Vec<OutputHead> = Vec::new();
    let mut ok = true;
    for item in list(v) {
        let Some(var) = variant(
            cx,
            &item,
            "output head",
            &["lm", "mlm", "nsp", "classifier", "reward", "value"],
        ) else {
            ok = false;
            continue;
        };
        if var.record.is_some() {
            cx.report(
                Diagnostic::new(
                    Code::Type,
                    format!("output head `{}` takes no settings", var.name),
                )
                .at(item.span, "remove the braces"),
            );
            ok = false;
            continue;
        }
        let head = match var.name.as_str() {
            "lm" => OutputHead::Lm,
            "mlm" => OutputHead::Mlm,
            "nsp" => OutputHead::Nsp,
            "reward" => OutputHead::Reward,
            "value" => OutputHead::Value,
            _ => match var.args.as_slice() {
                [n] => match int_in(cx, n, 2, u64::MAX)
                    .filter(|&labels| within(cx, limits::LABELS, labels, n.span))
                {
                    Some(labels) => OutputHead::Classifier { labels },
                    None => {
                        ok = false;
                        continue;
                    }
                },
                _ => {
                    cx.report(
                        Diagnostic::new(Code::Type, "a classifier head needs its number of labels")
                            .at(item.span, "write `classifier(3)` for three labels"),
                    );
                    ok = false;
                    continue;
                }
            },
        };
        if out.iter().any(|h| h.name() == head.name()) {
            cx.report(
                Diagnostic::new(
                    Code::Duplicate,
                    format!("output head `{}` is listed twice", head.name()),
                )
                .at(item.span, "listed again"),
            );
            ok = false;
            continue;
        }
        out.push(head);
    }
    ok.then_some(out)
}
