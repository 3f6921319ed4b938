//! What Kiln knows of Hugging Face transformers and PEFT, one file per model family
//! (`gpt2.rs`, `bert.rs`, `llama.rs`): the keys of the family's `config.json` that `hf("dir")`
//! reads and `kiln export --merged` writes, its module and parameter names, and the modules
//! PEFT targets in it. This file holds the [`HfFamily`] trait they implement and what the
//! families share: transformers' activation names and the config export around each family's
//! own keys. Module names are in `names.rs`.

mod bert;
mod gpt2;
mod llama;
mod names;

pub use names::{Module, Names};

use crate::spec::{Activation, Family, Model, Norm, Objective, Target};
use serde_json::{json, Value as Json};

/// One family as transformers and PEFT have it.
pub trait HfFamily: Sync {
    /// transformers' `model_type`, which is also Kiln's name for the family.
    fn model_type(&self) -> &'static str;

    /// The family's name in prose (`GPT-2`).
    fn title(&self) -> &'static str;

    /// How `hf("dir")` reads the family's `config.json` into a Kiln model.
    fn import(&self) -> &'static Import;

    /// transformers' config class (`GPT2Config`).
    fn config_class(&self) -> &'static str;

    /// The knobs the family's config fixes, each as (knob, whether `m` agrees, the value the
    /// family has).
    fn fixed(&self, m: &Model) -> Vec<(&'static str, bool, &'static str)>;

    /// The transformers class holding exactly the heads Kiln trains for `objective`, and the
    /// number of labels of a sequence classifier.
    fn architecture(&self, objective: &Objective) -> Result<(&'static str, Option<u64>), String>;

    /// The family's own keys of the `config.json` describing `m`, given transformers' name of
    /// its activation and its norm's epsilon.
    fn config_keys(&self, m: &Model, activation: &str, eps: f64) -> Json;

    /// The family's module and parameter names.
    fn names(&self) -> &'static Names;

    /// What PEFT knows of the family.
    fn peft(&self) -> &'static Peft;

    /// `config.json` for model `m` (defined in Kiln rather than read with `hf("dir")`) trained
    /// with `objective`: the fields transformers' config class reads, so that `from_pretrained`
    /// builds the model Kiln trained (the inverse of [`HfFamily::import`]). A knob the
    /// family's config cannot express is an error naming it.
    fn to_config(&self, m: &Model, objective: &Objective) -> Result<Json, String> {
        let class = self.config_class();
        if let Some((knob, _, want)) = self.fixed(m).into_iter().find(|(_, agrees, _)| !agrees) {
            return Err(format!(
                "--merged writes a Hugging Face checkpoint, and transformers' {class} cannot describe this model's `{knob}` (it has {knob} = {want}); use --peft, or keep {knob} as the family has it"
            ));
        }
        let (arch, labels) = self.architecture(objective)?;
        let eps = match m.norm {
            Norm::Layernorm { eps } | Norm::Rmsnorm { eps } => eps,
        };
        let mut config = self.config_keys(m, activation_name(m.activation), eps);
        let object = config.as_object_mut().expect("built as an object");
        object.insert("model_type".into(), json!(self.model_type()));
        object.insert("architectures".into(), json!([arch]));
        object.insert("tie_word_embeddings".into(), json!(m.tie_embeddings));
        if let Some(n) = labels {
            let id2label: serde_json::Map<String, Json> = (0..n)
                .map(|i| (i.to_string(), json!(format!("LABEL_{i}"))))
                .collect();
            let label2id: serde_json::Map<String, Json> =
                (0..n).map(|i| (format!("LABEL_{i}"), json!(i))).collect();
            object.insert("id2label".into(), Json::Object(id2label));
            object.insert("label2id".into(), Json::Object(label2id));
        }
        Ok(config)
    }
}

/// Every family, in the order messages list them.
pub const FAMILIES: [Family; 3] = [Family::Gpt2, Family::Bert, Family::Llama];

/// `family`'s Hugging Face side.
pub fn of(family: Family) -> &'static dyn HfFamily {
    match family {
        Family::Gpt2 => &gpt2::Gpt2,
        Family::Bert => &bert::Bert,
        Family::Llama => &llama::Llama,
    }
}

/// How a family's `config.json` maps onto a Kiln model's fields. `hf("dir")` (in
/// `resolve::builtins`) reads it, keeping where each value is in the file for diagnostics.
pub struct Import {
    /// Kiln field ← the first of these config keys present. Without its own key `kv_heads`
    /// takes the model's default, `heads` (as transformers reads a missing
    /// `num_key_value_heads`), so that one bad `n_head` is one error.
    pub keys: &'static [(&'static str, &'static [&'static str])],
    /// A key giving `ffn` when it holds an integer, and 4 × `hidden` otherwise (GPT-2's
    /// `n_inner`, `null` by default).
    pub ffn_or_four_hidden: Option<&'static str>,
    /// Norm kind, its epsilon's key, and the default epsilon.
    pub norm: (&'static str, &'static str, f64),
    /// The activation's key and its default (transformers' names, see [`activation`]).
    pub activation: (&'static str, &'static str),
    pub mlp: &'static str,
    pub block: &'static str,
    /// Config key saying whether linears have biases (`None`: they always do).
    pub bias_key: Option<&'static str>,
    /// Whether the output embeddings are tied when `tie_word_embeddings` is not given.
    pub tied: bool,
    /// Where a rotary family keeps θ (`None`: positions are learned).
    pub rope: Option<Rope>,
    /// The output heads of the model a checkpoint of the family holds.
    pub heads: &'static [&'static str],
}

/// Where a rotary family's config keeps θ: transformers 4 writes `key` at the top, 5 nests it
/// in `nested_in`; without either, `default`.
pub struct Rope {
    pub key: &'static str,
    pub nested_in: &'static str,
    pub default: f64,
}

/// What PEFT knows of a family, in Kiln's family-independent [`Target`]s (each module's name is
/// the family's [`Names::linear`]).
pub struct Peft {
    /// The block linears PEFT can adapt, in the order `all_linear` and messages list them.
    pub linears: &'static [Target],
    /// PEFT's default LoRA `target_modules`.
    pub lora: &'static [Target],
    /// PEFT's default IA3 `target_modules` and `feedforward_modules`.
    pub ia3: (&'static [Target], &'static [Target]),
}

impl Peft {
    /// The module paths PEFT matches target names against (the part after the block's
    /// number), each with its target. A target name matches a path when equal to it or to a
    /// `.`-separated suffix of it, as PEFT matches `target_modules`.
    pub fn modules(&self, names: &Names) -> Vec<(&'static str, Target)> {
        self.linears.iter().map(|&t| (names.linear(t), t)).collect()
    }
}

/// transformers' names for activation `a`; the first is the one written.
fn activation_names(a: Activation) -> &'static [&'static str] {
    match a {
        Activation::Gelu => &["gelu"],
        Activation::GeluTanh => &["gelu_new", "gelu_pytorch_tanh", "gelu_fast"],
        Activation::Relu => &["relu"],
        Activation::Silu => &["silu", "swish"],
    }
}

/// The Kiln activation transformers calls `name`, if Kiln has it.
pub fn activation(name: &str) -> Option<Activation> {
    use Activation::*;
    [Gelu, GeluTanh, Relu, Silu]
        .into_iter()
        .find(|a| activation_names(*a).contains(&name))
}

/// transformers' name for activation `a`.
pub fn activation_name(a: Activation) -> &'static str {
    activation_names(a)[0]
}
