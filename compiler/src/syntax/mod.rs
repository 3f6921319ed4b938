//! Syntax: the pest grammar (`kiln.pest`), the AST, and the parser that builds one from the
//! other. Every AST node carries the [`Span`] it came from.

mod ast;
mod parser;

pub use ast::*;
pub use parser::parse;
