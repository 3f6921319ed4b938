//! PEFT export round trip: an adapter read from PEFT's own files and written back holds the same
//! tensors under the same keys, and its config reads back to the same adapter.

use kiln_compiler::graph::compile_graph;
use kiln_runtime::checkpoint::{bind, read_safetensors, HostTensor};
use kiln_runtime::exec::{forward_backward, Batch};
use kiln_runtime::export::write_peft;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

fn graph_of(src: &str) -> (kiln_compiler::spec::Experiment, kiln_compiler::graph::Graph) {
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

#[test]
fn peft_adapters_round_trip() {
    for case in ["clm_lora", "clm_ia3", "clm_prompt", "clm_prefix"] {
        let dir = fixtures().join("gpt2_tiny").join(case);
        let src = format!("experiment e {{ model = hf(\"gpt2_tiny\"), adapter = peft(\"gpt2_tiny/{case}\"), train {{ batch = 2, seq_len = 12 }} }}");
        let (e, g) = graph_of(&src);
        // Prompt methods' PEFT files hold the virtual tokens; the trainable file holds the table
        // (the same values when there is no encoder).
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
        let out = std::env::temp_dir().join(format!("kiln-export-{case}-{}", std::process::id()));
        write_peft(&g, &values, &e, &out).unwrap();

        assert_eq!(
            raw_keys(&out.join("adapter_model.safetensors")),
            raw_keys(&dir.join("adapter_model.safetensors")),
            "{case}: keys"
        );
        let ours = read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
        let theirs = read_safetensors(&dir.join("adapter_model.safetensors")).unwrap();
        assert_eq!(ours, theirs, "{case}: tensors");

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
        assert_eq!(config["inference_mode"], true);
        std::fs::remove_dir_all(&out).ok();
    }
}

/// Loss of `g` on a fixed batch, with the values bound from `files` (the rest filled with
/// deterministic non-zero numbers, so that a fresh LoRA B is not zero).
fn loss_of(
    g: &kiln_compiler::graph::Graph,
    files: &[(PathBuf, BTreeMap<String, HostTensor>)],
) -> f32 {
    let values: Vec<HostTensor> = bind(g, files)
        .unwrap()
        .into_iter()
        .zip(&g.params)
        .map(|(v, p)| {
            v.unwrap_or_else(|| {
                let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
                let n = shape.iter().product::<usize>();
                let data = (0..n)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
                    .collect();
                HostTensor { shape, data }
            })
        })
        .collect();
    let ids: Vec<Vec<i64>> = (0..2)
        .map(|r| (0..12).map(|c| (r * 31 + c * 7) % 50).collect())
        .collect();
    let mut batch = Batch::default();
    batch.ints.insert("input_ids".into(), ids.clone());
    batch.ints.insert("labels".into(), ids);
    forward_backward(g, &values, &batch).unwrap().loss
}

/// `kiln export --merged`: the merged model, read back with `hf()` and no adapter, computes the
/// loss the base model with its adapter computes — for LoRA on whole modules (PEFT's own files)
/// and on the query/value slices of GPT-2's fused c_attn.
#[test]
fn merged_lora_computes_what_base_and_adapter_compute() {
    for (name, adapter) in [
        ("peft", "peft(\"gpt2_tiny/clm_lora\")".to_string()),
        (
            "split",
            "lora { rank = 4, alpha = 8, targets = [query, value, c_fc] }".to_string(),
        ),
    ] {
        let src = format!("experiment e {{ model = hf(\"gpt2_tiny\"), adapter = {adapter}, train {{ batch = 2, seq_len = 12 }} }}");
        let (e, g) = graph_of(&src);
        let base = fixtures().join("gpt2_tiny/model.safetensors");
        let base_tensors = read_safetensors(&base).unwrap();
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
                .map(|(k, p)| {
                    let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
                    let n = shape.iter().product::<usize>();
                    let data = (0..n)
                        .map(|i| (((i + k) * 13 % 29) as f32 - 14.0) * 4e-3)
                        .collect();
                    (p.name.clone(), HostTensor { shape, data })
                })
                .collect(),
        };
        let runs = std::env::temp_dir().join(format!("kiln-merged-{name}-{}", std::process::id()));
        let checkpoint = runs.join("e/checkpoint");
        std::fs::create_dir_all(&checkpoint).unwrap();
        let bytes = kiln_runtime::checkpoint::safetensors_bytes(
            adapter_tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.shape.clone(), t.data.as_slice()))
                .collect(),
        )
        .unwrap();
        std::fs::write(checkpoint.join("trainable.safetensors"), bytes).unwrap();
        let out = runs.join("merged");
        kiln_runtime::export::export_merged(&e, &runs, &out).unwrap();

        let with_adapter = loss_of(
            &g,
            &[
                (checkpoint.join("trainable.safetensors"), adapter_tensors),
                (base.clone(), base_tensors),
            ],
        );
        let merged_src = format!(
            "experiment m {{ model = hf(\"{}\"), train {{ batch = 2, seq_len = 12 }} }}",
            out.display()
        );
        let (_, merged_graph) = graph_of(&merged_src);
        let merged_path = out.join("model.safetensors");
        let merged = loss_of(
            &merged_graph,
            &[(merged_path.clone(), read_safetensors(&merged_path).unwrap())],
        );
        assert!(
            (with_adapter - merged).abs() <= 1e-5 * with_adapter.abs(),
            "{name}: base + adapter {with_adapter}, merged {merged}"
        );
        // And the adapter matters: the base alone computes something else.
        let (_, plain) = graph_of(
            "experiment b { model = hf(\"gpt2_tiny\"), train { batch = 2, seq_len = 12 } }",
        );
        let alone = loss_of(&plain, &[(base.clone(), read_safetensors(&base).unwrap())]);
        assert!(
            (alone - merged).abs() > 1e-4,
            "{name}: base {alone}, merged {merged}"
        );
        std::fs::remove_dir_all(&runs).ok();
    }
}

#[test]
fn merging_needs_a_hugging_face_base_and_lora() {
    let (e, _) = graph_of("experiment e { model = hf(\"gpt2_tiny\"), adapter = ia3 { targets = [\"c_attn\", \"mlp.c_proj\"], feedforward = [\"mlp.c_proj\"] }, train { batch = 2, seq_len = 12 } }");
    let err =
        kiln_runtime::export::export_merged(&e, Path::new("runs"), Path::new("out")).unwrap_err();
    assert!(
        err.0.contains("only one plain LoRA adapter merges"),
        "{}",
        err.0
    );
    let (e, _) = graph_of("import std.models.gpt2\nexperiment e { model = gpt2 { layers = 1, hidden = 32, heads = 2, vocab = 64, positions = 16 }, adapter = lora { rank = 2 }, train { batch = 2, seq_len = 12 } }");
    let err =
        kiln_runtime::export::export_merged(&e, Path::new("runs"), Path::new("out")).unwrap_err();
    assert!(err.0.contains("not loaded from one"), "{}", err.0);
}
