//! The front end as one call: load a file with its imports, evaluate and check it.

use crate::diagnostics::Diagnostic;
use crate::resolve::{Evaluator, Program};
use crate::spec::{check_module, CheckedModule};
use std::path::Path;

/// The result of checking one file: the program (sources, for rendering), the checked
/// definitions, and every error found.
pub struct Checked {
    pub program: Program,
    pub module: CheckedModule,
}

impl Checked {
    pub fn errors(&self) -> Vec<Diagnostic> {
        self.program
            .diagnostics
            .borrow()
            .sorted()
            .into_iter()
            .cloned()
            .collect()
    }

    pub fn is_ok(&self) -> bool {
        !self.program.has_errors()
    }

    /// All errors rendered without colour, as a terminal that is not a tty shows them.
    pub fn render_errors(&self) -> String {
        let errors = self.errors();
        let refs: Vec<&Diagnostic> = errors.iter().collect();
        crate::diagnostics::render_plain(&self.program.sources.borrow(), &refs)
    }
}

/// Checks a file on disk.
pub fn check_file(path: &Path) -> Checked {
    let mut program = Program::new();
    let module = program.load_file(path);
    finish(program, module)
}

/// Checks source text; relative imports and data paths resolve against `dir`.
pub fn check_source(name: &str, text: &str, dir: Option<&Path>) -> Checked {
    let mut program = Program::new();
    let module = program.load_source(name, text, dir);
    finish(program, module)
}

fn finish(program: Program, module: Option<crate::resolve::ModuleId>) -> Checked {
    let checked = match module {
        Some(id) => {
            let ev = Evaluator::new(&program);
            let checked = check_module(&ev, id);
            // Imported user files are checked too (their errors matter even for definitions
            // this file does not use); the stdlib is checked by Kiln's own tests.
            for other in (0..program.modules.len()).map(crate::resolve::ModuleId) {
                if other != id && program.module(other).dir.is_some() {
                    check_module(&ev, other);
                }
            }
            checked
        }
        None => CheckedModule::default(),
    };
    Checked {
        program,
        module: checked,
    }
}
