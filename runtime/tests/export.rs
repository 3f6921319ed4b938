//! PEFT export round trip: an adapter read from PEFT's own files and written back holds the same
//! tensors under the same keys, and its config reads back to the same adapter.

use kiln_compiler::graph::compile_graph;
use kiln_runtime::checkpoint::{bind, read_safetensors, HostTensor};
use kiln_runtime::export::write_peft;
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
