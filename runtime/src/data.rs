//! Data: Hugging Face tokenizers (`tokenizer.json`, through the `tokenizers` crate), training a
//! byte-level BPE tokenizer from text, JSONL datasets with errors that name file and line, and
//! causal-LM batches (padding, truncation, labels −100 on padding, attention masks).

use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// A data problem, with the file (and line) it comes from.
#[derive(Debug)]
pub struct DataError(pub String);

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

/// The end-of-text token a trained tokenizer reserves (GPT-2's name for it).
pub const END_OF_TEXT: &str = "<|endoftext|>";

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, DataError> {
    Tokenizer::from_file(path).map_err(|e| {
        DataError(format!(
            "{}: not a usable tokenizer.json: {e}",
            path.display()
        ))
    })
}

/// Trains a byte-level BPE tokenizer (GPT-2 style) of `vocab` tokens on text files and writes
/// it as `tokenizer.json`.
pub fn train_tokenizer(files: &[PathBuf], vocab: usize, out: &Path) -> Result<usize, DataError> {
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(END_OF_TEXT.to_string(), true)])
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default()));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // JSONL inputs are trained on their text, not their JSON syntax.
    let dir = std::env::temp_dir().join(format!("kiln-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| DataError(format!("{}: {e}", dir.display())))?;
    let mut plain = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let text = if f.extension().is_some_and(|e| e == "jsonl") {
            read_jsonl(f)?
                .into_iter()
                .flat_map(|(_, r)| string_values(&r))
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            std::fs::read_to_string(f).map_err(|e| DataError(format!("{}: {e}", f.display())))?
        };
        let p = dir.join(format!("{i}.txt"));
        std::fs::write(&p, text).map_err(|e| DataError(format!("{}: {e}", p.display())))?;
        plain.push(p.display().to_string());
    }
    let trained = tokenizer
        .train_from_files(&mut trainer, plain)
        .map_err(|e| DataError(format!("training the tokenizer failed: {e}")));
    std::fs::remove_dir_all(&dir).ok();
    let trained = trained?;
    let size = trained.get_vocab_size(true);
    let tmp = out.with_extension("json.tmp");
    trained
        .save(&tmp, true)
        .map_err(|e| DataError(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, out).map_err(|e| DataError(format!("{}: {e}", out.display())))?;
    Ok(size)
}

fn string_values(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Object(m) => m.values().flat_map(string_values).collect(),
        Value::Array(a) => a.iter().flat_map(string_values).collect(),
        _ => Vec::new(),
    }
}

/// Records of a JSONL file with their line numbers; a malformed line is an error naming it.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError(format!("{}: cannot read: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Value = serde_json::from_str(line).map_err(|e| {
            DataError(format!(
                "{}:{}: not a JSON record: {e}",
                path.display(),
                i + 1
            ))
        })?;
        out.push((i + 1, record));
    }
    if out.is_empty() {
        return Err(DataError(format!("{}: no records", path.display())));
    }
    Ok(out)
}

/// Token ids of one text field of each record (`.txt` files: one record per non-empty line).
pub fn tokenize_field(
    path: &Path,
    field: &str,
    tokenizer: &Tokenizer,
) -> Result<Vec<Vec<i64>>, DataError> {
    let texts: Vec<String> = if path.extension().is_some_and(|e| e == "jsonl") {
        read_jsonl(path)?
            .into_iter()
            .map(|(line, r)| match r.get(field) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(DataError(format!(
                    "{}:{line}: the record has no text field `{field}`",
                    path.display()
                ))),
            })
            .collect::<Result<_, _>>()?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| DataError(format!("{}: {e}", path.display())))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect()
    };
    let eot = tokenizer.token_to_id(END_OF_TEXT).map(i64::from);
    texts
        .iter()
        .map(|t| {
            let enc = tokenizer
                .encode(t.as_str(), false)
                .map_err(|e| DataError(format!("{}: cannot tokenize: {e}", path.display())))?;
            let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
            ids.extend(eot);
            Ok(ids)
        })
        .collect()
}

/// Rows of a causal-LM batch.
pub struct CausalBatch {
    pub ids: Vec<Vec<i64>>,
    /// The ids again (the loss shifts them), −100 on padding.
    pub labels: Vec<Vec<i64>>,
    pub mask: Vec<Vec<i64>>,
}

/// A causal-LM batch: `rows` sequences padded or truncated to `seq_len`.
pub fn causal_batch(sequences: &[&Vec<i64>], seq_len: usize, pad: i64) -> CausalBatch {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    let mut mask = Vec::new();
    for seq in sequences {
        let real = seq.len().min(seq_len);
        let mut row: Vec<i64> = seq[..real].to_vec();
        let mut lab = row.clone();
        let mut m = vec![1; real];
        row.resize(seq_len, pad);
        lab.resize(seq_len, -100);
        m.resize(seq_len, 0);
        ids.push(row);
        labels.push(lab);
        mask.push(m);
    }
    CausalBatch { ids, labels, mask }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_pad_with_ignored_labels_and_truncate() {
        let (a, b) = (vec![5, 6, 7], vec![1, 2, 3, 4, 5, 6]);
        let CausalBatch { ids, labels, mask } = causal_batch(&[&a, &b], 4, 0);
        assert_eq!(ids, vec![vec![5, 6, 7, 0], vec![1, 2, 3, 4]]);
        assert_eq!(labels, vec![vec![5, 6, 7, -100], vec![1, 2, 3, 4]]);
        assert_eq!(mask, vec![vec![1, 1, 1, 0], vec![1, 1, 1, 1]]);
    }

    #[test]
    fn malformed_jsonl_names_file_and_line() {
        let dir = std::env::temp_dir().join(format!("kiln-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.jsonl");
        std::fs::write(&f, "{\"text\": \"ok\"}\n\n{\"text\": oops}\n").unwrap();
        let e = read_jsonl(&f).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(e.contains("bad.jsonl:3: not a JSON record"), "{e}");
    }
}
