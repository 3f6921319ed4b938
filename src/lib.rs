//! Kiln: a compiler and runtime for language-model training experiments.
//!
//! This facade re-exports the compiler and runtime crates so that users depend on one crate:
//! `kiln::compiler::check_file(path)` checks an experiment file and returns its typed spec.

pub use kiln_compiler as compiler;
pub use kiln_runtime as runtime;

pub mod cli;
