//! Kiln's compiler: the `.kiln` language front end (syntax, resolution, typed spec), and —
//! in later stages — lowering to an operator graph and planning across a device mesh.

pub mod diagnostics;
pub mod graph;
pub mod plan;
pub mod resolve;
pub mod spec;
pub mod stdlib;
pub mod syntax;

mod frontend;
pub mod overrides;

pub use frontend::{check_file, check_source, Checked as CheckedFile};
