//! Examples of the causal families, made one record at a time as the file is read: causal LM
//! (the text and the end-of-text token, every token a label), SFT (a prompt and a response, the
//! loss on the response only), reward pairs (prompt + chosen and prompt + rejected, one group)
//! and PPO's prompts (the rollouts sample the responses). Each family is a [`TaskData`].

use crate::data::batch::Inputs;
use crate::data::records::{for_each_record, text_field};
use crate::data::tokenizer::{token_ids, END_OF_TEXT};
use crate::data::{DataError, Example, Feed, Source, TaskData};
use kiln_compiler::spec::Ppo;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::Tokenizer;

/// A record as the causal families read it: its fields by logical name, tokenized.
struct Record<'a> {
    value: &'a Value,
    line: usize,
    path: &'a Path,
    /// Logical field names to record keys (`data { fields = { ... } }`).
    fields: &'a BTreeMap<String, String>,
    tokenizer: &'a Tokenizer,
    /// The end-of-text token, when the tokenizer has one.
    eot: Option<i64>,
}

impl Record<'_> {
    /// The key of the field `logical` names: the one `fields` maps it to, or itself.
    fn key<'k>(&'k self, logical: &'k str) -> &'k str {
        self.fields.get(logical).map_or(logical, String::as_str)
    }

    /// The token ids of the string field `logical`.
    fn ids(&self, logical: &str) -> Result<Vec<i64>, DataError> {
        let text = text_field(self.value, self.key(logical), self.path, self.line)?;
        token_ids(self.tokenizer, text, self.path, self.line)
    }

    /// The token ids of the string field `logical` and the end-of-text token.
    fn ids_with_end(&self, logical: &str) -> Result<Vec<i64>, DataError> {
        let mut ids = self.ids(logical)?;
        ids.extend(self.eot);
        Ok(ids)
    }

    /// An error naming the record's file and line.
    fn error(&self, what: &str) -> DataError {
        DataError(format!("{}:{}: {what}", self.path.display(), self.line))
    }
}

/// The group of examples `each` makes of every record of `path`, read one at a time.
fn groups(
    path: &Path,
    fields: &BTreeMap<String, String>,
    tokenizer: &Tokenizer,
    mut each: impl FnMut(&Record) -> Result<Vec<Example>, DataError>,
) -> Result<Vec<Vec<Example>>, DataError> {
    let eot = tokenizer.token_to_id(END_OF_TEXT).map(i64::from);
    let mut out = Vec::new();
    for_each_record(path, |line, value| {
        out.push(each(&Record {
            value: &value,
            line,
            path,
            fields,
            tokenizer,
            eot,
        })?);
        Ok(())
    })?;
    Ok(out)
}

/// An example whose tokens are all off the loss (a reward pair's sequence, a PPO prompt).
fn unlabelled(ids: Vec<i64>) -> Example {
    Example {
        labels: vec![-100; ids.len()],
        ids,
        ..Example::default()
    }
}

/// Causal LM on a record's `text`, or with `sft` (the prompt and response fields) supervised
/// fine-tuning, whose loss is on the response only.
pub(super) struct Causal<'o> {
    pub(super) sft: Option<(&'o str, &'o str)>,
}

impl TaskData for Causal<'_> {
    fn examples(&self, source: &Source) -> Result<Vec<Vec<Example>>, DataError> {
        let Source {
            path,
            fields,
            tokenizer,
            seq_len,
            ..
        } = *source;
        groups(path, fields, tokenizer, |record| {
            let example = match self.sft {
                None => {
                    let ids = record.ids_with_end("text")?;
                    Example {
                        labels: ids.clone(),
                        ids,
                        ..Example::default()
                    }
                }
                Some((prompt, response)) => sft(record, prompt, response, seq_len)?,
            };
            Ok(vec![example])
        })
    }

    fn rows_per_record(&self) -> usize {
        1
    }

    fn token_loss(&self) -> bool {
        true
    }

    fn feed(&self) -> Feed<'_> {
        Feed::Batches(Inputs {
            tokens: Some("labels"),
            classes: None,
            verbalizer: None,
        })
    }
}

/// The prompt and the response (with the end-of-text token), labelled on the response only;
/// a record with no response token to learn is an error.
fn sft(
    record: &Record,
    prompt: &str,
    response: &str,
    seq_len: usize,
) -> Result<Example, DataError> {
    let p = record.ids(prompt)?;
    let r = record.ids_with_end(response)?;
    if p.len() >= seq_len {
        return Err(record.error(&format!(
            "the prompt is {} tokens and seq_len is {seq_len}, so no token of the response fits in the sequence and the record has nothing to learn; raise train.seq_len above {} or shorten the prompt",
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
        return Err(record.error(&format!("{why}, so the record has nothing to learn")));
    }
    let labels = std::iter::repeat_n(-100, p.len())
        .chain(r.iter().copied())
        .collect();
    Ok(Example {
        ids: p.into_iter().chain(r).collect(),
        labels,
        ..Example::default()
    })
}

/// A reward model's pairs: the record's optional `prompt` followed by its `chosen` and by its
/// `rejected` response, two rows of one group, in that order (the pairwise loss reads them so).
pub(super) struct RewardPairs<'o> {
    pub(super) chosen: &'o str,
    pub(super) rejected: &'o str,
}

impl TaskData for RewardPairs<'_> {
    fn examples(&self, source: &Source) -> Result<Vec<Vec<Example>>, DataError> {
        let Source {
            path,
            fields,
            tokenizer,
            seq_len,
            ..
        } = *source;
        groups(path, fields, tokenizer, |record| {
            let p = if record.value.get(record.key("prompt")).is_some() {
                record.ids("prompt")?
            } else {
                Vec::new()
            };
            if p.len() >= seq_len {
                return Err(record.error(&format!(
                    "the prompt is {} tokens and seq_len is {seq_len}, so the chosen and rejected responses are cut off and the model cannot tell them apart; raise train.seq_len above {} or shorten the prompt",
                    p.len(),
                    p.len()
                )));
            }
            [self.chosen, self.rejected]
                .into_iter()
                .map(|f| {
                    let response = record.ids_with_end(f)?;
                    Ok(unlabelled(p.iter().copied().chain(response).collect()))
                })
                .collect()
        })
    }

    fn rows_per_record(&self) -> usize {
        2
    }

    fn token_loss(&self) -> bool {
        false
    }

    /// The pairwise loss reads the scores of the sequences' last tokens: no labels.
    fn feed(&self) -> Feed<'_> {
        Feed::Batches(Inputs {
            tokens: None,
            classes: None,
            verbalizer: None,
        })
    }
}

/// PPO's prompts, each record's `prompt`: the rollouts sample the responses (`train::ppo`).
pub(super) struct Prompts<'o> {
    pub(super) ppo: &'o Ppo,
}

impl TaskData for Prompts<'_> {
    fn examples(&self, source: &Source) -> Result<Vec<Vec<Example>>, DataError> {
        let Source {
            path,
            fields,
            tokenizer,
            ..
        } = *source;
        groups(path, fields, tokenizer, |record| {
            let ids = record.ids("prompt")?;
            if ids.is_empty() {
                return Err(record.error(
                    "the prompt is empty; PPO samples a response after at least one token",
                ));
            }
            Ok(vec![unlabelled(ids)])
        })
    }

    fn rows_per_record(&self) -> usize {
        1
    }

    fn token_loss(&self) -> bool {
        false
    }

    fn feed(&self) -> Feed<'_> {
        Feed::Rollouts(self.ppo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::task_data;
    use crate::data::tokenizer::tests::{bpe, scratch};
    use kiln_compiler::spec::Objective;

    #[test]
    fn sft_takes_the_loss_on_the_response_only() {
        let dir = std::env::temp_dir().join(format!("kiln-sft-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("sft.jsonl");
        std::fs::write(&f, "{\"q\": \"hello there\", \"a\": \"general kenobi\"}\n").unwrap();
        let objective = Objective::Sft {
            prompt: "q".into(),
            response: "a".into(),
        };
        let ex = &examples(&f, &objective, 64).unwrap()[0][0];
        let prompt_len = bpe().encode("hello there", false).unwrap().get_ids().len();
        assert!(ex.labels[..prompt_len].iter().all(|&l| l == -100));
        assert_eq!(&ex.labels[prompt_len..], &ex.ids[prompt_len..]);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The examples of `path` for `objective`, read with the BPE tokenizer.
    fn examples(
        path: &Path,
        objective: &Objective,
        seq_len: usize,
    ) -> Result<Vec<Vec<Example>>, DataError> {
        let tok = bpe();
        task_data(objective, &tok)?.examples(&Source {
            path,
            fields: &BTreeMap::new(),
            tokenizer: &tok,
            seq_len,
            seed: 0,
        })
    }

    /// The error reading a file of `contents` (named `name`) gives.
    fn load_error(name: &str, contents: &[u8], objective: &Objective, seq_len: usize) -> String {
        let dir = scratch(name);
        let f = dir.0.join(name);
        std::fs::write(&f, contents).unwrap();
        examples(&f, objective, seq_len)
            .map(|_| ())
            .unwrap_err()
            .to_string()
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
        let e = examples(&dir.0.join("absent.jsonl"), &causal, 64)
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
        assert!(examples(&f, &sft, n + 1).is_ok());
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
}
