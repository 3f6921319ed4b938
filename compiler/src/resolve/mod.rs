//! Resolution: loading modules and imports, and evaluating definitions to values
//! (inheritance, overrides, arithmetic, units, builtins).

mod builtins;
mod eval;
mod loader;
pub mod units;
mod value;

pub use eval::Evaluator;
pub use value::{Field, Record, RecordKind, Spanned, Value};

use crate::diagnostics::{Diagnostics, FileId, SourceMap, Span};
use crate::syntax::{Definition, SourceFile};
use indexmap::IndexMap;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId(pub usize);

/// One loaded `.kiln` file.
pub struct Module {
    pub name: String,
    pub file: FileId,
    /// Directory that relative paths in this module are resolved against; `None` for stdlib.
    pub dir: Option<PathBuf>,
    pub ast: SourceFile,
    pub defs: IndexMap<String, Definition>,
    /// Imported modules in order, with the span of the import (`None` for the prelude).
    pub imports: Vec<(ModuleId, Option<Span>)>,
}

/// Everything loaded for one compilation, and the errors found while loading.
///
/// Sources and diagnostics sit in `RefCell`s because evaluation, which only reads modules,
/// still adds files (`hf("dir")` reads a config.json that later messages point into) and errors.
#[derive(Default)]
pub struct Program {
    pub sources: RefCell<SourceMap>,
    pub modules: Vec<Module>,
    pub diagnostics: RefCell<Diagnostics>,
    module_keys: IndexMap<loader::ModuleKey, ModuleId>,
    /// The `hf(...)` / `peft(...)` call that read each imported JSON file.
    read_by: RefCell<HashMap<FileId, Span>>,
}

impl Program {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads a file from disk with its imports; `None` when it could not be read or parsed.
    pub fn load_file(&mut self, path: &Path) -> Option<ModuleId> {
        loader::Loader::new(self).load_path(path)
    }

    /// Loads source text under a display name; relative paths resolve against `dir`.
    pub fn load_source(&mut self, name: &str, text: &str, dir: Option<&Path>) -> Option<ModuleId> {
        loader::Loader::new(self).load_text(name, text.to_string(), dir.map(Path::to_path_buf))
    }

    pub fn module(&self, id: ModuleId) -> &Module {
        &self.modules[id.0]
    }

    /// The implicitly imported prelude, once loaded.
    pub fn prelude(&self) -> Option<ModuleId> {
        let name = crate::stdlib::display_name(crate::stdlib::PRELUDE);
        self.modules
            .iter()
            .position(|m| m.name == name)
            .map(ModuleId)
    }

    pub fn report(&self, mut diagnostic: crate::diagnostics::Diagnostic) {
        // An error inside a file that `hf(...)` or `peft(...)` read also points at the call.
        let file = diagnostic.primary.as_ref().map(|l| l.span.file);
        let call = file.and_then(|f| self.read_by.borrow().get(&f).copied());
        if let Some(call) = call.filter(|c| diagnostic.secondary.iter().all(|l| l.span != *c)) {
            diagnostic = diagnostic.also(call, "read because of this");
        }
        self.diagnostics.borrow_mut().push(diagnostic);
    }

    /// Registers a JSON file that a builtin call read, so that errors in it name the call.
    pub(crate) fn add_read_file(&self, name: String, text: String, call: Span) -> FileId {
        let file = self.sources.borrow_mut().add(name, text);
        self.read_by.borrow_mut().insert(file, call);
        file
    }

    pub fn has_errors(&self) -> bool {
        !self.diagnostics.borrow().is_empty()
    }
}
