//! What the tests that run the `kiln` binary share.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// `kiln run FILE --runs RUNS EXTRA...`, its output captured.
pub fn kiln_run(file: &Path, runs: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(KILN);
    run_args(&mut cmd, file, runs, extra);
    cmd
}

/// `cmd` given the arguments of `kiln run FILE --runs RUNS EXTRA...` (after whatever starts
/// `kiln`, such as `mpirun`), its output captured.
pub fn run_args(cmd: &mut Command, file: &Path, runs: &Path, extra: &[&str]) {
    cmd.arg("run")
        .arg(file)
        .arg("--runs")
        .arg(runs)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
}

/// A fresh directory of its own under the system's temporary directory, for the test `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The run exited 0; otherwise the test fails with what it printed.
pub fn succeeded(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
