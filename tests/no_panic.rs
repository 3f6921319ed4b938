//! No input makes the front end panic: random bytes, random token soup, and mutations of
//! every example (deletions, duplications, insertions of grammar fragments).

use proptest::prelude::*;
use std::path::Path;

fn check(text: &str) {
    // Checked against the examples directory so relative paths and imports resolve.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let _ = kiln::compiler::check_source("fuzz.kiln", text, Some(&dir));
}

fn examples() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "kiln")
                .then(|| std::fs::read_to_string(p).ok())
                .flatten()
        })
        .collect();
    out.sort();
    out
}

const FRAGMENTS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    "=",
    ",",
    ":",
    "\"",
    "+",
    "-",
    "*",
    "/",
    "0",
    "1e999",
    "9999999999999999999999",
    "80GiB",
    "1f1b",
    "model",
    "experiment",
    "import",
    "import std.models.gpt2",
    "a.b.c",
    "{x}",
    "[MASK]",
    "%",
    "cpu(0)",
    "cpu(-1)",
    "hf(\"nope\")",
    "peft(1)",
    "dgx_a100 * 0",
    "x = x",
    "\\",
    "\u{e9}",
    "\n",
    "//",
    "/*",
    "layers = 0",
    "heads = 7",
    "mlm + nsp",
    "lora {}",
    "interleaved(0)",
    "classifier(1)",
    "steps = 1, epochs = 1",
];

fn mutate(base: &str, ops: &[(u8, usize, usize)]) -> String {
    let mut s: Vec<char> = base.chars().collect();
    for &(kind, at, which) in ops {
        let at = if s.is_empty() { 0 } else { at % (s.len() + 1) };
        match kind % 3 {
            0 => {
                let end = (at + which % 12).min(s.len());
                s.drain(at..end);
            }
            1 => {
                let frag: Vec<char> = FRAGMENTS[which % FRAGMENTS.len()].chars().collect();
                s.splice(at..at, frag);
            }
            _ => {
                let end = (at + which % 40).min(s.len());
                let copy: Vec<char> = s[at..end].to_vec();
                s.splice(at..at, copy);
            }
        }
    }
    s.into_iter().collect()
}

#[test]
fn deep_nesting_and_long_chains_are_errors_not_stack_overflows() {
    for text in [
        format!("let x = {}{}", "[".repeat(5000), "]".repeat(5000)),
        format!("let x = {}1{}", "(".repeat(5000), ")".repeat(5000)),
        format!("let x = {}1", "1 + ".repeat(50_000)),
        format!("let x = {}1", "-".repeat(50_000)),
        format!("experiment e {}{}", "{ a ".repeat(3000), "}".repeat(3000)),
        // Each definition needs the next, so the first one evaluates the whole chain.
        (0..20_000)
            .map(|i| format!("let a{i} = a{} + 1\n", i + 1))
            .collect::<String>()
            + "let a20000 = 0\n",
        (0..20_000)
            .map(|i| format!("model m{i} = m{} {{}}\n", i + 1))
            .collect::<String>()
            + "model m20000 { family = gpt2 }\n",
    ] {
        let checked = kiln::compiler::check_source("deep.kiln", &text, None);
        assert!(!checked.is_ok());
    }
}

#[test]
fn nesting_within_and_across_definitions_multiplies_without_overflow() {
    // 250 definitions each nesting the next 120 lists deep: valid, and 30,000 levels in all.
    let text = (0..250)
        .map(|i| {
            format!(
                "let a{i} = {}a{}{}\n",
                "[".repeat(120),
                i + 1,
                "]".repeat(120)
            )
        })
        .collect::<String>()
        + "let a250 = 1\n";
    let checked = kiln::compiler::check_source("deep.kiln", &text, None);
    assert!(checked.is_ok(), "{}", checked.render_errors());
}

/// Sizes from the smallest to the largest that Kiln's limits allow
/// (`kiln_compiler::spec::limits`), by field; past them is an error (tests/semantics.rs).
const LAYERS: &[&str] = &["1", "2", "1024"];
const HIDDEN: &[&str] = &["64", "262144"];
const HEADS: &[&str] = &["1", "4", "64"];
const VOCAB: &[&str] = &["2", "16777216"];
const POSITIONS: &[&str] = &["64", "16777216"];
const FFN: &[&str] = &["1", "1048576"];
const BATCH: &[&str] = &["1", "8", "1048576"];
const SEQ_LEN: &[&str] = &["1", "64", "4096"];
const MODELS: &[&str] = &["gpt2", "bert_base", "llama_7b"];
const ADAPTERS: &[&str] = &[
    "lora { rank = 262144 }",
    "prefix { tokens = 65536 }",
    "prefix { tokens = 65536, projection = 262144 }",
    "prompt { tokens = 65536 }",
    "ptuning { tokens = 65536, encoder = lstm, hidden = 262144 }",
    "ptuning_v2 { tokens = 1 }",
    "bottleneck { reduction = 1 }",
    "ia3 {}",
];
const MESHES: &[&str] = &["cpu(1)", "cpu(2)", "dgx_h100 * 65536", "cpu(1024)"];

/// An experiment of the given sizes; the objective fits the model's family.
fn sized_experiment(
    model: &str,
    [layers, hidden, heads, vocab, positions, ffn]: [&str; 6],
    adapter: &str,
    mesh: &str,
    [batch, seq_len]: [&str; 2],
    micro_batch: bool,
) -> String {
    let objective = if model == "bert_base" {
        "mlm"
    } else {
        "causal_lm"
    };
    let micro_batch = if micro_batch { ", micro_batch = 1" } else { "" };
    format!(
        "import std.models.gpt2\nimport std.models.bert\nimport std.models.llama\nimport std.clusters\n\
         experiment sized {{\n\
           model = {model} {{ layers = {layers}, hidden = {hidden}, heads = {heads}, kv_heads = {heads}, \
             vocab = {vocab}, positions = {positions}, ffn = {ffn} }}\n\
           objective = {objective}\n\
           adapter = {adapter}\n\
           parallel {{ mesh = {mesh} }}\n\
           train {{ batch = {batch}, seq_len = {seq_len}, steps = 10, precision = bf16{micro_batch} }}\n\
         }}\n"
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// What checks clean at extreme sizes also lowers to a graph and plans (overflow checks
    /// are on in tests); what does not (heads that do not divide hidden, a sequence beyond the
    /// positions, a plan that does not fit) is a diagnostic, never a panic.
    #[test]
    fn extreme_sizes_check_lower_and_plan_without_panicking(
        model in proptest::sample::select(MODELS),
        shape in (
            proptest::sample::select(LAYERS),
            proptest::sample::select(HIDDEN),
            proptest::sample::select(HEADS),
            proptest::sample::select(VOCAB),
            proptest::sample::select(POSITIONS),
            proptest::sample::select(FFN),
        ),
        adapter in proptest::sample::select(ADAPTERS),
        mesh in proptest::sample::select(MESHES),
        batch in proptest::sample::select(BATCH),
        seq_len in proptest::sample::select(SEQ_LEN),
        micro_batch in any::<bool>(),
    ) {
        let (layers, hidden, heads, vocab, positions, ffn) = shape;
        // The stage search over the deepest models on the largest meshes takes minutes: deep
        // models are planned on one or two devices here, the largest meshes for shallow ones.
        let deepest = layers == LAYERS[LAYERS.len() - 1];
        prop_assume!(!deepest || matches!(mesh, "cpu(1)" | "cpu(2)"));
        let text = sized_experiment(
            model,
            [layers, hidden, heads, vocab, positions, ffn],
            adapter,
            mesh,
            [batch, seq_len],
            micro_batch,
        );
        let checked = kiln::compiler::check_source("sized.kiln", &text, None);
        for e in checked.module.all_experiments() {
            // A graph or plan error is fine (a plan that does not fit); a panic is not.
            if kiln::compiler::graph::compile_graph(e).is_ok() {
                let _ = kiln::compiler::plan::compile_plan(e);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn fragment_soup_does_not_panic(parts in proptest::collection::vec(0..FRAGMENTS.len(), 0..60)) {
        let text: Vec<&str> = parts.iter().map(|&i| FRAGMENTS[i]).collect();
        check(&text.join(" "));
    }

    #[test]
    fn mutated_examples_do_not_panic(example in any::<prop::sample::Index>(), ops in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<usize>()), 1..8)) {
        let all = examples();
        let base = &all[example.index(all.len())];
        check(&mutate(base, &ops));
    }
}
