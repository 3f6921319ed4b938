//! Every GPU kernel against the CPU path on the same inputs, on any device that launches them
//! and holds their buffers: the host emulation in the tests, a GPU in `kiln gpu-check`. Each
//! check returns what differed, with tolerances relative to the largest expected value: the
//! kernels sum in other orders than the CPU (tiles, warps, an online softmax) and use CUDA's
//! exp/tanh/erf, not the CPU's vectorised approximations.

use super::launch::*;
use super::memory::Element;
use super::{Device, GpuError};
use crate::exec::kernels::testing::{probe, t1, t3, values, within};
use crate::exec::kernels::{self, Heads, Vector};
use crate::exec::precision::Format;
use crate::rng::{Key, Purpose};
use crate::train::optim;
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use kiln_compiler::spec::Optimizer;

/// A check: its name, and what differed if anything did.
pub type Check<D> = (&'static str, fn(&D) -> Result<(), String>);

/// Every check, in the order `kiln gpu-check` reports them.
pub fn checks<D: Device>() -> Vec<Check<D>> {
    vec![
        ("rounding to bf16 and fp16", rounding),
        ("activations (tanh and erf GELU, SiLU)", activations),
        ("layer norm, with and without bias", layer_norm),
        ("RMS norm", rms_norm),
        ("cross-entropy", cross_entropy),
        (
            "token log-probabilities, whole and sharded",
            token_log_probs,
        ),
        ("AdamW", adamw),
        (
            "attention: causal, grouped-query, left padding",
            causal_grouped_query_attention,
        ),
        ("attention: causal over a prefix, dropout", prefix_attention),
        (
            "attention: bidirectional, multi-query, dropout",
            bidirectional_attention,
        ),
        (
            "attention: heads 128 wide, prefix, padded rows, dropout",
            widest_heads_attention,
        ),
        (
            "training step: GPT-2 with LoRA and dropout, f32",
            super::step::checks::gpt2_with_lora,
        ),
        (
            "training step: LLaMA (rotary, GQA, SwiGLU), bf16",
            super::step::checks::llama_bf16,
        ),
        (
            "training step: GPT-2 with dropout, fp16",
            super::step::checks::gpt2_f16,
        ),
        (
            "training step: GPT-2 with prompt and prefix tuning, f32",
            super::step::checks::gpt2_prompt_and_prefix,
        ),
        (
            "training step: BERT masked LM with dropout, f32",
            super::step::checks::bert_mlm,
        ),
    ]
}

fn gpu(e: GpuError) -> String {
    e.0
}

type T3 = Tensor<(usize, usize, usize), f32, Cpu>;

fn scaled(shape: (usize, usize, usize), seed: u64, by: f32, shift: f32) -> T3 {
    let n = shape.0 * shape.1 * shape.2;
    Cpu::default().tensor_from_vec(
        values(n, seed).iter().map(|v| v * by + shift).collect(),
        shape,
    )
}

/// Values read past a buffer's end: NaN, so that a kernel reading beyond its inputs (a tile
/// past the last key, a row past the last) spoils its results instead of reading zeros.
const GUARD: usize = 1 << 14;

/// `values` on the device, followed by a guard of NaNs.
fn input<'d, D: Device>(d: &'d D, values: &[f32]) -> Result<Buffer<'d, f32>, String> {
    let mut guarded = values.to_vec();
    guarded.resize(values.len() + GUARD, f32::NAN);
    let buffer = d.upload(&guarded).map_err(gpu)?;
    // SAFETY: the first `values.len()` elements of the upload.
    Ok(unsafe { Buffer::from_raw(buffer.address(), values.len()) })
}

fn download<D: Device, T: Element>(d: &D, b: Buffer<'_, T>) -> Result<Vec<T>, String> {
    d.download(b).map_err(gpu)
}

fn rounding<D: Device>(d: &D) -> Result<(), String> {
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
        f32::NAN,
        // A NaN whose payload lies below bf16's and fp16's mantissas: it must stay a NaN.
        f32::from_bits(0x7f80_0001),
        -f32::from_bits(0x7fc0_1234),
    ]);
    let x_on_device = input(d, &x)?;
    for format in [Format::Bf16, Format::F16, Format::F32] {
        let y = d.zeros(x.len()).map_err(gpu)?;
        Kernels(d)
            .round_to_format(x_on_device, y, format)
            .map_err(gpu)?;
        let got = download(d, y)?;
        if let Some((v, g)) = x
            .iter()
            .zip(&got)
            .find(|(v, g)| g.to_bits() != format.round(**v).to_bits())
        {
            return Err(format!("{format:?} of {v}: {g}, not {}", format.round(*v)));
        }
    }
    Ok(())
}

fn activations<D: Device>(d: &D) -> Result<(), String> {
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
        let xs = input(d, &x.as_vec())?;
        let dy = input(d, &values(n, 6))?;
        let (y, dx) = (d.zeros(n).map_err(gpu)?, d.zeros(n).map_err(gpu)?);
        Kernels(d).activation_forward(xs, y, act).map_err(gpu)?;
        Kernels(d)
            .activation_backward(xs, dy, dx, act)
            .map_err(gpu)?;
        within(&format!("{act:?}"), &download(d, y)?, &want_y, 1e-5)?;
        within(
            &format!("{act:?}'"),
            &download(d, dx)?,
            &grads.get(&x).as_vec(),
            1e-5,
        )?;
    }
    Ok(())
}

/// The norm kernels' forward and backward on `x` with weight `w` and maybe bias `b`, dy
/// being `values(.., seed)` (as `probe` draws it): y, dx, dw, db.
fn gpu_norm<D: Device>(
    d: &D,
    x: &T3,
    w: &Tensor<(usize,), f32, Cpu>,
    b: Option<&Tensor<(usize,), f32, Cpu>>,
    centred: bool,
    seed: u64,
) -> Result<[Vec<f32>; 4], String> {
    let (d0, d1, h) = *x.shape();
    let (rows, n) = (d0 * d1, d0 * d1 * h);
    let up = |v: Vec<f32>| input(d, &v);
    let (xs, ws, dy) = (up(x.as_vec())?, up(w.as_vec())?, up(values(n, seed))?);
    let bs = b.map(|b| up(b.as_vec())).transpose()?;
    let zeros = |len| d.zeros::<f32>(len).map_err(gpu);
    let (y, stats, dx, dw, db) = (zeros(n)?, zeros(2 * rows)?, zeros(n)?, zeros(h)?, zeros(h)?);
    // Scratch as reused memory holds it: whatever was there (NaN), for the kernel to clear.
    let scratch = d
        .upload(&vec![f32::NAN; norm_backward_scratch(rows, h)])
        .map_err(gpu)?;
    let k = Kernels(d);
    k.norm_forward(xs, ws, bs, y, stats, h, 1e-5, centred)
        .map_err(gpu)?;
    let db_wanted = bs.map(|_| db);
    k.norm_backward(
        xs,
        ws,
        stats,
        dy,
        dx,
        Some(dw),
        db_wanted,
        scratch,
        h,
        centred,
    )
    .map_err(gpu)?;
    Ok([
        download(d, y)?,
        download(d, dx)?,
        download(d, dw)?,
        download(d, db)?,
    ])
}

fn layer_norm<D: Device>(d: &D) -> Result<(), String> {
    // 35 rows: two blocks of the backward's partial sums; 70 columns: a partial warp; 300
    // columns: more than a block's threads, each taking two.
    for (shape, seed) in [((5, 7, 70), 1), ((2, 3, 300), 13)] {
        let h = shape.2;
        let x = scaled(shape, seed, 3.0, 0.5);
        let (w, b) = (t1(h, seed + 1), t1(h, seed + 2));
        for with_bias in [true, false] {
            let weight = Vector {
                v: w.clone(),
                trainable: true,
            };
            let bias = with_bias.then(|| Vector {
                v: b.clone(),
                trainable: true,
            });
            let out = kernels::norm(
                x.clone().leaky_traced(),
                weight,
                bias,
                1e-5,
                kernels::Centring::Centred,
            )?;
            let (want_y, grads) = probe(out, 9);
            let [y, dx, dw, db] = gpu_norm(d, &x, &w, with_bias.then_some(&b), true, 9)?;
            within("y", &y, &want_y, 2e-6)?;
            within("dx", &dx, &grads.get(&x).as_vec(), 2e-5)?;
            within("dw", &dw, &grads.get(&w).as_vec(), 2e-5)?;
            if with_bias {
                within("db", &db, &grads.get(&b).as_vec(), 2e-5)?;
            }
        }
    }
    Ok(())
}

fn rms_norm<D: Device>(d: &D) -> Result<(), String> {
    for shape in [(3, 13, 45), (2, 2, 300)] {
        let x = scaled(shape, 4, 2.0, 0.3);
        let w = t1(shape.2, 5);
        let weight = Vector {
            v: w.clone(),
            trainable: true,
        };
        let y = kernels::norm(
            x.clone().leaky_traced(),
            weight,
            None,
            1e-5,
            kernels::Centring::Uncentred,
        )?;
        let (want_y, grads) = probe(y, 11);
        let [y, dx, dw, _] = gpu_norm(d, &x, &w, None, false, 11)?;
        within("y", &y, &want_y, 2e-6)?;
        within("dx", &dx, &grads.get(&x).as_vec(), 2e-5)?;
        within("dw", &dw, &grads.get(&w).as_vec(), 2e-5)?;
    }
    Ok(())
}

fn cross_entropy<D: Device>(d: &D) -> Result<(), String> {
    // A vocabulary narrower than a block's threads, and one wider (each thread two columns).
    for vocab in [77, 333] {
        cross_entropy_over(d, vocab)?;
    }
    Ok(())
}

fn cross_entropy_over<D: Device>(d: &D, vocab: usize) -> Result<(), String> {
    // 3 sequences of 9 positions, the loss reading the first 7 of each; some rows weightless.
    let (b, s, positions) = (3, 9, 7);
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
    )?;
    let want_loss = loss.array();
    let want_grad = loss.backward().get(&logits).as_vec();

    let gpu_targets: Vec<i64> = targets
        .iter()
        .zip(&weights)
        .map(|(&t, &w)| if w == 0.0 { -1 } else { t as i64 })
        .collect();
    let coef: Vec<f32> = weights.iter().map(|w| w / count).collect();
    let read = TargetRows {
        logits: input(d, &logits.as_vec())?,
        positions,
        seq: s,
        width: vocab,
        first: 0,
    };
    let targets = d.upload(&gpu_targets).map_err(gpu)?;
    let (lse, picked) = (d.zeros(rows).map_err(gpu)?, d.zeros(rows).map_err(gpu)?);
    let (coef, grad) = (input(d, &coef)?, d.zeros(read.logits.len()).map_err(gpu)?);
    let k = Kernels(d);
    k.softmax_statistics(read, targets, lse, picked)
        .map_err(gpu)?;
    k.softmax_target_backward(read, targets, lse, coef, grad)
        .map_err(gpu)?;
    let (lse, picked) = (download(d, lse)?, download(d, picked)?);
    let got_loss = (0..rows)
        .map(|i| f64::from(weights[i] * (lse[i] - picked[i])))
        .sum::<f64>()
        / f64::from(count);
    within("loss", &[got_loss as f32], &[want_loss], 1e-5)?;
    within("grad", &download(d, grad)?, &want_grad, 1e-5)
}

fn token_log_probs<D: Device>(d: &D) -> Result<(), String> {
    let (b, s, vocab) = (2, 6, 50);
    let logits = scaled((b, s, vocab), 8, 3.0, 0.0);
    let targets: Vec<Option<usize>> = (0..b * s)
        .map(|i| (i % 4 != 1).then_some((i * 17) % vocab))
        .collect();
    let (want, grads) = probe(
        kernels::token_log_probs(logits.clone().leaky_traced(), targets.clone(), None)?,
        12,
    );
    let xs = logits.as_vec();
    let gpu_targets: Vec<i64> = targets.iter().map(|t| t.map_or(-1, |t| t as i64)).collect();
    let read = TargetRows {
        logits: input(d, &xs)?,
        positions: s,
        seq: s,
        width: vocab,
        first: 0,
    };
    let on_device = d.upload(&gpu_targets).map_err(gpu)?;
    let (lse, picked) = (d.zeros(b * s).map_err(gpu)?, d.zeros(b * s).map_err(gpu)?);
    let k = Kernels(d);
    k.softmax_statistics(read, on_device, lse, picked)
        .map_err(gpu)?;
    let (lse_got, picked_got) = (download(d, lse)?, download(d, picked)?);
    let got: Vec<f32> = (0..b * s)
        .map(|i| {
            if targets[i].is_some() {
                picked_got[i] - lse_got[i]
            } else {
                0.0
            }
        })
        .collect();
    within("log p", &got, &want, 1e-5)?;
    // d log p / d logits = onehot − softmax: the coefficient is −upstream.
    let coef: Vec<f32> = values(b * s, 12).iter().map(|v| -v).collect();
    let (coef, grad) = (input(d, &coef)?, d.zeros(xs.len()).map_err(gpu)?);
    k.softmax_target_backward(read, on_device, lse, coef, grad)
        .map_err(gpu)?;
    within(
        "grad",
        &download(d, grad)?,
        &grads.get(&logits).as_vec(),
        1e-5,
    )?;

    // Ranks holding columns [0, 20) and [20, 50) of the vocabulary: each one's statistics are
    // over its own columns, and only targets among them are picked (target 20 is the first
    // rank's column 20, one past its last).
    for (first, width) in [(0, 20), (20, 30)] {
        let shard: Vec<f32> = xs
            .chunks(vocab)
            .flat_map(|row| row[first..first + width].to_vec())
            .collect();
        let read = TargetRows {
            logits: input(d, &shard)?,
            positions: s,
            seq: s,
            width,
            first: first as i64,
        };
        k.softmax_statistics(read, on_device, lse, picked)
            .map_err(gpu)?;
        let (lse, picked) = (download(d, lse)?, download(d, picked)?);
        for (i, target) in targets.iter().enumerate() {
            let Some(t) = *target else { continue };
            let row = &xs[i * vocab + first..i * vocab + first + width];
            let max = row.iter().fold(f32::MIN, |m, &v| m.max(v));
            let want_lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            within(&format!("shard lse[{i}]"), &[lse[i]], &[want_lse], 1e-5)?;
            let mine = (first..first + width).contains(&t);
            let want_picked = if mine { xs[i * vocab + t] } else { 0.0 };
            if picked[i] != want_picked {
                return Err(format!(
                    "shard [{first}, {}) row {i}, target {t}: picked {}, not {want_picked}",
                    first + width,
                    picked[i]
                ));
            }
        }
    }
    Ok(())
}

fn adamw<D: Device>(d: &D) -> Result<(), String> {
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
    let p = d.upload(&values(n, 21)).map_err(gpu)?;
    let (m, v) = (d.zeros(n).map_err(gpu)?, d.zeros(n).map_err(gpu)?);
    for step in 1..=5u64 {
        let g = values(n, 30 + step);
        optim::step(
            &optimizer,
            3e-3,
            step,
            &mut cpu_params,
            &[Some(g.clone())],
            &mut states,
        );
        let g = input(d, &g)?;
        Kernels(d)
            .adamw_step(p, m, v, g, 3e-3, (0.9, 0.95), 1e-8, 0.1, step)
            .map_err(gpu)?;
    }
    let state = states[0]
        .as_ref()
        .ok_or("the CPU optimizer kept no state")?;
    within("params", &download(d, p)?, &cpu_params[0], 1e-6)?;
    within("m", &download(d, m)?, &state.m, 1e-6)?;
    within("v", &download(d, v)?, &state.v, 1e-6)
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

/// The attention kernels against `exec::kernels::attention` on one geometry, with which keys
/// each row keeps, and dropout's p.
fn attention<D: Device>(
    d: &D,
    shape: AttentionShape,
    key_keep: Option<Vec<f32>>,
    p: f64,
) -> Result<(), String> {
    let AttentionShape {
        batch,
        s,
        s_kv,
        heads,
        kv_heads,
        d: width,
        causal,
    } = shape;
    let [b, s, skv, h, kvh, dh] = [batch, s, s_kv, heads, kv_heads, width].map(|n| n as usize);
    let q = t3((b, s, h * dh), 41);
    let k = t3((b, skv, kvh * dh), 42);
    let v = t3((b, skv, kvh * dh), 43);
    // The CPU kernel's additive mask, as `exec::ops::attention` builds it.
    let past = skv - s;
    let mut mask = vec![0.0f32; b * s * skv];
    for r in 0..b {
        for i in 0..s {
            for j in 0..skv {
                let future = causal && j > i + past;
                let padded = key_keep
                    .as_ref()
                    .is_some_and(|keep| keep[r * skv + j] == 0.0);
                if future || padded {
                    mask[(r * s + i) * skv + j] = f32::MIN;
                }
            }
        }
    }
    // Dropout as `exec::dropout` draws it, on a rank whose heads start at head 1 of the row.
    let row_keys: Vec<Key> = (0..b as u64)
        .map(|r| Key::of(5, Purpose::Dropout).fold(17).fold(100 + r))
        .collect();
    let threshold = (p * u64::MAX as f64) as u64;
    let scale = 1.0 / (1.0 - p) as f32;
    let offset = (s * skv) as u64;
    let factors = (p > 0.0).then(|| {
        row_keys
            .iter()
            .flat_map(|key| {
                (0..(h * s * skv) as u64).map(move |e| {
                    if key.bits(offset + e) >= threshold {
                        scale
                    } else {
                        0.0
                    }
                })
            })
            .collect::<Vec<f32>>()
    });
    let dims = Heads {
        heads: h,
        kv_heads: kvh,
        dim: dh,
    };
    let out = kernels::attention(
        q.clone().leaky_traced(),
        k.clone(),
        v.clone(),
        dims,
        mask,
        factors,
    )?;
    let (want_y, grads) = probe(out, 44);

    let up = |x: Vec<f32>| input(d, &x);
    let zeros = |n| d.zeros::<f32>(n).map_err(gpu);
    let keys: Vec<u64> = row_keys.iter().map(|k| k.value()).collect();
    let dropout = if p > 0.0 {
        Some(DropoutDraw {
            row_keys: d.upload(&keys).map_err(gpu)?,
            threshold,
            offset,
            scale,
        })
    } else {
        None
    };
    let tensors = AttentionTensors {
        q: up(q.as_vec())?,
        k: up(k.as_vec())?,
        v: up(v.as_vec())?,
        key_keep: key_keep.map(up).transpose()?,
        y: zeros(b * s * h * dh)?,
        stats: zeros(b * h * s * 2)?,
    };
    let kernels = Kernels(d);
    kernels
        .attention_forward(shape, tensors, dropout)
        .map_err(gpu)?;
    let grads_gpu = AttentionGradients {
        dy: up(values(b * s * h * dh, 44))?,
        dq: zeros(tensors.q.len())?,
        dk: zeros(tensors.k.len())?,
        dv: zeros(tensors.v.len())?,
        delta: zeros(b * h * s)?,
    };
    kernels
        .attention_backward(shape, tensors, grads_gpu, dropout)
        .map_err(gpu)?;
    within("y", &download(d, tensors.y)?, &want_y, 2e-5)?;
    within(
        "dq",
        &download(d, grads_gpu.dq)?,
        &grads.get(&q).as_vec(),
        2e-5,
    )?;
    within(
        "dk",
        &download(d, grads_gpu.dk)?,
        &grads.get(&k).as_vec(),
        2e-5,
    )?;
    within(
        "dv",
        &download(d, grads_gpu.dv)?,
        &grads.get(&v).as_vec(),
        2e-5,
    )
}

fn causal_grouped_query_attention<D: Device>(d: &D) -> Result<(), String> {
    // Row 1's first 5 queries see only padding: uniform over every key, as the CPU's mask.
    let shape = AttentionShape {
        batch: 2,
        s: 37,
        s_kv: 37,
        heads: 4,
        kv_heads: 2,
        d: 12,
        causal: true,
    };
    attention(d, shape, Some(keep(2, 37, &[0, 5], true)), 0.0)
}

fn prefix_attention<D: Device>(d: &D) -> Result<(), String> {
    // 6 prefix keys before 30 queries' own: heads 40 wide (two lanes' columns), 2 key tiles.
    let shape = AttentionShape {
        batch: 2,
        s: 30,
        s_kv: 36,
        heads: 2,
        kv_heads: 2,
        d: 40,
        causal: true,
    };
    attention(d, shape, Some(keep(2, 36, &[3, 0], false)), 0.1)
}

fn bidirectional_attention<D: Device>(d: &D) -> Result<(), String> {
    let shape = AttentionShape {
        batch: 2,
        s: 45,
        s_kv: 45,
        heads: 3,
        kv_heads: 1,
        d: 64,
        causal: false,
    };
    attention(d, shape, Some(keep(2, 45, &[7, 0], false)), 0.2)
}

fn widest_heads_attention<D: Device>(d: &D) -> Result<(), String> {
    // The widest heads the tiles hold; 6 prefix keys; row 1's first 10 keys padding, so its
    // first 4 queries see no key; dropout.
    let shape = AttentionShape {
        batch: 2,
        s: 20,
        s_kv: 26,
        heads: 2,
        kv_heads: 1,
        d: 128,
        causal: true,
    };
    attention(d, shape, Some(keep(2, 26, &[0, 10], true)), 0.1)
}
