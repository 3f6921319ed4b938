//! The CUDA C sources of Kiln's kernels, compiled into the binary, and the kernels each
//! defines (by their `extern "C"` names, which the driver looks up).

use super::launch::{
    ATTENTION_KEYS, ATTENTION_MAX_HEAD_DIM, ATTENTION_QUERIES, NORM_ROWS_PER_BLOCK,
};

/// What every source file starts with: reductions, number formats, random bits.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// The sizes the kernels and their launches share, defined once (in `launch`) for both.
pub fn shared_sizes() -> String {
    format!(
        "#define KILN_ATTN_KEYS {ATTENTION_KEYS}\n\
         #define KILN_ATTN_QUERIES {ATTENTION_QUERIES}\n\
         #define KILN_ATTN_MAX_DIM {ATTENTION_MAX_HEAD_DIM}\n\
         #define KILN_NORM_ROWS_PER_BLOCK {NORM_ROWS_PER_BLOCK}\n"
    )
}

/// One file of kernels.
#[derive(Debug)]
pub struct Source {
    pub file: &'static str,
    pub code: &'static str,
    pub kernels: &'static [&'static str],
}

pub const SOURCES: &[Source] = &[
    Source {
        file: "elementwise.cu",
        code: include_str!("kernels/elementwise.cu"),
        kernels: &[
            "round_to_format",
            "activation_forward",
            "activation_backward",
        ],
    },
    Source {
        file: "norm.cu",
        code: include_str!("kernels/norm.cu"),
        kernels: &["norm_forward", "norm_backward", "column_sums"],
    },
    Source {
        file: "cross_entropy.cu",
        code: include_str!("kernels/cross_entropy.cu"),
        kernels: &["softmax_statistics", "softmax_target_backward"],
    },
    Source {
        file: "attention.cu",
        code: include_str!("kernels/attention.cu"),
        kernels: &[
            "attention_forward",
            "attention_backward_query",
            "attention_backward_key_value",
        ],
    },
    Source {
        file: "tensor.cu",
        code: include_str!("kernels/tensor.cu"),
        kernels: &[
            "gather_rows",
            "scatter_rows",
            "add_columns",
            "add_scaled",
            "add_product",
            "rotary",
            "column_partials",
            "dropout_factors",
        ],
    },
    Source {
        file: "adamw.cu",
        code: include_str!("kernels/adamw.cu"),
        kernels: &["adamw_step"],
    },
];

impl Source {
    /// The program a compiler reads: the shared sizes, the common header, then the file,
    /// whose lines a diagnostic numbers as the file's own.
    pub fn program(&self) -> String {
        format!("{}{COMMON}\n{}", shared_sizes(), self.numbered())
    }

    /// The file's code under a `#line` directive naming it.
    pub fn numbered(&self) -> String {
        format!("#line 1 \"{}\"\n{}", self.file, self.code)
    }
}
