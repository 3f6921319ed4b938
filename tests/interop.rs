//! `hf("dir")` and `peft("dir")` read the Hugging Face and PEFT files of the shared reference
//! fixtures into the same spec a hand-written model or adapter gives.

use kiln::compiler::spec::{Activation, Adapter, Family, Mlp, Norm, Position, Target};
use std::path::Path;

fn fixtures() -> &'static Path {
    // The shared reference material sits beside the repository.
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures"))
}

fn check(src: &str) -> kiln::compiler::CheckedFile {
    let checked = kiln::compiler::check_source("interop.kiln", src, Some(fixtures()));
    assert!(checked.is_ok(), "{}", checked.render_errors());
    checked
}

#[test]
fn hf_gpt2_config() {
    let c = check("experiment e { model = hf(\"gpt2_tiny\") }");
    let m = &c.module.experiments[0].value.model;
    assert_eq!(
        (
            m.family,
            m.vocab,
            m.positions,
            m.hidden,
            m.layers,
            m.heads,
            m.ffn
        ),
        (Family::Gpt2, 128, 64, 48, 2, 4, 192)
    );
    assert_eq!(
        (m.activation, m.norm, m.tie_embeddings),
        (Activation::GeluTanh, Norm::Layernorm { eps: 1e-5 }, true)
    );
    // Origins point into the config file.
    let from = c.module.experiments[0]
        .origins
        .describe("model.hidden", &c.program.sources.borrow());
    assert!(from.ends_with("gpt2_tiny/config.json:15"), "{from}");
}

#[test]
fn hf_bert_and_llama_configs() {
    let c = check("experiment b { model = hf(\"bert_tiny\"), objective = mlm + nsp }\nexperiment l { model = hf(\"llama_tiny\") { layers = 1 } }");
    let b = &c.module.experiments[0].value.model;
    assert_eq!(
        (b.family, b.hidden, b.ffn, b.type_vocab, b.norm),
        (Family::Bert, 48, 96, 2, Norm::Layernorm { eps: 1e-12 })
    );
    let l = &c.module.experiments[1].value.model;
    assert_eq!(
        (l.family, l.kv_heads, l.mlp, l.tie_embeddings, l.bias),
        (Family::Llama, 2, Mlp::Gated, false, false)
    );
    assert_eq!(l.position, Position::Rotary { theta: 10000.0 });
    assert_eq!(l.layers, 1, "overrides apply on top of an imported config");
    let from = c.module.experiments[1]
        .origins
        .describe("model.position.theta", &c.program.sources.borrow());
    assert!(
        from.contains("llama_tiny/config.json:"),
        "theta is read from the nested rope_parameters: {from}"
    );
}

#[test]
fn peft_adapter_configs() {
    let c = check(
        "experiment lora { model = hf(\"gpt2_tiny\"), adapter = peft(\"gpt2_tiny/clm_lora\") }\n\
         experiment ia3 { model = hf(\"gpt2_tiny\"), adapter = peft(\"gpt2_tiny/clm_ia3\") }\n\
         experiment prefix { model = hf(\"gpt2_tiny\"), adapter = peft(\"gpt2_tiny/clm_prefix_proj\") }\n\
         experiment ptuning { model = hf(\"gpt2_tiny\"), adapter = peft(\"gpt2_tiny/clm_ptuning_mlp\") }",
    );
    let adapter = |i: usize| c.module.experiments[i].value.adapters[0].clone();
    match adapter(0) {
        Adapter::Lora(l) => {
            assert_eq!((l.rank, l.alpha, l.dropout), (4, 8.0, 0.0));
            // `c_proj` suffix-matches both GPT-2 projections, as in PEFT.
            assert_eq!(
                l.targets,
                vec![Target::Qkv, Target::AttnOut, Target::FfnDown]
            );
        }
        other => panic!("{other:?}"),
    }
    match adapter(1) {
        Adapter::Ia3 {
            targets,
            feedforward,
        } => {
            assert_eq!(targets, vec![Target::Qkv, Target::FfnDown]);
            assert_eq!(feedforward, vec![Target::FfnDown]);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(
            adapter(2),
            Adapter::Prefix {
                tokens: 5,
                projection: Some(32)
            }
        ),
        "{:?}",
        adapter(2)
    );
    assert!(
        matches!(
            adapter(3),
            Adapter::Ptuning {
                tokens: 5,
                hidden: 32,
                ..
            }
        ),
        "{:?}",
        adapter(3)
    );
}

#[test]
fn missing_and_corrupt_configs_are_errors() {
    let c = kiln::compiler::check_source(
        "interop.kiln",
        "experiment e { model = hf(\"nope\") }",
        Some(fixtures()),
    );
    assert!(
        c.render_errors().contains("error[K0016]"),
        "{}",
        c.render_errors()
    );
    // A PEFT directory is not a model directory.
    let c = kiln::compiler::check_source(
        "interop.kiln",
        "experiment e { model = hf(\"gpt2_tiny/clm_lora\") }",
        Some(fixtures()),
    );
    assert!(
        c.render_errors().contains("config.json"),
        "{}",
        c.render_errors()
    );
}
