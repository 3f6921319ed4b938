//! The UI corpus: bad inputs and their full diagnostic output, grouped by the compiler stage
//! that reports them (rustc's `tests/ui` layout).
//!
//! Every `tests/ui/<stage>/<case>.kiln` is a case and `<case>.stderr` beside it is its
//! expected output, exactly as the compiler renders it without colour. Folders inside a stage
//! hold the files that its cases import or read; they are not cases. Paths are relative to the
//! package root, so the expected output is machine-independent.
//!
//! `KILN_BLESS=1 cargo test --test ui` rewrites the `.stderr` files from the current output.

use kiln::compiler::diagnostics::{render_plain, Diagnostic};
use std::path::{Path, PathBuf};

/// The stages, in compiler order. Each case belongs to the stage whose module reports its
/// diagnostics: `syntax` (parser), `resolve` (imports, names, evaluation, units, builtins
/// such as `hf(...)`), `spec` (typed checking of each kind), `plan` (the planner, run on a
/// file that checks clean). Lowering to the graph reports only internal errors (K0024, a bug
/// in Kiln), so it has no folder.
const STAGES: &[&str] = &["syntax", "resolve", "spec", "plan"];

const PLAN: &str = "plan";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn corpus() -> PathBuf {
    root().join("tests/ui")
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    out.sort();
    out
}

fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension().is_some_and(|x| x == ext)
}

/// The cases of one stage: the `.kiln` files directly inside its folder.
fn cases(stage: &str) -> Vec<PathBuf> {
    let dir = corpus().join(stage);
    if !dir.is_dir() {
        return Vec::new();
    }
    sorted_entries(&dir)
        .into_iter()
        .filter(|p| p.is_file() && has_extension(p, "kiln"))
        .collect()
}

/// Every `.stderr` file under `dir`, helper folders included.
fn stderr_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for path in sorted_entries(dir) {
        if path.is_dir() {
            stderr_files(&path, out);
        } else if has_extension(&path, "stderr") {
            out.push(path);
        }
    }
}

fn relative(path: &Path) -> &Path {
    path.strip_prefix(root()).unwrap_or(path)
}

/// What the compiler prints for a case, or why the case is not a case of its stage.
fn render(stage: &str, case: &Path) -> Result<String, String> {
    let checked = kiln::compiler::check_file(relative(case));
    if stage != PLAN {
        return if checked.is_ok() {
            Err("checks clean, but every case must be reported by the compiler".into())
        } else {
            Ok(checked.render_errors())
        };
    }
    if !checked.is_ok() {
        return Err(format!(
            "is reported before planning, so it belongs in an earlier stage's folder:\n{}",
            checked.render_errors()
        ));
    }
    // Compiled as `kiln run` compiles it: every pipeline stage on one submesh.
    let mut errors: Vec<Diagnostic> = Vec::new();
    for experiment in checked.module.all_experiments() {
        if let Err(d) = kiln::compiler::compile(experiment) {
            errors.extend(d.items);
        }
    }
    if errors.is_empty() {
        return Err(
            "checks and plans clean, but every case must be reported by the compiler".into(),
        );
    }
    let refs: Vec<&Diagnostic> = errors.iter().collect();
    let rendered = render_plain(&checked.program.sources.borrow(), &refs);
    Ok(rendered)
}

/// A line diff (longest common subsequence): `-` expected only, `+` actual only.
fn diff(expected: &str, actual: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out, mut changed) = (0, 0, String::new(), false);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out += &format!("   {}\n", a[i]);
            (i, j) = (i + 1, j + 1);
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out += &format!("  -{}\n", a[i]);
            (i, changed) = (i + 1, true);
        } else {
            out += &format!("  +{}\n", b[j]);
            (j, changed) = (j + 1, true);
        }
    }
    if !changed {
        out += "  (every line is the same: the two differ in line endings or the final newline)\n";
    }
    out
}

#[test]
fn ui_corpus() {
    let bless = std::env::var_os("KILN_BLESS").is_some_and(|v| v != "0" && !v.is_empty());
    let mut failures: Vec<String> = Vec::new();
    let mut blessed = 0;
    for stage in STAGES {
        for case in cases(stage) {
            let name = relative(&case).display().to_string();
            let actual = match render(stage, &case) {
                Ok(text) => text,
                Err(why) => {
                    failures.push(format!("{name} {why}"));
                    continue;
                }
            };
            let stderr = case.with_extension("stderr");
            let expected = std::fs::read_to_string(&stderr).ok();
            if expected.as_deref() == Some(actual.as_str()) {
                continue;
            }
            if bless {
                std::fs::write(&stderr, &actual)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", stderr.display()));
                blessed += 1;
                continue;
            }
            let stderr_name = relative(&stderr).display();
            failures.push(match expected {
                None => format!(
                    "{name} has no expected output: {stderr_name} is missing \
                     (KILN_BLESS=1 cargo test --test ui writes it). The output is:\n{actual}"
                ),
                Some(expected) => format!(
                    "{name}: the output differs from {stderr_name} (- expected, + actual; \
                     KILN_BLESS=1 cargo test --test ui accepts it):\n{}",
                    diff(&expected, &actual)
                ),
            });
        }
    }
    let mut all_stderr = Vec::new();
    stderr_files(&corpus(), &mut all_stderr);
    for stderr in all_stderr {
        let is_case = stderr
            .parent()
            .and_then(|p| p.strip_prefix(corpus()).ok())
            .is_some_and(|stage| STAGES.iter().any(|s| Path::new(s) == stage));
        if !is_case || !stderr.with_extension("kiln").is_file() {
            failures.push(format!(
                "{} has no case beside it (a `.kiln` of the same name in a stage folder); \
                 delete it or restore its case",
                relative(&stderr).display()
            ));
        }
    }
    if blessed > 0 {
        eprintln!("blessed {blessed} expected output(s)");
    }
    assert!(
        failures.is_empty(),
        "{} UI corpus failure(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn ui_corpus_is_large_enough() {
    let count: usize = STAGES.iter().map(|s| cases(s).len()).sum();
    assert!(
        count >= 40,
        "the UI corpus has {count} cases; it should cover at least 40"
    );
}

/// The corpus holds stage folders only, and each has cases: a case in the wrong place or a
/// stage left empty by a move is an error, not a silently skipped folder.
#[test]
fn every_stage_folder_has_cases() {
    for path in sorted_entries(&corpus()) {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        assert!(
            path.is_dir() && STAGES.contains(&name.as_ref()),
            "{} is not a stage folder; tests/ui holds only {}",
            relative(&path).display(),
            STAGES.join(", ")
        );
    }
    for stage in STAGES {
        assert!(
            !cases(stage).is_empty(),
            "tests/ui/{stage} has no cases; every stage folder needs at least one"
        );
    }
}
