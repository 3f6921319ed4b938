//! Data: Hugging Face tokenizers (`tokenizer.json`, through the `tokenizers` crate), training a
//! byte-level BPE or WordPiece tokenizer from text, JSONL datasets with errors that name file and line, and
//! causal-LM batches (padding, truncation, labels −100 on padding, attention masks).

pub mod mlm;
pub mod pet;

use kiln_compiler::spec::Objective;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// The longest record Kiln reads: one line of a JSONL or text file, 4 MiB. A training sequence
/// is at most a few thousand tokens (tens of KiB of text), and even a whole book chapter as one
/// masked-LM document is well under 1 MiB; a longer line is almost always a file that is not
/// line-delimited (a JSON array on one line, a binary file). Lines are read through a reader
/// bounded to this size, so such a file costs 4 MiB of memory and an error that names its line,
/// not gigabytes (parsing and tokenizing a 50 MB line took 8 GB).
pub const MAX_RECORD_BYTES: usize = 4 << 20;

/// The largest `tokenizer.json` Kiln loads, 256 MiB: the biggest published tokenizers (250k
/// tokens and their merges) are under 40 MB, and the file is parsed whole.
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// The largest vocabulary `kiln tokenizer train` makes, 2^20 = 1,048,576 tokens: four times the
/// largest vocabularies in use (Gemma's 262,144), and the trainers reserve memory for every
/// token up front, so an absurd size (`--vocab 4000000000`) would abort on allocation.
pub const MAX_VOCAB: usize = 1 << 20;

/// A human size: "4 MiB", "256 MiB", "1536 bytes".
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes & ((1 << 20) - 1) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, DataError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        DataError(format!(
            "{}: cannot read the tokenizer: {e}",
            path.display()
        ))
    })?;
    if meta.is_dir() {
        return Err(DataError(format!(
            "{}: is a directory; data.tokenizer names a tokenizer.json file",
            path.display()
        )));
    }
    if meta.len() > MAX_TOKENIZER_BYTES {
        return Err(DataError(format!(
            "{}: {} bytes is larger than any tokenizer.json ({} at most); is this the right file?",
            path.display(),
            meta.len(),
            size(MAX_TOKENIZER_BYTES)
        )));
    }
    let tokenizer = Tokenizer::from_file(path).map_err(|e| {
        DataError(format!(
            "{}: not a usable tokenizer.json: {e}",
            path.display()
        ))
    })?;
    // A token's id is its row of the model's embedding and output layer, and the model's vocab
    // is checked against the tokenizer's size: ids must be 0..size, with no gaps, or a token
    // would index past the rows the check allowed for.
    let size = tokenizer.get_vocab_size(true);
    if let Some((token, id)) = tokenizer
        .get_vocab(true)
        .into_iter()
        .filter(|&(_, id)| id as usize >= size)
        .max_by_key(|&(_, id)| id)
    {
        return Err(DataError(format!(
            "{}: the token {token:?} has id {id}, but the tokenizer has {size} tokens; Kiln needs the ids 0 to {} (one row of the model's vocab each), without gaps",
            path.display(),
            size.saturating_sub(1)
        )));
    }
    Ok(tokenizer)
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

/// A scratch directory removed when dropped (on every return path, errors included); unique
/// per call, so that calls in parallel (tests, threads) never share one.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(what: &str) -> Result<Self, DataError> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir)
            .map_err(|e| DataError(format!("{}: cannot create: {e}", dir.display())))?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// The smallest vocabulary a trainer can honour: byte-level BPE starts from its 256 byte
/// symbols and `<|endoftext|>`; WordPiece from BERT's five special tokens and at least one more.
fn min_vocab(kind: TokenizerKind) -> usize {
    match kind {
        TokenizerKind::Bpe => 257,
        TokenizerKind::WordPiece => BERT_SPECIAL.len() + 1,
    }
}

/// Trains a tokenizer of `vocab` tokens on text or JSONL files, adds `whole_words` as tokens of
/// their own, and writes it as `tokenizer.json`. Returns the size of the vocabulary written.
///
/// Files are read line by line (a line over [`MAX_RECORD_BYTES`] is an error naming it); a
/// JSONL file contributes the string values of its records, a text file its lines. A missing,
/// unreadable or empty file, a vocabulary outside `min..=`[`MAX_VOCAB`] and an empty word are
/// errors.
pub fn train_tokenizer(
    files: &[PathBuf],
    vocab: usize,
    out: &Path,
    kind: TokenizerKind,
    whole_words: &[String],
) -> Result<usize, DataError> {
    if files.is_empty() {
        return Err(DataError(
            "no files to train the tokenizer on: name text (.txt) or JSONL (.jsonl) files".into(),
        ));
    }
    let least = min_vocab(kind);
    if vocab < least || vocab > MAX_VOCAB {
        let name = match kind {
            TokenizerKind::Bpe => "byte-level BPE (256 byte symbols and <|endoftext|>)",
            TokenizerKind::WordPiece => "WordPiece (5 special tokens and at least one more)",
        };
        return Err(DataError(format!(
            "--vocab {vocab} is out of range: a {name} vocabulary is {least} to {MAX_VOCAB} tokens (2^20, four times the largest vocabularies in use; the trainer reserves memory for every token)"
        )));
    }
    if let Some(w) = whole_words.iter().find(|w| w.trim().is_empty()) {
        return Err(DataError(format!(
            "the word list has an empty word ({w:?}); --words takes words separated by commas"
        )));
    }
    let (mut tokenizer, mut trainer) = match kind {
        TokenizerKind::Bpe => bpe_tokenizer(vocab),
        TokenizerKind::WordPiece => wordpiece_tokenizer(vocab),
    };
    // Every input is copied, through the bounded line reader, into a plain text file for the
    // trainer: JSONL inputs as the text of their records, not their JSON syntax.
    let scratch = ScratchDir::new("tokenizer")?;
    let mut plain = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let p = scratch.0.join(format!("{i}.txt"));
        let written = |e: std::io::Error| DataError(format!("{}: cannot write: {e}", p.display()));
        let mut w = std::io::BufWriter::new(std::fs::File::create(&p).map_err(written)?);
        let mut text_bytes = 0usize;
        if is_jsonl(f) {
            for_each_line(f, |line, text| {
                if text.trim().is_empty() {
                    return Ok(());
                }
                let record = parse_record(f, line, text)?;
                for s in string_values(&record) {
                    text_bytes += s.trim().len();
                    w.write_all(s.as_bytes()).map_err(written)?;
                    w.write_all(b"\n").map_err(written)?;
                }
                Ok(())
            })?;
        } else {
            for_each_line(f, |_, text| {
                text_bytes += text.trim().len();
                w.write_all(text.as_bytes()).map_err(written)?;
                w.write_all(b"\n").map_err(written)
            })?;
        }
        w.flush().map_err(written)?;
        if text_bytes == 0 {
            return Err(DataError(format!(
                "{}: no text to train a tokenizer on ({})",
                f.display(),
                if is_jsonl(f) {
                    "a JSONL file's text is the string values of its records"
                } else {
                    "the file is empty"
                }
            )));
        }
        plain.push(p.display().to_string());
    }
    let trained = tokenizer
        .train_from_files(&mut trainer, plain)
        .map_err(|e| DataError(format!("training the tokenizer failed: {e}")))?;
    drop(scratch);
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
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    trained.save(&tmp, true).map_err(|e| {
        DataError(format!(
            "{}: cannot write the tokenizer: {e}",
            out.display()
        ))
    })?;
    std::fs::rename(&tmp, out).map_err(|e| {
        std::fs::remove_file(&tmp).ok();
        DataError(format!(
            "{}: cannot write the tokenizer: {e}",
            out.display()
        ))
    })?;
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

/// Whether `path` is read as JSONL (by its extension) rather than as plain text lines.
fn is_jsonl(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "jsonl")
}

/// Reads `path` line by line, calling `each` with the 1-based line number and the line without
/// its end (`\n` or `\r\n`, and a UTF-8 byte-order mark on the first line). Each line is read
/// through a reader bounded to [`MAX_RECORD_BYTES`]: a longer line is an error naming it, found
/// without reading the rest of it; a line that is not UTF-8 is an error naming it too.
pub(crate) fn for_each_line(
    path: &Path,
    mut each: impl FnMut(usize, &str) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = std::fs::File::open(path)
        .map_err(|e| DataError(format!("{}: cannot open: {e}", path.display())))?;
    let mut reader = BufReader::with_capacity(64 << 10, file);
    let mut buf = Vec::new();
    let mut line = 0usize;
    loop {
        line += 1;
        buf.clear();
        let n = (&mut reader)
            .take(MAX_RECORD_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError(format!("{}:{line}: cannot read: {e}", path.display())))?;
        if n == 0 {
            return Ok(());
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        } else if buf.len() > MAX_RECORD_BYTES {
            return Err(DataError(format!(
                "{}:{line}: the line is longer than {}, the most Kiln reads as one record; data files hold one record per line (JSONL: one JSON object per line), so split it into several records",
                path.display(),
                size(MAX_RECORD_BYTES as u64)
            )));
        }
        let bytes = if line == 1 {
            buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&buf)
        } else {
            &buf
        };
        let text = std::str::from_utf8(bytes).map_err(|e| {
            DataError(format!(
                "{}:{line}: not UTF-8 text (an invalid byte at column {}); data files must be UTF-8",
                path.display(),
                e.valid_up_to() + 1
            ))
        })?;
        each(line, text)?;
    }
}

/// One JSON value from line `line` of `path`.
fn parse_record(path: &Path, line: usize, text: &str) -> Result<Value, DataError> {
    serde_json::from_str(text)
        .map_err(|e| DataError(format!("{}:{line}: not a JSON record: {e}", path.display())))
}

/// What kind of JSON value `v` is, for messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The string field `key` of a record; a missing field (with the fields the record has) or one
/// of another type is an error naming the file and line.
pub(crate) fn text_field<'r>(
    record: &'r Value,
    key: &str,
    path: &Path,
    line: usize,
) -> Result<&'r str, DataError> {
    match record.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(DataError(format!(
            "{}:{line}: the field `{key}` is {}, not a string",
            path.display(),
            json_kind(other)
        ))),
        None => {
            let known: Vec<String> = record
                .as_object()
                .map(|m| m.keys().map(|k| format!("`{k}`")).collect())
                .unwrap_or_default();
            Err(DataError(format!(
                "{}:{line}: the record has no text field `{key}` (it has {}); name the field the data uses in `data {{ fields = {{ ... }} }}`",
                path.display(),
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            )))
        }
    }
}

/// Records of a JSONL file with their line numbers, read line by line (see [`for_each_line`]);
/// blank lines are skipped. A line that is not JSON, and a file without records, are errors
/// naming the file (and line).
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    let mut out = Vec::new();
    for_each_line(path, |line, text| {
        if !text.trim().is_empty() {
            out.push((line, parse_record(path, line, text)?));
        }
        Ok(())
    })?;
    if out.is_empty() {
        return Err(DataError(format!(
            "{}: no records (the file is empty or has only blank lines)",
            path.display()
        )));
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

/// The texts of a file: JSONL records (with their line numbers), each a JSON object, or a text
/// file's non-empty lines as records with a `text` field. A file without records is an error.
pub(crate) fn records(path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    let mut out = Vec::new();
    for_each_record(path, |line, record| {
        out.push((line, record));
        Ok(())
    })?;
    Ok(out)
}

/// Calls `each` with every record of a file (see [`records`]) as it is read, so that a caller
/// that needs one record at a time never holds the file.
pub(crate) fn for_each_record(
    path: &Path,
    mut each: impl FnMut(usize, Value) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let jsonl = is_jsonl(path);
    let mut any = false;
    for_each_line(path, |line, text| {
        if text.trim().is_empty() {
            return Ok(());
        }
        any = true;
        if !jsonl {
            return each(line, serde_json::json!({ "text": text }));
        }
        let record = parse_record(path, line, text)?;
        if !record.is_object() {
            return Err(DataError(format!(
                "{}:{line}: the record is {}; each line must be a JSON object such as {{\"text\": \"...\"}}",
                path.display(),
                json_kind(&record)
            )));
        }
        each(line, record)
    })?;
    if !any {
        return Err(DataError(format!(
            "{}: no records (the file is empty or has only blank lines)",
            path.display()
        )));
    }
    Ok(())
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
        return crate::data::mlm::examples(
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
        return crate::data::pet::examples(
            &records(path)?,
            path,
            pvp,
            fields,
            tokenizer,
            seq_len,
            seed,
        );
    }
    let eot = tokenizer.token_to_id(END_OF_TEXT).map(i64::from);
    let encode = |text: &str, line: usize| token_ids(tokenizer, text, path, line);
    let mut out = Vec::new();
    for_each_record(path, |line, record| {
        let field = |logical: &str| -> Result<&str, DataError> {
            let key = fields.get(logical).map_or(logical, String::as_str);
            text_field(&record, key, path, line)
        };
        let with_end = |mut ids: Vec<i64>| {
            ids.extend(eot);
            ids
        };
        let examples = match objective {
            Objective::CausalLm => {
                let ids = with_end(encode(field("text")?, line)?);
                vec![Example {
                    labels: ids.clone(),
                    ids,
                    ..Example::default()
                }]
            }
            Objective::Sft { prompt, response } => {
                // The loss is on the response only.
                let p = encode(field(prompt)?, line)?;
                let r = with_end(encode(field(response)?, line)?);
                if p.len() >= seq_len {
                    return Err(DataError(format!(
                        "{}:{line}: the prompt is {} tokens and seq_len is {seq_len}, so no token of the response fits in the sequence and the record has nothing to learn; raise train.seq_len above {} or shorten the prompt",
                        path.display(),
                        p.len(),
                        p.len()
                    )));
                }
                // The first token is never predicted (nothing comes before it).
                if r.is_empty() || (p.is_empty() && r.len() < 2) {
                    let why = if r.is_empty() {
                        "the response is empty"
                    } else {
                        "the prompt is empty and the response one token, which nothing before it predicts"
                    };
                    return Err(DataError(format!(
                        "{}:{line}: {why}, so the record has nothing to learn",
                        path.display()
                    )));
                }
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
                let prompt_key = fields.get("prompt").map_or("prompt", String::as_str);
                let p = if record.get(prompt_key).is_some() {
                    encode(field("prompt")?, line)?
                } else {
                    Vec::new()
                };
                if p.len() >= seq_len {
                    return Err(DataError(format!(
                        "{}:{line}: the prompt is {} tokens and seq_len is {seq_len}, so the chosen and rejected responses are cut off and the model cannot tell them apart; raise train.seq_len above {} or shorten the prompt",
                        path.display(),
                        p.len(),
                        p.len()
                    )));
                }
                [chosen, rejected]
                    .into_iter()
                    .map(|f| {
                        let ids: Vec<i64> = p
                            .iter()
                            .copied()
                            .chain(with_end(encode(field(f)?, line)?))
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
                let ids = encode(field("prompt")?, line)?;
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
        Ok(())
    })?;
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
        let mut labels: Vec<i64> = ex.labels.iter().take(real).copied().collect();
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

    /// A scratch directory of its own for each test (tests run in parallel).
    fn scratch(name: &str) -> ScratchDir {
        ScratchDir::new(&format!("data-test-{name}")).unwrap()
    }

    fn bpe() -> Tokenizer {
        load_tokenizer(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/data/tokenizer.json"
        )))
        .unwrap()
    }

    /// The error `load_examples` gives for a file of `contents` (named `name`).
    fn load_error(name: &str, contents: &[u8], objective: &Objective, seq_len: usize) -> String {
        let dir = scratch(name);
        let f = dir.0.join(name);
        std::fs::write(&f, contents).unwrap();
        load_examples(&f, objective, &BTreeMap::new(), &bpe(), seq_len, 0)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_line_over_the_limit_is_an_error_naming_it_without_reading_it_whole() {
        let dir = scratch("long");
        let f = dir.0.join("long.jsonl");
        let mut text = String::from("{\"text\": \"fine\"}\n");
        text.push_str(&format!(
            "{{\"text\": \"{}\"}}\n",
            "a".repeat(MAX_RECORD_BYTES)
        ));
        text.push_str("{\"text\": \"after\"}\n");
        std::fs::write(&f, text).unwrap();
        let e = read_jsonl(&f).unwrap_err().to_string();
        assert!(
            e.contains("long.jsonl:2: the line is longer than 4 MiB"),
            "{e}"
        );
        // A line of exactly the limit (its newline not counted) is read.
        std::fs::write(&f, format!("{}\n", " ".repeat(MAX_RECORD_BYTES - 2) + "{}")).unwrap();
        assert_eq!(read_jsonl(&f).unwrap().len(), 1);
        // Text files are read the same way.
        let t = dir.0.join("long.txt");
        std::fs::write(&t, "x".repeat(MAX_RECORD_BYTES + 1)).unwrap();
        let e = records(&t).unwrap_err().to_string();
        assert!(
            e.contains("long.txt:1: the line is longer than 4 MiB"),
            "{e}"
        );
    }

    #[test]
    fn encodings_and_line_ends_are_checked() {
        let dir = scratch("utf8");
        let f = dir.0.join("bad.txt");
        std::fs::write(&f, b"good line\nbad \xff byte\n").unwrap();
        let e = records(&f).unwrap_err().to_string();
        assert!(
            e.contains("bad.txt:2: not UTF-8 text (an invalid byte at column 5)"),
            "{e}"
        );
        // A byte-order mark and Windows line ends are not part of the records.
        let f = dir.0.join("crlf.jsonl");
        std::fs::write(
            &f,
            b"\xEF\xBB\xBF{\"text\": \"a\"}\r\n\r\n{\"text\": \"b\"}\r\n",
        )
        .unwrap();
        let r = read_jsonl(&f).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].0, r[1].0), (1, 3), "line numbers count blank lines");
    }

    #[test]
    fn malformed_records_are_errors_naming_file_and_line() {
        let causal = Objective::CausalLm;
        let e = load_error(
            "missing.jsonl",
            b"{\"text\": \"a\"}\n{\"body\": \"b\"}\n",
            &causal,
            64,
        );
        assert!(
            e.contains("missing.jsonl:2: the record has no text field `text` (it has `body`)"),
            "{e}"
        );
        let e = load_error("type.jsonl", b"{\"text\": [\"a\"]}\n", &causal, 64);
        assert!(
            e.contains("type.jsonl:1: the field `text` is a list, not a string"),
            "{e}"
        );
        let e = load_error("array.jsonl", b"\n[1, 2]\n", &causal, 64);
        assert!(e.contains("array.jsonl:2: the record is a list"), "{e}");
        let e = load_error("empty.jsonl", b"", &causal, 64);
        assert!(e.contains("empty.jsonl: no records"), "{e}");
        let e = load_error("blank.txt", b"\n  \n", &causal, 64);
        assert!(e.contains("blank.txt: no records"), "{e}");
        let dir = scratch("absent");
        let e = load_examples(
            &dir.0.join("absent.jsonl"),
            &causal,
            &BTreeMap::new(),
            &bpe(),
            64,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("absent.jsonl: cannot open"), "{e}");
    }

    #[test]
    fn an_sft_prompt_longer_than_the_sequence_is_an_error_with_the_fix() {
        let sft = Objective::Sft {
            prompt: "prompt".into(),
            response: "response".into(),
        };
        let long = serde_json::json!({ "prompt": "word ".repeat(50), "response": "ok" });
        let text = format!("{{\"prompt\": \"hi\", \"response\": \"ok\"}}\n{long}\n");
        let e = load_error("sft.jsonl", text.as_bytes(), &sft, 16);
        let n = bpe()
            .encode("word ".repeat(50), false)
            .unwrap()
            .get_ids()
            .len();
        assert!(
            e.contains(&format!(
                "sft.jsonl:2: the prompt is {n} tokens and seq_len is 16"
            )),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "raise train.seq_len above {n} or shorten the prompt"
            )),
            "{e}"
        );
        // The same record fits a longer sequence.
        let dir = scratch("sft-fits");
        let f = dir.0.join("sft.jsonl");
        std::fs::write(&f, text).unwrap();
        assert!(load_examples(&f, &sft, &BTreeMap::new(), &bpe(), n + 1, 0).is_ok());
        let e = load_error(
            "blank.jsonl",
            b"{\"prompt\": \"\", \"response\": \"\"}\n",
            &sft,
            16,
        );
        assert!(
            e.contains("blank.jsonl:1: the prompt is empty and the response one token"),
            "{e}"
        );
        let reward = Objective::Reward {
            chosen: "chosen".into(),
            rejected: "rejected".into(),
        };
        let pair =
            serde_json::json!({ "prompt": "word ".repeat(50), "chosen": "a", "rejected": "b" });
        let e = load_error("pairs.jsonl", format!("{pair}\n").as_bytes(), &reward, 16);
        assert!(e.contains("pairs.jsonl:1: the prompt is"), "{e}");
    }

    #[test]
    fn tokenizer_training_refuses_unusable_inputs() {
        let dir = scratch("tok");
        let out = dir.0.join("tokenizer.json");
        let text = dir.0.join("a.txt");
        std::fs::write(&text, "the river flows north\nthe basin is large\n").unwrap();
        let train = |files: &[PathBuf], vocab: usize, kind: TokenizerKind| {
            train_tokenizer(files, vocab, &out, kind, &[]).map_err(|e| e.0)
        };
        let e = train(
            std::slice::from_ref(&text),
            4_000_000_000,
            TokenizerKind::Bpe,
        )
        .unwrap_err();
        assert!(
            e.contains("--vocab 4000000000 is out of range") && e.contains("1048576"),
            "{e}"
        );
        let e = train(std::slice::from_ref(&text), 100, TokenizerKind::Bpe).unwrap_err();
        assert!(e.contains("is 257 to 1048576 tokens"), "{e}");
        let e = train(std::slice::from_ref(&text), 3, TokenizerKind::WordPiece).unwrap_err();
        assert!(e.contains("is 6 to 1048576 tokens"), "{e}");
        let e = train(&[], 300, TokenizerKind::Bpe).unwrap_err();
        assert!(e.contains("no files"), "{e}");
        let e = train(&[dir.0.join("absent.txt")], 300, TokenizerKind::Bpe).unwrap_err();
        assert!(e.contains("absent.txt: cannot open"), "{e}");
        let empty = dir.0.join("empty.txt");
        std::fs::write(&empty, "").unwrap();
        let e = train(&[text.clone(), empty], 300, TokenizerKind::Bpe).unwrap_err();
        assert!(
            e.contains("empty.txt: no text to train a tokenizer on"),
            "{e}"
        );
        let numbers = dir.0.join("numbers.jsonl");
        std::fs::write(&numbers, "{\"n\": 1}\n").unwrap();
        let e = train(&[numbers], 300, TokenizerKind::Bpe).unwrap_err();
        assert!(e.contains("numbers.jsonl: no text"), "{e}");
        let bad = dir.0.join("bad.jsonl");
        std::fs::write(&bad, "{\"text\": \"a\"}\n{oops\n").unwrap();
        let e = train(&[bad], 300, TokenizerKind::Bpe).unwrap_err();
        assert!(e.contains("bad.jsonl:2: not a JSON record"), "{e}");
        let e = train_tokenizer(
            std::slice::from_ref(&text),
            300,
            &out,
            TokenizerKind::WordPiece,
            &["".into()],
        )
        .unwrap_err();
        assert!(e.0.contains("empty word"), "{e}");
        assert!(!out.exists(), "nothing is written on an error");
        // The smallest and a large vocabulary both train.
        assert!(train(std::slice::from_ref(&text), 257, TokenizerKind::Bpe).unwrap() >= 257);
        assert!(train(&[text], MAX_VOCAB, TokenizerKind::WordPiece).is_ok());
        assert!(load_tokenizer(&out).is_ok());
        let e = load_tokenizer(&dir.0).unwrap_err().0;
        assert!(e.contains("is a directory"), "{e}");
        // Ids with a gap would index past the model's vocab rows.
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        json["model"]["vocab"]["[UNK]"] = serde_json::json!(50_000);
        let sparse = dir.0.join("sparse.json");
        std::fs::write(&sparse, json.to_string()).unwrap();
        let e = load_tokenizer(&sparse).unwrap_err().0;
        assert!(
            e.contains("\"[UNK]\" has id 50000, but the tokenizer has"),
            "{e}"
        );
    }

    #[test]
    fn tokenizers_trained_at_the_same_time_do_not_share_scratch_files() {
        let dir = scratch("parallel");
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let text = dir.0.join(format!("{i}.txt"));
                std::fs::write(&text, format!("text number {i} of four\n").repeat(20)).unwrap();
                let out = dir.0.join(format!("{i}.json"));
                std::thread::spawn(move || {
                    train_tokenizer(&[text], 300, &out, TokenizerKind::Bpe, &[]).map(|_| out)
                })
            })
            .collect();
        for h in handles {
            let out = h.join().unwrap().unwrap();
            assert!(load_tokenizer(&out).is_ok());
        }
    }
}
