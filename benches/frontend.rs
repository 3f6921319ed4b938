//! Parse + resolve + check of each example (the whole front end, file I/O included).
//! Target: under 2 ms per example file.

use criterion::{criterion_group, criterion_main, Criterion};
use std::path::{Path, PathBuf};

fn examples() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out: Vec<PathBuf> = std::fs::read_dir(root.join("examples"))
        .expect("examples/ exists")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "kiln"))
        .collect();
    out.sort();
    out
}

fn frontend(c: &mut Criterion) {
    let mut group = c.benchmark_group("check");
    for path in examples() {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        group.bench_function(&name, |b| {
            b.iter(|| {
                let checked = kiln::compiler::check_file(&path);
                assert!(checked.is_ok());
                checked
            })
        });
    }
    group.finish();
}

criterion_group!(benches, frontend);
criterion_main!(benches);
