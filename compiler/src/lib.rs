//! Kiln's compiler: the `.kiln` language front end (syntax, resolution, typed spec), lowering
//! to an operator graph, planning across a device mesh, and the [`Program`] that holds all of
//! it for the back ends.

pub mod diagnostics;
pub mod graph;
pub mod hf;
pub mod plan;
mod program;
pub mod resolve;
pub mod spec;
pub mod stdlib;
pub mod syntax;

mod frontend;
pub mod overrides;

pub use frontend::{check_file, check_source, Checked as CheckedFile};
pub use program::{check as check_program, compile, compile_with, Program};
