//! PET cloze examples (Schick & Schütze 2021, as `timoschick/pet`'s `pvp.py` builds them): the
//! record's fields rendered into the pattern, `||` separating the two segments of
//! `[CLS] A [SEP] B [SEP]`, the [MASK] position remembered for the class logits, and the text —
//! never the pattern — truncated when the sequence is too long.
//!
//! PET's auxiliary MLM loss (`mlm_weight`) is computed on masked unlabelled text; here each
//! record also gives a copy of its row with 15% of the text tokens masked (never the pattern's
//! own words) and no class, so that one batch carries both losses and the classification always
//! reads unmasked text.
//!
//! [`Pet`] is the [`TaskData`] of the PET objective.

use crate::data::batch::Inputs;
use crate::data::mlm::{mask, Unmasked};
use crate::data::records::{json_kind, records, text_field};
use crate::data::tokenizer::{special_id, token_ids};
use crate::data::{DataError, Example, Feed, Source, TaskData};
use crate::rng::Rng;
use kiln_compiler::spec::{MaskStrategy, Mlm, Pvp};
use serde_json::Value;
use tokenizers::Tokenizer;

/// A piece of a pattern segment.
#[derive(Debug, PartialEq)]
enum Part<'p> {
    /// Pattern words, kept whole.
    Literal(&'p str),
    /// A record field (`{text}`), the part truncation shortens.
    Field(&'p str),
    Mask,
}

/// The pattern's segments (split at `||`), each a list of parts.
fn parse(pattern: &str) -> Vec<Vec<Part<'_>>> {
    pattern
        .split("||")
        .map(|segment| {
            let mut parts = Vec::new();
            let mut rest = segment.trim();
            while !rest.is_empty() {
                let field = rest.find('{');
                let mask = rest.find("[MASK]");
                match (field, mask) {
                    (Some(f), m) if m.is_none_or(|m| f < m) => {
                        let close = rest[f..].find('}').map_or(rest.len(), |c| f + c);
                        parts.push(Part::Literal(&rest[..f]));
                        parts.push(Part::Field(&rest[f + 1..close]));
                        rest = rest.get(close + 1..).unwrap_or("");
                    }
                    (_, Some(m)) => {
                        parts.push(Part::Literal(&rest[..m]));
                        parts.push(Part::Mask);
                        rest = &rest[m + "[MASK]".len()..];
                    }
                    _ => {
                        parts.push(Part::Literal(rest));
                        rest = "";
                    }
                }
            }
            parts.retain(|p| !matches!(p, Part::Literal(l) if l.trim().is_empty()));
            parts
        })
        .collect()
}

/// The token id of each verbalizer word, in the verbalizer's order; a word the tokenizer splits
/// into several tokens is an error (PET scores one token per class).
/// A word the tokenizer does not know (its unknown token) or two labels sharing a token would
/// make classes that cannot be told apart: both are errors too.
fn verbalizer_ids(pvp: &Pvp, tokenizer: &Tokenizer) -> Result<Vec<usize>, DataError> {
    let unknown = tokenizer.token_to_id("[UNK]");
    let mut ids: Vec<usize> = Vec::with_capacity(pvp.verbalizer.len());
    for (label, word) in &pvp.verbalizer {
        let enc = tokenizer
            .encode(word.as_str(), false)
            .map_err(|e| DataError(format!("verbalizer word `{word}`: {e}")))?;
        let id = match enc.get_ids() {
            [id] if Some(*id) == unknown => {
                return Err(DataError(format!(
                    "the verbalizer word `{word}` (label `{label}`) is not in the tokenizer's vocabulary (it reads as [UNK]); choose a word it knows, or train the tokenizer with `--words {word}`"
                )))
            }
            [id] => *id as usize,
            pieces => {
                return Err(DataError(format!(
                    "the verbalizer word `{word}` (label `{label}`) is {} tokens for this tokenizer ({}); PET needs one token per word",
                    pieces.len(),
                    enc.get_tokens().join(" ")
                )))
            }
        };
        if let Some(j) = ids.iter().position(|&other| other == id) {
            return Err(DataError(format!(
                "the labels `{}` and `{label}` are verbalized by the same token ({:?} and {word:?}); each class needs a word of its own",
                pvp.verbalizer[j].0, pvp.verbalizer[j].1
            )));
        }
        ids.push(id);
    }
    Ok(ids)
}

/// The data of a PET objective: its pattern-verbalizer pair, and the token of each verbalizer
/// word, whose MLM logits at the [MASK] are the class scores.
pub(super) struct Pet<'o> {
    pvp: &'o Pvp,
    verbalizer: Vec<usize>,
}

impl<'o> Pet<'o> {
    /// `pvp` with its verbalizer words' tokens; a word that is not one token of its own is an
    /// error (see [`verbalizer_ids`]).
    pub(super) fn new(pvp: &'o Pvp, tokenizer: &Tokenizer) -> Result<Self, DataError> {
        Ok(Pet {
            pvp,
            verbalizer: verbalizer_ids(pvp, tokenizer)?,
        })
    }
}

impl TaskData for Pet<'_> {
    fn examples(&self, source: &Source) -> Result<Vec<Vec<Example>>, DataError> {
        self.examples_from(&records(source.path)?, source)
    }

    /// The row, and with the auxiliary MLM loss its masked copy.
    fn rows_per_record(&self) -> usize {
        if self.auxiliary_mlm() {
            2
        } else {
            1
        }
    }

    fn token_loss(&self) -> bool {
        false
    }

    fn feed(&self) -> Feed<'_> {
        Feed::Batches(Inputs {
            tokens: self.auxiliary_mlm().then_some("mlm_labels"),
            classes: Some("class_labels"),
            verbalizer: Some(&self.verbalizer),
        })
    }
}

impl Pet<'_> {
    /// Whether the loss has PET's auxiliary MLM part (`mlm_weight` above zero).
    fn auxiliary_mlm(&self) -> bool {
        self.pvp.mlm_weight > 0.0
    }

    /// One group per record: the rendered pattern, the class index of the record's label and
    /// the [MASK] position (and with the auxiliary MLM loss, the row's masked copy).
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
        let pvp = self.pvp;
        let id = |t: &str| special_id(tokenizer, t, path);
        let (cls, sep, mask_id) = (id("[CLS]")?, id("[SEP]")?, id("[MASK]")?);
        let segments = parse(&pvp.pattern);
        if segments.len() > 2 {
            return Err(DataError(format!(
                "the PET pattern has {} segments; BERT-style inputs have at most two (one `||`)",
                segments.len()
            )));
        }
        if !segments.iter().flatten().any(|p| *p == Part::Mask) {
            return Err(DataError(format!(
                "the PET pattern {:?} has no [MASK] outside its {{fields}}; the class is read at the [MASK]",
                pvp.pattern
            )));
        }
        let label_key = fields.get("label").map_or("label", String::as_str);
        let encode = |text: &str, line: usize| token_ids(tokenizer, text, path, line);
        // The auxiliary MLM loss masks text tokens, BERT-style.
        let aux = self.auxiliary_mlm().then_some(Mlm {
            prob: 0.15,
            strategy: MaskStrategy::Token,
            replace: [0.8, 0.1, 0.1],
            max_predictions: u64::MAX,
        });
        let mut rng = Rng(seed ^ 0x0050_4554);
        let vocab = tokenizer.get_vocab_size(true);
        let mut out = Vec::new();
        for (line, record) in records {
            let line = *line;
            let label = match record.get(label_key) {
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                Some(other) => {
                    return Err(DataError(format!(
                        "{}:{line}: the label `{label_key}` is {}; a label is a string, number or boolean naming a class of the verbalizer",
                        path.display(),
                        json_kind(other)
                    )))
                }
                None => {
                    return Err(DataError(format!(
                        "{}:{line}: the record has no `{label_key}` field",
                        path.display()
                    )))
                }
            };
            let class = pvp
                .verbalizer
                .iter()
                .position(|(l, _)| *l == label)
                .ok_or_else(|| {
                    let known: Vec<&str> = pvp.verbalizer.iter().map(|(l, _)| l.as_str()).collect();
                    DataError(format!(
                        "{}:{line}: label `{label}` is not in the verbalizer ({})",
                        path.display(),
                        known.join(", ")
                    ))
                })?;
            // Tokens of every part, and whether the part is a field (the text truncation shortens).
            let mut rendered: Vec<Vec<(Vec<i64>, &Part)>> = Vec::new();
            for segment in &segments {
                let mut parts = Vec::new();
                for part in segment {
                    parts.push(match part {
                        Part::Literal(text) => (encode(text, line)?, part),
                        Part::Mask => (vec![mask_id], part),
                        Part::Field(name) => {
                            let key = fields.get(*name).map_or(*name, String::as_str);
                            let text = text_field(record, key, path, line).map_err(|e| {
                                DataError(format!("{} (the pattern's {{{name}}})", e.0))
                            })?;
                            (encode(text, line)?, part)
                        }
                    });
                }
                rendered.push(parts);
            }
            let specials = 1 + rendered.len();
            let mut total: usize = specials
                + rendered
                    .iter()
                    .flatten()
                    .map(|(ids, _)| ids.len())
                    .sum::<usize>();
            // PET's truncation: the longest field loses its last token until the row fits.
            while total > seq_len {
                let longest = rendered
                    .iter_mut()
                    .flatten()
                    .filter(|(ids, part)| matches!(part, Part::Field(_)) && !ids.is_empty())
                    .max_by_key(|(ids, _)| ids.len());
                match longest {
                    Some((ids, _)) => {
                        ids.pop();
                        total -= 1;
                    }
                    None => {
                        return Err(DataError(format!(
                            "{}:{line}: the pattern alone is {} tokens with [CLS] and [SEP]; seq_len is {seq_len}",
                            path.display(),
                            total
                        )))
                    }
                }
            }
            let mut ids = vec![cls];
            let mut types = vec![0];
            let mut words = vec![None];
            let mut mask_position = None;
            for (s, parts) in rendered.iter().enumerate() {
                for (part_ids, part) in parts {
                    if let Part::Mask = part {
                        mask_position = Some(ids.len());
                    }
                    for &t in part_ids {
                        // Each text token may be masked for the auxiliary loss; pattern tokens not.
                        let field = matches!(part, Part::Field(_));
                        words.push(field.then_some(ids.len() as u32));
                        ids.push(t);
                        types.push(s as i64);
                    }
                }
                ids.push(sep);
                types.push(s as i64);
                words.push(None);
            }
            let example = Example {
                labels: vec![-100; ids.len()],
                ids,
                types,
                class: Some(class as i64),
                mask_position,
            };
            // The auxiliary MLM reads a masked copy of the row, which has no class, so that the
            // classification (and its accuracy) always sees the text unmasked.
            let group = match &aux {
                Some(m) => {
                    let copy = Example {
                        class: None,
                        ..example.clone()
                    };
                    vec![
                        example,
                        mask(
                            Unmasked {
                                example: copy,
                                words,
                            },
                            m,
                            mask_id,
                            vocab,
                            &mut rng,
                        ),
                    ]
                }
                None => vec![example],
            };
            out.push(group);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mlm::tests::tokenizer;
    use std::collections::BTreeMap;
    use std::path::Path;

    fn pvp(pattern: &str, mlm_weight: f64) -> Pvp {
        Pvp {
            pattern: pattern.into(),
            verbalizer: vec![
                ("positive".into(), "great".into()),
                ("negative".into(), "the".into()),
            ],
            mlm_weight,
        }
    }

    fn build(p: &Pvp, text: &str, label: &str, seq_len: usize) -> Result<Example, DataError> {
        let records = [(1, serde_json::json!({ "text": text, "label": label }))];
        let tok = tokenizer();
        Pet::new(p, &tok)
            .unwrap()
            .examples_from(
                &records,
                &Source {
                    path: Path::new("r.jsonl"),
                    fields: &BTreeMap::new(),
                    tokenizer: &tok,
                    seq_len: seq_len,
                    seed: 0,
                },
            )
            .map(|mut e| e.remove(0).remove(0))
    }

    #[test]
    fn patterns_parse_into_fields_literals_and_the_mask() {
        assert_eq!(
            parse("Just [MASK]! || {text}"),
            vec![
                vec![Part::Literal("Just "), Part::Mask, Part::Literal("!")],
                vec![Part::Field("text")]
            ]
        );
        assert_eq!(
            parse("{text} All in all, it was [MASK]."),
            vec![vec![
                Part::Field("text"),
                Part::Literal(" All in all, it was "),
                Part::Mask,
                Part::Literal(".")
            ]]
        );
    }

    #[test]
    fn the_row_is_the_rendered_pattern_with_the_mask_position_and_class() {
        let tok = tokenizer();
        let ex = build(
            &pvp("{text} it was [MASK].", 0.0),
            "the river",
            "negative",
            32,
        )
        .unwrap();
        let tokens: Vec<String> = ex
            .ids
            .iter()
            .map(|&i| tok.id_to_token(i as u32).unwrap())
            .collect();
        assert_eq!(
            tokens,
            ["[CLS]", "the", "river", "it", "was", "[MASK]", ".", "[SEP]"]
        );
        assert_eq!(ex.mask_position, Some(5));
        assert_eq!(ex.class, Some(1));
        assert!(ex.labels.iter().all(|&l| l == -100));
        assert!(ex.types.iter().all(|&t| t == 0));
    }

    #[test]
    fn truncation_shortens_the_text_and_keeps_the_pattern() {
        let tok = tokenizer();
        let long = "the river flows north and the basin is large ".repeat(10);
        let ex = build(&pvp("{text} it was [MASK].", 0.0), &long, "positive", 16).unwrap();
        assert_eq!(ex.ids.len(), 16);
        let tail: Vec<String> = ex.ids[11..]
            .iter()
            .map(|&i| tok.id_to_token(i as u32).unwrap())
            .collect();
        assert_eq!(tail, ["it", "was", "[MASK]", ".", "[SEP]"]);
        let two = build(&pvp("Just [MASK]! || {text}", 0.0), &long, "positive", 12).unwrap();
        assert_eq!(two.ids.len(), 12);
        let pieces = |t: &str| tok.encode(t, false).unwrap().get_ids().len();
        assert_eq!(
            two.types.iter().filter(|&&t| t == 0).count(),
            3 + pieces("Just") + pieces("!"),
            "segment A, [CLS] Just [MASK] ! [SEP], is whole"
        );
        let short = build(&pvp("{text} it was [MASK].", 0.0), "river", "positive", 5);
        assert!(short.unwrap_err().0.contains("the pattern alone is"));
    }

    #[test]
    fn the_auxiliary_mlm_masks_text_never_the_pattern() {
        let long = "the river flows north and the basin is large ".repeat(4);
        let records = [(1, serde_json::json!({ "text": long, "label": "positive" }))];
        let p = pvp("{text} it was [MASK].", 0.5);
        let tok = tokenizer();
        let mut group = Pet::new(&p, &tok)
            .unwrap()
            .examples_from(
                &records,
                &Source {
                    path: Path::new("r.jsonl"),
                    fields: &BTreeMap::new(),
                    tokenizer: &tok,
                    seq_len: 64,
                    seed: 0,
                },
            )
            .unwrap()
            .remove(0);
        assert_eq!(group.len(), 2, "the row and its masked copy");
        let ex = group.remove(1);
        let clean = group.remove(0);
        assert!(clean.labels.iter().all(|&l| l == -100) && clean.class == Some(0));
        assert_eq!(ex.class, None, "the copy carries only the MLM loss");
        let masked: Vec<usize> = (0..ex.ids.len())
            .filter(|&i| ex.labels[i] != -100)
            .collect();
        assert!(!masked.is_empty());
        let pattern_start = ex.ids.len() - 5;
        assert!(masked.iter().all(|&i| i > 0 && i < pattern_start));
        assert_eq!(ex.mask_position, Some(ex.ids.len() - 3));
    }

    #[test]
    fn bad_labels_and_verbalizers_are_errors() {
        let e = build(&pvp("{text} [MASK]", 0.0), "x", "neutral", 16).unwrap_err();
        assert!(
            e.0.contains(
                "r.jsonl:1: label `neutral` is not in the verbalizer (positive, negative)"
            ),
            "{}",
            e.0
        );
        let mut multi = pvp("{text} [MASK]", 0.0);
        multi.verbalizer[0].1 = "unbelievably".into();
        let e = verbalizer_ids(&multi, &tokenizer()).unwrap_err();
        assert!(
            e.0.contains("`unbelievably` (label `positive`) is"),
            "{}",
            e.0
        );
        let mut unknown = pvp("{text} [MASK]", 0.0);
        unknown.verbalizer[0].1 = "\u{2603}".into();
        let e = verbalizer_ids(&unknown, &tokenizer()).unwrap_err();
        assert!(
            e.0.contains("is not in the tokenizer's vocabulary"),
            "{}",
            e.0
        );
        let mut same = pvp("{text} [MASK]", 0.0);
        same.verbalizer[1].1 = "GREAT".into();
        let e = verbalizer_ids(&same, &tokenizer()).unwrap_err();
        assert!(
            e.0.contains("the labels `positive` and `negative` are verbalized by the same token"),
            "{}",
            e.0
        );
        let e = build(&pvp("{text} || a || [MASK]", 0.0), "x", "positive", 16).unwrap_err();
        assert!(e.0.contains("3 segments"), "{}", e.0);
        let e = build(&pvp("{text [MASK]", 0.0), "x", "positive", 16).unwrap_err();
        assert!(
            e.0.contains("has no [MASK] outside its {fields}"),
            "{}",
            e.0
        );
        let records = [(4, serde_json::json!({ "text": "x", "label": ["positive"] }))];
        let p = pvp("{text} [MASK]", 0.0);
        let tok = tokenizer();
        let e = Pet::new(&p, &tok)
            .unwrap()
            .examples_from(
                &records,
                &Source {
                    path: Path::new("r.jsonl"),
                    fields: &BTreeMap::new(),
                    tokenizer: &tok,
                    seq_len: 16,
                    seed: 0,
                },
            )
            .unwrap_err();
        assert!(
            e.0.contains("r.jsonl:4: the label `label` is a list"),
            "{}",
            e.0
        );
        let e = build(&pvp("{review} [MASK]", 0.0), "x", "positive", 16).unwrap_err();
        assert!(
            e.0.contains("r.jsonl:1: the record has no text field `review`"),
            "{}",
            e.0
        );
    }
}
