//! Values of the language after evaluation.
//!
//! Records are lazy: each field keeps its expression and lexical environment and is evaluated
//! on first use with `self` bound to the record that owns it. That gives late binding through
//! inheritance — `ffn = 4 * hidden` in `gpt2` follows an override of `hidden` in a model that
//! inherits from it — and lets cycles be reported instead of looping.

use super::units::Quantity;
use super::ModuleId;
use crate::diagnostics::Span;
use crate::syntax::{DefKind, Expr, RecordLit};
use indexmap::IndexMap;
use std::cell::RefCell;
use std::rc::Rc;

/// A value with the span of the source that produced it.
#[derive(Clone, Debug)]
pub struct Spanned {
    pub value: Value,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum Value {
    Int(i64),
    Float(f64),
    Quantity(Quantity),
    Str(String),
    Bool(bool),
    /// A bare name that is neither a field nor a definition: an enum choice (`gelu`), or a
    /// misspelt reference that the checker reports with the names that were in scope.
    Symbol {
        name: String,
        module: ModuleId,
    },
    /// A parameterised symbol: `interleaved(2)`, `classifier(3)`, `text("...")`.
    Call {
        name: String,
        args: Vec<Spanned>,
        module: ModuleId,
    },
    /// Shared, so that copying a cached value is cheap however deeply it nests.
    List(Rc<[Spanned]>),
    Record(Rc<Record>),
    /// `a + b` of non-numbers: composed objectives (`mlm + nsp`).
    Sum(Vec<Spanned>),
}

impl Value {
    /// How the value is described in type errors.
    pub fn describe(&self) -> String {
        match self {
            Value::Int(i) => format!("the integer {i}"),
            Value::Float(f) => format!("the number {f:?}"),
            Value::Quantity(q) => format!("a {} ({})", q.dim.describe(), q.written),
            Value::Str(s) => format!("the string \"{s}\""),
            Value::Bool(b) => format!("`{b}`"),
            Value::Symbol { name, .. } => format!("`{name}`"),
            Value::Call { name, .. } => format!("`{name}(...)`"),
            Value::List(_) => "a list".into(),
            Value::Record(r) => r.kind.describe(),
            Value::Sum(_) => "a sum of values".into(),
        }
    }
}

/// What a record is: a definition of some kind, a tagged constructor value, or plain.
#[derive(Clone, Debug, PartialEq)]
pub enum RecordKind {
    /// `{ ... }` with no name in front.
    Plain,
    /// `lora { ... }` where `lora` names no definition: the tag says which variant is meant.
    Tag { name: String, module: ModuleId },
    /// A definition (`model gpt2 = ...`), or a value inheriting from one. `tag` is the
    /// variant a preset was built from (`objective yelp = pvp { .. }` has tag `pvp`).
    Def {
        kind: DefKind,
        name: String,
        tag: Option<String>,
    },
}

impl RecordKind {
    pub fn describe(&self) -> String {
        match self {
            RecordKind::Plain => "a record".into(),
            RecordKind::Tag { name, .. } => format!("`{name} {{ ... }}`"),
            RecordKind::Def {
                kind: DefKind::Let,
                name,
                ..
            } => format!("`{name}`"),
            RecordKind::Def { kind, name, .. } => format!("{kind} `{name}`"),
        }
    }

    /// The name a value of this kind is constructed with, if any (`lora`, `gpt2`).
    pub fn name(&self) -> Option<&str> {
        match self {
            RecordKind::Plain => None,
            RecordKind::Tag { name, .. } | RecordKind::Def { name, .. } => Some(name),
        }
    }
}

/// Where a field's value comes from.
#[derive(Clone, Debug)]
pub(crate) enum FieldSource {
    /// An expression, evaluated in its lexical environment plus the owning record.
    Expr { expr: Rc<Expr>, env: Env },
    /// An already known value (from a Hugging Face config, a builtin, a `--set` override).
    Value(Spanned),
    /// An untagged record written over an inherited field: `train { steps = 10 }` in a child
    /// experiment changes `steps` and keeps the parent's other `train` fields.
    Merge {
        base: Box<FieldSource>,
        body: Rc<RecordLit>,
        env: Env,
    },
}

#[derive(Clone, Debug)]
pub(crate) enum CellState {
    Pending,
    Forcing,
    /// `None` when evaluation failed; the error was reported once already.
    Done(Option<Spanned>),
}

#[derive(Debug)]
pub struct Field {
    pub key_span: Span,
    pub(crate) source: FieldSource,
    pub(crate) cell: RefCell<CellState>,
}

impl Field {
    pub(crate) fn new(key_span: Span, source: FieldSource) -> Field {
        Field {
            key_span,
            source,
            cell: RefCell::new(CellState::Pending),
        }
    }

    /// The same source with a fresh cache: used when a record is inherited, so that the
    /// field is re-evaluated with `self` bound to the new record.
    pub(crate) fn reinstantiate(&self) -> Field {
        Field::new(self.key_span, self.source.clone())
    }
}

#[derive(Debug)]
pub struct Record {
    pub kind: RecordKind,
    pub span: Span,
    pub fields: IndexMap<String, Field>,
}

impl Record {
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.keys().map(String::as_str)
    }

    /// Where a field's value was written once it has been evaluated, else where its key was.
    pub fn value_span(&self, name: &str) -> Option<Span> {
        let field = self.fields.get(name)?;
        let state = field.cell.borrow();
        Some(match &*state {
            CellState::Done(Some(v)) => v.span,
            _ => field.key_span,
        })
    }
}

/// The lexical environment of an expression: its module (for definitions and imports) and
/// the records enclosing it, innermost first.
#[derive(Clone, Debug)]
pub(crate) struct Env {
    pub module: ModuleId,
    pub frames: Vec<Rc<Record>>,
}

impl Env {
    pub fn with_frame(&self, record: &Rc<Record>) -> Env {
        let mut frames = Vec::with_capacity(self.frames.len() + 1);
        frames.push(record.clone());
        frames.extend(self.frames.iter().cloned());
        Env {
            module: self.module,
            frames,
        }
    }
}
