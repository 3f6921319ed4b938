//! The language's evaluation rules: late binding through inheritance, merging versus
//! replacing an inherited record, presets, and units.

use kiln::compiler::spec::{Length, Objective};

fn check(src: &str) -> kiln::compiler::CheckedFile {
    let checked = kiln::compiler::check_source("semantics.kiln", src, None);
    assert!(checked.is_ok(), "{}", checked.render_errors());
    checked
}

const BASE: &str = "
import std.models.gpt2
experiment long {
  model = gpt2 { layers = 2 }
  train { batch = 16, steps = 1000, seq_len = 64, seed = 3 }
}
";

#[test]
fn overriding_a_field_rebinds_fields_computed_from_it() {
    let c = check(&format!("{BASE}\nexperiment wide = long {{ model = gpt2 {{ layers = 2, hidden = 256, heads = 4 }} }}"));
    let m = &c.module.experiments[1].value.model;
    assert_eq!(
        (m.hidden, m.ffn),
        (256, 1024),
        "ffn = 4 * hidden follows the override"
    );
}

#[test]
fn a_block_merges_into_the_inherited_record() {
    let c = check(&format!(
        "{BASE}\nexperiment short = long {{ train {{ steps = 10 }} }}"
    ));
    let t = &c.module.experiments[1].value.train;
    assert_eq!(t.length, Length::Steps(10));
    assert_eq!(
        (t.batch, t.seq_len, t.seed),
        (16, 64, 3),
        "the other train fields are kept"
    );
}

#[test]
fn an_assignment_replaces_the_inherited_record() {
    let c = check(&format!(
        "{BASE}\nexperiment fresh = long {{ train = {{ steps = 10 }} }}"
    ));
    let t = &c.module.experiments[1].value.train;
    assert_eq!(t.length, Length::Steps(10));
    assert_eq!(
        (t.batch, t.seed),
        (8, 0),
        "defaults, not the parent's values"
    );
}

#[test]
fn a_preset_verbalizer_is_replaced_not_merged() {
    let c = check(
        "import std.models.bert\nimport std.objectives.pet\n\
         experiment e { model = bert_tiny, objective = yelp_p1 { verbalizer = { bad: \"awful\", good: \"superb\" } } }",
    );
    let Objective::Pvp(p) = &c.module.experiments[0].value.objective else {
        panic!("a PET objective")
    };
    assert_eq!(
        p.verbalizer,
        vec![
            ("bad".to_string(), "awful".to_string()),
            ("good".to_string(), "superb".to_string())
        ]
    );
    assert!(p.pattern.contains("[MASK]"), "the preset's pattern is kept");
}

#[test]
fn units_and_arithmetic_reach_the_spec_in_si() {
    let c = check(
        "import std.models.gpt2\nimport std.clusters\n\
         node half = dgx_a100 { inter_bandwidth = 4 * 200Gb/s, intra_latency = 3us }\n\
         experiment e { model = gpt2, parallel { mesh = half * 2, plan = auto } }",
    );
    let mesh = &c.module.experiments[0].value.parallel.mesh;
    assert_eq!(mesh.devices(), 16);
    assert_eq!(mesh.node.inter_bandwidth, 100e9, "4 × 200 Gb/s = 100 GB/s");
    assert!((mesh.node.intra_latency - 3e-6).abs() < 1e-18);
    assert_eq!(mesh.node.device.memory, 80e9);
}

/// PPO's knobs added after its first release serialise only when set: a spec (and so a
/// checkpoint's fingerprint) written before them reads the same.
#[test]
fn later_ppo_knobs_serialise_only_when_set() {
    let src = "import std.models.gpt2\n\
        experiment reward { model = gpt2 { layers = 2, output_heads = [reward] }, objective = reward, train { batch = 4, steps = 1, seq_len = 32 } }\n\
        experiment plain { model = gpt2 { layers = 2, output_heads = [lm, value] }, objective = ppo { reward_model = reward }, train { batch = 4, steps = 1, seq_len = 32 } }\n\
        experiment tuned = plain { objective = ppo { reward_model = reward, temperature = 0.7, kl_target = 6, kl_horizon = 500 } }\n";
    let c = check(src);
    let objective =
        |i: usize| serde_json::to_value(&c.module.experiments[i].value.objective).unwrap();
    let (plain, tuned) = (objective(1), objective(2));
    for key in ["temperature", "kl_target", "kl_horizon"] {
        assert!(plain.get(key).is_none(), "{key} in {plain}");
        assert!(tuned.get(key).is_some(), "{key} missing from {tuned}");
    }
}

/// A UTF-8 byte order mark, which some editors write, is skipped in a file and in the files
/// it imports (`tests/ui/resolve/bom/common.kiln` starts with one).
#[test]
fn a_byte_order_mark_starts_a_file_like_nothing() {
    let c = check(&format!("\u{feff}{BASE}"));
    assert_eq!(c.module.experiments[0].value.model.layers, 2);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/resolve/bom");
    let imported = kiln::compiler::check_source(
        "bom.kiln",
        "\u{feff}import \"common.kiln\"\nmodel fixed = gpt2 { layers = 2 }\n",
        Some(&dir),
    );
    let errors = imported.render_errors();
    assert!(
        !errors.contains("K0001") && errors.contains("common.kiln:2:15"),
        "only the imported file's misspelt model, at its column:\n{errors}"
    );
}

/// Without a written seq_len, a sequence fills the learned positions that the virtual tokens
/// of a prefix or prompt leave (lowering places the real tokens after them).
#[test]
fn the_default_sequence_leaves_room_for_virtual_tokens() {
    let c = check(
        "import std.models.gpt2\n\
         experiment e { model = gpt2, adapter = prefix { tokens = 24 } }",
    );
    assert_eq!(c.module.experiments[0].value.train.seq_len, 1024 - 24);
}

/// Every size limit's largest value is accepted; one more is an error at the field.
#[test]
fn sizes_are_accepted_up_to_their_limit() {
    use kiln::compiler::spec::limits::{HIDDEN, LAYERS, VIRTUAL_TOKENS};
    let at = |layers: u64, hidden: u64, tokens: u64| {
        kiln::compiler::check_source(
            "limits.kiln",
            &format!(
                "import std.models.llama\n\
                 experiment e {{ model = llama_7b {{ layers = {layers}, hidden = {hidden}, heads = 1, kv_heads = 1 }}, \
                 adapter = prompt {{ tokens = {tokens} }}, train {{ seq_len = 16 }} }}"
            ),
            None,
        )
    };
    let c = at(LAYERS.max, HIDDEN.max, VIRTUAL_TOKENS.max);
    assert!(c.is_ok(), "{}", c.render_errors());
    for (layers, hidden, tokens, field) in [
        (LAYERS.max + 1, HIDDEN.max, VIRTUAL_TOKENS.max, "layers"),
        (LAYERS.max, HIDDEN.max + 1, VIRTUAL_TOKENS.max, "hidden"),
        (LAYERS.max, HIDDEN.max, VIRTUAL_TOKENS.max + 1, "tokens"),
    ] {
        let errors = at(layers, hidden, tokens).render_errors();
        assert!(
            errors.contains(&format!("{field} = ")) && errors.contains("above Kiln's limit"),
            "{errors}"
        );
    }
}
