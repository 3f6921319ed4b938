//! The evaluator: definitions and expressions to [`Value`]s.
//!
//! Errors are reported to the program's diagnostics and evaluation continues with `None`
//! ("poisoned"), so one run reports every independent mistake.

use super::builtins;
use super::units::{self, UnitMeaning};
use super::value::{CellState, Env, Field, FieldSource, Record, RecordKind, Spanned, Value};
use super::{ModuleId, Program};
use crate::diagnostics::{did_you_mean, Code, Diagnostic, Span};
use crate::syntax::{BinOp, DefKind, Definition, Expr, ExprKind, Ident, RecordLit};
use indexmap::IndexMap;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

pub struct Evaluator<'p> {
    pub program: &'p Program,
    defs: RefCell<HashMap<(ModuleId, String), CellState>>,
    /// Names of the definitions being evaluated, outermost first (to explain cycles).
    forcing: RefCell<Vec<String>>,
    /// How many definitions and fields are being evaluated inside each other.
    depth: std::cell::Cell<usize>,
}

/// Chains of definitions referring to definitions deeper than this are reported rather than
/// allowed to overflow the stack; real files stay far below it.
const MAX_DEPTH: usize = 256;

/// A definition found by name, and the module it lives in.
pub struct Found<'p> {
    pub module: ModuleId,
    pub def: &'p Definition,
}

impl<'p> Evaluator<'p> {
    pub fn new(program: &'p Program) -> Self {
        Evaluator {
            program,
            defs: RefCell::new(HashMap::new()),
            forcing: RefCell::new(Vec::new()),
            depth: std::cell::Cell::new(0),
        }
    }

    pub fn report(&self, diagnostic: Diagnostic) {
        self.program.report(diagnostic);
    }

    // ----- names -------------------------------------------------------------------------

    /// A definition visible in `module` (its own, then imported ones). Two imports defining the
    /// same name is an error at the use.
    pub fn lookup(&self, module: ModuleId, name: &str, use_span: Span) -> Option<Found<'p>> {
        let m = self.program.module(module);
        if let Some(def) = m.defs.get(name) {
            return Some(Found { module, def });
        }
        let mut found: Vec<Found<'p>> = Vec::new();
        for &(imported, _) in &m.imports {
            if let Some(def) = self.program.module(imported).defs.get(name) {
                found.push(Found {
                    module: imported,
                    def,
                });
            }
        }
        if found.len() > 1 {
            let names: Vec<String> = found
                .iter()
                .map(|f| self.program.module(f.module).name.clone())
                .collect();
            self.report(
                Diagnostic::new(Code::UnknownName, format!("`{name}` is ambiguous"))
                    .at(use_span, "defined by more than one import")
                    .note(format!("defined in {}", names.join(" and ")))
                    .help("define it locally, or import only one of those modules"),
            );
        }
        found.into_iter().next()
    }

    /// Names of definitions visible in `module`, optionally only those of one kind.
    pub fn visible_names(&self, module: ModuleId, kind: Option<DefKind>) -> Vec<&'p str> {
        let m = self.program.module(module);
        let mut out: Vec<&str> = Vec::new();
        let modules = std::iter::once(module).chain(m.imports.iter().map(|(id, _)| *id));
        for id in modules {
            for (name, def) in &self.program.module(id).defs {
                if kind.is_none_or(|k| k == def.kind) {
                    out.push(name);
                }
            }
        }
        out
    }

    // ----- definitions -------------------------------------------------------------------

    /// The value of a definition, evaluated once.
    pub fn definition(&self, module: ModuleId, def: &Definition) -> Option<Spanned> {
        let key = (module, def.name.name.clone());
        let state = self.defs.borrow().get(&key).cloned();
        match state {
            Some(CellState::Done(v)) => return v,
            Some(CellState::Forcing) => {
                self.report(
                    Diagnostic::new(
                        Code::Cycle,
                        format!("`{}` is defined in terms of itself", def.name.name),
                    )
                    .at(def.name.span, "this definition depends on itself")
                    .note(self.cycle_chain(&def.name.name))
                    .help("break the cycle: a definition cannot inherit from or refer to itself"),
                );
                return None;
            }
            _ => {}
        }
        self.defs
            .borrow_mut()
            .insert(key.clone(), CellState::Forcing);
        self.forcing.borrow_mut().push(def.name.name.clone());
        let env = Env {
            module,
            frames: Vec::new(),
        };
        let result = self
            .nested(def.name.span, || self.expr(&def.value, &env))
            .and_then(|v| self.name_definition(def, v));
        self.forcing.borrow_mut().pop();
        self.defs
            .borrow_mut()
            .insert(key, CellState::Done(result.clone()));
        result
    }

    /// A record defined by a definition takes the definition's kind and name.
    fn name_definition(&self, def: &Definition, value: Spanned) -> Option<Spanned> {
        let Value::Record(record) = &value.value else {
            return Some(value);
        };
        if def.kind == DefKind::Let {
            return Some(value);
        }
        if let RecordKind::Def { kind, name, .. } = &record.kind {
            if *kind != def.kind && *kind != DefKind::Let {
                self.report(
                    Diagnostic::new(
                        Code::Type,
                        format!(
                            "{} `{}` cannot inherit from {kind} `{name}`",
                            def.kind, def.name.name
                        ),
                    )
                    .at(value.span, format!("this is a {kind}"))
                    .help(format!("inherit from a {}", def.kind)),
                );
                return None;
            }
        }
        // Models, hardware, experiments and pipelines inherit from definitions; an unknown
        // name in front of `{ ... }` there is a missing definition, not a variant tag.
        let inherits_only = !matches!(def.kind, DefKind::Objective | DefKind::Adapter);
        if let (true, RecordKind::Tag { name, module }) = (inherits_only, &record.kind) {
            let mut d =
                Diagnostic::new(Code::UnknownName, format!("unknown {} `{name}`", def.kind)).at(
                    Span {
                        end: value.span.start + name.len(),
                        ..value.span
                    },
                    "not defined",
                );
            let candidates = self
                .visible_names(*module, Some(def.kind))
                .into_iter()
                .filter(|n| *n != def.name.name);
            if let Some(s) = did_you_mean(name, candidates) {
                d = d.help(format!("did you mean `{s}`?"));
            }
            self.report(d);
            return None;
        }
        let tag = match &record.kind {
            RecordKind::Tag { name, .. } => Some(name.clone()),
            RecordKind::Def { tag, .. } => tag.clone(),
            RecordKind::Plain => None,
        };
        let kind = RecordKind::Def {
            kind: def.kind,
            name: def.name.name.clone(),
            tag,
        };
        let renamed = Record {
            kind,
            span: record.span,
            fields: reinstantiate(record),
        };
        Some(Spanned {
            value: Value::Record(Rc::new(renamed)),
            span: value.span,
        })
    }

    /// `a -> b -> a` for a definition found while it is being evaluated.
    fn cycle_chain(&self, name: &str) -> String {
        let forcing = self.forcing.borrow();
        let from = forcing.iter().rposition(|n| n == name).unwrap_or(0);
        let mut chain: Vec<&str> = forcing[from..].iter().map(String::as_str).collect();
        chain.push(name);
        chain.join(" -> ")
    }

    /// Runs `f` one level deeper, or reports that references nest too deeply.
    fn nested(&self, span: Span, f: impl FnOnce() -> Option<Spanned>) -> Option<Spanned> {
        if self.depth.get() >= MAX_DEPTH {
            self.report(
                Diagnostic::new(Code::Cycle, "definitions refer to each other too deeply")
                    .at(span, format!("more than {MAX_DEPTH} levels of references"))
                    .help("flatten the chain of definitions"),
            );
            return None;
        }
        self.depth.set(self.depth.get() + 1);
        let result = f();
        self.depth.set(self.depth.get() - 1);
        result
    }

    // ----- records -----------------------------------------------------------------------

    /// Evaluates a field of a record (once), with `self` bound to that record.
    pub fn field(&self, record: &Rc<Record>, name: &str) -> Option<Spanned> {
        let field = record.fields.get(name)?;
        let state = field.cell.borrow().clone();
        match state {
            CellState::Done(v) => return v,
            CellState::Forcing => {
                self.report(
                    Diagnostic::new(Code::Cycle, format!("field `{name}` depends on itself"))
                        .at(field.key_span, "its value refers back to it")
                        .help("give one of the fields in the cycle a literal value"),
                );
                *field.cell.borrow_mut() = CellState::Done(None);
                return None;
            }
            CellState::Pending => {}
        }
        *field.cell.borrow_mut() = CellState::Forcing;
        let result = self.nested(field.key_span, || self.source(&field.source, record));
        // A cycle error may already have poisoned the cell; keep the first outcome.
        let mut cell = field.cell.borrow_mut();
        if matches!(*cell, CellState::Forcing) {
            *cell = CellState::Done(result.clone());
        }
        match &*cell {
            CellState::Done(v) => v.clone(),
            _ => result,
        }
    }

    fn source(&self, source: &FieldSource, owner: &Rc<Record>) -> Option<Spanned> {
        match source {
            FieldSource::Value(v) => Some(v.clone()),
            FieldSource::Expr { expr, env } => self.expr(expr, &env.with_frame(owner)),
            FieldSource::Merge { base, body, env } => {
                let env = env.with_frame(owner);
                let base = self.source(base, owner)?;
                match &base.value {
                    Value::Record(parent) => {
                        let kind = parent.kind.clone();
                        let merged = self.inherit(parent, body, &env, kind);
                        Some(Spanned {
                            value: Value::Record(merged),
                            span: body.span,
                        })
                    }
                    _ => self.record_literal(body, &env),
                }
            }
        }
    }

    /// A new record with `base`'s fields, overridden by `body`'s.
    fn inherit(
        &self,
        base: &Rc<Record>,
        body: &RecordLit,
        env: &Env,
        kind: RecordKind,
    ) -> Rc<Record> {
        let mut fields = reinstantiate(base);
        for (key, lit) in self.unique_fields(body) {
            let source = match (&lit.value.kind, base.fields.get(&key.name)) {
                (ExprKind::Record(inner), Some(inherited)) if lit.merge => FieldSource::Merge {
                    base: Box::new(inherited.source.clone()),
                    body: Rc::new(inner.clone()),
                    env: env.clone(),
                },
                _ => FieldSource::Expr {
                    expr: lit.value.clone(),
                    env: env.clone(),
                },
            };
            fields.insert(key.name.clone(), Field::new(key.span, source));
        }
        Rc::new(Record {
            kind,
            span: body.span,
            fields,
        })
    }

    fn record_literal(&self, body: &RecordLit, env: &Env) -> Option<Spanned> {
        let fields = self
            .unique_fields(body)
            .map(|(key, lit)| {
                (
                    key.name.clone(),
                    Field::new(
                        key.span,
                        FieldSource::Expr {
                            expr: lit.value.clone(),
                            env: env.clone(),
                        },
                    ),
                )
            })
            .collect();
        let record = Record {
            kind: RecordKind::Plain,
            span: body.span,
            fields,
        };
        Some(Spanned {
            value: Value::Record(Rc::new(record)),
            span: body.span,
        })
    }

    /// The fields of a literal, reporting a key written twice.
    fn unique_fields<'a>(
        &self,
        body: &'a RecordLit,
    ) -> impl Iterator<Item = (&'a Ident, &'a crate::syntax::FieldLit)> {
        let mut seen: IndexMap<&str, Span> = IndexMap::new();
        let mut out = Vec::new();
        for lit in &body.fields {
            if let Some(first) = seen.get(lit.key.name.as_str()) {
                self.report(
                    Diagnostic::new(
                        Code::Duplicate,
                        format!("field `{}` is set twice", lit.key.name),
                    )
                    .at(lit.key.span, "set again here")
                    .also(*first, "first set here"),
                );
                continue;
            }
            seen.insert(&lit.key.name, lit.key.span);
            out.push((&lit.key, lit));
        }
        out.into_iter()
    }

    // ----- expressions -------------------------------------------------------------------

    pub(crate) fn expr(&self, expr: &Expr, env: &Env) -> Option<Spanned> {
        // Nesting inside expressions and across definitions multiplies; grow the stack on
        // demand rather than bound the product.
        stacker::maybe_grow(64 * 1024, 1024 * 1024, || self.expr_inner(expr, env))
    }

    fn expr_inner(&self, expr: &Expr, env: &Env) -> Option<Spanned> {
        let span = expr.span;
        let value = match &expr.kind {
            ExprKind::Int(i) => Value::Int(*i),
            ExprKind::Float(f) => Value::Float(*f),
            ExprKind::Str(s) => Value::Str(s.clone()),
            ExprKind::Bool(b) => Value::Bool(*b),
            ExprKind::Quantity {
                value,
                unit,
                unit_span,
            } => self.quantity(*value, unit, *unit_span, span)?,
            ExprKind::List(items) => {
                let items: Vec<Option<Spanned>> = items.iter().map(|e| self.expr(e, env)).collect();
                Value::List(items.into_iter().collect::<Option<_>>()?)
            }
            ExprKind::Record(body) => return self.record_literal(body, env),
            ExprKind::Path(path) => return self.path(path, env, span),
            ExprKind::Call { name, args } => {
                let args: Vec<Option<Spanned>> = args.iter().map(|e| self.expr(e, env)).collect();
                let args: Vec<Spanned> = args.into_iter().collect::<Option<_>>()?;
                return self.call(name, args, env, span);
            }
            ExprKind::Construct { base, body } => {
                let base_value = match &base.kind {
                    ExprKind::Path(path) => self.path(path, env, base.span)?,
                    _ => self.expr(base, env)?,
                };
                let record = match &base_value.value {
                    Value::Record(parent) => self.inherit(parent, body, env, parent.kind.clone()),
                    Value::Symbol { name, module } => {
                        let kind = RecordKind::Tag {
                            name: name.clone(),
                            module: *module,
                        };
                        let empty = Rc::new(Record {
                            kind: kind.clone(),
                            span: base.span,
                            fields: IndexMap::new(),
                        });
                        self.inherit(&empty, body, env, kind)
                    }
                    other => {
                        self.report(
                            Diagnostic::new(Code::Type, format!("cannot add fields to {}", other.describe()))
                                .at(base.span, "not a record")
                                .help("only definitions and constructors like `lora { ... }` take a `{ ... }` body"),
                        );
                        return None;
                    }
                };
                Value::Record(record)
            }
            ExprKind::Neg(inner) => {
                let v = self.expr(inner, env)?;
                match v.value {
                    Value::Int(i) => match i.checked_neg() {
                        Some(n) => Value::Int(n),
                        None => {
                            self.report(
                                Diagnostic::new(Code::Arithmetic, "integer overflow")
                                    .at(span, "its negation does not fit in 64 bits"),
                            );
                            return None;
                        }
                    },
                    Value::Float(f) => Value::Float(-f),
                    Value::Quantity(mut q) => {
                        q.si = -q.si;
                        q.written = format!("-{}", q.written);
                        Value::Quantity(q)
                    }
                    other => {
                        self.report(
                            Diagnostic::new(
                                Code::Arithmetic,
                                format!("cannot negate {}", other.describe()),
                            )
                            .at(span, "not a number"),
                        );
                        return None;
                    }
                }
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let (l, r) = (self.expr(lhs, env), self.expr(rhs, env));
                return self.binary(*op, l?, r?, span);
            }
        };
        Some(Spanned { value, span })
    }

    fn quantity(&self, value: f64, unit: &str, unit_span: Span, span: Span) -> Option<Value> {
        let written = self.program.sources.borrow().text_of(span).to_string();
        match units::lookup(unit) {
            Some(UnitMeaning::Percent) => Some(Value::Float(value / 100.0)),
            Some(UnitMeaning::Quantity(dim, factor)) => Some(Value::Quantity(units::Quantity {
                si: value * factor,
                dim,
                written,
            })),
            None => {
                let all = units::all_units();
                let mut d = Diagnostic::new(Code::Unit, format!("unknown unit `{unit}`"))
                    .at(unit_span, "not a unit Kiln knows");
                let same_letters = all
                    .iter()
                    .find(|u| u.eq_ignore_ascii_case(unit))
                    .map(String::as_str);
                d = match same_letters.or_else(|| did_you_mean(unit, all.iter().map(String::as_str))) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help("units: B KB MB GB KiB MiB GiB (bytes), GB/s Gb/s (bandwidth), TFLOP/s, ns us ms s, %"),
                };
                self.report(d);
                None
            }
        }
    }

    fn path(&self, path: &[Ident], env: &Env, span: Span) -> Option<Spanned> {
        let first = &path[0];
        let mut value = match self.name(first, env) {
            Some(v) => v?,
            // Not a name in scope: a symbol (`gelu`, or a module path such as `mlp.c_proj`).
            // Where a reference was expected, the checker reports it with the names in scope.
            None => {
                let name: Vec<&str> = path.iter().map(|i| i.name.as_str()).collect();
                return Some(Spanned {
                    value: Value::Symbol {
                        name: name.join("."),
                        module: env.module,
                    },
                    span,
                });
            }
        };
        for segment in &path[1..] {
            let Value::Record(record) = &value.value else {
                self.report(
                    Diagnostic::new(
                        Code::Type,
                        format!("{} has no fields", value.value.describe()),
                    )
                    .at(segment.span, format!("cannot take `.{}`", segment.name)),
                );
                return None;
            };
            if !record.fields.contains_key(&segment.name) {
                let mut d = Diagnostic::new(
                    Code::UnknownField,
                    format!("{} has no field `{}`", record.kind.describe(), segment.name),
                )
                .at(segment.span, "unknown field");
                if let Some(s) = did_you_mean(&segment.name, record.field_names()) {
                    d = d.help(format!("did you mean `{s}`?"));
                }
                self.report(d);
                return None;
            }
            value = self.field(record, &segment.name)?;
        }
        // A reference keeps the span where it was written, so errors point at the use.
        Some(Spanned {
            value: value.value,
            span,
        })
    }

    /// A name in an expression: a field of an enclosing record (innermost first), then a
    /// definition. `None` when nothing has that name; `Some(None)` when it failed to evaluate.
    fn name(&self, ident: &Ident, env: &Env) -> Option<Option<Spanned>> {
        for frame in &env.frames {
            if frame.fields.contains_key(&ident.name) {
                return Some(self.field(frame, &ident.name));
            }
        }
        let found = self.lookup(env.module, &ident.name, ident.span)?;
        Some(self.definition(found.module, found.def))
    }

    fn call(&self, name: &[Ident], args: Vec<Spanned>, env: &Env, span: Span) -> Option<Spanned> {
        let [ident] = name else {
            self.report(
                Diagnostic::new(Code::UnknownName, "only plain names can be called")
                    .at(span, "dotted call"),
            );
            return None;
        };
        let value = match ident.name.as_str() {
            call @ ("cpu" | "gpu" | "cuda") => builtins::local_devices(self, call, &args, span)?,
            "hf" => builtins::hf(self, &args, env, span)?,
            "peft" => builtins::peft(self, &args, env, span)?,
            _ => Value::Call {
                name: ident.name.clone(),
                args,
                module: env.module,
            },
        };
        Some(Spanned { value, span })
    }

    fn binary(&self, op: BinOp, l: Spanned, r: Spanned, span: Span) -> Option<Spanned> {
        use Value::*;
        let fail = |why: &str| {
            self.report(
                Diagnostic::new(
                    Code::Arithmetic,
                    format!(
                        "cannot compute {} {} {}",
                        l.value.describe(),
                        op.symbol(),
                        r.value.describe()
                    ),
                )
                .at(span, why.to_string()),
            );
            None
        };
        let value = match (&l.value, &r.value) {
            (Int(a), Int(b)) => match op {
                BinOp::Add => a.checked_add(*b).map(Int),
                BinOp::Sub => a.checked_sub(*b).map(Int),
                BinOp::Mul => a.checked_mul(*b).map(Int),
                BinOp::Div if *b == 0 => return fail("division by zero"),
                // Exact division stays an integer (`hidden / heads`); otherwise a float.
                BinOp::Div => match a.checked_rem(*b) {
                    Some(0) => a.checked_div(*b).map(Int),
                    Some(_) => Some(Float(*a as f64 / *b as f64)),
                    None => None,
                },
            }
            .or_else(|| fail("integer overflow").map(|s| s.value))?,
            (Int(_) | Float(_), Int(_) | Float(_)) => {
                let (a, b) = (as_f64(&l.value), as_f64(&r.value));
                if op == BinOp::Div && b == 0.0 {
                    return fail("division by zero");
                }
                Float(apply(op, a, b))
            }
            (Quantity(a), Quantity(b))
                if a.dim == b.dim && matches!(op, BinOp::Add | BinOp::Sub) =>
            {
                Quantity(units::Quantity {
                    si: apply(op, a.si, b.si),
                    dim: a.dim,
                    written: self.written(span),
                })
            }
            (Quantity(a), Quantity(b)) if a.dim == b.dim && op == BinOp::Div => {
                if b.si == 0.0 {
                    return fail("division by zero");
                }
                Float(a.si / b.si)
            }
            (Quantity(q), Int(_) | Float(_)) if matches!(op, BinOp::Mul | BinOp::Div) => {
                let n = as_f64(&r.value);
                if op == BinOp::Div && n == 0.0 {
                    return fail("division by zero");
                }
                Quantity(units::Quantity {
                    si: apply(op, q.si, n),
                    dim: q.dim,
                    written: self.written(span),
                })
            }
            (Int(_) | Float(_), Quantity(q)) if op == BinOp::Mul => Quantity(units::Quantity {
                si: as_f64(&l.value) * q.si,
                dim: q.dim,
                written: self.written(span),
            }),
            (Quantity(_), Quantity(_)) => return fail("the units do not combine"),
            (Record(node), Int(n)) if op == BinOp::Mul && is_node(node) => {
                builtins::cluster_of(node, *n, span, r.span)
            }
            (
                Record(_) | Symbol { .. } | Call { .. } | Sum(_),
                Record(_) | Symbol { .. } | Call { .. } | Sum(_),
            ) if op == BinOp::Add => {
                let mut parts = Vec::new();
                for side in [l.clone(), r.clone()] {
                    match side.value {
                        Sum(inner) => parts.extend(inner),
                        _ => parts.push(side),
                    }
                }
                Sum(parts)
            }
            (Str(a), Str(b)) if op == BinOp::Add => Str(format!("{a}{b}")),
            (Symbol { name, module }, Int(_)) if op == BinOp::Mul => {
                // `dgx_a100 * 16` with the node undefined: say so, rather than "cannot multiply".
                let mut d =
                    Diagnostic::new(Code::UnknownName, format!("cannot find node `{name}`"))
                        .at(l.span, "not defined");
                d = match did_you_mean(name, self.visible_names(*module, Some(DefKind::Node))) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help("the stdlib's nodes are in `import std.clusters`"),
                };
                self.report(d);
                return None;
            }
            _ => return fail("these operands do not support this operator"),
        };
        let finite = match &value {
            Float(f) => f.is_finite(),
            Quantity(q) => q.si.is_finite(),
            _ => true,
        };
        if !finite {
            return fail("the result is too large to represent");
        }
        Some(Spanned { value, span })
    }

    fn written(&self, span: Span) -> String {
        self.program.sources.borrow().text_of(span).to_string()
    }
}

fn is_node(record: &Record) -> bool {
    matches!(
        &record.kind,
        RecordKind::Def {
            kind: DefKind::Node,
            ..
        }
    )
}

fn as_f64(v: &Value) -> f64 {
    match v {
        Value::Int(i) => *i as f64,
        Value::Float(f) => *f,
        _ => f64::NAN,
    }
}

fn apply(op: BinOp, a: f64, b: f64) -> f64 {
    match op {
        BinOp::Add => a + b,
        BinOp::Sub => a - b,
        BinOp::Mul => a * b,
        BinOp::Div => a / b,
    }
}

/// Copies of a record's fields with fresh caches (see [`Field::reinstantiate`]).
fn reinstantiate(record: &Record) -> IndexMap<String, Field> {
    record
        .fields
        .iter()
        .map(|(k, f)| (k.clone(), f.reinstantiate()))
        .collect()
}
