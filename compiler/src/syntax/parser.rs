//! pest parse tree → AST.

use super::ast::*;
use crate::diagnostics::{did_you_mean, Code, Diagnostic, FileId, Span};
use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;
use pest::pratt_parser::{Assoc, Op, PrattParser};
use pest::Parser as _;
use std::rc::Rc;
use std::sync::OnceLock;

#[derive(pest_derive::Parser)]
#[grammar = "syntax/kiln.pest"]
struct KilnParser;

fn pratt() -> &'static PrattParser<Rule> {
    static PRATT: OnceLock<PrattParser<Rule>> = OnceLock::new();
    PRATT.get_or_init(|| {
        PrattParser::new()
            .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
            .op(Op::infix(Rule::mul, Assoc::Left) | Op::infix(Rule::div, Assoc::Left))
            .op(Op::prefix(Rule::neg))
    })
}

/// Parses one file. Syntax errors stop the parse of that file (pest does not recover), so at
/// most one diagnostic comes back; semantic checks later report everything else at once.
pub fn parse(file: FileId, text: &str) -> Result<SourceFile, Box<Diagnostic>> {
    let mut pairs =
        KilnParser::parse(Rule::file, text).map_err(|e| Box::new(syntax_error(file, text, e)))?;
    let b = Builder {
        file,
        depth: std::cell::Cell::new(0),
    };
    let root = pairs
        .next()
        .expect("pest returns the `file` rule on success");
    let mut items = Vec::new();
    for pair in root.into_inner() {
        match pair.as_rule() {
            Rule::import => items.push(Item::Import(b.import(pair)?)),
            Rule::definition => items.push(Item::Definition(b.definition(pair)?)),
            _ => {}
        }
    }
    Ok(SourceFile { items })
}

/// The children of a pair without the punctuation tokens (named only for error messages).
fn content(pair: Pair<Rule>) -> impl Iterator<Item = Pair<Rule>> {
    pair.into_inner().filter(|p| {
        !matches!(
            p.as_rule(),
            Rule::assign | Rule::comma | Rule::rbrace | Rule::rbracket | Rule::rparen
        )
    })
}

struct Builder {
    file: FileId,
    /// Current nesting of expressions; evaluation recurses as deep, so it is bounded.
    depth: std::cell::Cell<usize>,
}

/// Deeper nesting, or longer operator chains, are certainly mistakes (or generated input)
/// and would overflow the stack of the recursive evaluator.
const MAX_NESTING: usize = 128;
const MAX_OPERATORS: usize = 1024;

impl Builder {
    fn span(&self, pair: &Pair<Rule>) -> Span {
        let s = pair.as_span();
        Span::new(self.file, s.start()..s.end())
    }

    fn ident(&self, pair: Pair<Rule>) -> Ident {
        Ident {
            name: pair.as_str().to_string(),
            span: self.span(&pair),
        }
    }

    fn path(&self, pair: Pair<Rule>) -> Vec<Ident> {
        pair.into_inner().map(|p| self.ident(p)).collect()
    }

    fn import(&self, pair: Pair<Rule>) -> Result<Import, Box<Diagnostic>> {
        let span = self.span(&pair);
        let target = pair
            .into_inner()
            .find(|p| p.as_rule() != Rule::kw_import)
            .expect("grammar: import has a target");
        let target = match target.as_rule() {
            Rule::string => ImportTarget::File(self.string(target)?),
            _ => ImportTarget::Module(self.path(target)),
        };
        Ok(Import { target, span })
    }

    fn definition(&self, pair: Pair<Rule>) -> Result<Definition, Box<Diagnostic>> {
        let span = self.span(&pair);
        let mut inner = content(pair);
        let kind_pair = inner.next().expect("grammar: def_kind");
        let kind = DefKind::parse(kind_pair.as_str()).expect("grammar only admits known kinds");
        let name = self.ident(inner.next().expect("grammar: definition name"));
        let value = self.value(inner.next().expect("grammar: definition value"))?;
        Ok(Definition {
            kind,
            name,
            value: Rc::new(value),
            span,
        })
    }

    fn record(&self, pair: Pair<Rule>) -> Result<RecordLit, Box<Diagnostic>> {
        let span = self.span(&pair);
        let mut fields = Vec::new();
        for field in content(pair) {
            let mut inner = content(field);
            let key_pair = inner.next().expect("grammar: field key");
            let key = match key_pair.as_rule() {
                Rule::string => Ident {
                    span: self.span(&key_pair),
                    name: self.string(key_pair)?,
                },
                _ => self.ident(key_pair),
            };
            let value_pair = inner.next().expect("grammar: field value");
            let merge = value_pair.as_rule() == Rule::record;
            let value = self.value(value_pair)?;
            fields.push(FieldLit {
                key,
                value: Rc::new(value),
                merge,
            });
        }
        Ok(RecordLit { fields, span })
    }

    /// A definition's or field's value: a `{ ... }` body or an expression.
    fn value(&self, pair: Pair<Rule>) -> Result<Expr, Box<Diagnostic>> {
        match pair.as_rule() {
            Rule::record => {
                let body = self.record(pair)?;
                Ok(Expr {
                    span: body.span,
                    kind: ExprKind::Record(body),
                })
            }
            _ => self.expr(pair),
        }
    }

    fn expr(&self, pair: Pair<Rule>) -> Result<Expr, Box<Diagnostic>> {
        let span = self.span(&pair);
        let operators = pair
            .clone()
            .into_inner()
            .filter(|p| {
                matches!(
                    p.as_rule(),
                    Rule::add | Rule::sub | Rule::mul | Rule::div | Rule::neg
                )
            })
            .count();
        if operators > MAX_OPERATORS || self.depth.get() >= MAX_NESTING {
            return Err(Box::new(
                Diagnostic::new(Code::Syntax, "expression is too deeply nested")
                    .at(Span { end: span.start + 1, ..span }, "starts here")
                    .help(format!("Kiln accepts up to {MAX_NESTING} levels of nesting and {MAX_OPERATORS} operators in one expression")),
            ));
        }
        self.depth.set(self.depth.get() + 1);
        let result = self.expr_inner(pair);
        self.depth.set(self.depth.get() - 1);
        result
    }

    fn expr_inner(&self, pair: Pair<Rule>) -> Result<Expr, Box<Diagnostic>> {
        pratt()
            .map_primary(|p| self.primary(p))
            .map_prefix(|op, rhs| {
                let rhs = rhs?;
                let span = self.span(&op).to(rhs.span);
                Ok(Expr {
                    span,
                    kind: ExprKind::Neg(Box::new(rhs)),
                })
            })
            .map_infix(|lhs, op, rhs| {
                let (lhs, rhs) = (lhs?, rhs?);
                let op = match op.as_rule() {
                    Rule::add => BinOp::Add,
                    Rule::sub => BinOp::Sub,
                    Rule::mul => BinOp::Mul,
                    _ => BinOp::Div,
                };
                let span = lhs.span.to(rhs.span);
                Ok(Expr {
                    span,
                    kind: ExprKind::Binary {
                        op,
                        lhs: Box::new(lhs),
                        rhs: Box::new(rhs),
                    },
                })
            })
            .parse(pair.into_inner())
    }

    fn primary(&self, pair: Pair<Rule>) -> Result<Expr, Box<Diagnostic>> {
        let span = self.span(&pair);
        let kind = match pair.as_rule() {
            Rule::paren => {
                let inner = self.expr(pair.into_inner().next().expect("grammar: paren expr"))?;
                return Ok(Expr {
                    span,
                    kind: inner.kind,
                });
            }
            Rule::int => ExprKind::Int(self.int(&pair)?),
            Rule::float => ExprKind::Float(self.float(&pair)?),
            Rule::quantity => {
                let mut inner = pair.into_inner();
                let number = inner.next().expect("grammar: quantity number");
                let unit = inner.next().expect("grammar: quantity unit");
                ExprKind::Quantity {
                    value: self.float(&number)?,
                    unit: unit.as_str().to_string(),
                    unit_span: self.span(&unit),
                }
            }
            Rule::string => ExprKind::Str(self.string(pair)?),
            Rule::boolean => ExprKind::Bool(pair.as_str() == "true"),
            Rule::schedule_1f1b => ExprKind::Path(vec![Ident {
                name: "1f1b".into(),
                span,
            }]),
            Rule::list => ExprKind::List(
                content(pair)
                    .map(|p| self.expr(p))
                    .collect::<Result<_, _>>()?,
            ),
            Rule::record => ExprKind::Record(self.record(pair)?),
            Rule::reference => return self.reference(pair),
            rule => unreachable!("grammar: unexpected primary {rule:?}"),
        };
        Ok(Expr { span, kind })
    }

    fn reference(&self, pair: Pair<Rule>) -> Result<Expr, Box<Diagnostic>> {
        let mut inner = pair.into_inner();
        let path_pair = inner.next().expect("grammar: reference path");
        let mut span = self.span(&path_pair);
        let name = self.path(path_pair);
        let mut head = Expr {
            span,
            kind: ExprKind::Path(name.clone()),
        };
        for part in inner {
            span = span.to(self.span(&part));
            match part.as_rule() {
                Rule::args => {
                    let args = content(part)
                        .map(|p| self.expr(p))
                        .collect::<Result<_, _>>()?;
                    head = Expr {
                        span,
                        kind: ExprKind::Call {
                            name: name.clone(),
                            args,
                        },
                    };
                }
                _ => {
                    let body = self.record(part)?;
                    head = Expr {
                        span,
                        kind: ExprKind::Construct {
                            base: Box::new(head),
                            body,
                        },
                    };
                }
            }
        }
        Ok(head)
    }

    fn int(&self, pair: &Pair<Rule>) -> Result<i64, Box<Diagnostic>> {
        let text = pair.as_str().replace('_', "");
        text.parse::<i64>().map_err(|_| {
            Box::new(
                Diagnostic::new(Code::Syntax, "integer literal is too large")
                    .at(self.span(pair), "does not fit in a 64-bit integer")
                    .help("write it as a float (`1e20`) if an approximate value is fine"),
            )
        })
    }

    fn float(&self, pair: &Pair<Rule>) -> Result<f64, Box<Diagnostic>> {
        let text = pair.as_str().replace('_', "");
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(Box::new(
                Diagnostic::new(Code::Syntax, "number literal is out of range")
                    .at(self.span(pair), "not a finite number"),
            )),
        }
    }

    fn string(&self, pair: Pair<Rule>) -> Result<String, Box<Diagnostic>> {
        let span = self.span(&pair);
        let raw = pair.into_inner().next().map(|p| p.as_str()).unwrap_or("");
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                other => {
                    let shown = other.map(|c| c.to_string()).unwrap_or_default();
                    return Err(Box::new(
                        Diagnostic::new(
                            Code::Syntax,
                            format!("unknown escape `\\{shown}` in string"),
                        )
                        .at(span, "in this string")
                        .help("the escapes are \\n, \\t, \\\" and \\\\"),
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// Turns pest's error into a diagnostic that speaks the language's words, not rule names.
fn syntax_error(file: FileId, text: &str, error: pest::error::Error<Rule>) -> Diagnostic {
    let pos = match error.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    if let Some(d) = malformed_token(file, text, pos) {
        return d;
    }
    // Point at the whole offending token, or at the end of input.
    let token_end = text[pos..]
        .char_indices()
        .find(|(_, c)| c.is_whitespace() || "{}[](),=".contains(*c))
        .map(|(i, _)| pos + i.max(text[pos..].chars().next().map_or(0, char::len_utf8)))
        .unwrap_or(text.len());
    let span = Span::new(file, pos..token_end.max(pos));
    let found = if pos >= text.len() {
        "end of file".to_string()
    } else {
        format!(
            "`{}`",
            &text[pos..token_end.max(pos + text[pos..].chars().next().map_or(0, char::len_utf8))]
        )
    };
    let expected = match &error.variant {
        ErrorVariant::ParsingError { positives, .. } => {
            let mut words: Vec<&str> = positives.iter().filter_map(|r| describe(*r)).collect();
            words.sort();
            words.dedup();
            words
        }
        ErrorVariant::CustomError { .. } => Vec::new(),
    };
    let message = if expected.is_empty() {
        format!("unexpected {found}")
    } else {
        format!("expected {}, found {found}", join_or(&expected))
    };
    let mut d = Diagnostic::new(Code::Syntax, message).at(span, "unexpected here");
    if let Some(help) = hint(text, pos) {
        d = d.help(help);
    }
    d
}

/// Errors that are about one token rather than the structure around it: an unterminated
/// string, or a number run into letters that are not a unit (`1f2b`, `80gigs`).
fn malformed_token(file: FileId, text: &str, pos: usize) -> Option<Diagnostic> {
    let line_end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
    if text[pos..].starts_with('"') && !text[pos + 1..line_end].contains('"') {
        return Some(
            Diagnostic::new(Code::Syntax, "unterminated string")
                .at(Span::new(file, pos..pos + 1), "this string is not closed")
                .help("add the closing `\"` before the end of the line"),
        );
    }
    // Walk back over the digits of a number that the error landed inside.
    let start = text[..pos]
        .trim_end_matches(|c: char| c.is_ascii_digit() || c == '.' || c == '_')
        .len();
    let glued = text[pos..].starts_with(|c: char| c.is_ascii_alphanumeric());
    if start == pos || !glued || !text[start..].starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let end = text[pos..]
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '/' || c == '%'))
        .map_or(text.len(), |i| pos + i);
    let token = &text[start..end];
    let d = Diagnostic::new(
        Code::Syntax,
        format!("`{token}` is not a number with a unit"),
    )
    .at(Span::new(file, start..end), "not a valid literal");
    Some(match did_you_mean(&token.to_ascii_lowercase(), ["1f1b"]) {
        Some(s) => d.help(format!("did you mean the pipeline schedule `{s}`?")),
        None => d.help(
            "units follow the number directly: 80GiB, 600GB/s, 200Gb/s, 312TFLOP/s, 2us, 15%",
        ),
    })
}

fn describe(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::EOI => "end of file",
        Rule::import | Rule::kw_import => "`import`",
        Rule::definition | Rule::def_kind => "a definition (`model`, `experiment`, `cluster`, ...)",
        Rule::ident | Rule::path | Rule::module_path | Rule::reference => "a name",
        Rule::expr | Rule::primary | Rule::paren | Rule::neg => "a value",
        Rule::int | Rule::float | Rule::number | Rule::quantity => "a number",
        Rule::string => "a string",
        Rule::record => "`{`",
        Rule::assign => "`=`",
        Rule::comma => "`,`",
        Rule::rbrace => "`}`",
        Rule::rbracket => "`]`",
        Rule::rparen => "`)`",
        Rule::field => "a field (`name = value`)",
        Rule::list => "`[`",
        Rule::args => "`(`",
        Rule::add | Rule::sub | Rule::mul | Rule::div => "an operator",
        Rule::unit => "a unit",
        _ => return None,
    })
}

fn join_or(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {}", init.join(", "), last),
    }
}

/// Common slips, recognised from the text around the error.
fn hint(text: &str, pos: usize) -> Option<String> {
    let before = text[..pos].trim_end();
    if before.ends_with('=') && text[pos..].starts_with('\'') {
        return Some("strings use double quotes: \"...\"".into());
    }
    if text[pos..].starts_with(':') && !before.ends_with('{') {
        return Some("fields are written `name = value`".into());
    }
    if text[pos..].starts_with(';') {
        return Some("fields are separated by newlines or commas, not semicolons".into());
    }
    if pos >= text.len() {
        return Some("a `{`, `[` or `(` is not closed".into());
    }
    None
}
