//! Experiments: the model, data, objective, adapters, parallel plan and training settings
//! read together, and the checks that span them.

use super::adapter::adapters;
use super::cluster::{cluster, expect_def, precision};
use super::limits;
use super::model::model;
use super::objective::{default_fields, objective, placeholders, required_heads};
use super::read::*;
use super::types::*;
use crate::diagnostics::{Code, Diagnostic, Span};
use crate::resolve::{Spanned, Value};
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

/// The manual degrees are written in the parallel block but live under `plan` in the spec.
fn move_degree_origins(cx: &Cx) {
    let mut origins = cx.origins.borrow_mut();
    for degree in ["data", "tensor", "pipeline"] {
        origins.rename(
            &format!("parallel.{degree}"),
            &format!("parallel.plan.{degree}"),
        );
    }
}

fn empty(span: Span) -> std::rc::Rc<crate::resolve::Record> {
    std::rc::Rc::new(crate::resolve::Record {
        kind: crate::resolve::RecordKind::Plain,
        span,
        fields: Default::default(),
    })
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

fn parallel(r: &mut Rec, model: Option<&Model>) -> Option<Parallel> {
    let cx = r.cx;
    let mesh_default = || -> Option<Cluster> {
        // `cpu(1)`: the prelude's host with one device.
        let prelude = cx.ev.program.prelude()?;
        let found = cx.ev.lookup(prelude, "cpu_host", r.span())?;
        let host = cx.ev.definition(found.module, found.def)?;
        let node = super::cluster::node(cx, &host, "parallel.mesh.node")?;
        Some(Cluster {
            name: "cpu(1)".into(),
            nodes: 1,
            node: Node { devices: 1, ..node },
        })
    };
    let mesh = if r.has("mesh") {
        r.req("mesh", |cx, v| cluster(cx, v, "parallel.mesh"))
    } else {
        r.defaulted("mesh");
        mesh_default()
    };
    let mesh_span = r.span_of("mesh");
    let degrees = ["data", "tensor", "pipeline"];
    let given: Vec<&str> = degrees.iter().copied().filter(|d| r.has(d)).collect();
    let plan_v = r.get("plan");
    let auto = match &plan_v {
        Some(v) => choice(cx, v, "plan", &[("auto", true), ("manual", false)]),
        None if r.has("plan") => None,
        None => Some(given.is_empty() && mesh.as_ref().is_some_and(|m| m.devices() > 1)),
    };
    let data = r.opt("data", positive);
    let tensor = r.or("tensor", 1, positive);
    let pipeline = r.or("pipeline", 1, positive);
    let sequence_parallel = r.or("sequence_parallel", false, boolean);
    let zero = r.or("zero", 0u8, |cx, v| int_in(cx, v, 0, 3).map(|z| z as u8));
    let recompute = r.or("recompute", Recompute::None, |cx, v| {
        choice(
            cx,
            v,
            "recompute setting",
            &[
                ("none", Recompute::None),
                ("selective", Recompute::Selective),
                ("full", Recompute::Full),
            ],
        )
    });
    let schedule = r.or("schedule", PipelineSchedule::OneFOneB, schedule);
    let microbatches = r.opt("microbatches", size(limits::MICROBATCHES));
    let overlap_grad_sync = r.or("overlap_grad_sync", false, boolean);
    let offload = r.or("offload", Offload::None, |cx, v| {
        choice(
            cx,
            v,
            "offload setting",
            &[
                ("none", Offload::None),
                ("optimizer", Offload::Optimizer),
                ("all", Offload::All),
            ],
        )
    });
    let (mesh, auto) = (mesh?, auto?);
    let (data, tensor, pipeline) = (data?, tensor?, pipeline?);
    let devices = mesh.devices();

    let plan = if auto {
        if !given.is_empty() {
            let d = given.iter().fold(
                Diagnostic::new(Code::Conflict, "`plan = auto` chooses the degrees itself").at(
                    plan_v.as_ref().map_or(r.span(), |v| v.span),
                    "automatic plan",
                ),
                |d, name| d.also(r.span_of(name), format!("`{name}` set by hand")),
            );
            cx.report(d.help("remove the degrees, or remove `plan = auto` to plan by hand"));
            return None;
        }
        r.cx.origins.borrow_mut().defaulted("parallel.plan");
        Plan::Auto
    } else {
        let data = match data {
            Some(d) => d,
            None if devices % tensor.saturating_mul(pipeline) == 0 => {
                devices / tensor.saturating_mul(pipeline)
            }
            None => {
                cx.report(
                    Diagnostic::new(
                        Code::Mesh,
                        format!(
                            "tensor × pipeline = {} does not divide the mesh's {devices} devices",
                            tensor.saturating_mul(pipeline)
                        ),
                    )
                    .at(
                        if r.has("tensor") {
                            r.span_of("tensor")
                        } else {
                            r.span_of("pipeline")
                        },
                        "this degree",
                    )
                    .also(mesh_span, format!("{devices} devices")),
                );
                return None;
            }
        };
        if data.saturating_mul(tensor).saturating_mul(pipeline) != devices {
            let mut d = Diagnostic::new(Code::Mesh, format!("data × tensor × pipeline = {data} × {tensor} × {pipeline} = {}, but the mesh has {devices} devices", data.saturating_mul(tensor).saturating_mul(pipeline)))
                .at(mesh_span, format!("{devices} devices"));
            for name in &given {
                d = d.also(r.span_of(name), *name);
            }
            cx.report(d.help("make the product equal the number of devices, or use `plan = auto`"));
            return None;
        }
        Plan::Manual {
            data,
            tensor,
            pipeline,
        }
    };
    let mut ok = true;
    if let (
        Plan::Manual {
            tensor, pipeline, ..
        },
        Some(m),
    ) = (plan, model)
    {
        let model_span = |path: &str| cx.origins.borrow().span(path);
        for (what, size, path) in [
            ("heads", m.heads, "model.heads"),
            ("kv_heads", m.kv_heads, "model.kv_heads"),
            ("ffn", m.ffn, "model.ffn"),
        ] {
            if size % tensor != 0 {
                let mut d = Diagnostic::new(
                    Code::Divisibility,
                    format!("tensor = {tensor} does not divide {what} = {size}"),
                )
                .at(r.span_of("tensor"), "tensor-parallel degree");
                if let Some(s) = model_span(path) {
                    d = d.also(s, format!("{what} = {size}"));
                }
                cx.report(d.help(format!("Megatron splits {what} across the tensor-parallel group; choose a divisor of {size}")));
                ok = false;
                break;
            }
        }
        if pipeline > m.layers {
            cx.report(
                Diagnostic::new(
                    Code::Range,
                    format!(
                        "pipeline = {pipeline} is more stages than the model's {} layers",
                        m.layers
                    ),
                )
                .at(r.span_of("pipeline"), "too many stages"),
            );
            ok = false;
        }
        if let Some(PipelineSchedule::Interleaved { chunks }) = schedule {
            if m.layers % pipeline.saturating_mul(chunks) != 0 {
                cx.report(
                    Diagnostic::new(
                        Code::Divisibility,
                        format!(
                            "pipeline × chunks = {} does not divide layers = {}",
                            pipeline.saturating_mul(chunks),
                            m.layers
                        ),
                    )
                    .at(r.span_of("schedule"), "interleaved schedule")
                    .help("each device holds `chunks` equal groups of layers"),
                );
                ok = false;
            }
        }
        if let (Some(mb), Some(PipelineSchedule::OneFOneB | PipelineSchedule::Interleaved { .. })) =
            (microbatches.flatten(), schedule)
        {
            if pipeline > 1 && mb < pipeline {
                cx.report(
                    Diagnostic::new(Code::Range, format!("microbatches = {mb} is fewer than the {pipeline} pipeline stages"))
                        .at(r.span_of("microbatches"), "too few to fill the pipeline")
                        .help(format!("1F1B needs at least as many microbatches as stages; use microbatches >= {pipeline}")),
                );
                ok = false;
            }
        }
        if sequence_parallel == Some(true) && tensor == 1 {
            cx.report(
                Diagnostic::new(
                    Code::Conflict,
                    "sequence parallelism needs tensor parallelism",
                )
                .at(
                    r.span_of("sequence_parallel"),
                    "has no effect with tensor = 1",
                )
                .help("set tensor > 1, or remove sequence_parallel"),
            );
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    move_degree_origins(cx);
    Some(Parallel {
        mesh,
        plan,
        sequence_parallel: sequence_parallel?,
        zero: zero?,
        recompute: recompute?,
        schedule: schedule?,
        microbatches: microbatches?,
        offload: offload?,
        overlap_grad_sync: overlap_grad_sync?,
    })
}

fn schedule(cx: &Cx, v: &Spanned) -> Option<PipelineSchedule> {
    let var = variant(
        cx,
        v,
        "pipeline schedule",
        &["gpipe", "1f1b", "interleaved"],
    )?;
    match var.name.as_str() {
        "gpipe" => Some(PipelineSchedule::Gpipe),
        "1f1b" => Some(PipelineSchedule::OneFOneB),
        _ => match var.args.as_slice() {
            [n] => int_in(cx, n, 2, u64::MAX)
                .filter(|&chunks| within(cx, limits::CHUNKS, chunks, n.span))
                .map(|chunks| PipelineSchedule::Interleaved { chunks }),
            _ => {
                cx.report(
                    Diagnostic::new(
                        Code::Type,
                        "`interleaved` takes the number of model chunks per device",
                    )
                    .at(v.span, "write `interleaved(2)`"),
                );
                None
            }
        },
    }
}

/// The training settings; `positions` (those the model leaves the real tokens) sets the
/// default sequence length.
fn train(
    r: &mut Rec,
    positions: Option<u64>,
    parallel: Option<(&Parallel, Option<Span>)>,
) -> Option<Train> {
    let cx = r.cx;
    let optimizer = r.or(
        "optimizer",
        Optimizer::Adamw {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        optimizer,
    );
    let schedule = r.or(
        "schedule",
        LrSchedule {
            kind: ScheduleKind::Constant,
            warmup: 0,
            min_lr_ratio: 0.0,
        },
        lr_schedule,
    );
    let batch = r.or("batch", 8, size(limits::BATCH));
    let micro_batch = r.opt("micro_batch", size(limits::MICRO_BATCH));
    let steps = r.opt("steps", size(limits::STEPS));
    let epochs = r.opt("epochs", size(limits::EPOCHS));
    let seq_len = r.or_derived(
        "seq_len",
        Some(positions.map_or(512, |p| p.min(2048))),
        size(limits::SEQ_LEN),
    );
    let precision_v = r.or("precision", Precision::F32, precision);
    let grad_clip = r.or("grad_clip", Some(1.0), |cx, v| match v.value {
        Value::Bool(false) => Some(None),
        _ => positive_number(cx, v).map(Some),
    });
    let seed = r.or("seed", 0, non_negative);
    let eval_every = r.opt("eval_every", positive);
    let checkpoint_every = r.opt("checkpoint_every", positive);
    let checkpoint_minutes = r.or("checkpoint_minutes", 10.0, positive_number);
    let keep_checkpoints = r.or("keep_checkpoints", 2, positive);
    let init_missing = r.or("init_missing", false, boolean);
    let length = match (steps?, epochs?) {
        (Some(_), Some(_)) => {
            cx.report(
                Diagnostic::new(Code::Conflict, "give either `steps` or `epochs`, not both")
                    .at(r.span_of("epochs"), "epochs")
                    .also(r.span_of("steps"), "steps"),
            );
            return None;
        }
        (Some(s), None) => Length::Steps(s),
        (None, Some(e)) => Length::Epochs(e),
        (None, None) => {
            r.defaulted("length");
            Length::Epochs(1)
        }
    };
    let (batch, micro_batch) = (batch?, micro_batch?);
    if let Some(seq_len) = seq_len {
        if let Some(d) = limits::TOKENS_PER_STEP.exceeded_by(batch.saturating_mul(seq_len)) {
            cx.report(
                d.at(r.span_of("batch"), format!("{batch} sequences"))
                    .also(r.span_of("seq_len"), format!("of {seq_len} tokens")),
            );
            return None;
        }
    }
    if let Some((
        parallel @ Parallel {
            plan: Plan::Manual { data, .. },
            ..
        },
        data_span,
    )) = parallel
    {
        let per_replica = micro_batch.unwrap_or(1).saturating_mul(*data);
        if batch % per_replica != 0 {
            let what = match micro_batch {
                Some(mb) => format!("data × micro_batch = {data} × {mb}"),
                None => format!("data = {data}"),
            };
            let mut d = Diagnostic::new(
                Code::Divisibility,
                format!("batch = {batch} is not divisible by {what}"),
            )
            .at(r.span_of("batch"), "global batch");
            if let Some(s) = data_span {
                d = d.also(s, "data-parallel degree");
            }
            cx.report(
                d.help("every data-parallel replica gets the same number of whole microbatches"),
            );
            return None;
        }
        // As the planner reads them: micro_batch fixes the microbatches, else `microbatches`.
        let microbatches = match (micro_batch, parallel.microbatches) {
            (Some(_), _) => Some((batch / per_replica, r.span_of("micro_batch"))),
            (None, Some(m)) => cx
                .origins
                .borrow()
                .span("parallel.microbatches")
                .map(|s| (m, s)),
            (None, None) => None,
        };
        if let Some((m, span)) = microbatches {
            if !schedule_fits(cx, parallel, m, span) {
                return None;
            }
        }
    }
    Some(Train {
        optimizer: optimizer?,
        schedule: schedule?,
        batch,
        micro_batch,
        length,
        seq_len: seq_len?,
        precision: precision_v?,
        grad_clip: grad_clip?,
        seed: seed?,
        eval_every: eval_every?,
        checkpoint_every: checkpoint_every?,
        checkpoint_minutes: checkpoint_minutes?,
        keep_checkpoints: keep_checkpoints?,
        init_missing: init_missing?,
    })
}

/// A manual plan's schedule lists each of its `microbatches` on every pipeline stage (and
/// chunk), so their product is bounded; reports it when not.
fn schedule_fits(cx: &Cx, parallel: &Parallel, microbatches: u64, span: Span) -> bool {
    let Plan::Manual { pipeline, .. } = parallel.plan else {
        return true;
    };
    let chunks = match parallel.schedule {
        PipelineSchedule::Interleaved { chunks } => chunks,
        PipelineSchedule::Gpipe | PipelineSchedule::OneFOneB => 1,
    };
    let stages = pipeline.saturating_mul(chunks);
    let Some(d) = limits::SCHEDULE.exceeded_by(microbatches.saturating_mul(stages)) else {
        return true;
    };
    let mut d = d.at(span, format!("{microbatches} microbatches per replica"));
    if let Some(s) = cx.origins.borrow().span("parallel.plan.pipeline") {
        let label = match chunks {
            1 => format!("{pipeline} stages"),
            _ => format!("{pipeline} stages of {chunks} chunks"),
        };
        d = d.also(s, label);
    }
    cx.report(d.help("use fewer, larger microbatches"));
    false
}

fn optimizer(cx: &Cx, v: &Spanned) -> Option<Optimizer> {
    let var = variant(cx, v, "optimizer", &["adamw", "sgd"])?;
    let record = var.record.unwrap_or_else(|| empty(v.span));
    let mut r = Rec::new(cx, record, "train.optimizer", var.name.clone());
    let lr = r.or(
        "lr",
        if var.name == "sgd" { 1e-2 } else { 1e-4 },
        positive_number,
    );
    let weight_decay = r.or("weight_decay", 0.0, |cx, v| {
        number_where(cx, v, "at least 0", |x| x >= 0.0)
    });
    let out = if var.name == "adamw" {
        let beta1 = r.or("beta1", 0.9, |cx, v| {
            number_where(cx, v, "in [0, 1)", |x| (0.0..1.0).contains(&x))
        });
        let beta2 = r.or("beta2", 0.999, |cx, v| {
            number_where(cx, v, "in [0, 1)", |x| (0.0..1.0).contains(&x))
        });
        let eps = r.or("eps", 1e-8, positive_number);
        Some(Optimizer::Adamw {
            lr: lr?,
            beta1: beta1?,
            beta2: beta2?,
            eps: eps?,
            weight_decay: weight_decay?,
        })
    } else {
        let momentum = r.or("momentum", 0.0, |cx, v| {
            number_where(cx, v, "in [0, 1)", |x| (0.0..1.0).contains(&x))
        });
        let nesterov = r.or("nesterov", false, boolean);
        Some(Optimizer::Sgd {
            lr: lr?,
            momentum: momentum?,
            weight_decay: weight_decay?,
            nesterov: nesterov?,
        })
    };
    r.finish();
    out
}

fn lr_schedule(cx: &Cx, v: &Spanned) -> Option<LrSchedule> {
    let kinds = [
        ("constant", ScheduleKind::Constant),
        ("linear", ScheduleKind::Linear),
        ("cosine", ScheduleKind::Cosine),
        ("warmup", ScheduleKind::Warmup),
    ];
    let names: Vec<&str> = kinds.iter().map(|(n, _)| *n).collect();
    let var = variant(cx, v, "learning-rate schedule", &names)?;
    let kind = kinds
        .iter()
        .find(|(n, _)| *n == var.name)
        .map(|(_, k)| *k)?;
    let record = var.record.unwrap_or_else(|| empty(v.span));
    let mut r = Rec::new(cx, record, "train.schedule", var.name.clone());
    let warmup = r.or("warmup", 0, non_negative);
    let min_lr_ratio = r.or("min_lr_ratio", 0.0, |cx, v| {
        number_where(cx, v, "in [0, 1]", |x| (0.0..=1.0).contains(&x))
    });
    r.finish();
    Some(LrSchedule {
        kind,
        warmup: warmup?,
        min_lr_ratio: min_lr_ratio?,
    })
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
