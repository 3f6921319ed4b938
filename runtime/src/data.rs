//! Data: Hugging Face tokenizers (`tokenizer.json`, through the `tokenizers` crate), training a
//! byte-level BPE or WordPiece tokenizer from text, JSONL datasets with errors that name file and line, and
//! causal-LM batches (padding, truncation, labels −100 on padding, attention masks).

use kiln_compiler::spec::Objective;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Encoding, Tokenizer};

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

/// The special tokens of a BERT-style tokenizer, in id order (0 pad, 1 unknown, 2 [CLS], 3 [SEP],
/// 4 [MASK], as in the reference fixtures).
pub const BERT_SPECIAL: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Which kind of tokenizer to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Byte-level BPE (GPT-2, LLaMA-style causal models).
    Bpe,
    /// Lower-cased WordPiece with BERT's special tokens (masked-LM models).
    WordPiece,
}

/// Trains a tokenizer of `vocab` tokens on text or JSONL files, adds `whole_words` as tokens of
/// their own, and writes it as `tokenizer.json`.
pub fn train_tokenizer(
    files: &[PathBuf],
    vocab: usize,
    out: &Path,
    kind: TokenizerKind,
    whole_words: &[String],
) -> Result<usize, DataError> {
    let (mut tokenizer, mut trainer) = match kind {
        TokenizerKind::Bpe => bpe_tokenizer(vocab),
        TokenizerKind::WordPiece => wordpiece_tokenizer(vocab),
    };
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
    // Words that must stay one token whatever the corpus says (PET's verbalizer words).
    let words: Vec<AddedToken> = whole_words
        .iter()
        .filter(|w| trained.token_to_id(w).is_none())
        .map(|w| AddedToken::from(w.clone(), false))
        .collect();
    trained.add_tokens(&words);
    if kind == TokenizerKind::WordPiece {
        // `[CLS] A [SEP] B [SEP]` when the file is used with `add_special_tokens`, as in BERT.
        let id = |t: &str| (t.to_string(), trained.token_to_id(t).unwrap_or_default());
        let bert = BertProcessing::new(id("[SEP]"), id("[CLS]"));
        trained.with_post_processor(Some(bert));
    }
    let size = trained.get_vocab_size(true);
    let tmp = out.with_extension("json.tmp");
    trained
        .save(&tmp, true)
        .map_err(|e| DataError(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, out).map_err(|e| DataError(format!("{}: {e}", out.display())))?;
    Ok(size)
}

/// GPT-2's byte-level BPE with `<|endoftext|>`.
fn bpe_tokenizer(vocab: usize) -> (Tokenizer, TrainerWrapper) {
    let trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(END_OF_TEXT.to_string(), true)])
        .build();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default()));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    (tokenizer, trainer.into())
}

/// BERT's uncased WordPiece: lower-casing and accent-stripping normaliser, whitespace and
/// punctuation pre-tokeniser, `##` continuations, and the special tokens first (ids 0–4).
fn wordpiece_tokenizer(vocab: usize) -> (Tokenizer, TrainerWrapper) {
    let trainer = WordPieceTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab)
        .min_frequency(2)
        .special_tokens(
            BERT_SPECIAL
                .iter()
                .map(|t| AddedToken::from(t.to_string(), true))
                .collect(),
        )
        .build();
    let mut tokenizer = Tokenizer::new(WordPiece::default());
    tokenizer.with_normalizer(Some(BertNormalizer::default()));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_decoder(Some(WordPieceDecoder::default()));
    (tokenizer, trainer.into())
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

/// `text` tokenized without special tokens; a failure names the file and line.
pub(crate) fn encoding(
    tokenizer: &Tokenizer,
    text: &str,
    path: &Path,
    line: usize,
) -> Result<Encoding, DataError> {
    tokenizer
        .encode(text, false)
        .map_err(|e| DataError(format!("{}:{line}: cannot tokenize: {e}", path.display())))
}

/// The token ids of `text` (see [`encoding`]).
pub(crate) fn token_ids(
    tokenizer: &Tokenizer,
    text: &str,
    path: &Path,
    line: usize,
) -> Result<Vec<i64>, DataError> {
    let enc = encoding(tokenizer, text, path, line)?;
    Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
}

/// The id of a special token a masked-LM pipeline builds with ([CLS], [SEP], [MASK]).
pub(crate) fn special_id(
    tokenizer: &Tokenizer,
    token: &str,
    path: &Path,
) -> Result<i64, DataError> {
    tokenizer.token_to_id(token).map(i64::from).ok_or_else(|| {
        DataError(format!(
            "{}: the tokenizer has no {token} token; masked-LM objectives need one (make such a tokenizer with `kiln tokenizer train --kind wordpiece`)",
            path.display()
        ))
    })
}

/// One training sequence: token ids and per-token labels (−100 where no loss is taken).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Example {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// Segment of each token (BERT's token types); empty means all zero.
    pub types: Vec<i64>,
    /// A label for the whole sequence (NSP: 0 when B follows A, 1 when it is random; PET: the
    /// class index).
    pub class: Option<i64>,
    /// The position whose MLM logits score the classes (PET's [MASK]).
    pub mask_position: Option<usize>,
}

/// The texts of a file: JSONL records (with their line numbers), or a `.txt` file's non-empty
/// lines as records with a `text` field.
pub(crate) fn records(path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    if path.extension().is_some_and(|e| e == "jsonl") {
        return read_jsonl(path);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError(format!("{}: cannot read: {e}", path.display())))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, serde_json::json!({ "text": l })))
        .collect())
}

/// What each record becomes for the objective: one example (causal LM, SFT, a PPO prompt) or a
/// chosen/rejected pair (reward model). `fields` maps logical field names to record keys.
pub fn load_examples(
    path: &Path,
    objective: &Objective,
    fields: &BTreeMap<String, String>,
    tokenizer: &Tokenizer,
    seq_len: usize,
    seed: u64,
) -> Result<Vec<Vec<Example>>, DataError> {
    if matches!(
        objective,
        Objective::Mlm(_) | Objective::Nsp { .. } | Objective::MlmNsp { .. }
    ) {
        return crate::mlm::examples(
            &records(path)?,
            path,
            objective,
            fields,
            tokenizer,
            seq_len,
            seed,
        );
    }
    if let Objective::Pvp(pvp) = objective {
        return crate::pet::examples(&records(path)?, path, pvp, fields, tokenizer, seq_len, seed);
    }
    let eot = tokenizer.token_to_id(END_OF_TEXT).map(i64::from);
    let encode = |text: &str, line: usize| token_ids(tokenizer, text, path, line);
    let mut out = Vec::new();
    for (line, record) in records(path)? {
        let field = |logical: &str| -> Result<String, DataError> {
            let key = fields.get(logical).map_or(logical, String::as_str);
            match record.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(DataError(format!(
                    "{}:{line}: the record has no text field `{key}`",
                    path.display()
                ))),
            }
        };
        let with_end = |mut ids: Vec<i64>| {
            ids.extend(eot);
            ids
        };
        let examples = match objective {
            Objective::CausalLm => {
                let ids = with_end(encode(&field("text")?, line)?);
                vec![Example {
                    labels: ids.clone(),
                    ids,
                    ..Example::default()
                }]
            }
            Objective::Sft { prompt, response } => {
                // The loss is on the response only.
                let p = encode(&field(prompt)?, line)?;
                let r = with_end(encode(&field(response)?, line)?);
                let labels = std::iter::repeat_n(-100, p.len())
                    .chain(r.iter().copied())
                    .collect();
                vec![Example {
                    ids: p.into_iter().chain(r).collect(),
                    labels,
                    ..Example::default()
                }]
            }
            Objective::Reward { chosen, rejected } => {
                let p = if record
                    .get(fields.get("prompt").map_or("prompt", String::as_str))
                    .is_some()
                {
                    encode(&field("prompt")?, line)?
                } else {
                    Vec::new()
                };
                [chosen, rejected]
                    .into_iter()
                    .map(|f| {
                        let ids: Vec<i64> = p
                            .iter()
                            .copied()
                            .chain(with_end(encode(&field(f)?, line)?))
                            .collect();
                        Ok(Example {
                            labels: vec![-100; ids.len()],
                            ids,
                            ..Example::default()
                        })
                    })
                    .collect::<Result<_, DataError>>()?
            }
            Objective::Ppo(_) => {
                // A prompt: the rollouts sample its responses.
                let ids = encode(&field("prompt")?, line)?;
                if ids.is_empty() {
                    return Err(DataError(format!(
                        "{}:{line}: the prompt is empty; PPO samples a response after at least one token",
                        path.display()
                    )));
                }
                vec![Example {
                    labels: vec![-100; ids.len()],
                    ids,
                    ..Example::default()
                }]
            }
            Objective::Mlm(_)
            | Objective::Nsp { .. }
            | Objective::MlmNsp { .. }
            | Objective::Pvp(_) => {
                unreachable!("masked-LM and PET examples are made above")
            }
        };
        out.push(examples);
    }
    Ok(out)
}

/// Rows of a batch, padded or truncated to one length.
pub struct PaddedBatch {
    pub ids: Vec<Vec<i64>>,
    pub types: Vec<Vec<i64>>,
    /// −100 on padding.
    pub labels: Vec<Vec<i64>>,
    pub mask: Vec<Vec<i64>>,
}

/// Pads (or truncates) `examples` to `seq_len`.
pub fn pad_batch(examples: &[&Example], seq_len: usize, pad: i64) -> PaddedBatch {
    let mut out = PaddedBatch {
        ids: Vec::new(),
        types: Vec::new(),
        labels: Vec::new(),
        mask: Vec::new(),
    };
    for ex in examples {
        let real = ex.ids.len().min(seq_len);
        let mut ids = ex.ids[..real].to_vec();
        let mut labels = ex.labels[..real].to_vec();
        let mut mask = vec![1; real];
        ids.resize(seq_len, pad);
        labels.resize(seq_len, -100);
        mask.resize(seq_len, 0);
        let mut types: Vec<i64> = ex.types.iter().take(real).copied().collect();
        types.resize(seq_len, 0);
        out.ids.push(ids);
        out.types.push(types);
        out.labels.push(labels);
        out.mask.push(mask);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_pad_with_ignored_labels_and_truncate() {
        let a = Example {
            ids: vec![5, 6, 7],
            labels: vec![-100, 6, 7],
            ..Example::default()
        };
        let b = Example {
            ids: vec![1, 2, 3, 4, 5, 6],
            labels: vec![1, 2, 3, 4, 5, 6],
            ..Example::default()
        };
        let PaddedBatch {
            ids, labels, mask, ..
        } = pad_batch(&[&a, &b], 4, 0);
        assert_eq!(ids, vec![vec![5, 6, 7, 0], vec![1, 2, 3, 4]]);
        assert_eq!(labels, vec![vec![-100, 6, 7, -100], vec![1, 2, 3, 4]]);
        assert_eq!(mask, vec![vec![1, 1, 1, 0], vec![1, 1, 1, 1]]);
    }

    #[test]
    fn sft_takes_the_loss_on_the_response_only() {
        let dir = std::env::temp_dir().join(format!("kiln-sft-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("sft.jsonl");
        std::fs::write(&f, "{\"q\": \"hello there\", \"a\": \"general kenobi\"}\n").unwrap();
        let tok = load_tokenizer(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/data/tokenizer.json"
        )))
        .unwrap();
        let objective = Objective::Sft {
            prompt: "q".into(),
            response: "a".into(),
        };
        let ex = &load_examples(&f, &objective, &BTreeMap::new(), &tok, 64, 0).unwrap()[0][0];
        let prompt_len = tok.encode("hello there", false).unwrap().get_ids().len();
        assert!(ex.labels[..prompt_len].iter().all(|&l| l == -100));
        assert_eq!(&ex.labels[prompt_len..], &ex.ids[prompt_len..]);
        std::fs::remove_dir_all(&dir).ok();
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
