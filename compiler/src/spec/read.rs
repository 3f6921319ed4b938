//! Typed reading of evaluated values: records with known fields, numbers in ranges, enum
//! choices, quantities. Each reader reports its own errors and returns `None` on failure, so
//! a checker can read every field and report every mistake in one run.

use super::limits::Limit;
use super::origins::Origins;
use crate::diagnostics::{did_you_mean, Code, Diagnostic, Span};
use crate::resolve::units::Dim;
use crate::resolve::{Evaluator, Record, RecordKind, Spanned, Value};
use std::cell::RefCell;
use std::rc::Rc;

/// The checker's context: the evaluator and the provenance of every value read.
pub struct Cx<'e, 'p> {
    pub ev: &'e Evaluator<'p>,
    pub origins: RefCell<Origins>,
}

impl<'e, 'p> Cx<'e, 'p> {
    pub fn new(ev: &'e Evaluator<'p>) -> Self {
        Cx {
            ev,
            origins: RefCell::new(Origins::default()),
        }
    }

    pub fn report(&self, d: Diagnostic) {
        self.ev.report(d);
    }

    pub fn type_error(&self, v: &Spanned, expected: &str) {
        self.report(
            Diagnostic::new(
                Code::Type,
                format!("expected {expected}, found {}", v.value.describe()),
            )
            .at(v.span, format!("expected {expected}")),
        );
    }

    pub fn text(&self, span: Span) -> String {
        self.ev.program.sources.borrow().text_of(span).to_string()
    }
}

/// A record being read as a given kind; unknown fields are reported by [`Rec::finish`].
pub struct Rec<'c, 'e, 'p> {
    pub cx: &'c Cx<'e, 'p>,
    pub record: Rc<Record>,
    /// Dotted path of this record in the spec (for origins).
    pub path: String,
    /// How this record is named in messages (`lora`, `model \`gpt2\``).
    pub what: String,
    known: Vec<&'static str>,
}

impl<'c, 'e, 'p> Rec<'c, 'e, 'p> {
    pub fn new(
        cx: &'c Cx<'e, 'p>,
        record: Rc<Record>,
        path: &str,
        what: impl Into<String>,
    ) -> Self {
        Rec {
            cx,
            record,
            path: path.to_string(),
            what: what.into(),
            known: Vec::new(),
        }
    }

    pub fn span(&self) -> Span {
        self.record.span
    }

    pub fn child_path(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.record.fields.contains_key(name)
    }

    /// The value of a field, or `None` when absent or failed. Records the origin.
    pub fn get(&mut self, name: &'static str) -> Option<Spanned> {
        self.known.push(name);
        if !self.record.fields.contains_key(name) {
            return None;
        }
        let v = self.cx.ev.field(&self.record, name)?;
        self.cx
            .origins
            .borrow_mut()
            .source(&self.child_path(name), v.span);
        Some(v)
    }

    /// Notes that a field took its default.
    pub fn defaulted(&self, name: &str) {
        self.cx
            .origins
            .borrow_mut()
            .defaulted(&self.child_path(name));
    }

    pub fn required(&mut self, name: &'static str) -> Option<Spanned> {
        if !self.has(name) {
            self.known.push(name);
            self.cx.report(
                Diagnostic::new(Code::Missing, format!("{} is missing `{name}`", self.what))
                    .at(self.opening(), format!("needs `{name} = ...`")),
            );
            return None;
        }
        self.get(name)
    }

    /// Reads a field with `read`, or takes `default` when it is absent.
    pub fn or<T>(
        &mut self,
        name: &'static str,
        default: T,
        read: impl FnOnce(&Cx, &Spanned) -> Option<T>,
    ) -> Option<T> {
        self.or_derived(name, Some(default), read)
    }

    /// Like [`Rec::or`] with a default computed from other fields (`None` if they failed).
    pub fn or_derived<T>(
        &mut self,
        name: &'static str,
        default: Option<T>,
        read: impl FnOnce(&Cx, &Spanned) -> Option<T>,
    ) -> Option<T> {
        if self.has(name) {
            let v = self.get(name)?;
            read(self.cx, &v)
        } else {
            self.known.push(name);
            self.defaulted(name);
            default
        }
    }

    /// Reads an optional field with `read`; absent is `Some(None)`.
    pub fn opt<T>(
        &mut self,
        name: &'static str,
        read: impl FnOnce(&Cx, &Spanned) -> Option<T>,
    ) -> Option<Option<T>> {
        if self.has(name) {
            let v = self.get(name)?;
            read(self.cx, &v).map(Some)
        } else {
            self.known.push(name);
            self.defaulted(name);
            Some(None)
        }
    }

    pub fn req<T>(
        &mut self,
        name: &'static str,
        read: impl FnOnce(&Cx, &Spanned) -> Option<T>,
    ) -> Option<T> {
        let v = self.required(name)?;
        read(self.cx, &v)
    }

    /// The span of a field's value, for cross-field messages.
    pub fn span_of(&self, name: &str) -> Span {
        self.record.value_span(name).unwrap_or(self.record.span)
    }

    /// The record's first character (its `{`, or the name it is built from): a multi-line
    /// record would otherwise be underlined whole.
    fn opening(&self) -> Span {
        Span {
            end: self.record.span.start + 1,
            ..self.record.span
        }
    }

    /// Reports fields this kind does not have, with the closest known name.
    pub fn finish(self) {
        for (name, field) in &self.record.fields {
            if self.known.contains(&name.as_str()) {
                continue;
            }
            let mut d = Diagnostic::new(
                Code::UnknownField,
                format!("{} has no field `{name}`", self.what),
            )
            .at(field.key_span, "unknown field");
            d = match did_you_mean(name, self.known.iter().copied()) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help(format!("the fields are: {}", self.known.join(", "))),
            };
            self.cx.report(d);
        }
    }
}

/// The span of just the name at the start of a value (`gtp2` in `gtp2 { layers = 2 }`).
pub fn name_span(cx: &Cx, span: Span, name: &str) -> Span {
    if cx.text(span).starts_with(name) {
        Span {
            end: span.start + name.len(),
            ..span
        }
    } else {
        span
    }
}

// ----- scalar readers ------------------------------------------------------------------------

/// An integer in `[min, max]`.
pub fn int_in(cx: &Cx, v: &Spanned, min: u64, max: u64) -> Option<u64> {
    let Value::Int(i) = v.value else {
        cx.type_error(v, "an integer");
        return None;
    };
    if i < min as i64 || (i as u64) > max {
        let range = if max == u64::MAX {
            format!("at least {min}")
        } else {
            format!("between {min} and {max}")
        };
        cx.report(
            Diagnostic::new(Code::Range, format!("{i} is out of range: must be {range}"))
                .at(v.span, format!("must be {range}")),
        );
        return None;
    }
    Some(i as u64)
}

pub fn positive(cx: &Cx, v: &Spanned) -> Option<u64> {
    int_in(cx, v, 1, u64::MAX)
}

/// A size: a positive integer within its field's [`Limit`].
pub fn size(limit: Limit) -> impl Fn(&Cx, &Spanned) -> Option<u64> {
    move |cx, v| positive(cx, v).filter(|&n| within(cx, limit, n, v.span))
}

/// A count that may be zero, within its field's [`Limit`].
pub fn count(limit: Limit) -> impl Fn(&Cx, &Spanned) -> Option<u64> {
    move |cx, v| non_negative(cx, v).filter(|&n| within(cx, limit, n, v.span))
}

/// Whether `value` (written at `span`) is within `limit`; reports it when not.
pub fn within(cx: &Cx, limit: Limit, value: u64, span: Span) -> bool {
    match limit.exceeded_by(value) {
        Some(d) => {
            cx.report(d.at(span, format!("at most {}", limit.max)));
            false
        }
        None => true,
    }
}

pub fn non_negative(cx: &Cx, v: &Spanned) -> Option<u64> {
    int_in(cx, v, 0, u64::MAX)
}

/// Any number (integers widen).
pub fn number(cx: &Cx, v: &Spanned) -> Option<f64> {
    match v.value {
        Value::Int(i) => Some(i as f64),
        Value::Float(f) => Some(f),
        _ => {
            cx.type_error(v, "a number");
            None
        }
    }
}

/// A number satisfying `ok`, described by `range` in the error.
pub fn number_where(cx: &Cx, v: &Spanned, range: &str, ok: impl Fn(f64) -> bool) -> Option<f64> {
    let x = number(cx, v)?;
    if !ok(x) {
        cx.report(
            Diagnostic::new(Code::Range, format!("{x} is out of range: must be {range}"))
                .at(v.span, format!("must be {range}")),
        );
        return None;
    }
    Some(x)
}

pub fn probability(cx: &Cx, v: &Spanned) -> Option<f64> {
    number_where(cx, v, "between 0 and 1", |x| (0.0..=1.0).contains(&x))
}

/// A dropout rate: 1.0 would drop everything.
pub fn dropout(cx: &Cx, v: &Spanned) -> Option<f64> {
    number_where(cx, v, "at least 0 and below 1", |x| (0.0..1.0).contains(&x))
}

pub fn positive_number(cx: &Cx, v: &Spanned) -> Option<f64> {
    number_where(cx, v, "greater than 0", |x| x > 0.0)
}

pub fn boolean(cx: &Cx, v: &Spanned) -> Option<bool> {
    match v.value {
        Value::Bool(b) => Some(b),
        _ => {
            cx.type_error(v, "`true` or `false`");
            None
        }
    }
}

pub fn string(cx: &Cx, v: &Spanned) -> Option<String> {
    match &v.value {
        Value::Str(s) => Some(s.clone()),
        _ => {
            cx.type_error(v, "a string");
            None
        }
    }
}

/// A quantity of the given dimension, in SI base units.
pub fn quantity(cx: &Cx, v: &Spanned, dim: Dim) -> Option<f64> {
    match &v.value {
        Value::Quantity(q) if q.dim == dim && q.si > 0.0 => Some(q.si),
        Value::Quantity(q) if q.dim == dim => {
            cx.report(
                Diagnostic::new(Code::Range, format!("{} must be positive", q.written))
                    .at(v.span, "must be greater than 0"),
            );
            None
        }
        Value::Quantity(q) => {
            cx.report(
                Diagnostic::new(
                    Code::Unit,
                    format!(
                        "expected a {}, found a {} ({})",
                        dim.describe(),
                        q.dim.describe(),
                        q.written
                    ),
                )
                .at(v.span, format!("wrong unit for a {}", dim.describe()))
                .help(format!("write it like {}", dim.examples())),
            );
            None
        }
        Value::Int(_) | Value::Float(_) => {
            cx.report(
                Diagnostic::new(Code::Unit, format!("this {} needs a unit", dim.describe()))
                    .at(v.span, "a bare number")
                    .help(format!("write it like {}", dim.examples())),
            );
            None
        }
        _ => {
            cx.type_error(v, &format!("a {}", dim.describe()));
            None
        }
    }
}

// ----- variants ---------------------------------------------------------------------------

/// A value written as a choice: `gelu`, `rotary { theta = 1e4 }`, `interleaved(2)`.
pub struct Variant {
    pub name: String,
    pub record: Option<Rc<Record>>,
    pub args: Vec<Spanned>,
}

/// The choices written with arguments: `interleaved(2)`, `classifier(3)`, `text("...")`.
const PARAMETERISED: &[&str] = &["interleaved", "classifier", "text"];

/// Reads a choice among `choices`; reports an unknown one with the closest choice.
pub fn variant(cx: &Cx, v: &Spanned, what: &str, choices: &[&str]) -> Option<Variant> {
    // A bare word that also names a definition (`family = gpt2` beside `model gpt2`) was
    // evaluated as a reference; where a choice is expected, the word as written wins.
    if !matches!(
        v.value,
        Value::Symbol { .. } | Value::Call { .. } | Value::Str(_)
    ) {
        let written = cx.text(v.span);
        if choices.contains(&written.as_str()) {
            return Some(Variant {
                name: written,
                record: None,
                args: Vec::new(),
            });
        }
    }
    let (name, record, args) = match &v.value {
        Value::Symbol { name, .. } => (name.clone(), None, Vec::new()),
        Value::Call { name, args, .. } => (name.clone(), None, args.clone()),
        Value::Record(r) => match &r.kind {
            RecordKind::Tag { name, .. } => (name.clone(), Some(r.clone()), Vec::new()),
            // A named preset (`objective yelp = pvp { .. }`) keeps the variant it was built from.
            RecordKind::Def { tag: Some(tag), .. } => (tag.clone(), Some(r.clone()), Vec::new()),
            _ => {
                cx.type_error(v, what);
                return None;
            }
        },
        Value::Str(s) if choices.contains(&s.as_str()) => (s.clone(), None, Vec::new()),
        _ => {
            cx.type_error(v, what);
            return None;
        }
    };
    if !choices.contains(&name.as_str()) {
        let mut d = Diagnostic::new(Code::Variant, format!("unknown {what} `{name}`"))
            .at(name_span(cx, v.span, &name), "not one of the choices");
        d = match did_you_mean(&name, choices.iter().copied()) {
            Some(s) => d.help(format!("did you mean `{s}`?")),
            None => d.help(format!("choose one of: {}", choices.join(", "))),
        };
        cx.report(d);
        return None;
    }
    // Only a few choices take arguments; silently dropping `lora(1)` would hide a mistake.
    if !args.is_empty() && !PARAMETERISED.contains(&name.as_str()) {
        cx.report(
            Diagnostic::new(Code::Type, format!("`{name}` takes no arguments"))
                .at(v.span, "remove the parentheses")
                .help(format!("settings go in braces: `{name} {{ ... }}`")),
        );
        return None;
    }
    Some(Variant { name, record, args })
}

/// A plain enum choice mapped to a value.
pub fn choice<T: Copy>(cx: &Cx, v: &Spanned, what: &str, choices: &[(&str, T)]) -> Option<T> {
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    let var = variant(cx, v, what, &names)?;
    if var.record.is_some() || !var.args.is_empty() {
        cx.report(
            Diagnostic::new(Code::Type, format!("`{}` takes no parameters", var.name))
                .at(v.span, "write just the name"),
        );
        return None;
    }
    choices
        .iter()
        .find(|(n, _)| *n == var.name)
        .map(|(_, t)| *t)
}

/// A record value (tagged, plain or defined); `None` with an error otherwise.
pub fn record<'c, 'e, 'p>(
    cx: &'c Cx<'e, 'p>,
    v: &Spanned,
    path: &str,
    what: &str,
) -> Option<Rec<'c, 'e, 'p>> {
    match &v.value {
        Value::Record(r) => Some(Rec::new(cx, r.clone(), path, what)),
        _ => {
            cx.type_error(v, what);
            None
        }
    }
}

/// The elements of a list; a single value is read as a list of one.
pub fn list(v: &Spanned) -> Vec<Spanned> {
    match &v.value {
        Value::List(items) => items.to_vec(),
        _ => vec![v.clone()],
    }
}

/// A name written as a bare word or a string (`c_attn`, `"mlp.c_proj"`).
pub fn name_like(cx: &Cx, v: &Spanned) -> Option<String> {
    match &v.value {
        Value::Symbol { name, .. } | Value::Str(name) => Some(name.clone()),
        _ => {
            cx.type_error(v, "a name");
            None
        }
    }
}

pub fn empty(span: Span) -> std::rc::Rc<crate::resolve::Record> {
    std::rc::Rc::new(crate::resolve::Record {
        kind: crate::resolve::RecordKind::Plain,
        span,
        fields: Default::default(),
    })
}
