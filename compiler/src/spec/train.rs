//! An experiment's `train` block: optimizer, learning-rate schedule, batch and sequence
//! sizes, checkpointing and evaluation cadence.

use super::cluster::precision;
use super::limits;
use super::read::*;
use super::types::*;
use crate::diagnostics::{Code, Diagnostic, Span};
use crate::resolve::{Spanned, Value};

/// The training settings; `positions` (those the model leaves the real tokens) sets the
/// default sequence length.
pub(super) fn train(
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
    let attention = r.or("attention", AttentionKernel::Auto, |cx, v| {
        choice(cx, v, "attention", ATTENTION_KERNELS)
    });
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
        attention: attention?,
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

const ATTENTION_KERNELS: &[(&str, AttentionKernel)] = &[
    ("auto", AttentionKernel::Auto),
    ("flash", AttentionKernel::Flash),
    ("eager", AttentionKernel::Eager),
];
