//! Data: what a run reads and what it becomes for the model. By concern:
//!
//! - `tokenizer`: Hugging Face tokenizers (`tokenizer.json`, through the `tokenizers` crate),
//!   and training a byte-level BPE or WordPiece tokenizer from text;
//! - `records`: JSONL and text files, one record per line, with limits and errors that name the
//!   file and line;
//! - `objective`: the objective's data behind one trait, [`TaskData`] (records into
//!   [`Example`]s, what a step is made of, rows per record, whether the loss is a token
//!   cross-entropy), implemented by `causal` (causal LM and SFT, reward pairs, PPO prompts),
//!   `mlm` (MLM, NSP, MLM+NSP) and `pet` (PET's cloze examples);
//! - `batch`: examples padded into the executor's batches (labels −100 on padding, attention
//!   masks), with the input names the objective's loss reads.

mod batch;
mod causal;
mod mlm;
mod objective;
mod pet;
mod records;
mod tokenizer;

pub use batch::Inputs;
pub use objective::{task_data, Example, Feed, Source, TaskData};
pub use records::{read_jsonl, MAX_RECORD_BYTES};
pub use tokenizer::{
    load_tokenizer, train_tokenizer, TokenizerKind, BERT_SPECIAL, END_OF_TEXT, MAX_TOKENIZER_BYTES,
    MAX_VOCAB,
};

/// A data problem, with the file (and line) it comes from.
#[derive(Debug)]
pub struct DataError(pub String);

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}
