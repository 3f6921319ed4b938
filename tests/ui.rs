//! The UI corpus: every `tests/ui/*.kiln` is a bad input whose full diagnostic output is
//! snapshotted. Paths are relative to the package root so snapshots are machine-independent.

use std::path::Path;

#[test]
fn ui_corpus() {
    insta::glob!("ui/*.kiln", |path| {
        let relative = path
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(path);
        let checked = kiln::compiler::check_file(relative);
        assert!(
            !checked.is_ok(),
            "{} is in the UI corpus but checks clean",
            relative.display()
        );
        insta::assert_snapshot!(checked.render_errors());
    });
}

#[test]
fn ui_corpus_is_large_enough() {
    let count = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui"))
        .expect("tests/ui exists")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "kiln"))
        })
        .count();
    assert!(
        count >= 40,
        "the UI corpus has {count} cases; it should cover at least 40"
    );
}
