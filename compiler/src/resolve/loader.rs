//! Loading a file and everything it imports: the module graph, with cycle detection.

use super::{Module, ModuleId, Program};
use crate::diagnostics::{did_you_mean, Code, Diagnostic, Span};
use crate::stdlib;
use crate::syntax::{self, ImportTarget, Item};
use indexmap::IndexMap;
use std::path::{Path, PathBuf};

/// Where a module's text comes from; also its identity for de-duplication.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum ModuleKey {
    Std(String),
    File(PathBuf),
}

pub(super) struct Loader<'p> {
    program: &'p mut Program,
    /// Modules being loaded, outermost first: an import of one of them is a cycle.
    stack: Vec<(ModuleKey, String)>,
}

impl<'p> Loader<'p> {
    pub fn new(program: &'p mut Program) -> Self {
        Loader {
            program,
            stack: Vec::new(),
        }
    }

    /// Loads a user file given on the command line (its name is kept as given, so messages
    /// and plans never contain absolute paths the user did not write).
    pub fn load_path(&mut self, path: &Path) -> Option<ModuleId> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                self.program.report(
                    Diagnostic::new(Code::Io, format!("cannot read `{}`: {e}", path.display()))
                        .help("check the path; `kiln check` takes .kiln files"),
                );
                return None;
            }
        };
        self.load_text(
            &path.display().to_string(),
            text,
            path.parent().map(Path::to_path_buf),
        )
    }

    /// Loads source text under a display name; `dir` resolves its relative imports and paths.
    pub fn load_text(
        &mut self,
        name: &str,
        text: String,
        dir: Option<PathBuf>,
    ) -> Option<ModuleId> {
        let key = ModuleKey::File(canonical(
            &dir.clone().unwrap_or_default().join(file_name(name)),
        ));
        self.load(key, name.to_string(), text, dir)
    }

    fn load(
        &mut self,
        key: ModuleKey,
        name: String,
        text: String,
        dir: Option<PathBuf>,
    ) -> Option<ModuleId> {
        if let Some(&id) = self.program.module_keys.get(&key) {
            return Some(id);
        }
        // Some editors start UTF-8 files with a byte order mark; it is not part of the text
        // (and kept out of it, so that columns in messages count from the first character).
        let text = match text.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_string(),
            None => text,
        };
        let file = self
            .program
            .sources
            .get_mut()
            .add(name.clone(), text.clone());
        let ast = match syntax::parse(file, &text) {
            Ok(ast) => ast,
            Err(d) => {
                self.program.report(*d);
                return None;
            }
        };
        let id = ModuleId(self.program.modules.len());
        self.program.modules.push(Module {
            name: name.clone(),
            file,
            dir: dir.clone(),
            ast,
            defs: IndexMap::new(),
            imports: Vec::new(),
        });
        self.program.module_keys.insert(key.clone(), id);
        self.stack.push((key.clone(), name));

        let is_prelude = key == ModuleKey::Std(stdlib::PRELUDE.into());
        if !is_prelude {
            if let Some(prelude) = self.load_std(stdlib::PRELUDE) {
                self.program.modules[id.0].imports.push((prelude, None));
            }
        }
        let items = self.program.modules[id.0].ast.items.clone();
        for item in &items {
            match item {
                Item::Import(import) => {
                    if let Some(target) = self.import(&import.target, import.span, dir.as_deref()) {
                        let imports = &mut self.program.modules[id.0].imports;
                        match imports.iter().find(|(m, _)| *m == target) {
                            Some((_, Some(_))) => self.program.report(
                                Diagnostic::new(Code::Duplicate, "module imported twice")
                                    .at(import.span, "already imported above"),
                            ),
                            // `import std.prelude` says what is implicit anyway.
                            Some((_, None)) => {}
                            None => imports.push((target, Some(import.span))),
                        }
                    }
                }
                Item::Definition(def) => {
                    let defs = &mut self.program.modules[id.0].defs;
                    if let Some(previous) = defs.get(&def.name.name) {
                        let previous = previous.name.span;
                        self.program.report(
                            Diagnostic::new(
                                Code::Duplicate,
                                format!("`{}` is defined twice", def.name.name),
                            )
                            .at(def.name.span, "defined again here")
                            .also(previous, "first defined here"),
                        );
                    } else {
                        defs.insert(def.name.name.clone(), def.clone());
                    }
                }
            }
        }
        self.stack.pop();
        Some(id)
    }

    fn load_std(&mut self, module: &str) -> Option<ModuleId> {
        let text = stdlib::source(module)?;
        self.load(
            ModuleKey::Std(module.to_string()),
            stdlib::display_name(module),
            text.to_string(),
            None,
        )
    }

    fn import(
        &mut self,
        target: &ImportTarget,
        span: Span,
        dir: Option<&Path>,
    ) -> Option<ModuleId> {
        let (key, name, text, new_dir) = match target {
            ImportTarget::Module(path) => {
                let dotted: Vec<&str> = path.iter().map(|i| i.name.as_str()).collect();
                let dotted = dotted.join(".");
                if stdlib::source(&dotted).is_none() {
                    let mut d = Diagnostic::new(Code::Import, format!("no module `{dotted}`"))
                        .at(span, "unknown module");
                    d = match did_you_mean(&dotted, stdlib::module_names()) {
                        Some(s) => d.help(format!("did you mean `{s}`?")),
                        None if dotted.starts_with("std.") => d.help(format!(
                            "the standard library has: {}",
                            stdlib::module_names().collect::<Vec<_>>().join(", ")
                        )),
                        None => {
                            d.help("files are imported by path in quotes: import \"common.kiln\"")
                        }
                    };
                    self.program.report(d);
                    return None;
                }
                let key = ModuleKey::Std(dotted.clone());
                (
                    key,
                    stdlib::display_name(&dotted),
                    stdlib::source(&dotted).map(str::to_string),
                    None,
                )
            }
            ImportTarget::File(relative) => {
                let Some(dir) = dir else {
                    self.program.report(
                        Diagnostic::new(
                            Code::Import,
                            "standard-library modules cannot import files",
                        )
                        .at(span, "file import in the stdlib"),
                    );
                    return None;
                };
                let path = dir.join(relative);
                let key = ModuleKey::File(canonical(&path));
                let text = std::fs::read_to_string(&path);
                let name = path.display().to_string();
                match text {
                    Ok(text) => (key, name, Some(text), path.parent().map(Path::to_path_buf)),
                    Err(e) if !self.program.module_keys.contains_key(&key) => {
                        self.program.report(
                            Diagnostic::new(
                                Code::Import,
                                format!("cannot import `{relative}`: {e}"),
                            )
                            .at(span, "this file")
                            .help(format!(
                                "paths are relative to the importing file's directory (`{}`)",
                                crate::diagnostics::display_dir(dir)
                            )),
                        );
                        return None;
                    }
                    Err(_) => (key, name, None, path.parent().map(Path::to_path_buf)),
                }
            }
        };
        if let Some(pos) = self.stack.iter().position(|(k, _)| *k == key) {
            let mut chain: Vec<&str> = self.stack[pos..].iter().map(|(_, n)| n.as_str()).collect();
            chain.push(&self.stack[pos].1);
            self.program.report(
                Diagnostic::new(Code::ImportCycle, "import cycle")
                    .at(span, "this import closes the cycle")
                    .note(chain.join(" -> "))
                    .help("move the definitions both files need into a third file that imports neither"),
            );
            return None;
        }
        self.load(key, name, text.unwrap_or_default(), new_dir)
    }
}

fn file_name(name: &str) -> PathBuf {
    Path::new(name)
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Identity of a file for import de-duplication; falls back to the path as given when the
/// file does not exist (the read error is reported elsewhere).
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
