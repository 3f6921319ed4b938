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
