//! Source files, spans and diagnostics.
//!
//! Every stage of the compiler reports user errors as [`Diagnostic`]s that point at spans of
//! the source. Rendering is delegated to `codespan-reporting` (rustc-style output, several
//! labels per diagnostic), so this module only keeps the data.

mod codes;
mod render;

pub use codes::Code;
pub use render::{render_plain, render_to_stderr};

use codespan_reporting::files::{Files, SimpleFiles};
use std::ops::Range;

/// Index of a source file in the [`SourceMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub usize);

/// A byte range in one source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: FileId,
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(file: FileId, range: Range<usize>) -> Self {
        Span {
            file,
            start: range.start,
            end: range.end,
        }
    }

    /// The smallest span covering both (same file assumed).
    pub fn to(self, other: Span) -> Span {
        Span {
            file: self.file,
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }

    pub fn range(self) -> Range<usize> {
        self.start..self.end
    }
}

/// All source text the compiler has seen: user files, embedded stdlib modules, and the
/// Hugging Face / PEFT JSON files that `hf(...)` and `peft(...)` read.
pub struct SourceMap {
    files: SimpleFiles<String, String>,
    count: usize,
}

impl Default for SourceMap {
    fn default() -> Self {
        SourceMap {
            files: SimpleFiles::new(),
            count: 0,
        }
    }
}

impl SourceMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> FileId {
        self.count += 1;
        FileId(self.files.add(name.into(), text.into()))
    }

    pub fn name(&self, id: FileId) -> &str {
        self.files
            .get(id.0)
            .map(|f| f.name().as_str())
            .unwrap_or("<unknown>")
    }

    pub fn text(&self, id: FileId) -> &str {
        self.files
            .get(id.0)
            .map(|f| f.source().as_str())
            .unwrap_or("")
    }

    pub fn text_of(&self, span: Span) -> &str {
        self.text(span.file).get(span.range()).unwrap_or("")
    }

    /// 1-based line and column of a span's start.
    pub fn line_col(&self, span: Span) -> (usize, usize) {
        let line = self.files.line_index(span.file.0, span.start).unwrap_or(0);
        let col = self
            .files
            .column_number(span.file.0, line, span.start)
            .unwrap_or(1);
        (line + 1, col)
    }

    /// `file:line:col` of a span's start.
    pub fn location(&self, span: Span) -> String {
        let (line, col) = self.line_col(span);
        format!("{}:{}:{}", self.name(span.file), line, col)
    }

    pub(crate) fn files(&self) -> &SimpleFiles<String, String> {
        &self.files
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A label under a span: the primary one says what is wrong, secondary ones say what it
/// conflicts with or where something was defined.
#[derive(Clone, Debug)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

/// One user error, with everything needed to explain it.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub code: Code,
    pub message: String,
    pub primary: Option<Label>,
    pub secondary: Vec<Label>,
    pub help: Option<String>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            message: message.into(),
            primary: None,
            secondary: Vec::new(),
            help: None,
            notes: Vec::new(),
        }
    }

    /// The span that is wrong, with a short label.
    pub fn at(mut self, span: Span, label: impl Into<String>) -> Self {
        self.primary = Some(Label {
            span,
            message: label.into(),
        });
        self
    }

    /// Another span that takes part (what this conflicts with, where a thing was defined).
    pub fn also(mut self, span: Span, label: impl Into<String>) -> Self {
        self.secondary.push(Label {
            span,
            message: label.into(),
        });
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }
}

/// The errors of one compilation, in the order they were found.
#[derive(Debug, Default)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.items.push(diagnostic);
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Sorted by file and position so that output does not depend on evaluation order;
    /// exact duplicates (the same error reached along two paths) are reported once.
    pub fn sorted(&self) -> Vec<&Diagnostic> {
        let mut out: Vec<&Diagnostic> = self.items.iter().collect();
        out.sort_by_key(|d| {
            d.primary
                .as_ref()
                .map(|l| (l.span.file.0, l.span.start, l.span.end))
                .unwrap_or((usize::MAX, 0, 0))
        });
        let mut seen = std::collections::HashSet::new();
        out.retain(|d| {
            seen.insert((
                d.code,
                d.message.clone(),
                d.primary.as_ref().map(|l| l.span),
            ))
        });
        out
    }
}

/// The closest candidate to a misspelt name, if one is close enough to suggest.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(f64, &str)> = None;
    for candidate in candidates {
        let score = strsim::jaro_winkler(name, candidate);
        let close = score > 0.8 || strsim::damerau_levenshtein(name, candidate) <= name.len() / 3;
        if close && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, candidate));
        }
    }
    best.map(|(_, c)| c)
}

/// A directory for messages: `.` rather than an empty string for the current directory.
pub fn display_dir(dir: &std::path::Path) -> String {
    if dir.as_os_str().is_empty() {
        ".".into()
    } else {
        dir.display().to_string()
    }
}
