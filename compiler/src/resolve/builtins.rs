//! Builtin functions: `cpu(n)`, `node * n`, and the importers `hf("dir")` and `peft("dir")`
//! that turn a Hugging Face `config.json` / PEFT `adapter_config.json` into Kiln records.

use super::eval::Evaluator;
use super::value::{Env, Field, FieldSource, Record, RecordKind, Spanned, Value};
use crate::diagnostics::{Code, Diagnostic, FileId, Span};
use crate::hf;
use crate::syntax::DefKind;
use indexmap::IndexMap;
use serde_json::Value as Json;
use std::path::PathBuf;
use std::rc::Rc;

fn record(kind: RecordKind, span: Span, fields: Vec<(&str, Spanned)>) -> Rc<Record> {
    let fields: IndexMap<String, Field> = fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), Field::new(v.span, FieldSource::Value(v))))
        .collect();
    Rc::new(Record { kind, span, fields })
}

/// `node * n`: a cluster of `n` identical nodes.
pub(super) fn cluster_of(node: &Rc<Record>, n: i64, span: Span, n_span: Span) -> Value {
    cluster_named(
        format!("{} * {n}", node.kind.name().unwrap_or("node")),
        node,
        n,
        span,
        n_span,
    )
}

fn cluster_named(name: String, node: &Rc<Record>, n: i64, span: Span, n_span: Span) -> Value {
    let fields = vec![
        (
            "node",
            Spanned {
                value: Value::Record(node.clone()),
                span,
            },
        ),
        (
            "nodes",
            Spanned {
                value: Value::Int(n),
                span: n_span,
            },
        ),
    ];
    Value::Record(record(
        RecordKind::Def {
            kind: DefKind::Cluster,
            name,
            tag: None,
        },
        span,
        fields,
    ))
}

/// This machine's devices as one node: `cpu(n)`, `n` CPU devices (the prelude's
/// `cpu_host`); `gpu(n)` or `cuda(n)`, `n` of its NVIDIA GPUs (the prelude's `gpu_host`).
pub(super) fn local_devices(
    ev: &Evaluator,
    call: &str,
    args: &[Spanned],
    span: Span,
) -> Option<Value> {
    let (host_name, what) = match call {
        "cpu" => ("cpu_host", "CPU devices in this process"),
        _ => ("gpu_host", "GPUs of this machine"),
    };
    let n = match args {
        [Spanned {
            value: Value::Int(n),
            span,
        }] if *n >= 1 => Spanned {
            value: Value::Int(*n),
            span: *span,
        },
        [Spanned {
            value: Value::Int(n),
            span,
        }] => {
            ev.report(
                Diagnostic::new(Code::Range, format!("`{call}({n})` has no devices"))
                    .at(*span, "must be at least 1")
                    .help(format!("write `{call}(4)` for four {what}")),
            );
            return None;
        }
        _ => {
            ev.report(
                Diagnostic::new(Code::Type, format!("`{call}` takes the number of devices"))
                    .at(span, "expected one positive integer")
                    .help(format!("write `{call}(4)` for four {what}")),
            );
            return None;
        }
    };
    // The prelude's host, whatever the user's file calls `cpu_host` or `gpu_host`.
    let host = ev.program.prelude().and_then(|prelude| {
        let def = ev.program.module(prelude).defs.get(host_name)?;
        ev.definition(prelude, def)
    });
    let Some(Spanned {
        value: Value::Record(host),
        ..
    }) = host
    else {
        ev.report(
            Diagnostic::new(
                Code::Internal,
                format!("the prelude defines no `{host_name}` node"),
            )
            .at(span, format!("needed by `{call}(n)`")),
        );
        return None;
    };
    let mut fields: IndexMap<String, Field> = host
        .fields
        .iter()
        .map(|(k, f)| (k.clone(), f.reinstantiate()))
        .collect();
    fields.insert(
        "devices".into(),
        Field::new(n.span, FieldSource::Value(n.clone())),
    );
    let name = ev.program.sources.borrow().text_of(span).to_string();
    let node = Rc::new(Record {
        kind: RecordKind::Def {
            kind: DefKind::Node,
            name: host_name.into(),
            tag: None,
        },
        span,
        fields,
    });
    Some(cluster_named(name, &node, 1, span, span))
}

/// Reads `dir/file` relative to the calling module, registering it as a source so that later
/// diagnostics and spec origins can point into it.
fn read_json(
    ev: &Evaluator,
    args: &[Spanned],
    env: &Env,
    span: Span,
    func: &str,
    file: &str,
) -> Option<(FileId, serde_json::Map<String, Json>, String)> {
    let dir = match args {
        [Spanned {
            value: Value::Str(dir),
            ..
        }] => dir.clone(),
        _ => {
            ev.report(
                Diagnostic::new(Code::Type, format!("`{func}` takes a directory path"))
                    .at(span, "expected one string")
                    .help(format!(
                        "write `{func}(\"path/to/dir\")`; it reads {file} there"
                    )),
            );
            return None;
        }
    };
    let Some(base) = ev.program.module(env.module).dir.clone() else {
        ev.report(
            Diagnostic::new(
                Code::Io,
                format!("`{func}` cannot be used in the standard library"),
            )
            .at(span, "no directory to resolve against"),
        );
        return None;
    };
    let path: PathBuf = base.join(&dir).join(file);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            ev.report(
                Diagnostic::new(Code::Io, format!("cannot read `{}`: {e}", path.display()))
                    .at(span, format!("`{func}` looks for {file} in this directory"))
                    .help("the path is relative to this .kiln file's directory"),
            );
            return None;
        }
    };
    let id = ev
        .program
        .add_read_file(path.display().to_string(), text.clone(), span);
    match serde_json::from_str::<Json>(&text) {
        Ok(Json::Object(map)) => Some((id, map, path.display().to_string())),
        Ok(_) => {
            ev.report(
                Diagnostic::new(
                    Code::External,
                    format!("`{}` is not a JSON object", path.display()),
                )
                .at(span, "read from here"),
            );
            None
        }
        Err(e) => {
            let offset = line_offset(&text, e.line(), e.column());
            ev.report(
                Diagnostic::new(
                    Code::External,
                    format!("`{}` is not valid JSON: {e}", path.display()),
                )
                .at(Span::new(id, offset..offset), "here"),
            );
            None
        }
    }
}

fn line_offset(text: &str, line: usize, column: usize) -> usize {
    let start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    (start + column.saturating_sub(1)).min(text.len())
}

/// Turns JSON keys into spanned Kiln values; each value's span is its key in the file.
struct JsonFields<'a> {
    file: FileId,
    text: String,
    map: &'a serde_json::Map<String, Json>,
    whole: Span,
}

impl JsonFields<'_> {
    fn span_of(&self, key: &str) -> Span {
        let needle = format!("\"{key}\"");
        match self.text.find(&needle) {
            Some(at) => Span::new(self.file, at..at + needle.len()),
            None => self.whole,
        }
    }

    fn get(&self, key: &str) -> Option<Spanned> {
        let value = match self.map.get(key)? {
            Json::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64()?),
            },
            Json::String(s) => Value::Str(s.clone()),
            Json::Bool(b) => Value::Bool(*b),
            Json::Array(items) => Value::List(
                items
                    .iter()
                    .filter_map(|i| i.as_str())
                    .map(|s| Spanned {
                        value: Value::Str(s.to_string()),
                        span: self.span_of(key),
                    })
                    .collect(),
            ),
            _ => return None,
        };
        Some(Spanned {
            value,
            span: self.span_of(key),
        })
    }

    fn symbol(&self, key: &str, name: &str, module: super::ModuleId) -> Spanned {
        Spanned {
            value: Value::Symbol {
                name: name.to_string(),
                module,
            },
            span: self.span_of(key),
        }
    }

    fn report_unsupported(&self, ev: &Evaluator, key: &str, what: &str) {
        ev.report(
            Diagnostic::new(Code::External, format!("unsupported {key} {what}"))
                .at(self.span_of(key), "not supported by Kiln"),
        );
    }
}

/// The model fields that a config.json must give (the others have defaults).
const SHAPE_FIELDS: &[&str] = &["vocab", "positions", "hidden", "layers", "heads"];

/// The directory holding a file that `hf()` or `peft()` read, as a string value.
fn directory_of(file: &str, span: Span) -> Spanned {
    let dir = std::path::Path::new(file)
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    Spanned {
        value: Value::Str(dir),
        span,
    }
}

/// `hf("dir")`: a model record from a Hugging Face `config.json`, read as its family's
/// [`hf::Import`] says.
pub(super) fn hf(ev: &Evaluator, args: &[Spanned], env: &Env, span: Span) -> Option<Value> {
    let (file, map, path) = read_json(ev, args, env, span, "hf", "config.json")?;
    let text = ev.program.sources.borrow().text(file).to_string();
    let whole = Span::new(file, 0..0);
    let j = JsonFields {
        file,
        text,
        map: &map,
        whole,
    };
    let module = env.module;
    let model_type = match map.get("model_type") {
        Some(Json::String(s)) => s.clone(),
        _ => {
            ev.report(
                Diagnostic::new(Code::External, format!("`{path}` has no `model_type`"))
                    .at(span, "read from here"),
            );
            return None;
        }
    };
    let sym = |key: &str, name: &str| j.symbol(key, name, module);
    let activation = |key: &str, default: &str| -> Option<Spanned> {
        let name = map.get(key).and_then(Json::as_str).unwrap_or(default);
        // Kiln's name for the activation transformers calls `name`.
        let kiln = hf::activation(name)
            .and_then(|a| crate::spec::ACTIVATIONS.iter().find(|(_, b)| *b == a));
        let Some((kiln, _)) = kiln else {
            j.report_unsupported(ev, key, &format!("activation `{name}`"));
            return None;
        };
        Some(sym(key, kiln))
    };
    let norm = |kind: &str, key: &str, default_eps: f64| -> Spanned {
        let eps = j.get(key).unwrap_or(Spanned {
            value: Value::Float(default_eps),
            span: whole,
        });
        let tag = RecordKind::Tag {
            name: kind.to_string(),
            module,
        };
        Spanned {
            value: Value::Record(record(tag, eps.span, vec![("eps", eps.clone())])),
            span: eps.span,
        }
    };
    let heads_list = |names: &[&str]| -> Spanned {
        let items = names
            .iter()
            .map(|n| Spanned {
                value: Value::Symbol {
                    name: n.to_string(),
                    module,
                },
                span: whole,
            })
            .collect();
        Spanned {
            value: Value::List(items),
            span: j.span_of("architectures"),
        }
    };
    let int = |v: i64| Spanned {
        value: Value::Int(v),
        span: whole,
    };
    let bool_or = |key: &str, default: bool| {
        j.get(key).unwrap_or(Spanned {
            value: Value::Bool(default),
            span: whole,
        })
    };

    let mut fields: Vec<(&str, Spanned)> = Vec::new();
    let mut put = |name: &'static str, v: Option<Spanned>| {
        if let Some(v) = v {
            fields.push((name, v));
        }
    };
    let families = hf::FAMILIES.map(hf::of);
    let Some(family) = families.iter().find(|f| f.model_type() == model_type) else {
        let [known @ .., last] = families.map(|f| f.model_type());
        j.report_unsupported(
            ev,
            "model_type",
            &format!(
                "`{model_type}` (Kiln reads {} and {last})",
                known.join(", ")
            ),
        );
        return None;
    };
    let (model_type, import) = (family.model_type(), family.import());
    // Kiln has no defaults for a model's shape: a config without it is not this model.
    let missing: Vec<&str> = import
        .keys
        .iter()
        .filter(|(field, keys)| {
            SHAPE_FIELDS.contains(field) && keys.iter().all(|k| j.get(k).is_none())
        })
        .map(|(_, keys)| keys[0])
        .collect();
    if !missing.is_empty() {
        ev.report(
            Diagnostic::new(
                Code::External,
                format!("`{path}` gives no `{}`", missing.join("`, `")),
            )
            .at(span, "reads this config.json")
            .help(format!(
                "a {model_type} config.json names the model's shape; add the missing keys or export the config again with transformers"
            )),
        );
        return None;
    }
    put("family", Some(sym("model_type", model_type)));
    // Where the weights are: `kiln run` loads `model.safetensors` from this directory.
    put("checkpoint", Some(directory_of(&path, span)));
    for (field, keys) in import.keys {
        put(field, keys.iter().find_map(|k| j.get(k)));
    }
    if let Some(key) = import.ffn_or_four_hidden {
        let ffn = j.get(key).filter(|v| matches!(v.value, Value::Int(_)));
        let four_hidden = || {
            let (_, keys) = import.keys.iter().find(|(f, _)| *f == "hidden")?;
            match keys.iter().find_map(|k| j.get(k))?.value {
                Value::Int(h) => h.checked_mul(4).map(int),
                _ => None,
            }
        };
        put("ffn", ffn.or_else(four_hidden));
    }
    let (norm_kind, norm_key, eps) = import.norm;
    put("norm", Some(norm(norm_kind, norm_key, eps)));
    put(
        "activation",
        activation(import.activation.0, import.activation.1),
    );
    put("mlp", Some(sym("model_type", import.mlp)));
    put("block", Some(sym("model_type", import.block)));
    put(
        "bias",
        Some(match import.bias_key {
            Some(key) => bool_or(key, false),
            None => Spanned {
                value: Value::Bool(true),
                span: whole,
            },
        }),
    );
    put(
        "tie_embeddings",
        Some(bool_or("tie_word_embeddings", import.tied)),
    );
    if !import.keys.iter().any(|(f, _)| *f == "type_vocab") {
        put("type_vocab", Some(int(0)));
    }
    put("output_heads", Some(heads_list(import.heads)));
    if let Some(rope) = &import.rope {
        let nested = map
            .get(rope.nested_in)
            .and_then(|p| p.get(rope.key))
            .and_then(Json::as_f64);
        let theta = j
            .get(rope.key)
            .or_else(|| {
                nested.map(|t| Spanned {
                    value: Value::Float(t),
                    span: j.span_of(rope.key),
                })
            })
            .unwrap_or(Spanned {
                value: Value::Float(rope.default),
                span: whole,
            });
        let rotary = record(
            RecordKind::Tag {
                name: "rotary".into(),
                module,
            },
            theta.span,
            vec![("theta", theta.clone())],
        );
        put(
            "position",
            Some(Spanned {
                value: Value::Record(rotary),
                span: theta.span,
            }),
        );
    } else {
        put("position", Some(sym("model_type", "learned")));
    }
    let kind = RecordKind::Def {
        kind: DefKind::Model,
        name: format!("hf({})", ev.program.sources.borrow().text_of(args[0].span)),
        tag: None,
    };
    Some(Value::Record(record(kind, span, fields)))
}

/// `peft("dir")`: an adapter record from PEFT's `adapter_config.json`.
pub(super) fn peft(ev: &Evaluator, args: &[Spanned], env: &Env, span: Span) -> Option<Value> {
    let (file, map, path) = read_json(ev, args, env, span, "peft", "adapter_config.json")?;
    let text = ev.program.sources.borrow().text(file).to_string();
    let whole = Span::new(file, 0..0);
    let j = JsonFields {
        file,
        text,
        map: &map,
        whole,
    };
    let module = env.module;
    let Some(peft_type) = map.get("peft_type").and_then(Json::as_str) else {
        ev.report(
            Diagnostic::new(Code::External, format!("`{path}` has no `peft_type`"))
                .at(span, "read from here"),
        );
        return None;
    };
    let sym = |key: &str, name: &str| j.symbol(key, name, module);
    let mut fields: Vec<(&str, Spanned)> = Vec::new();
    let mut put = |name: &'static str, v: Option<Spanned>| {
        if let Some(v) = v {
            fields.push((name, v));
        }
    };
    // Where the trained weights are: `kiln run` loads `adapter_model.safetensors` from here.
    put("checkpoint", Some(directory_of(&path, span)));
    let tag = match peft_type {
        "LORA" => {
            put("rank", j.get("r"));
            put("alpha", j.get("lora_alpha"));
            put("dropout", j.get("lora_dropout"));
            put("targets", j.get("target_modules"));
            put("rslora", j.get("use_rslora"));
            put("dora", j.get("use_dora"));
            let bias = map.get("bias").and_then(Json::as_str).unwrap_or("none");
            put("bias", Some(sym("bias", bias)));
            "lora"
        }
        "IA3" => {
            put("targets", j.get("target_modules"));
            put("feedforward", j.get("feedforward_modules"));
            "ia3"
        }
        "PREFIX_TUNING" => {
            put("tokens", j.get("num_virtual_tokens"));
            if map.get("prefix_projection").and_then(Json::as_bool) == Some(true) {
                put("projection", j.get("encoder_hidden_size"));
            }
            "prefix"
        }
        "PROMPT_TUNING" => {
            put("tokens", j.get("num_virtual_tokens"));
            match map.get("prompt_tuning_init").and_then(Json::as_str) {
                Some("TEXT") => {
                    let text = j.get("prompt_tuning_init_text").unwrap_or(Spanned {
                        value: Value::Str(String::new()),
                        span: whole,
                    });
                    let call = Value::Call {
                        name: "text".into(),
                        args: vec![text.clone()],
                        module,
                    };
                    put(
                        "init",
                        Some(Spanned {
                            value: call,
                            span: text.span,
                        }),
                    );
                }
                Some("SAMPLE_VOCAB") => put("init", Some(sym("prompt_tuning_init", "vocab"))),
                _ => put("init", Some(sym("prompt_tuning_init", "random"))),
            }
            "prompt"
        }
        "P_TUNING" => {
            put("tokens", j.get("num_virtual_tokens"));
            let encoder = match map
                .get("encoder_reparameterization_type")
                .and_then(Json::as_str)
            {
                Some("LSTM") => "lstm",
                _ => "mlp",
            };
            put(
                "encoder",
                Some(sym("encoder_reparameterization_type", encoder)),
            );
            put("hidden", j.get("encoder_hidden_size"));
            "ptuning"
        }
        other => {
            j.report_unsupported(
                ev,
                "peft_type",
                &format!(
                    "`{other}` (Kiln reads LORA, IA3, PREFIX_TUNING, PROMPT_TUNING, P_TUNING)"
                ),
            );
            return None;
        }
    };
    Some(Value::Record(record(
        RecordKind::Tag {
            name: tag.into(),
            module,
        },
        span,
        fields,
    )))
}
