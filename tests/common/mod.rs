//! What the tests that run the `kiln` binary share.

use std::path::PathBuf;
use std::process::Output;

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

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
