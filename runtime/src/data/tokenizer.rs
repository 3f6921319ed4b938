//! Tokenizers: Hugging Face `tokenizer.json` files loaded (through the `tokenizers` crate) and
//! checked, byte-level BPE or WordPiece tokenizers trained from text or JSONL files, and
//! tokenizing with errors that name the file and line.

use crate::data::records::{for_each_line, is_jsonl, parse_record, size};
use crate::data::DataError;
use serde_json::Value;
use std::io::Write;
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

/// The end-of-text token a trained tokenizer reserves (GPT-2's name for it).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// The largest `tokenizer.json` Kiln loads, 256 MiB: the biggest published tokenizers (250k
/// tokens and their merges) are under 40 MB, and the file is parsed whole.
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// The largest vocabulary `kiln tokenizer train` makes, 2^20 = 1,048,576 tokens: four times the
/// largest vocabularies in use (Gemma's 262,144), and the trainers reserve memory for every
/// token up front, so an absurd size (`--vocab 4000000000`) would abort on allocation.
pub const MAX_VOCAB: usize = 1 << 20;

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
pub(super) struct ScratchDir(pub(super) PathBuf);

impl ScratchDir {
    pub(super) fn new(what: &str) -> Result<Self, DataError> {
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
/// Files are read line by line (a line over [`MAX_RECORD_BYTES`](super::MAX_RECORD_BYTES) is an
/// error naming it); a JSONL file contributes the string values of its records, a text file its
/// lines. A missing, unreadable or empty file, a vocabulary outside `min..=`[`MAX_VOCAB`] and an
/// empty word are errors.
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

/// Every string in a JSON value, in order (the text a JSONL record gives a tokenizer trainer).
fn string_values(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Object(m) => m.values().flat_map(string_values).collect(),
        Value::Array(a) => a.iter().flat_map(string_values).collect(),
        _ => Vec::new(),
    }
}

/// `text` tokenized without special tokens; a failure names the file and line.
pub(super) fn encoding(
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
pub(super) fn token_ids(
    tokenizer: &Tokenizer,
    text: &str,
    path: &Path,
    line: usize,
) -> Result<Vec<i64>, DataError> {
    let enc = encoding(tokenizer, text, path, line)?;
    Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
}

/// The id of a special token a masked-LM pipeline builds with ([CLS], [SEP], [MASK]).
pub(super) fn special_id(
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A scratch directory of its own for each test (tests run in parallel).
    pub(in crate::data) fn scratch(name: &str) -> ScratchDir {
        ScratchDir::new(&format!("data-test-{name}")).unwrap()
    }

    /// The shipped byte-level BPE tokenizer.
    pub(in crate::data) fn bpe() -> Tokenizer {
        load_tokenizer(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/data/tokenizer.json"
        )))
        .unwrap()
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
