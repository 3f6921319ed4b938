//! Rendering diagnostics with codespan-reporting.

use super::{Diagnostic, SourceMap};
use codespan_reporting::diagnostic as cs;
use codespan_reporting::term::{self, termcolor};
use std::io::IsTerminal;

fn to_codespan(d: &Diagnostic) -> cs::Diagnostic<usize> {
    let mut labels = Vec::new();
    if let Some(p) = &d.primary {
        labels.push(cs::Label::primary(p.span.file.0, p.span.range()).with_message(&p.message));
    }
    for s in &d.secondary {
        labels.push(cs::Label::secondary(s.span.file.0, s.span.range()).with_message(&s.message));
    }
    let mut notes: Vec<String> = d.notes.iter().map(|n| format!("note: {n}")).collect();
    if let Some(h) = &d.help {
        notes.push(format!("help: {h}"));
    }
    cs::Diagnostic::error()
        .with_code(d.code.as_str())
        .with_message(&d.message)
        .with_labels(labels)
        .with_notes(notes)
}

/// Renders without colour: what tests snapshot and what a pipe receives.
pub fn render_plain(sources: &SourceMap, diagnostics: &[&Diagnostic]) -> String {
    let mut out = termcolor::NoColor::new(Vec::new());
    let config = term::Config::default();
    for d in diagnostics {
        // Writing into a Vec cannot fail; a label outside its file is a compiler bug that
        // codespan reports as an error, which we surface as text rather than panic.
        if let Err(e) = term::emit(&mut out, &config, sources.files(), &to_codespan(d)) {
            out.get_mut().extend_from_slice(
                format!("error[{}]: {} ({e})\n", d.code.as_str(), d.message).as_bytes(),
            );
        }
    }
    String::from_utf8_lossy(&out.into_inner()).into_owned()
}

/// Renders to standard error, coloured only on a terminal and when NO_COLOR is unset.
pub fn render_to_stderr(sources: &SourceMap, diagnostics: &[&Diagnostic]) {
    let colour = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::io::stderr().is_terminal();
    if !colour {
        eprint!("{}", render_plain(sources, diagnostics));
        return;
    }
    let writer = termcolor::StandardStream::stderr(termcolor::ColorChoice::Always);
    let mut lock = writer.lock();
    let config = term::Config::default();
    for d in diagnostics {
        let _ = term::emit(&mut lock, &config, sources.files(), &to_codespan(d));
    }
}
