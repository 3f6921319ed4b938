//! Parity with Hugging Face transformers + PEFT: every case directory under
//! `shared/fixtures/`, under `tests/fixtures/parity/` (cases made by its `make.py`) and under
//! each directory in `KILN_FIXTURES` (colon-separated) is run through its objective, and the
//! loss, every gradient and the trainable count are compared with the reference's (layout:
//! shared/fixtures/README.md), in the case's `precision` (f32 unless it says bf16 or f16).

use kiln_compiler::graph::compile_graph;
use kiln_runtime::exec::precision::Format;
use kiln_runtime::exec::{forward_backward, Batch};
use kiln_runtime::store::safetensors::{bind, read_safetensors};
use kiln_runtime::tensor::HostTensor;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn case_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.join("case.json").exists() {
                    out.push(p);
                } else {
                    stack.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

fn rows(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

/// Runs one case; `Err` says what differs.
fn run_case(dir: &Path) -> Result<String, String> {
    let case: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("case.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let model_dir = dir.parent().ok_or("case has no model directory")?;
    let inputs = &case["inputs"];
    let ids = rows(&inputs["input_ids"]);
    let (b, s) = (ids.len(), ids[0].len());
    let objective = match case["objective"].as_str().unwrap_or("") {
        "causal_lm" => "causal_lm".to_string(),
        "mlm" => "mlm".to_string(),
        "mlm+nsp" => "mlm + nsp".to_string(),
        "pvp_cloze" => {
            let classes = case["verbalizer_token_ids"].as_array().map_or(0, Vec::len);
            let labels: Vec<String> = (0..classes).map(|i| format!("c{i}: \"w{i}\"")).collect();
            format!(
                "pvp {{ pattern = \"{{text}} [MASK]\", verbalizer = {{ {} }}, mlm_weight = 0 }}",
                labels.join(", ")
            )
        }
        other => return Err(format!("objective `{other}` is not supported by this test")),
    };
    let adapter = if dir.join("adapter_config.json").exists() {
        format!("adapter = peft(\"{}\"),", dir.display())
    } else {
        String::new()
    };
    let src = format!("experiment e {{ model = hf(\"{}\"), objective = {objective}, {adapter} train {{ batch = {b}, seq_len = {s} }} }}", model_dir.display());
    let checked = kiln_compiler::check_source("parity.kiln", &src, Some(Path::new("/")));
    if !checked.is_ok() {
        return Err(checked.render_errors());
    }
    let graph = compile_graph(&checked.module.experiments[0].value)
        .map_err(|d| format!("{:?}", d.items))?;
    let expected_count = case["trainable_count"].as_u64().unwrap_or(0);
    if graph.trainable_params() != expected_count {
        return Err(format!(
            "trainable count {} vs reference {expected_count}",
            graph.trainable_params()
        ));
    }

    let mut files = vec![(
        dir.join("trainable.safetensors"),
        read_safetensors(&dir.join("trainable.safetensors")).map_err(|e| e.to_string())?,
    )];
    if dir.join("adapter_model.safetensors").exists() {
        files.push((
            dir.join("adapter_model.safetensors"),
            read_safetensors(&dir.join("adapter_model.safetensors")).map_err(|e| e.to_string())?,
        ));
    }
    files.push((
        model_dir.join("model.safetensors"),
        read_safetensors(&model_dir.join("model.safetensors")).map_err(|e| e.to_string())?,
    ));
    let bound = bind(&graph, &files).map_err(|e| e.to_string())?;
    let values: Vec<HostTensor> = bound
        .into_iter()
        .zip(&graph.params)
        .map(|(v, p)| v.ok_or_else(|| format!("no value for `{}`", p.name)))
        .collect::<Result<_, _>>()?;

    let mut ints: BTreeMap<String, Vec<Vec<i64>>> = BTreeMap::new();
    ints.insert("input_ids".into(), ids.clone());
    if !inputs["token_type_ids"].is_null() {
        ints.insert("token_type_ids".into(), rows(&inputs["token_type_ids"]));
    }
    if !inputs["labels"].is_null() {
        let key = if objective.starts_with("causal") {
            "labels"
        } else {
            "mlm_labels"
        };
        ints.insert(key.into(), rows(&inputs["labels"]));
    }
    if let Some(l) = inputs["next_sentence_label"].as_array() {
        ints.insert(
            "next_sentence_labels".into(),
            l.iter().map(|x| vec![x.as_i64().unwrap()]).collect(),
        );
    }
    if let Some(l) = inputs["class_labels"].as_array() {
        ints.insert(
            "class_labels".into(),
            l.iter().map(|x| vec![x.as_i64().unwrap()]).collect(),
        );
    }
    let batch = Batch {
        ints,
        attention_mask: (!inputs["attention_mask"].is_null())
            .then(|| rows(&inputs["attention_mask"])),
        mask_positions: inputs["mask_positions"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64().unwrap() as usize).collect()),
        class_token_ids: case["verbalizer_token_ids"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64().unwrap() as usize).collect()),
        ..Batch::default()
    };
    // bf16 and fp16 cases are autocast's (their tolerances are stated in the case:
    // `make_mixed.py`).
    let format = match case["precision"].as_str().unwrap_or("f32") {
        "f32" => Format::F32,
        "bf16" => Format::Bf16,
        "f16" => Format::F16,
        other => return Err(format!("precision `{other}` is not one Kiln computes in")),
    };
    let outcome = forward_backward(&graph, &values, &batch, format).map_err(|e| e.to_string())?;

    let expected_loss = case["expected"]["loss"].as_f64().unwrap() as f32;
    let loss_tol = case["tolerance"]["loss_rel"].as_f64().unwrap_or(1e-5) as f32;
    let loss_rel = (outcome.loss - expected_loss).abs() / expected_loss.abs();
    let mut problems = Vec::new();
    // A case in a lower precision states how far autocast's gradients lie from its f32 run:
    // Kiln's must lie at least a tenth as far from Kiln's own f32 run, or it did not compute in
    // that precision. (Gradients, not the loss: a loss averages fp16's roundings away.)
    if let (Format::Bf16 | Format::F16, Some(reference_distance)) = (
        format,
        case["autocast_distance_from_f32"]["grad_rel_l2_worst"].as_f64(),
    ) {
        let f32_run =
            forward_backward(&graph, &values, &batch, Format::F32).map_err(|e| e.to_string())?;
        let moved = outcome
            .grads
            .iter()
            .zip(&f32_run.grads)
            .filter_map(|(g, r)| Some(relative_l2(g.as_ref()?, r.as_ref()?, 0.0)))
            .fold(0.0, f64::max);
        if moved < 0.1 * reference_distance {
            problems.push(format!(
                "gradients {moved:.1e} from Kiln's f32 run at most (autocast's: {reference_distance:.1e}): not computed in {}",
                case["precision"].as_str().unwrap_or("its precision")
            ));
        }
    }
    if loss_rel > loss_tol {
        problems.push(format!(
            "loss {} vs {expected_loss} (rel {loss_rel:.2e})",
            outcome.loss
        ));
    }
    let reference = read_safetensors(&dir.join("grads.safetensors")).map_err(|e| e.to_string())?;
    let grad_tol = case["tolerance"]["grad_rel_l2"].as_f64().unwrap_or(1e-4);
    // Some gradients are zero in exact arithmetic (a key bias: softmax ignores a constant added
    // to a row of scores), so both sides hold only rounding noise; they are measured against a
    // floor of 1e-6 of the case's largest gradient instead of against their own noise.
    let floor = 1e-6
        * reference
            .values()
            .map(|t| norm(&t.data))
            .fold(0.0, f64::max);
    let mut worst = 0.0f64;
    for (p, g) in graph.params.iter().zip(&outcome.grads) {
        let Some(g) = g else { continue };
        let Some(r) = reference.get(&p.name) else {
            problems.push(format!("no reference gradient for `{}`", p.name));
            continue;
        };
        let rel = relative_l2(g, &r.data, floor);
        worst = worst.max(rel);
        let grad_tol = case["tolerance"]["grad_rel_l2_by_param"][&p.name]
            .as_f64()
            .unwrap_or(grad_tol);
        if rel > grad_tol {
            problems.push(format!("gradient of `{}`: relative L2 {rel:.2e}", p.name));
        }
    }
    if problems.is_empty() {
        Ok(format!(
            "loss rel {loss_rel:.1e}, worst gradient rel {worst:.1e}"
        ))
    } else {
        Err(problems.join("\n    "))
    }
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// ‖got − want‖ / ‖want‖, the denominator at least `floor`.
fn relative_l2(got: &[f32], want: &[f32], floor: f64) -> f64 {
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    diff / norm(want).max(floor).max(1e-30)
}

#[test]
fn parity_with_hugging_face_and_peft() {
    let mut roots = vec![
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures"
        ))
        .to_path_buf(),
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/parity"
        ))
        .to_path_buf(),
    ];
    if let Ok(extra) = std::env::var("KILN_FIXTURES") {
        roots.extend(
            extra
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        );
    }
    let mut failures = Vec::new();
    for root in &roots {
        let cases = case_dirs(root);
        assert!(!cases.is_empty(), "{} holds no case", root.display());
        for dir in cases {
            match run_case(&dir) {
                Ok(summary) => eprintln!("ok   {}: {summary}", dir.display()),
                Err(why) => {
                    eprintln!("FAIL {}:\n    {why}", dir.display());
                    failures.push(dir.display().to_string());
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed: {}",
        failures.len(),
        failures.join(", ")
    );
}
