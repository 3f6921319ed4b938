//! The abstract syntax tree of a `.kiln` file.

use crate::diagnostics::Span;
use std::fmt;
use std::rc::Rc;

#[derive(Clone, Debug)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct SourceFile {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug)]
pub enum Item {
    Import(Import),
    Definition(Definition),
}

#[derive(Clone, Debug)]
pub struct Import {
    pub target: ImportTarget,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum ImportTarget {
    /// `import std.models.gpt2`
    Module(Vec<Ident>),
    /// `import "common.kiln"`, relative to the importing file.
    File(String),
}

/// What a top-level definition defines; checked against the value's use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DefKind {
    Model,
    Device,
    Node,
    Cluster,
    Experiment,
    Pipeline,
    Objective,
    Adapter,
    /// A plain named value (a constant, a shared record).
    Let,
}

impl DefKind {
    pub fn parse(word: &str) -> Option<DefKind> {
        Some(match word {
            "model" => DefKind::Model,
            "device" => DefKind::Device,
            "node" => DefKind::Node,
            "cluster" => DefKind::Cluster,
            "experiment" => DefKind::Experiment,
            "pipeline" => DefKind::Pipeline,
            "objective" => DefKind::Objective,
            "adapter" => DefKind::Adapter,
            "let" => DefKind::Let,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DefKind::Model => "model",
            DefKind::Device => "device",
            DefKind::Node => "node",
            DefKind::Cluster => "cluster",
            DefKind::Experiment => "experiment",
            DefKind::Pipeline => "pipeline",
            DefKind::Objective => "objective",
            DefKind::Adapter => "adapter",
            DefKind::Let => "let",
        }
    }
}

impl fmt::Display for DefKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug)]
pub struct Definition {
    pub kind: DefKind,
    pub name: Ident,
    pub value: Rc<Expr>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }
}

#[derive(Clone, Debug)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    /// A number with a unit, as written (`80GiB`); the unit is interpreted when evaluated.
    Quantity {
        value: f64,
        unit: String,
        unit_span: Span,
    },
    Str(String),
    Bool(bool),
    /// `a` or `a.b.c`: a definition, a field of an enclosing record, or an enum symbol.
    Path(Vec<Ident>),
    /// `name(args)`: a builtin (`cpu(4)`, `hf("dir")`) or a parameterised symbol (`interleaved(2)`).
    Call {
        name: Vec<Ident>,
        args: Vec<Expr>,
    },
    /// `base { fields }`: inherit from a definition or construct a tagged value (`lora { .. }`).
    Construct {
        base: Box<Expr>,
        body: RecordLit,
    },
    Record(RecordLit),
    List(Vec<Expr>),
    Neg(Box<Expr>),
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
}

#[derive(Clone, Debug)]
pub struct RecordLit {
    pub fields: Vec<FieldLit>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct FieldLit {
    pub key: Ident,
    pub value: Rc<Expr>,
    /// Written `name { ... }` (no `=`): merges into the field it overrides, where
    /// `name = { ... }` replaces it.
    pub merge: bool,
}
