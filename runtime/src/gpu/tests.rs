//! Every kernel against the CPU path on the same inputs, run under the host emulation; every
//! source through NVRTC where it is installed (CI installs it and sets `KILN_REQUIRE_NVRTC`).

use super::emulator::{emulator, Emulator};
use super::launch::*;
use super::nvrtc;
use super::source::{Source, SOURCES};
use crate::exec::kernels::testing::{close, probe, t1, t3, values};
use crate::exec::kernels::{self, Heads, Vector};
use crate::exec::precision::Format;
use crate::rng::{Key, Purpose};
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use kiln_compiler::spec::Optimizer;

fn gpu() -> Kernels<'static, Emulator> {
    Kernels(emulator())
}

/// A host vector as the emulation's device buffer.
fn buf<T>(v: &mut [T]) -> Buffer<T> {
    // SAFETY: the emulation's kernels run on host memory; every test keeps `v` alive and
    // unmoved until its kernels return.
    unsafe { Buffer::from_raw(v.as_mut_ptr() as u64, v.len()) }
}

fn scaled(
    shape: (usize, usize, usize),
    seed: u64,
    by: f32,
    shift: f32,
) -> Tensor<(usize, usize, usize), f32, Cpu> {
    let n = shape.0 * shape.1 * shape.2;
    Cpu::default().tensor_from_vec(
        values(n, seed).iter().map(|v| v * by + shift).collect(),
        shape,
    )
}

#[test]
fn every_kernel_a_source_defines_is_listed() {
    const DEFINITION: &str = "extern \"C\" __global__ void ";
    for source in SOURCES {
        let defined: Vec<&str> = source
            .code
            .match_indices(DEFINITION)
            .map(|(at, _)| {
                let rest = &source.code[at + DEFINITION.len()..];
                &rest[..rest.find('(').expect("a kernel's parameters")]
            })
            .collect();
        assert_eq!(defined, source.kernels, "{}", source.file);
    }
}

#[test]
fn every_source_compiles_to_ptx_with_nvrtc() {
    if !nvrtc::available() {
        assert!(
            std::env::var_os("KILN_REQUIRE_NVRTC").is_none(),
            "KILN_REQUIRE_NVRTC is set, but no NVRTC library loads (LD_LIBRARY_PATH = {:?})",
            std::env::var_os("LD_LIBRARY_PATH")
        );
        eprintln!(
            "NVRTC is not installed: the CUDA sources were not compiled here (CI compiles them)"
        );
        return;
    }
    // A100, and H100/H200.
    for arch in ["compute_80", "compute_90"] {
        for source in SOURCES {
            let ptx = nvrtc::compile(source, arch).unwrap_or_else(|e| panic!("{e}"));
            for kernel in source.kernels {
                assert!(
                    ptx.contains(&format!(".entry {kernel}(")),
                    "{} compiled for {arch} has no entry `{kernel}`",
                    source.file
                );
            }
        }
    }
    let broken = Source {
        file: "broken.cu",
        code: "extern \"C\" __global__ void f(float* x) { x[0] = undeclared; }",
        kernels: &["f"],
    };
    let error = nvrtc::compile(&broken, "compute_80").unwrap_err().0;
    assert!(
        error.contains("broken.cu") && error.contains("undeclared"),
        "{error}"
    );
}

#[test]
fn rounding_matches_the_cpu_formats_bit_for_bit() {
    // Magnitudes from 1e-9 to 1e3, and the edges: ties, fp16's largest value and overflow,
    // its subnormals, f32's largest, zeros of both signs, an f32 subnormal.
    let mut x: Vec<f32> = values(4096, 3)
        .iter()
        .enumerate()
        .map(|(i, v)| v * 10f32.powi((i % 13) as i32 - 9))
        .collect();
    x.extend([
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        1.0 + 2f32.powi(-11),
        65504.0,
        65519.0,
        65520.0,
        -70000.0,
        2f32.powi(-24),
        2f32.powi(-25),
        3.0 * 2f32.powi(-26),
        6.1e-5,
        f32::MAX,
        f32::INFINITY,
        0.0,
        -0.0,
        1e-40,
    ]);
    for format in [Format::Bf16, Format::F16, Format::F32] {
        let mut y = vec![0.0f32; x.len()];
        gpu()
            .round_to_format(buf(&mut x), buf(&mut y), format)
            .unwrap();
        for (&v, &got) in x.iter().zip(&y) {
            assert_eq!(
                got.to_bits(),
                format.round(v).to_bits(),
                "{format:?} of {v}: {got}"
            );
        }
    }
}

#[test]
fn activations_match_the_cpu_kernels() {
    let shape = (3, 17, 29);
    let n = 3 * 17 * 29;
    let x = scaled(shape, 5, 6.0, 0.0);
    let cases = [
        (Activation::GeluTanh, kernels::Activation::GeluTanh),
        (Activation::GeluErf, kernels::Activation::GeluErf),
        (Activation::Silu, kernels::Activation::Silu),
    ];
    for (act, cpu) in cases {
        let (want_y, grads) = probe(kernels::activation(x.clone().leaky_traced(), cpu), 6);
        let want_dx = grads.get(&x).as_vec();
        let (mut xs, mut y, mut dy, mut dx) =
            (x.as_vec(), vec![0.0; n], values(n, 6), vec![0.0; n]);
        gpu()
            .activation_forward(buf(&mut xs), buf(&mut y), act)
            .unwrap();
        gpu()
            .activation_backward(buf(&mut xs), buf(&mut dy), buf(&mut dx), act)
            .unwrap();
        close(&format!("{act:?}"), &y, &want_y, 1e-5);
        close(&format!("{act:?}'"), &dx, &want_dx, 1e-5);
    }
}

/// The norm kernels' forward and backward on `x` with weight `w` and maybe bias `b`, dy being
/// `values(.., seed)` (as `probe` draws it): y, dx, dw, db.
fn gpu_norm(
    x: &Tensor<(usize, usize, usize), f32, Cpu>,
    w: &Tensor<(usize,), f32, Cpu>,
    b: Option<&Tensor<(usize,), f32, Cpu>>,
    centred: bool,
    seed: u64,
) -> [Vec<f32>; 4] {
    let (d0, d1, h) = *x.shape();
    let (rows, n) = (d0 * d1, d0 * d1 * h);
    let (mut xs, mut ws) = (x.as_vec(), w.as_vec());
    let mut bs = b.map(|b| b.as_vec());
    let (mut y, mut stats) = (vec![0.0; n], vec![0.0; 2 * rows]);
    let (mut dy, mut dx, mut dw, mut db) =
        (values(n, seed), vec![0.0; n], vec![0.0; h], vec![0.0; h]);
    let mut scratch = vec![0.0; norm_backward_scratch(rows, h)];
    let eps = 1e-5;
    gpu()
        .norm_forward(
            buf(&mut xs),
            buf(&mut ws),
            bs.as_deref_mut().map(buf),
            buf(&mut y),
            buf(&mut stats),
            h,
            eps,
            centred,
        )
        .unwrap();
    gpu()
        .norm_backward(
            buf(&mut xs),
            buf(&mut ws),
            buf(&mut stats),
            buf(&mut dy),
            buf(&mut dx),
            Some(buf(&mut dw)),
            bs.is_some().then(|| buf(&mut db)),
            buf(&mut scratch),
            h,
            centred,
        )
        .unwrap();
    [y, dx, dw, db]
}

#[test]
fn layer_norm_matches_the_cpu_kernel_with_and_without_bias() {
    // 35 rows: two blocks of the backward's partial sums; 70 columns: a partial warp.
    let x = scaled((5, 7, 70), 1, 3.0, 0.5);
    let (w, b) = (t1(70, 2), t1(70, 3));
    for with_bias in [true, false] {
        let weight = Vector {
            v: w.clone(),
            trainable: true,
        };
        let bias = with_bias.then(|| Vector {
            v: b.clone(),
            trainable: true,
        });
        let out = kernels::layer_norm(x.clone().leaky_traced(), weight, bias, 1e-5).unwrap();
        let (want_y, grads) = probe(out, 9);
        let [y, dx, dw, db] = gpu_norm(&x, &w, with_bias.then_some(&b), true, 9);
        close("y", &y, &want_y, 2e-6);
        close("dx", &dx, &grads.get(&x).as_vec(), 2e-5);
        close("dw", &dw, &grads.get(&w).as_vec(), 2e-5);
        if with_bias {
            close("db", &db, &grads.get(&b).as_vec(), 2e-5);
        }
    }
}

#[test]
fn rms_norm_matches_the_cpu_ops() {
    let shape = (3, 13, 45);
    let x = scaled(shape, 4, 2.0, 0.3);
    let w = t1(45, 5);
    // `exec::ops::norm`'s RMS norm, in dfdx's ops.
    let (xs, tape) = x.clone().leaky_traced().split_tape();
    let ms = xs
        .clone()
        .put_tape(tape)
        .square()
        .mean::<(usize, usize), Axis<2>>();
    let inv = (ms + 1e-5)
        .sqrt()
        .recip()
        .broadcast_like::<_, Axis<2>>(&shape);
    let y = inv
        * xs
        * w.clone()
            .leaky_traced()
            .broadcast_like::<_, Axes2<0, 1>>(&shape);
    let (want_y, grads) = probe(y, 11);
    let [y, dx, dw, _] = gpu_norm(&x, &w, None, false, 11);
    close("y", &y, &want_y, 2e-6);
    close("dx", &dx, &grads.get(&x).as_vec(), 2e-5);
    close("dw", &dw, &grads.get(&w).as_vec(), 2e-5);
}

#[test]
fn cross_entropy_matches_the_cpu_kernel() {
    // 3 sequences of 9 positions, the loss reading the first 7 of each; some rows weightless.
    let (b, s, vocab, positions) = (3, 9, 77, 7);
    let logits = scaled((b, s, vocab), 7, 4.0, 0.0);
    let rows = b * positions;
    let targets: Vec<usize> = (0..rows).map(|i| (i * 31 + 5) % vocab).collect();
    let weights: Vec<f32> = (0..rows)
        .map(|i| {
            if i % 5 == 3 {
                0.0
            } else {
                1.0 + (i % 3) as f32
            }
        })
        .collect();
    let count = weights.iter().filter(|w| **w != 0.0).count() as f32;
    let loss = kernels::cross_entropy(
        logits.clone().leaky_traced(),
        positions,
        targets.clone(),
        weights.clone(),
        count,
        None,
    )
    .unwrap();
    let want_loss = loss.array();
    let want_grad = loss.backward().get(&logits).as_vec();

    let mut xs = logits.as_vec();
    let mut gpu_targets: Vec<i64> = targets
        .iter()
        .zip(&weights)
        .map(|(&t, &w)| if w == 0.0 { -1 } else { t as i64 })
        .collect();
    let (mut lse, mut picked) = (vec![0.0; rows], vec![0.0; rows]);
    let mut coef: Vec<f32> = weights.iter().map(|w| w / count).collect();
    let mut grad = vec![0.0; xs.len()];
    let read = TargetRows {
        logits: buf(&mut xs),
        positions,
        seq: s,
        width: vocab,
        first: 0,
    };
    gpu()
        .softmax_statistics(read, buf(&mut gpu_targets), buf(&mut lse), buf(&mut picked))
        .unwrap();
    gpu()
        .softmax_target_backward(
            read,
            buf(&mut gpu_targets),
            buf(&mut lse),
            buf(&mut coef),
            buf(&mut grad),
        )
        .unwrap();
    let got_loss: f64 = (0..rows)
        .map(|i| f64::from(weights[i] * (lse[i] - picked[i])))
        .sum::<f64>()
        / f64::from(count);
    assert!(
        (got_loss as f32 - want_loss).abs() <= 1e-5 * want_loss.abs(),
        "loss {got_loss} vs {want_loss}"
    );
    close("grad", &grad, &want_grad, 1e-5);
}

#[test]
fn token_log_probs_match_the_cpu_kernel_over_a_vocabulary_shard() {
    let (b, s, vocab) = (2, 6, 50);
    let logits = scaled((b, s, vocab), 8, 3.0, 0.0);
    let targets: Vec<Option<usize>> = (0..b * s)
        .map(|i| (i % 4 != 1).then_some((i * 17) % vocab))
        .collect();
    let (want, grads) = probe(
        kernels::token_log_probs(logits.clone().leaky_traced(), targets.clone(), None).unwrap(),
        12,
    );
    let want_grad = grads.get(&logits).as_vec();
    let mut xs = logits.as_vec();
    let mut gpu_targets: Vec<i64> = targets.iter().map(|t| t.map_or(-1, |t| t as i64)).collect();
    let (mut lse, mut picked) = (vec![0.0; b * s], vec![0.0; b * s]);
    let read = TargetRows {
        logits: buf(&mut xs),
        positions: s,
        seq: s,
        width: vocab,
        first: 0,
    };
    gpu()
        .softmax_statistics(read, buf(&mut gpu_targets), buf(&mut lse), buf(&mut picked))
        .unwrap();
    let got: Vec<f32> = (0..b * s)
        .map(|i| {
            if targets[i].is_some() {
                picked[i] - lse[i]
            } else {
                0.0
            }
        })
        .collect();
    close("log p", &got, &want, 1e-5);
    // d log p / d logits = onehot − softmax: the coefficient is −upstream.
    let mut coef: Vec<f32> = values(b * s, 12).iter().map(|v| -v).collect();
    let mut grad = vec![0.0; xs.len()];
    gpu()
        .softmax_target_backward(
            read,
            buf(&mut gpu_targets),
            buf(&mut lse),
            buf(&mut coef),
            buf(&mut grad),
        )
        .unwrap();
    close("grad", &grad, &want_grad, 1e-5);

    // A rank holding columns [20, 50) of the vocabulary: its statistics are over its own
    // columns, and only targets among them are picked.
    let (width, first) = (30, 20);
    let mut shard: Vec<f32> = xs
        .chunks(vocab)
        .flat_map(|row| row[first..].to_vec())
        .collect();
    let read = TargetRows {
        logits: buf(&mut shard),
        positions: s,
        seq: s,
        width,
        first: first as i64,
    };
    gpu()
        .softmax_statistics(read, buf(&mut gpu_targets), buf(&mut lse), buf(&mut picked))
        .unwrap();
    for (i, target) in targets.iter().enumerate() {
        let Some(t) = *target else { continue };
        let row = &xs[i * vocab + first..(i + 1) * vocab];
        let max = row.iter().fold(f32::MIN, |m, &v| m.max(v));
        let want_lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
        assert!(
            (lse[i] - want_lse).abs() < 1e-5,
            "row {i}: {} vs {want_lse}",
            lse[i]
        );
        let want_picked = if t >= first { xs[i * vocab + t] } else { 0.0 };
        assert_eq!(picked[i], want_picked, "row {i}, target {t}");
    }
}

#[test]
fn target_rows_outside_the_logits_are_refused() {
    let mut xs = vec![0.0f32; 2 * 5 * 10];
    let mut targets = vec![0i64; 12];
    let (mut lse, mut picked) = (vec![0.0; 12], vec![0.0; 12]);
    // 12 rows of 6 positions would need 2 sequences of 6: the logits have 5 a sequence.
    let read = TargetRows {
        logits: buf(&mut xs),
        positions: 6,
        seq: 5,
        width: 10,
        first: 0,
    };
    let error = gpu()
        .softmax_statistics(read, buf(&mut targets), buf(&mut lse), buf(&mut picked))
        .unwrap_err();
    assert!(error.0.contains("12 target rows"), "{error}");
}

#[test]
fn adamw_matches_the_cpu_optimizer_over_steps() {
    let n = 1000;
    let optimizer = Optimizer::Adamw {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut cpu_params = vec![values(n, 21)];
    let mut states = vec![None];
    let (mut p, mut m, mut v) = (values(n, 21), vec![0.0; n], vec![0.0; n]);
    for step in 1..=5u64 {
        let mut g = values(n, 30 + step);
        crate::train::optim::step(
            &optimizer,
            3e-3,
            step,
            &mut cpu_params,
            &[Some(g.clone())],
            &mut states,
        );
        gpu()
            .adamw_step(
                buf(&mut p),
                buf(&mut m),
                buf(&mut v),
                buf(&mut g),
                3e-3,
                (0.9, 0.95),
                1e-8,
                0.1,
                step,
            )
            .unwrap();
    }
    let state = states[0].as_ref().unwrap();
    close("params", &p, &cpu_params[0], 1e-6);
    close("m", &m, &state.m, 1e-6);
    close("v", &v, &state.v, 1e-6);
}

/// One attention case: its geometry, which keys each row keeps, and dropout's p.
struct Case {
    shape: AttentionShape,
    keep: Option<Vec<f32>>,
    dropout: f64,
}

fn attention_matches_the_cpu_kernel(case: Case) {
    let AttentionShape {
        batch: b,
        s,
        s_kv: skv,
        heads: h,
        kv_heads: kvh,
        d,
        causal,
    } = case.shape;
    let (b, s, skv, h, kvh, d) = (
        b as usize,
        s as usize,
        skv as usize,
        h as usize,
        kvh as usize,
        d as usize,
    );
    let q = t3((b, s, h * d), 41);
    let k = t3((b, skv, kvh * d), 42);
    let v = t3((b, skv, kvh * d), 43);
    // The CPU kernel's additive mask, as `exec::ops::attention` builds it.
    let past = skv - s;
    let mut mask = vec![0.0f32; b * s * skv];
    for r in 0..b {
        for i in 0..s {
            for j in 0..skv {
                let future = causal && j > i + past;
                let padded = case
                    .keep
                    .as_ref()
                    .is_some_and(|keep| keep[r * skv + j] == 0.0);
                if future || padded {
                    mask[(r * s + i) * skv + j] = f32::MIN;
                }
            }
        }
    }
    // Dropout as `exec::dropout` draws it, from a rank whose heads start at head 1 of the row.
    let row_keys: Vec<Key> = (0..b as u64)
        .map(|r| Key::of(5, Purpose::Dropout).fold(17).fold(100 + r))
        .collect();
    let threshold = (case.dropout * u64::MAX as f64) as u64;
    let scale = 1.0 / (1.0 - case.dropout) as f32;
    let offset = (s * skv) as u64;
    let factors = (case.dropout > 0.0).then(|| {
        let mut f = Vec::with_capacity(b * h * s * skv);
        for key in &row_keys {
            for e in 0..(h * s * skv) as u64 {
                f.push(if key.bits(offset + e) >= threshold {
                    scale
                } else {
                    0.0
                });
            }
        }
        f
    });
    let heads = Heads {
        heads: h,
        kv_heads: kvh,
        dim: d,
    };
    let out = kernels::attention(
        q.clone().leaky_traced(),
        k.clone(),
        v.clone(),
        heads,
        mask,
        factors,
    )
    .unwrap();
    let (want_y, grads) = probe(out, 44);

    let (mut qs, mut ks, mut vs) = (q.as_vec(), k.as_vec(), v.as_vec());
    let mut keep = case.keep.clone();
    let (mut y, mut stats) = (vec![0.0; qs.len()], vec![0.0; b * h * s * 2]);
    let mut keys: Vec<u64> = row_keys.iter().map(|k| k.value()).collect();
    let dropout = (case.dropout > 0.0).then(|| AttentionDropout {
        row_keys: buf(&mut keys),
        threshold,
        offset,
        scale,
    });
    let tensors = AttentionTensors {
        q: buf(&mut qs),
        k: buf(&mut ks),
        v: buf(&mut vs),
        key_keep: keep.as_deref_mut().map(buf),
        y: buf(&mut y),
        stats: buf(&mut stats),
    };
    gpu()
        .attention_forward(case.shape, tensors, dropout)
        .unwrap();
    let mut dy = values(y.len(), 44);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; qs.len()],
        vec![0.0; ks.len()],
        vec![0.0; vs.len()],
    );
    let mut delta = vec![0.0; b * h * s];
    let grads_gpu = AttentionGradients {
        dy: buf(&mut dy),
        dq: buf(&mut dq),
        dk: buf(&mut dk),
        dv: buf(&mut dv),
        delta: buf(&mut delta),
    };
    gpu()
        .attention_backward(case.shape, tensors, grads_gpu, dropout)
        .unwrap();
    close("y", &y, &want_y, 2e-5);
    close("dq", &dq, &grads.get(&q).as_vec(), 2e-5);
    close("dk", &dk, &grads.get(&k).as_vec(), 2e-5);
    close("dv", &dv, &grads.get(&v).as_vec(), 2e-5);
}

/// Which keys of each row are real: `pad[r]` padding keys at the start (`left`) or end.
fn keep(b: usize, skv: usize, pad: &[usize], left: bool) -> Vec<f32> {
    let mut keep = vec![1.0; b * skv];
    for (r, &p) in pad.iter().enumerate() {
        let padded = if left { 0..p } else { skv - p..skv };
        padded.for_each(|j| keep[r * skv + j] = 0.0);
    }
    keep
}

#[test]
fn causal_grouped_query_attention_with_left_padding_matches_the_cpu() {
    // Row 1's first 5 queries see only padding: uniform over every key, as the CPU's mask.
    attention_matches_the_cpu_kernel(Case {
        shape: AttentionShape {
            batch: 2,
            s: 37,
            s_kv: 37,
            heads: 4,
            kv_heads: 2,
            d: 12,
            causal: true,
        },
        keep: Some(keep(2, 37, &[0, 5], true)),
        dropout: 0.0,
    });
}

#[test]
fn causal_attention_over_a_prefix_with_dropout_matches_the_cpu() {
    // 6 prefix keys before 30 queries' own: heads 40 wide (two lanes' columns), 2 key tiles.
    attention_matches_the_cpu_kernel(Case {
        shape: AttentionShape {
            batch: 2,
            s: 30,
            s_kv: 36,
            heads: 2,
            kv_heads: 2,
            d: 40,
            causal: true,
        },
        keep: Some(keep(2, 36, &[3, 0], false)),
        dropout: 0.1,
    });
}

#[test]
fn bidirectional_multi_query_attention_with_dropout_matches_the_cpu() {
    attention_matches_the_cpu_kernel(Case {
        shape: AttentionShape {
            batch: 2,
            s: 45,
            s_kv: 45,
            heads: 3,
            kv_heads: 1,
            d: 64,
            causal: false,
        },
        keep: Some(keep(2, 45, &[7, 0], false)),
        dropout: 0.2,
    });
}

#[test]
fn attention_refuses_heads_wider_than_its_tiles_and_wrong_sizes() {
    let shape = AttentionShape {
        batch: 1,
        s: 4,
        s_kv: 4,
        heads: 1,
        kv_heads: 1,
        d: 256,
        causal: true,
    };
    let mut x = vec![0.0f32; 4 * 256];
    let mut stats = vec![0.0f32; 8];
    let tensors = AttentionTensors {
        q: buf(&mut x),
        k: buf(&mut x),
        v: buf(&mut x),
        key_keep: None,
        y: buf(&mut x),
        stats: buf(&mut stats),
    };
    let error = gpu().attention_forward(shape, tensors, None).unwrap_err();
    assert!(error.0.contains("up to 128 wide"), "{error}");
    let narrower = AttentionShape { d: 128, ..shape };
    let error = gpu()
        .attention_forward(narrower, tensors, None)
        .unwrap_err();
    assert!(
        error
            .0
            .contains("the queries holds 1024 values where the kernel reads 512"),
        "{error}"
    );
}
