//! The objective on the data side: one trait, [`TaskData`], with an implementation per family of
//! objectives — causal LM and SFT, reward pairs and PPO prompts (`causal`), MLM, NSP and
//! MLM+NSP (`mlm`), PET (`pet`) — that says what the training loop needs to know of its data:
//! what a record becomes ([`Example`]s), what a step is made of ([`Feed`]: batches of examples
//! with the inputs the loss reads, or prompts for PPO's rollouts), how many rows a record is, and
//! whether the loss is a token cross-entropy. [`task_data`] is the one place that matches on the
//! experiment's objective.

use crate::data::batch::Inputs;
use crate::data::causal::{Causal, Prompts, RewardPairs};
use crate::data::mlm::Masked;
use crate::data::pet::Pet;
use crate::data::DataError;
use kiln_compiler::spec::{Objective, Ppo};
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::Tokenizer;

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

/// What each step of an objective trains on.
pub enum Feed<'o> {
    /// Rows of examples, batched with the inputs the loss reads ([`Inputs::batch`]).
    Batches(Inputs<'o>),
    /// The examples are prompts: PPO's rollouts sample responses to them, score them and make
    /// the batches (`train::ppo`).
    Rollouts(&'o Ppo),
}

/// Where an objective's examples come from and how they are cut.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    /// The records (JSONL, or a text file's lines).
    pub path: &'a Path,
    /// Logical field names mapped to record keys.
    pub fields: &'a BTreeMap<String, String>,
    pub tokenizer: &'a Tokenizer,
    pub seq_len: usize,
    /// Draws what is random in the examples (MLM's masks, NSP's random segments).
    pub seed: u64,
}

/// An objective's data: its examples, and how the loop trains on them.
pub trait TaskData {
    /// The examples of the records of `source.path` (JSONL, or a text file's lines), one group
    /// per record or per unit the loader shuffles, each of
    /// [`rows_per_record`](Self::rows_per_record) rows that stay in one micro-batch. Errors name
    /// the file and line.
    fn examples(&self, source: &Source) -> Result<Vec<Vec<Example>>, DataError>;

    /// The rows of each group of examples: two for a chosen/rejected pair and for PET's row with
    /// its masked copy, one otherwise.
    fn rows_per_record(&self) -> usize;

    /// Whether the loss is a token cross-entropy alone, for which perplexity is defined (not
    /// sums with NSP, nor pair losses).
    fn token_loss(&self) -> bool;

    /// What a step is made of.
    fn feed(&self) -> Feed<'_>;
}

/// The data side of `objective`; PET's verbalizer words must each be one token of `tokenizer`.
pub fn task_data<'o>(
    objective: &'o Objective,
    tokenizer: &Tokenizer,
) -> Result<Box<dyn TaskData + 'o>, DataError> {
    Ok(match objective {
        Objective::CausalLm => Box::new(Causal { sft: None }),
        Objective::Sft { prompt, response } => Box::new(Causal {
            sft: Some((prompt, response)),
        }),
        Objective::Mlm(mlm) => Box::new(Masked {
            mlm: Some(mlm),
            random_next: None,
        }),
        Objective::Nsp { random_next } => Box::new(Masked {
            mlm: None,
            random_next: Some(*random_next),
        }),
        Objective::MlmNsp { mlm, random_next } => Box::new(Masked {
            mlm: Some(mlm),
            random_next: Some(*random_next),
        }),
        Objective::Pvp(pvp) => Box::new(Pet::new(pvp, tokenizer)?),
        Objective::Reward { chosen, rejected } => Box::new(RewardPairs { chosen, rejected }),
        Objective::Ppo(ppo) => Box::new(Prompts { ppo }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mlm::tests::tokenizer;
    use kiln_compiler::spec::{MaskStrategy, Mlm, Pvp};

    /// What `objective` says of its data: the integer inputs of a batch, whether PET's mask
    /// positions and verbalizer come with them, the rows per record and whether the loss is a
    /// token cross-entropy.
    fn shape(objective: &Objective) -> (Vec<String>, bool, usize, bool) {
        let tok = tokenizer();
        let data = task_data(objective, &tok).unwrap();
        let Feed::Batches(inputs) = data.feed() else {
            panic!("{objective:?} trains on batches of its examples");
        };
        let row = Example {
            ids: vec![2, 7, 3],
            labels: vec![-100, 7, -100],
            class: Some(1),
            mask_position: Some(1),
            ..Example::default()
        };
        let b = inputs.batch(&[&row], 4);
        (
            b.ints.keys().cloned().collect(),
            b.mask_positions.is_some() && b.class_token_ids.is_some(),
            data.rows_per_record(),
            data.token_loss(),
        )
    }

    #[test]
    fn each_objective_batches_the_inputs_its_loss_reads() {
        let mlm = Mlm {
            prob: 0.15,
            strategy: MaskStrategy::Token,
            replace: [0.8, 0.1, 0.1],
            max_predictions: 20,
        };
        let pvp = |mlm_weight| {
            Objective::Pvp(Pvp {
                pattern: "{text} [MASK]".into(),
                verbalizer: vec![
                    ("positive".into(), "great".into()),
                    ("negative".into(), "the".into()),
                ],
                mlm_weight,
            })
        };
        let sft = Objective::Sft {
            prompt: "prompt".into(),
            response: "response".into(),
        };
        let reward = Objective::Reward {
            chosen: "chosen".into(),
            rejected: "rejected".into(),
        };
        let mlm_nsp = Objective::MlmNsp {
            mlm: mlm.clone(),
            random_next: 0.5,
        };
        let cases: [(Objective, &[&str], bool, usize, bool); 8] = [
            (Objective::CausalLm, &["labels"], false, 1, true),
            (sft, &["labels"], false, 1, true),
            (Objective::Mlm(mlm), &["mlm_labels"], false, 1, true),
            (
                Objective::Nsp { random_next: 0.5 },
                &["next_sentence_labels"],
                false,
                1,
                false,
            ),
            (
                mlm_nsp,
                &["mlm_labels", "next_sentence_labels"],
                false,
                1,
                false,
            ),
            (pvp(0.0), &["class_labels"], true, 1, false),
            (pvp(0.5), &["class_labels", "mlm_labels"], true, 2, false),
            (reward, &[], false, 2, false),
        ];
        for (objective, labels, pet, rows, token_loss) in cases {
            let mut ints: Vec<String> = ["input_ids", "token_type_ids"]
                .iter()
                .chain(labels)
                .map(|s| s.to_string())
                .collect();
            ints.sort();
            assert_eq!(
                shape(&objective),
                (ints, pet, rows, token_loss),
                "{objective:?}"
            );
        }
    }
}
