//! `kiln export`: an adapter read from PEFT's own files and written back holds the same tensors
//! under the same keys (a prompt encoder's output as PEFT computed it), and its config reads back
//! to the same adapter; an exported prompt computes what its encoder did; a merged model, read
//! back with `hf()`, computes what the base model with its adapter did, also when the model was
//! defined in Kiln.

use kiln_compiler::graph::{compile_graph, Graph};
use kiln_compiler::spec::Experiment;
use kiln_runtime::exec::precision::Format;
use kiln_runtime::exec::prompt::from_peft;
use kiln_runtime::exec::{forward_backward, Batch};
use kiln_runtime::export::{export_merged, peft_config, write_peft};
use kiln_runtime::store::safetensors::{bind, read_safetensors};
use kiln_runtime::tensor::HostTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;
use common::{relative_l2, tensor_bytes};

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

fn graph_of(src: &str) -> (Experiment, Graph) {
    let checked = kiln_compiler::check_source("export.kiln", src, Some(&fixtures()));
    assert!(checked.is_ok(), "{}", checked.render_errors());
    let e = checked.module.experiments[0].value.clone();
    let g = compile_graph(&e).unwrap();
    (e, g)
}

fn raw_keys(path: &Path) -> Vec<String> {
    // The keys as stored (read_safetensors strips PEFT's prefix).
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut keys: Vec<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    keys.sort();
    keys
}

fn scratch(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kiln-export-{what}-{}", std::process::id()))
}

#[test]
fn peft_adapters_round_trip() {
    for case in [
        "clm_lora",
        "clm_ia3",
        "clm_prompt",
        "clm_prefix",
        "clm_prefix_proj",
        "clm_ptuning_mlp",
    ] {
        let dir = fixtures().join("gpt2_tiny").join(case);
        let src = format!("experiment e {{ model = hf(\"gpt2_tiny\"), adapter = peft(\"gpt2_tiny/{case}\"), train {{ batch = 2, seq_len = 12 }} }}");
        let (e, g) = graph_of(&src);
        // The trainable file holds the adapter as trained (a prompt encoder's weights too).
        let files = vec![
            (
                dir.join("trainable.safetensors"),
                read_safetensors(&dir.join("trainable.safetensors")).unwrap(),
            ),
            (
                fixtures().join("gpt2_tiny/model.safetensors"),
                read_safetensors(&fixtures().join("gpt2_tiny/model.safetensors")).unwrap(),
            ),
        ];
        let values: Vec<HostTensor> = bind(&g, &files)
            .unwrap()
            .into_iter()
            .map(Option::unwrap)
            .collect();
        let out = scratch(case);
        write_peft(&g, &values, &e, &out).unwrap();

        assert_eq!(
            raw_keys(&out.join("adapter_model.safetensors")),
            raw_keys(&dir.join("adapter_model.safetensors")),
            "{case}: keys"
        );
        // What PEFT saved: for a prompt encoder, its output as PyTorch computed it.
        let ours = read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
        let theirs = read_safetensors(&dir.join("adapter_model.safetensors")).unwrap();
        for (key, want) in &theirs {
            let got = &ours[key];
            assert_eq!(got.shape, want.shape, "{case}: {key}");
            let error = relative_l2(&got.data, &want.data);
            assert!(
                error <= 1e-6,
                "{case}: {key} differs from PEFT's by {error:e}"
            );
        }

        // The written config describes the same adapter.
        let reread = format!("experiment e {{ model = hf(\"gpt2_tiny\"), adapter = peft(\"{}\"), train {{ batch = 2, seq_len = 12 }} }}", out.display());
        let checked = kiln_compiler::check_source("export.kiln", &reread, Some(&fixtures()));
        assert!(checked.is_ok(), "{}", checked.render_errors());
        assert_eq!(
            format!("{:?}", checked.module.experiments[0].value.adapters),
            format!("{:?}", e.adapters),
            "{case}: config"
        );
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let fixture: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        // A virtual-token adapter's config holds every field PEFT wrote, with PEFT's value
        // (LoRA's and IA3's name their targets by suffix and leave newer fields to PEFT's defaults).
        if !matches!(case, "clm_lora" | "clm_ia3") {
            for (key, want) in fixture.as_object().unwrap() {
                if [
                    "auto_mapping",
                    "base_model_name_or_path",
                    "peft_version",
                    "init_weights",
                ]
                .contains(&key.as_str())
                {
                    continue;
                }
                assert_eq!(&config[key], want, "{case}: `{key}`");
            }
        }
        std::fs::remove_dir_all(&out).ok();
    }
}

/// Deterministic non-zero numbers (a fresh LoRA B is not zero).
fn filler(p: &kiln_compiler::graph::Param, k: usize) -> HostTensor {
    let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
    let n = shape.iter().product::<usize>();
    let data = (0..n)
        .map(|i| (((i + k) * 37 % 101) as f32 - 50.0) * 1e-3)
        .collect();
    HostTensor { shape, data }
}

/// Values for `g` from `files`, the rest filled deterministically.
fn values_of(g: &Graph, files: &[(PathBuf, BTreeMap<String, HostTensor>)]) -> Vec<HostTensor> {
    bind(g, files)
        .unwrap()
        .into_iter()
        .zip(&g.params)
        .map(|(v, p)| v.unwrap_or_else(|| filler(p, 0)))
        .collect()
}

/// The loss of `g` with `values` on a fixed batch (causal and MLM labels alike).
fn loss(g: &Graph, values: &[HostTensor]) -> f32 {
    let ids: Vec<Vec<i64>> = (0..2)
        .map(|r| (0..12).map(|c| (r * 31 + c * 7) % 50).collect())
        .collect();
    let mut batch = Batch::default();
    batch.ints.insert("input_ids".into(), ids.clone());
    batch.ints.insert("labels".into(), ids.clone());
    batch.ints.insert("mlm_labels".into(), ids);
    forward_backward(g, values, &batch, Format::F32)
        .unwrap()
        .loss
}

fn base_files() -> Vec<(PathBuf, BTreeMap<String, HostTensor>)> {
    let base = fixtures().join("gpt2_tiny/model.safetensors");
    let tensors = read_safetensors(&base).unwrap();
    vec![(base, tensors)]
}

/// An exported prompt is the prompt the encoder computed: loaded as a plain table (as PEFT loads
/// it for inference, and as Kiln's `checkpoint = "dir"` does), the model computes the loss it
/// computed with the encoder. Loaded back as `peft("dir")`, a plain table binds, and an encoder's
/// output is refused with a way to load it.
#[test]
fn exported_prompts_compute_what_their_encoders_did() {
    for (name, adapter, plain, encoded) in [
        ("prompt", "prompt { tokens = 5 }", "prompt", false),
        ("prefix", "prefix { tokens = 5 }", "prefix", false),
        (
            "prefix_proj",
            "prefix { tokens = 5, projection = 16 }",
            "prefix",
            true,
        ),
        (
            "ptuning_mlp",
            "ptuning { tokens = 5, encoder = mlp, hidden = 16 }",
            "prompt",
            true,
        ),
        (
            "ptuning_lstm",
            "ptuning { tokens = 5, encoder = lstm, hidden = 8 }",
            "prompt",
            true,
        ),
    ] {
        let model = "model = hf(\"gpt2_tiny\"), train { batch = 2, seq_len = 12 }";
        let (e, g) = graph_of(&format!("experiment e {{ {model}, adapter = {adapter} }}"));
        let values = values_of(&g, &base_files());
        let with_encoder = loss(&g, &values);
        let out = scratch(name);
        write_peft(&g, &values, &e, &out).unwrap();
        let saved = out.join("adapter_model.safetensors");
        let tensors = read_safetensors(&saved).unwrap();
        assert_eq!(
            tensors.keys().collect::<Vec<_>>(),
            ["prompt_embeddings"],
            "{name}"
        );

        let table = format!(
            "experiment t {{ {model}, adapter = {plain} {{ tokens = 5, checkpoint = \"{}\" }} }}",
            out.display()
        );
        let (_, plain_graph) = graph_of(&table);
        let mut files = vec![(
            saved.clone(),
            from_peft(&plain_graph, tensors.clone()).unwrap(),
        )];
        files.extend(base_files());
        assert!(
            bind(&plain_graph, &files)
                .unwrap()
                .iter()
                .all(Option::is_some),
            "{name}: the table binds"
        );
        let from_table = loss(&plain_graph, &values_of(&plain_graph, &files));
        assert!(
            (with_encoder - from_table).abs() <= 1e-5 * with_encoder.abs(),
            "{name}: with the encoder {with_encoder}, from the exported table {from_table}"
        );

        let (_, reread) = graph_of(&format!(
            "experiment r {{ {model}, adapter = peft(\"{}\") }}",
            out.display()
        ));
        match from_peft(&reread, tensors) {
            Ok(bound) => assert!(!encoded && bound.contains_key("prompt_encoder.embedding.weight")),
            Err(err) => {
                assert!(encoded, "{name}: {err}");
                assert!(
                    err.contains("cannot be recovered")
                        && err.contains(&format!("`adapter = {plain} {{ tokens = 5")),
                    "{name}: {err}"
                );
            }
        }
        std::fs::remove_dir_all(&out).ok();
    }
}

/// Under grouped-query attention PEFT sizes prefixes by the key/value heads (its
/// `_prepare_prompt_learning_config`): LLaMA-tiny's 2 of 4 heads of 12 make `token_dim` 24.
#[test]
fn prefix_configs_count_key_value_heads() {
    let (e, g) = graph_of(
        "experiment e { model = hf(\"llama_tiny\"), adapter = prefix { tokens = 5 }, train { batch = 2, seq_len = 12 } }",
    );
    let files = [(
        fixtures().join("llama_tiny/model.safetensors"),
        read_safetensors(&fixtures().join("llama_tiny/model.safetensors")).unwrap(),
    )];
    let out = scratch("gqa");
    write_peft(&g, &values_of(&g, &files), &e, &out).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            &config["token_dim"],
            &config["num_attention_heads"],
            &config["encoder_hidden_size"]
        ),
        (
            &serde_json::json!(24),
            &serde_json::json!(2),
            &serde_json::json!(24)
        )
    );
    let saved = read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    // Layers × (key, value) × token_dim.
    assert_eq!(saved["prompt_embeddings"].shape, [5, 2 * 2 * 24]);
    std::fs::remove_dir_all(&out).ok();
}

/// A virtual-token adapter trained on BERT's masked LM is exported with the task type under
/// which PEFT runs it as Kiln did, the one PEFT saved the parity cases with (without a task
/// type `PeftModel` never adds the prompt).
#[test]
fn masked_lm_prompts_export_as_token_classification() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/bert_tiny");
    for case in ["mlm_prompt", "mlm_ptuning_mlp", "mlm_ptuning_lstm"] {
        let peft: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(case).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let src = format!(
            "experiment e {{ model = hf(\"{}\"), objective = mlm, adapter = peft(\"{}\"), train {{ batch = 2, seq_len = 12 }} }}",
            dir.display(),
            dir.join(case).display()
        );
        let (e, g) = graph_of(&src);
        let ours = peft_config(&g, &e).unwrap();
        for key in ["task_type", "peft_type", "num_virtual_tokens", "token_dim"] {
            assert_eq!(ours[key], peft[key], "{case}: {key}");
        }
    }
}

/// A run's directory whose final checkpoint (step 1 of 1) holds `tensors` as its trained
/// parameters.
fn fake_run(what: &str, tensors: &BTreeMap<String, HostTensor>) -> PathBuf {
    let runs = scratch(what);
    let bytes = tensor_bytes(tensors);
    let state = serde_json::json!({
        "step": 1, "total": 1, "loss": 0.0, "first_loss": 0.0, "rng": 0, "order": [],
        "cursor": 0, "tokens": 0, "fingerprint": "",
    })
    .to_string();
    let files = [
        ("trainable.safetensors", bytes.as_slice()),
        ("state.json", state.as_bytes()),
    ];
    kiln_runtime::store::run_dir::RunDir::lock(&runs, "e")
        .unwrap()
        .save(1, &files, 1)
        .unwrap();
    runs
}

/// The merged model in `dir`, read back with `hf()` and no adapter.
fn merged_model(dir: &Path, objective: &str) -> (Experiment, Graph, Vec<HostTensor>) {
    let (e, g) = graph_of(&format!(
        "experiment m {{ model = hf(\"{}\"), objective = {objective}, train {{ batch = 2, seq_len = 12 }} }}",
        dir.display()
    ));
    let path = dir.join("model.safetensors");
    let files = [(path.clone(), read_safetensors(&path).unwrap())];
    let values = bind(&g, &files)
        .unwrap()
        .into_iter()
        .zip(&g.params)
        .map(|(v, p)| v.unwrap_or_else(|| panic!("the merged model has no `{}`", p.name)))
        .collect();
    (e, g, values)
}

/// `kiln export --merged`: the merged model, read back with `hf()` and no adapter, computes the
/// loss the base model with its adapter computes — for LoRA on whole modules (PEFT's own files)
/// and on the query/value slices of GPT-2's fused c_attn.
#[test]
fn merged_lora_computes_what_base_and_adapter_compute() {
    for (name, adapter) in [
        ("peft", "peft(\"gpt2_tiny/clm_lora\")"),
        (
            "split",
            "lora { rank = 4, alpha = 8, targets = [query, value, c_fc] }",
        ),
    ] {
        let (e, g) = graph_of(&format!("experiment e {{ model = hf(\"gpt2_tiny\"), adapter = {adapter}, train {{ batch = 2, seq_len = 12 }} }}"));
        // The run's checkpoint: the adapter's tensors (PEFT's, or made up for the split case).
        let adapter_tensors: BTreeMap<String, HostTensor> = match name {
            "peft" => {
                read_safetensors(&fixtures().join("gpt2_tiny/clm_lora/adapter_model.safetensors"))
                    .unwrap()
            }
            _ => g
                .params
                .iter()
                .filter(|p| p.trainable)
                .enumerate()
                .map(|(k, p)| (p.name.clone(), filler(p, k)))
                .collect(),
        };
        let runs = fake_run(&format!("merged-{name}"), &adapter_tensors);
        let out = runs.join("merged");
        export_merged(&common::program(&e).unwrap(), &runs, &out).unwrap();

        let mut files = vec![(runs.clone(), adapter_tensors)];
        files.extend(base_files());
        let with_adapter = loss(&g, &values_of(&g, &files));
        let (_, merged_graph, merged_values) = merged_model(&out, "causal_lm");
        let merged = loss(&merged_graph, &merged_values);
        assert!(
            (with_adapter - merged).abs() <= 1e-5 * with_adapter.abs(),
            "{name}: base + adapter {with_adapter}, merged {merged}"
        );
        // And the adapter matters: the base alone computes something else.
        let (_, plain) = graph_of(
            "experiment b { model = hf(\"gpt2_tiny\"), train { batch = 2, seq_len = 12 } }",
        );
        let alone = loss(&plain, &values_of(&plain, &base_files()));
        assert!(
            (alone - merged).abs() > 1e-4,
            "{name}: base {alone}, merged {merged}"
        );
        std::fs::remove_dir_all(&runs).ok();
    }
}

/// A model defined in Kiln merges into a Hugging Face checkpoint too: its `config.json` reads
/// back (through `hf()`) as the same model, and the merged weights — the run's initialisation
/// with LoRA merged, or every weight of a fully trained run — compute the run's loss.
#[test]
fn models_defined_in_kiln_merge_into_hugging_face_checkpoints() {
    let small = "vocab = 64, positions = 16, hidden = 32, layers = 2, heads = 4";
    for (name, model, objective, adapter) in [
        ("gpt2", format!("gpt2 {{ {small}, ffn = 48 }}"), "causal_lm", "lora { rank = 2, targets = [c_attn, c_fc] }"),
        ("gpt2_full", format!("gpt2 {{ {small}, activation = gelu, tie_embeddings = false }}"), "causal_lm", ""),
        ("bert", format!("bert_base {{ {small} }}"), "mlm", "lora { rank = 2, targets = [query, value] }"),
        ("llama", format!("llama_7b {{ {small}, kv_heads = 2, ffn = 40, position = rotary {{ theta = 500 }} }}"), "causal_lm", "lora { rank = 2, targets = [q_proj, v_proj, down_proj] }"),
    ] {
        let adapter = if adapter.is_empty() { String::new() } else { format!("adapter = {adapter},") };
        let (e, g) = graph_of(&format!(
            "import std.models.gpt2\nimport std.models.bert\nimport std.models.llama\nexperiment e {{ model = {model}, objective = {objective}, {adapter} train {{ batch = 2, seq_len = 12, seed = 3 }} }}"
        ));
        let trained: BTreeMap<String, HostTensor> = g
            .params
            .iter()
            .filter(|p| p.trainable)
            .enumerate()
            .map(|(k, p)| (p.name.clone(), filler(p, k)))
            .collect();
        let runs = fake_run(&format!("kiln-{name}"), &trained);
        let out = runs.join("merged");
        export_merged(&common::program(&e).unwrap(), &runs, &out).unwrap();

        let (back, merged_graph, merged_values) = merged_model(&out, objective);
        let described = |m: &kiln_compiler::spec::Model| {
            let mut v = serde_json::to_value(m).unwrap();
            for field in ["name", "checkpoint", "output_heads"] {
                v.as_object_mut().unwrap().remove(field);
            }
            v
        };
        assert_eq!(described(&back.model), described(&e.model), "{name}: config.json");

        // The run's values: its initialisation, the trained parameters in place.
        let values: Vec<HostTensor> = kiln_runtime::train::initialise(&g, e.train.seed)
            .into_iter()
            .zip(&g.params)
            .map(|(v, p)| trained.get(&p.name).cloned().unwrap_or(v))
            .collect();
        let run_loss = loss(&g, &values);
        let merged = loss(&merged_graph, &merged_values);
        assert!(
            (run_loss - merged).abs() <= 1e-5 * run_loss.abs(),
            "{name}: run {run_loss}, merged {merged}"
        );
        std::fs::remove_dir_all(&runs).ok();
    }
}

#[test]
fn merging_refuses_what_it_cannot_write() {
    let (e, _) = graph_of("experiment e { model = hf(\"gpt2_tiny\"), adapter = ia3 { targets = [\"c_attn\", \"mlp.c_proj\"], feedforward = [\"mlp.c_proj\"] }, train { batch = 2, seq_len = 12 } }");
    let err = export_merged(
        &common::program(&e).unwrap(),
        Path::new("runs"),
        Path::new("out"),
    )
    .unwrap_err();
    assert!(
        err.0.contains("only one plain LoRA adapter merges"),
        "{}",
        err.0
    );
    // Knobs transformers' config for the family has no field for, and heads it has no class for.
    for (model, knob, objective, says) in [
        (
            "gpt2",
            "mlp = gated,",
            "causal_lm",
            "GPT2Config cannot describe this model's `mlp`",
        ),
        (
            "llama_7b",
            "norm = layernorm { eps = 1e-5 }, kv_heads = 4,",
            "causal_lm",
            "LlamaConfig cannot describe this model's `norm`",
        ),
        (
            "bert_base",
            "type_vocab = 0,",
            "mlm",
            "BertConfig cannot describe this model's `type_vocab`",
        ),
        (
            "bert_base",
            "output_heads = [lm],",
            "causal_lm",
            "not those of a transformers BERT class",
        ),
    ] {
        let (e, g) = graph_of(&format!(
            "import std.models.gpt2\nimport std.models.bert\nimport std.models.llama\nexperiment e {{ model = {model} {{ {knob} vocab = 64, positions = 16, hidden = 32, layers = 1, heads = 4 }}, objective = {objective}, adapter = lora {{ rank = 2 }}, train {{ batch = 2, seq_len = 12 }} }}"
        ));
        let lora: BTreeMap<String, HostTensor> = g
            .params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| (p.name.clone(), filler(p, 0)))
            .collect();
        let runs = fake_run("refused", &lora);
        let err =
            export_merged(&common::program(&e).unwrap(), &runs, &runs.join("out")).unwrap_err();
        assert!(err.0.contains(says), "{model}: {}", err.0);
        assert!(!runs.join("out").exists(), "{model}: nothing written");
        std::fs::remove_dir_all(&runs).ok();
    }
}
