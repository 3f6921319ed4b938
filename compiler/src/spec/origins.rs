//! Where each value of a spec came from: a source span, or a default.

use crate::diagnostics::{SourceMap, Span};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug)]
pub enum Origin {
    Source(Span),
    Default,
}

/// Origins keyed by the value's dotted path in the spec (`model.hidden`, `adapters.0.rank`).
#[derive(Clone, Debug, Default)]
pub struct Origins {
    entries: BTreeMap<String, Origin>,
}

impl Origins {
    pub fn source(&mut self, path: &str, span: Span) {
        self.entries.insert(path.to_string(), Origin::Source(span));
    }

    pub fn defaulted(&mut self, path: &str) {
        self.entries
            .entry(path.to_string())
            .or_insert(Origin::Default);
    }

    /// The origin of a path, or of its nearest recorded ancestor (values inside a record
    /// that came whole from somewhere, such as `cpu(4)` or `hf("dir")`).
    pub fn get(&self, path: &str) -> Option<Origin> {
        let mut p = path;
        loop {
            if let Some(o) = self.entries.get(p) {
                return Some(*o);
            }
            p = &p[..p.rfind('.')?];
        }
    }

    /// The origin recorded for exactly this path (no ancestor fallback).
    pub fn exact(&self, path: &str) -> Option<Origin> {
        self.entries.get(path).copied()
    }

    /// The span a value was written at, for diagnostics of later stages.
    pub fn span(&self, path: &str) -> Option<Span> {
        match self.get(path)? {
            Origin::Source(s) => Some(s),
            Origin::Default => None,
        }
    }

    pub fn rename(&mut self, from: &str, to: &str) {
        if let Some(o) = self.entries.remove(from) {
            self.entries.insert(to.to_string(), o);
        }
    }

    /// Adds `other`'s entries under `prefix.` (a pipeline's stages under `stages.N`).
    pub fn extend_under(&mut self, prefix: &str, other: &Origins) {
        for (k, v) in &other.entries {
            self.entries.insert(format!("{prefix}.{k}"), *v);
        }
    }

    /// `file:line`, or `default`.
    pub fn describe(&self, path: &str, sources: &SourceMap) -> String {
        match self.get(path) {
            Some(Origin::Source(span)) => {
                let (line, _) = sources.line_col(span);
                format!("{}:{line}", sources.name(span.file))
            }
            Some(Origin::Default) | None => "default".into(),
        }
    }
}
