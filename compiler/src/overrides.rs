//! Command-line overrides (`kiln plan --cluster EXPR --set key=value`), written in the language
//! itself: a small generated file imports the experiment's file and inherits from the
//! experiment with the overrides as blocks (`train { batch = 512 }` merges into `train`). The
//! usual checks then apply to the overridden experiment, with errors pointing at the override.

use crate::diagnostics::{Code, Diagnostic};
use crate::frontend::{check_source, Checked};
use std::path::Path;

/// Suffix of the generated experiment's name; removed again from the checked spec.
const SUFFIX: &str = "__with_overrides";

/// Checks `experiment` of `file` with a new mesh and `key=value` overrides.
pub fn check_with_overrides(
    file: &Path,
    experiment: &str,
    cluster: Option<&str>,
    sets: &[String],
) -> Result<Checked, String> {
    let mut body = String::new();
    if let Some(expr) = cluster {
        body.push_str(&format!("  parallel {{ mesh = {expr} }}\n"));
    }
    for set in sets {
        let Some((key, value)) = set.split_once('=') else {
            return Err(usage(set, "expected KEY=VALUE, such as train.batch=512"));
        };
        let path: Vec<&str> = key.trim().split('.').collect();
        if path.iter().any(|p| {
            p.is_empty()
                || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || p.starts_with(|c: char| c.is_ascii_digit())
        }) {
            return Err(usage(
                set,
                "the key is a dotted path of field names, such as parallel.zero",
            ));
        }
        let (last, parents) = path.split_last().expect("split of a non-empty string");
        let mut line = format!("{last} = {}", value.trim());
        for parent in parents.iter().rev() {
            line = format!("{parent} {{ {line} }}");
        }
        body.push_str(&format!("  {line}\n"));
    }
    let file_name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let source = format!("// kiln plan overrides\nimport \"{file_name}\"\nimport std.clusters\n\nexperiment {experiment}{SUFFIX} = {experiment} {{\n{body}}}\n");
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut checked = check_source("<command line>", &source, Some(dir));
    for e in &mut checked.module.experiments {
        if let Some(name) = e.value.name.strip_suffix(SUFFIX) {
            e.value.name = name.to_string();
        }
    }
    // Only the overridden experiment is meant; the imported file's others are not.
    checked
        .module
        .experiments
        .retain(|e| e.value.name == experiment);
    Ok(checked)
}

fn usage(set: &str, why: &str) -> String {
    let d = Diagnostic::new(Code::Override, format!("cannot use `--set {set}`: {why}"));
    format!("error[{}]: {}", d.code.as_str(), d.message)
}
