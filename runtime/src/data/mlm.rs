//! Masked-LM and next-sentence-prediction examples, as BERT's `create_pretraining_data` makes
//! them: documents split into sentences, `[CLS] A [SEP] B [SEP]` pairs whose B is the true next
//! segment or (with probability `random_next`) a segment of another document, and token or
//! whole-word masking with the 80/10/10 replacement split.
//!
//! Masks are drawn once, when the data is loaded, from the experiment's seed (BERT's static
//! masking): the same seed gives the same examples, which is what makes `--resume` exact.
//!
//! [`Masked`] is the [`TaskData`] of the MLM, NSP and MLM+NSP objectives.
//!
//! Over 800 lines with its tests, which are 325 of them (rates, layouts and errors of every
//! masking strategy); the code itself is under 500.

use crate::data::batch::Inputs;
use crate::data::records::{records, text_field};
use crate::data::tokenizer::{encoding, special_id};
use crate::data::{DataError, Example, Feed, Source, TaskData};
use crate::rng::Rng;
use kiln_compiler::spec::{MaskStrategy, Mlm};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::Tokenizer;

/// One sentence: token ids and the word each token belongs to (for whole-word masking).
struct Sentence {
    ids: Vec<i64>,
    words: Vec<u32>,
}

/// The special tokens the examples are built from.
struct Specials {
    cls: i64,
    sep: i64,
    mask: i64,
}

/// The data of a masked-LM objective: MLM (`mlm` alone), NSP (`random_next` alone) or both.
pub(super) struct Masked<'o> {
    /// How tokens are masked, when the loss predicts masked tokens.
    pub(super) mlm: Option<&'o Mlm>,
    /// The probability that B is a segment of another document, when the loss predicts
    /// whether B follows A.
    pub(super) random_next: Option<f64>,
}

impl TaskData for Masked<'_> {
    fn examples(&self, source: &Source) -> Result<Vec<Vec<Example>>, DataError> {
        self.examples_from(&records(source.path)?, source)
    }

    fn rows_per_record(&self) -> usize {
        1
    }

    fn token_loss(&self) -> bool {
        self.mlm.is_some() && self.random_next.is_none()
    }

    fn feed(&self) -> Feed<'_> {
        Feed::Batches(Inputs {
            tokens: self.mlm.map(|_| "mlm_labels"),
            classes: self.random_next.map(|_| "next_sentence_labels"),
            verbalizer: None,
        })
    }
}

impl Masked<'_> {
    /// Examples from the records' text field (one document per record), each in a group of
    /// its own.
    fn examples_from(
        &self,
        records: &[(usize, Value)],
        source: &Source,
    ) -> Result<Vec<Vec<Example>>, DataError> {
        let Source {
            path,
            fields,
            tokenizer,
            seq_len,
            seed,
        } = *source;
        let Masked { mlm, random_next } = *self;
        if seq_len < 4 {
            return Err(DataError(format!(
                "{}: seq_len {seq_len} leaves no room for text between [CLS] and [SEP] (masked-LM sequences need at least 4 positions)",
                path.display()
            )));
        }
        let specials = specials(tokenizer, path, mlm.is_some())?;
        let key = fields.get("text").map_or("text", String::as_str);
        let entity_masking = mlm.is_some_and(|m| m.strategy == MaskStrategy::Entity);
        let docs = records
            .iter()
            .map(|(line, record)| {
                let text = text_field(record, key, path, *line)?;
                let entities = if entity_masking {
                    entity_spans(record, text, fields, path, *line)?
                } else {
                    Vec::new()
                };
                sentences(text)
                    .map(|s| {
                        // Sentences are slices of the text: their byte offset places the entities.
                        let at = s.as_ptr() as usize - text.as_ptr() as usize;
                        encode(tokenizer, s, at, &entities, path, *line)
                    })
                    .filter(|s| !matches!(s, Ok(s) if s.ids.is_empty()))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        if random_next.is_some() && docs.iter().filter(|d| !d.is_empty()).count() < 2 {
            return Err(DataError(format!(
                "{}: next-sentence prediction needs at least two documents with text (random next segments come from another document)",
                path.display()
            )));
        }
        let mut rng = Rng(seed ^ 0x4D4C_4D00);
        let vocab = tokenizer.get_vocab_size(true);
        let mut out = Vec::new();
        for (d, doc) in docs.iter().enumerate() {
            let sequences = match random_next {
                Some(p) => pairs(&docs, d, seq_len, p, &specials, &mut rng),
                None => packed(doc, seq_len, &specials),
            };
            // Each sequence is its own group: the unit the loader shuffles and batches.
            for seq in sequences {
                out.push(vec![match mlm {
                    Some(m) => mask(seq, m, specials.mask, vocab, &mut rng),
                    None => seq.example,
                }]);
            }
        }
        if out.is_empty() {
            return Err(DataError(format!(
                "{}: no text to train on",
                path.display()
            )));
        }
        Ok(out)
    }
}

fn specials(tokenizer: &Tokenizer, path: &Path, masking: bool) -> Result<Specials, DataError> {
    let id = |t: &str| special_id(tokenizer, t, path);
    Ok(Specials {
        cls: id("[CLS]")?,
        sep: id("[SEP]")?,
        mask: if masking { id("[MASK]")? } else { -1 },
    })
}

/// Sentences of a document: its lines, each split after `.`, `!` or `?` followed by a space.
fn sentences(text: &str) -> impl Iterator<Item = &str> {
    text.lines().flat_map(|line| {
        let mut parts = Vec::new();
        let mut start = 0;
        let bytes = line.as_bytes();
        for i in 0..bytes.len().saturating_sub(1) {
            if matches!(bytes[i], b'.' | b'!' | b'?') && bytes[i + 1] == b' ' {
                parts.push(&line[start..=i]);
                start = i + 2;
            }
        }
        parts.push(&line[start..]);
        parts.into_iter().map(str::trim).filter(|s| !s.is_empty())
    })
}

/// The record's entities (`"entities": [[start, end], ...]`, character offsets into the text,
/// end exclusive) as byte ranges, for entity masking (ERNIE).
fn entity_spans(
    record: &Value,
    text: &str,
    fields: &BTreeMap<String, String>,
    path: &Path,
    line: usize,
) -> Result<Vec<(usize, usize)>, DataError> {
    let key = fields.get("entities").map_or("entities", String::as_str);
    let bad = |what: &str| {
        DataError(format!(
            "{}:{line}: entity masking reads `{key}`: a list of [start, end] character offsets into the text; {what}",
            path.display()
        ))
    };
    let Some(list) = record.get(key).and_then(Value::as_array) else {
        return Err(bad("the record has none"));
    };
    // Byte offset of every character boundary, the text's end included.
    let bytes: Vec<usize> = text
        .char_indices()
        .map(|(b, _)| b)
        .chain([text.len()])
        .collect();
    list.iter()
        .map(|span| {
            let pair = span
                .as_array()
                .map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>());
            match pair.as_deref() {
                Some(&[Some(a), Some(b)]) if a < b && (b as usize) < bytes.len() => {
                    Ok((bytes[a as usize], bytes[b as usize]))
                }
                _ => Err(bad(&format!("{span} is not a span inside the text"))),
            }
        })
        .collect()
}

/// A sentence's tokens and words; a token inside an entity (byte ranges in the document, the
/// sentence starting at byte `at`) belongs to the entity's word, so the entity masks whole.
fn encode(
    tokenizer: &Tokenizer,
    text: &str,
    at: usize,
    entities: &[(usize, usize)],
    path: &Path,
    line: usize,
) -> Result<Sentence, DataError> {
    let enc = encoding(tokenizer, text, path, line)?;
    let words: Vec<Option<u32>> = enc
        .get_word_ids()
        .iter()
        .zip(enc.get_offsets())
        .map(|(&word, &(a, b))| {
            let (a, b) = (a + at, b + at);
            match entities.iter().position(|&(s, e)| a < e && b > s) {
                Some(k) => Some(u32::MAX - k as u32),
                None => word,
            }
        })
        .collect();
    Ok(Sentence {
        ids: enc.get_ids().iter().map(|&i| i64::from(i)).collect(),
        words: dense_words(&words),
    })
}

/// Word ids renumbered 0, 1, 2… in order; a token outside any word is a word of its own.
fn dense_words(ids: &[Option<u32>]) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len());
    let mut prev = None;
    for &w in ids {
        let next = match out.last() {
            Some(&last) if w.is_some() && w == prev => last,
            Some(&last) => last + 1,
            None => 0,
        };
        out.push(next);
        prev = w;
    }
    out
}

/// MLM without NSP: a document's sentences packed into `[CLS] … [SEP]` sequences of at most
/// `seq_len` tokens; a sentence longer than that is split.
fn packed(doc: &[Sentence], seq_len: usize, sp: &Specials) -> Vec<Unmasked> {
    let room = seq_len - 2;
    let mut out = Vec::new();
    let mut chunk = Segment::default();
    for s in doc {
        for (ids, words) in s.ids.chunks(room).zip(s.words.chunks(room)) {
            if chunk.ids.len() + ids.len() > room {
                out.push(sequence(&chunk, None, sp));
                chunk = Segment::default();
            }
            chunk.push(ids, words);
        }
    }
    if !chunk.ids.is_empty() {
        out.push(sequence(&chunk, None, sp));
    }
    out
}

/// NSP pairs from document `d`, as BERT builds them: sentences accumulate until they fill the
/// sequence; a random cut makes A; B is the rest (label 0) or, with probability `random_next`
/// or when the chunk is one sentence, the start of a random other document (label 1), whose
/// unused sentences of this document are then put back.
fn pairs(
    docs: &[Vec<Sentence>],
    d: usize,
    seq_len: usize,
    random_next: f64,
    sp: &Specials,
    rng: &mut Rng,
) -> Vec<Unmasked> {
    let doc = &docs[d];
    let target = seq_len - 3;
    let mut out = Vec::new();
    let mut i = 0;
    let mut chunk: Vec<&Sentence> = Vec::new();
    while i < doc.len() {
        chunk.push(&doc[i]);
        let len: usize = chunk.iter().map(|s| s.ids.len()).sum();
        if i + 1 == doc.len() || len >= target {
            let a_end = if chunk.len() >= 2 {
                1 + rng.below(chunk.len() - 1)
            } else {
                1
            };
            let mut a = Segment::default();
            chunk[..a_end].iter().for_each(|s| a.push(&s.ids, &s.words));
            let mut b = Segment::default();
            let is_random = chunk.len() == 1 || rng.uniform() < random_next;
            if is_random {
                let other = loop {
                    let o = rng.below(docs.len());
                    if o != d && !docs[o].is_empty() {
                        break &docs[o];
                    }
                };
                let start = rng.below(other.len());
                // As BERT: take a sentence, then stop once B is long enough (truncation trims).
                for s in &other[start..] {
                    b.push(&s.ids, &s.words);
                    if b.ids.len() >= target.saturating_sub(a.ids.len()) {
                        break;
                    }
                }
                // The sentences not used as A are not wasted: the next chunk starts with them.
                i -= chunk.len() - a_end;
            } else {
                chunk[a_end..].iter().for_each(|s| b.push(&s.ids, &s.words));
            }
            truncate_pair(&mut a, &mut b, target, rng);
            if !a.ids.is_empty() && !b.ids.is_empty() {
                out.push(sequence(&a, Some((&b, i64::from(is_random))), sp));
            }
            chunk.clear();
        }
        i += 1;
    }
    out
}

/// Token ids and word ids of one side of a sequence.
#[derive(Default)]
struct Segment {
    ids: Vec<i64>,
    words: Vec<u32>,
}

impl Segment {
    /// Appends a sentence; its words are shifted past this segment's so that they stay apart.
    fn push(&mut self, ids: &[i64], words: &[u32]) {
        let base = self.words.last().map_or(0, |w| w + 1);
        self.ids.extend_from_slice(ids);
        self.words.extend(words.iter().map(|w| base + w));
    }
}

/// BERT's `truncate_seq_pair`: trims the longer side, from the front or back at random, until
/// the pair fits.
fn truncate_pair(a: &mut Segment, b: &mut Segment, max: usize, rng: &mut Rng) {
    while a.ids.len() + b.ids.len() > max {
        let longer = if a.ids.len() > b.ids.len() {
            &mut *a
        } else {
            &mut *b
        };
        if rng.uniform() < 0.5 {
            longer.ids.remove(0);
            longer.words.remove(0);
        } else {
            longer.ids.pop();
            longer.words.pop();
        }
    }
}

/// A sequence before masking, with the word of each position (`None` for [CLS] and [SEP],
/// which are never masked).
pub(crate) struct Unmasked {
    pub example: Example,
    pub words: Vec<Option<u32>>,
}

/// `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]`, token types 0 for A and 1 for B, no labels yet.
fn sequence(a: &Segment, b: Option<(&Segment, i64)>, sp: &Specials) -> Unmasked {
    let mut ids = vec![sp.cls];
    ids.extend(&a.ids);
    ids.push(sp.sep);
    let mut types = vec![0; ids.len()];
    let mut words: Vec<Option<u32>> = std::iter::once(None)
        .chain(a.words.iter().map(|&w| Some(w)))
        .chain([None])
        .collect();
    let mut class = None;
    if let Some((b, label)) = b {
        let offset = a.words.last().map_or(0, |w| w + 1);
        ids.extend(&b.ids);
        ids.push(sp.sep);
        types.resize(ids.len(), 1);
        words.extend(b.words.iter().map(|&w| Some(offset + w)).chain([None]));
        class = Some(label);
    }
    Unmasked {
        example: Example {
            labels: vec![-100; ids.len()],
            ids,
            types,
            class,
            mask_position: None,
        },
        words,
    }
}

/// Chooses `prob` of the positions (at most `max_predictions`, at least one) — single tokens,
/// whole words, whole entities, or SpanBERT's spans of whole words (lengths from a geometric
/// distribution, p = 0.2, at most 10 words) — labels them with their token and replaces them by
/// [MASK], a random token or themselves in the `replace` proportions.
pub(crate) fn mask(seq: Unmasked, m: &Mlm, mask_id: i64, vocab: usize, rng: &mut Rng) -> Example {
    let Unmasked { mut example, words } = seq;
    // Candidate units: single positions, or the positions of one word (or entity).
    let mut units: Vec<Vec<usize>> = Vec::new();
    for (pos, w) in words.iter().enumerate() {
        let Some(w) = w else { continue };
        let same_word = m.strategy != MaskStrategy::Token && pos > 0 && words[pos - 1] == Some(*w);
        match units.last_mut() {
            Some(unit) if same_word => unit.push(pos),
            _ => units.push(vec![pos]),
        }
    }
    let candidates: usize = units.iter().map(Vec::len).sum();
    let budget =
        ((candidates as f64 * m.prob).round() as usize).clamp(1, m.max_predictions as usize);
    let groups = if m.strategy == MaskStrategy::Span {
        spans(&units, budget, rng)
    } else {
        for i in (1..units.len()).rev() {
            units.swap(i, rng.below(i + 1));
        }
        units
    };
    let mut chosen = 0;
    for group in groups {
        if chosen >= budget {
            break;
        }
        // As in BERT: a word that would overshoot the budget is skipped, not split.
        if chosen + group.len() > budget {
            continue;
        }
        chosen += group.len();
        for pos in group {
            example.labels[pos] = example.ids[pos];
            let r = rng.uniform();
            if r < m.replace[0] {
                example.ids[pos] = mask_id;
            } else if r < m.replace[0] + m.replace[1] {
                example.ids[pos] = rng.below(vocab) as i64;
            }
        }
    }
    example
}

/// SpanBERT's span selection over words: a span of ℓ ~ Geometric(0.2) words (ℓ ≤ 10) from a
/// random start, until the budget is met; spans never overlap. Returns each span's positions.
fn spans(words: &[Vec<usize>], budget: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let mut taken = vec![false; words.len()];
    let (mut out, mut chosen) = (Vec::new(), 0);
    // Bounded: short sequences may not fit the budget exactly.
    for _ in 0..words.len() * 10 {
        if chosen >= budget || words.is_empty() {
            break;
        }
        let mut len = 1;
        while len < 10 && rng.uniform() >= 0.2 {
            len += 1;
        }
        let start = rng.below(words.len());
        let end = (start + len).min(words.len());
        let span: Vec<usize> = words[start..end].iter().flatten().copied().collect();
        if taken[start..end].iter().any(|&t| t) || chosen + span.len() > budget {
            continue;
        }
        taken[start..end].iter_mut().for_each(|t| *t = true);
        chosen += span.len();
        out.push(span);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::tokenizer::tests::bpe;

    /// The shipped BERT-style WordPiece tokenizer.
    pub(crate) fn tokenizer() -> Tokenizer {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/data/wordpiece.json"
        ));
        crate::data::load_tokenizer(path).unwrap()
    }

    fn docs(n: usize) -> Vec<(usize, Value)> {
        (0..n)
            .map(|i| {
                let text = format!(
                    "The river number {i} flows north. Its basin is very large! Fish live in the river. \
                     Many species are found nowhere else. The forest covers most of the basin."
                );
                (i + 1, serde_json::json!({ "text": text }))
            })
            .collect()
    }

    fn mlm(strategy: MaskStrategy, prob: f64) -> Mlm {
        Mlm {
            prob,
            strategy,
            replace: [0.8, 0.1, 0.1],
            max_predictions: 1000,
        }
    }

    fn masked_lm(mlm: Option<&Mlm>, random_next: Option<f64>) -> Masked<'_> {
        Masked { mlm, random_next }
    }

    fn build(objective: &Masked, n: usize, seq_len: usize, seed: u64) -> Vec<Example> {
        objective
            .examples_from(
                &docs(n),
                &Source {
                    path: Path::new("d.jsonl"),
                    fields: &BTreeMap::new(),
                    tokenizer: &tokenizer(),
                    seq_len: seq_len,
                    seed: seed,
                },
            )
            .unwrap()
            .into_iter()
            .flatten()
            .collect()
    }

    #[test]
    fn sentences_split_at_terminal_punctuation_and_lines() {
        let s: Vec<_> = sentences("One. Two! Three? Four\nFive. 3.5 stays").collect();
        assert_eq!(s, ["One.", "Two!", "Three?", "Four", "Five.", "3.5 stays"]);
    }

    #[test]
    fn nsp_pairs_have_bert_layout_and_both_labels() {
        let objective = masked_lm(None, Some(0.5));
        let ex = build(&objective, 40, 32, 1);
        let tok = tokenizer();
        let (cls, sep) = (
            tok.token_to_id("[CLS]").unwrap() as i64,
            tok.token_to_id("[SEP]").unwrap() as i64,
        );
        for e in &ex {
            assert!(e.ids.len() <= 32);
            assert_eq!(e.ids[0], cls);
            assert_eq!(*e.ids.last().unwrap(), sep);
            let seps: Vec<usize> = (0..e.ids.len()).filter(|&i| e.ids[i] == sep).collect();
            assert_eq!(seps.len(), 2, "[CLS] A [SEP] B [SEP]");
            // Types: 0 up to and including the first [SEP], then 1.
            assert!(e
                .types
                .iter()
                .enumerate()
                .all(|(i, &t)| t == i64::from(i > seps[0])));
            assert!(
                e.labels.iter().all(|&l| l == -100),
                "no masking without MLM"
            );
        }
        let random = ex.iter().filter(|e| e.class == Some(1)).count();
        let actual = ex.iter().filter(|e| e.class == Some(0)).count();
        assert_eq!(random + actual, ex.len());
        assert!(
            random > ex.len() / 4 && actual > ex.len() / 4,
            "{random} random, {actual} actual"
        );
    }

    #[test]
    fn token_masking_follows_the_rate_and_replacement_split() {
        let m = mlm(MaskStrategy::Token, 0.15);
        let objective = masked_lm(Some(&m), None);
        let ex = build(&objective, 200, 64, 3);
        let tok = tokenizer();
        let mask = tok.token_to_id("[MASK]").unwrap() as i64;
        let (mut candidates, mut chosen, mut masked, mut kept) = (0, 0, 0, 0);
        for e in &ex {
            assert!(e.types.iter().all(|&t| t == 0) && e.class.is_none());
            candidates += e.ids.len() - 2;
            for (i, &l) in e.labels.iter().enumerate() {
                if l == -100 {
                    continue;
                }
                assert!(
                    i > 0 && i < e.ids.len() - 1,
                    "[CLS] and [SEP] are never chosen"
                );
                chosen += 1;
                masked += usize::from(e.ids[i] == mask);
                kept += usize::from(e.ids[i] == l);
            }
        }
        let rate = chosen as f64 / candidates as f64;
        assert!((0.13..0.17).contains(&rate), "masked rate {rate}");
        let masked = masked as f64 / chosen as f64;
        let kept = kept as f64 / chosen as f64;
        assert!((0.75..0.85).contains(&masked), "[MASK] share {masked}");
        // Kept: the 10% left alone plus random replacements that drew the same token.
        assert!((0.07..0.14).contains(&kept), "kept share {kept}");
    }

    #[test]
    fn whole_word_masking_takes_every_piece_of_a_word() {
        let m = mlm(MaskStrategy::WholeWord, 0.3);
        let objective = masked_lm(Some(&m), None);
        let tok = tokenizer();
        let ex = build(&objective, 50, 64, 5);
        let mut split_words = 0;
        for e in &ex {
            // Recover the word pieces: a "##" piece continues the previous token's word.
            let original: Vec<i64> = e
                .ids
                .iter()
                .zip(&e.labels)
                .map(|(&id, &l)| if l == -100 { id } else { l })
                .collect();
            for (i, &id) in original.iter().enumerate().skip(1) {
                let piece = tok.id_to_token(id as u32).unwrap();
                if piece.starts_with("##") {
                    split_words += 1;
                    assert_eq!(
                        e.labels[i] == -100,
                        e.labels[i - 1] == -100,
                        "a word is masked whole or not at all"
                    );
                }
            }
        }
        assert!(split_words > 0, "the test data has words of several pieces");
    }

    #[test]
    fn the_same_seed_gives_the_same_examples() {
        let m = mlm(MaskStrategy::WholeWord, 0.15);
        let objective = masked_lm(Some(&m), Some(0.5));
        assert_eq!(build(&objective, 20, 48, 9), build(&objective, 20, 48, 9));
        assert_ne!(build(&objective, 20, 48, 9), build(&objective, 20, 48, 10));
    }

    #[test]
    fn unusable_inputs_are_errors() {
        let objective = masked_lm(None, Some(0.5));
        let one = objective.examples_from(
            &docs(1),
            &Source {
                path: Path::new("d.jsonl"),
                fields: &BTreeMap::new(),
                tokenizer: &tokenizer(),
                seq_len: 32,
                seed: 0,
            },
        );
        assert!(one.unwrap_err().0.contains("at least two documents"));
        let no_cls = objective.examples_from(
            &docs(3),
            &Source {
                path: Path::new("d.jsonl"),
                fields: &BTreeMap::new(),
                tokenizer: &bpe(),
                seq_len: 32,
                seed: 0,
            },
        );
        assert!(no_cls.unwrap_err().0.contains("no [CLS] token"));
        let m = mlm(MaskStrategy::Entity, 0.15);
        let entity = masked_lm(Some(&m), None);
        let e = entity.examples_from(
            &docs(3),
            &Source {
                path: Path::new("d.jsonl"),
                fields: &BTreeMap::new(),
                tokenizer: &tokenizer(),
                seq_len: 32,
                seed: 0,
            },
        );
        assert!(e
            .unwrap_err()
            .0
            .contains("d.jsonl:1: entity masking reads `entities`"));
    }

    #[test]
    fn entity_masking_masks_annotated_entities_whole() {
        let text = "The Amazon River flows through South America. Many species live there.";
        let start = text.find("South America").unwrap();
        let record = serde_json::json!({
            "text": text,
            "entities": [[4, 16], [start, start + "South America".len()]],
        });
        let m = mlm(MaskStrategy::Entity, 0.5);
        let objective = masked_lm(Some(&m), None);
        let tok = tokenizer();
        let mut whole = 0;
        for seed in 0..20 {
            let ex = objective
                .examples_from(
                    &[(1, record.clone())],
                    &Source {
                        path: Path::new("d.jsonl"),
                        fields: &BTreeMap::new(),
                        tokenizer: &tok,
                        seq_len: 64,
                        seed: seed,
                    },
                )
                .unwrap()
                .remove(0)
                .remove(0);
            let original: Vec<i64> = ex
                .ids
                .iter()
                .zip(&ex.labels)
                .map(|(&id, &l)| if l == -100 { id } else { l })
                .collect();
            for entity in ["Amazon River", "South America"] {
                let pieces: Vec<i64> = tok
                    .encode(entity, false)
                    .unwrap()
                    .get_ids()
                    .iter()
                    .map(|&i| i64::from(i))
                    .collect();
                let at = original
                    .windows(pieces.len())
                    .position(|w| w == pieces.as_slice())
                    .unwrap();
                let masked: Vec<bool> = (at..at + pieces.len())
                    .map(|p| ex.labels[p] != -100)
                    .collect();
                assert!(
                    masked.iter().all(|&m| m == masked[0]),
                    "seed {seed}: {entity} half masked"
                );
                whole += usize::from(masked[0]);
            }
        }
        assert!(whole > 0, "entities get masked");
        let bad = serde_json::json!({ "text": "abc", "entities": [[2, 9]] });
        let err = objective.examples_from(
            &[(3, bad)],
            &Source {
                path: Path::new("d.jsonl"),
                fields: &BTreeMap::new(),
                tokenizer: &tok,
                seq_len: 64,
                seed: 0,
            },
        );
        assert!(err
            .unwrap_err()
            .0
            .contains("d.jsonl:3: entity masking reads `entities`"));
    }

    #[test]
    fn span_masking_masks_runs_of_whole_words_at_the_rate() {
        // Masked rate and mean length of runs of consecutive masked positions.
        let stats = |strategy| {
            let m = mlm(strategy, 0.15);
            let objective = masked_lm(Some(&m), None);
            let ex = build(&objective, 200, 64, 11);
            let (mut candidates, mut chosen, mut runs) = (0, 0, 0);
            for e in &ex {
                candidates += e.ids.len() - 2;
                let masked: Vec<bool> = e.labels.iter().map(|&l| l != -100).collect();
                chosen += masked.iter().filter(|&&m| m).count();
                runs += masked.windows(2).filter(|w| !w[0] && w[1]).count();
            }
            (
                chosen as f64 / candidates as f64,
                chosen as f64 / runs as f64,
            )
        };
        let (rate, span_run) = stats(MaskStrategy::Span);
        assert!((0.12..0.17).contains(&rate), "masked rate {rate}");
        let (_, token_run) = stats(MaskStrategy::Token);
        assert!(
            span_run > 1.5 * token_run,
            "spans {span_run} tokens per run, single tokens {token_run}"
        );
    }

    #[test]
    fn sentences_longer_than_the_sequence_still_make_pairs() {
        // One sentence per document, longer than the sequence: A and B are truncated, not lost.
        let records: Vec<(usize, Value)> = (0..4)
            .map(|i| {
                let text =
                    format!("the river {i} flows north and the basin is large and wide ").repeat(6);
                (i + 1, serde_json::json!({ "text": text }))
            })
            .collect();
        let objective = masked_lm(None, Some(0.5));
        let ex = objective
            .examples_from(
                &records,
                &Source {
                    path: Path::new("d.jsonl"),
                    fields: &BTreeMap::new(),
                    tokenizer: &tokenizer(),
                    seq_len: 32,
                    seed: 0,
                },
            )
            .unwrap();
        assert_eq!(ex.len(), 4, "one pair per document");
        assert!(ex.iter().flatten().all(|e| e.ids.len() == 32));
    }
}
