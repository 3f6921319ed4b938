//! The attention core: softmax(q·kᵀ·scale + mask)·v over heads in parallel, grouped-query
//! heads sharing keys and values, with an optional inverted-dropout mask on the probabilities.

use super::buffer::{add_grad, elements, row_major, vectorized, Shared};
use super::math::exp;
use super::product::{product, Mat};
use super::{Taped, R3};
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use rayon::prelude::*;

/// The attention core's geometry: query heads, key/value heads (grouped-query attention when
/// fewer), head width.
#[derive(Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

/// softmax(q·kᵀ·scale + mask)·(dropout)·v for q `[b, s, heads·d]`, k and v
/// `[b, s_kv, kv_heads·d]`, an additive mask `[b, s, s_kv]` and an optional inverted-dropout
/// mask `[b, heads, s, s_kv]`; the result is `[b, s, heads·d]`. Heads are computed in parallel
/// (one task per batch row and key/value head); the probabilities are kept for the backward.
pub fn attention(
    q: Taped<R3>,
    k: Tensor<R3, f32, Cpu>,
    v: Tensor<R3, f32, Cpu>,
    heads: Heads,
    mask: Vec<f32>,
    dropout: Option<Vec<f32>>,
) -> Result<Taped<R3>, String> {
    let Heads {
        heads: h,
        kv_heads: kvh,
        dim: d,
    } = heads;
    let (b, s, width) = *q.shape();
    let skv = k.shape().1;
    // The parallel products write through raw pointers: every extent is checked first.
    if kvh == 0 || h % kvh != 0 || d == 0 || s == 0 || skv == 0 {
        return Err(format!(
            "attention over {h} heads, {kvh} key/value heads of width {d}, {s} queries and {skv} keys"
        ));
    }
    if width != h * d || *k.shape() != (b, skv, kvh * d) || *v.shape() != *k.shape() {
        return Err(format!(
            "attention inputs q {:?}, k {:?}, v {:?} for {h} heads over {kvh} of width {d}",
            q.shape(),
            k.shape(),
            v.shape()
        ));
    }
    let plane = s * skv;
    if mask.len() != b * plane || dropout.as_ref().is_some_and(|m| m.len() != b * h * plane) {
        return Err("an attention mask of the wrong size".into());
    }
    let (q, tape) = row_major(q).split_tape();
    let (k, tape) = row_major(k.put_tape(tape)).split_tape();
    let (v, mut tape) = row_major(v.put_tape(tape)).split_tape();
    let group = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let mut probs = vec![0.0f32; b * h * plane];
    let mut y = vec![0.0f32; b * s * h * d];
    {
        let (qs, ks, vs) = (elements(&q), elements(&k), elements(&v));
        let out = Shared(y.as_mut_ptr());
        probs
            .par_chunks_mut(group * plane)
            .enumerate()
            .for_each(|(task, probs)| {
                let (r, g) = (task / kvh, task % kvh);
                let k_g = Mat::at(&ks[(r * skv * kvh + g) * d..], skv, d, kvh * d);
                let v_g = Mat::at(&vs[(r * skv * kvh + g) * d..], skv, d, kvh * d);
                let mut kept = vec![0.0f32; if dropout.is_some() { plane } else { 0 }];
                for (i, p) in probs.chunks_mut(plane).enumerate() {
                    let head = g * group + i;
                    let q_h = Mat::at(&qs[(r * s * h + head) * d..], s, d, h * d);
                    // SAFETY: `p` is this head's s × s_kv plane.
                    unsafe { product(p.as_mut_ptr(), skv, q_h, k_g.t(), false, scale, false) };
                    softmax_rows(p, &mask[r * plane..(r + 1) * plane], skv);
                    let used: &[f32] = match &dropout {
                        Some(drop) => {
                            let drop = &drop[(r * h + head) * plane..][..plane];
                            kept.iter_mut()
                                .zip(p.iter().zip(drop))
                                .for_each(|(k, (p, m))| *k = p * m);
                            &kept
                        }
                        None => p,
                    };
                    let dst = out;
                    // SAFETY: this head's columns of batch row r: no other task writes them.
                    unsafe {
                        product(
                            dst.0.add((r * s * h + head) * d),
                            h * d,
                            Mat::rows(used, s, skv),
                            v_g,
                            false,
                            1.0,
                            false,
                        )
                    };
                }
            });
    }
    let out = q.device().tensor_from_vec(y, (b, s, h * d));
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let (qs, ks, vs) = (elements(&q), elements(&k), elements(&v));
        let mut dq = vec![0.0f32; qs.len()];
        let mut dk = vec![0.0f32; ks.len()];
        let mut dv = vec![0.0f32; vs.len()];
        let (dq_out, dk_out, dv_out) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        (0..b * kvh).into_par_iter().for_each(|task| {
            let (r, g) = (task / kvh, task % kvh);
            let kv_at = (r * skv * kvh + g) * d;
            let k_g = Mat::at(&ks[kv_at..], skv, d, kvh * d);
            let v_g = Mat::at(&vs[kv_at..], skv, d, kvh * d);
            let mut grad = vec![0.0f32; plane];
            let mut kept = vec![0.0f32; if dropout.is_some() { plane } else { 0 }];
            for head in g * group..(g + 1) * group {
                let p = &probs[(r * h + head) * plane..][..plane];
                let drop = dropout
                    .as_ref()
                    .map(|m| &m[(r * h + head) * plane..][..plane]);
                let q_at = (r * s * h + head) * d;
                let q_h = Mat::at(&qs[q_at..], s, d, h * d);
                let dy_h = Mat::at(&dy[q_at..], s, d, h * d);
                let used: &[f32] = match drop {
                    Some(drop) => {
                        kept.iter_mut()
                            .zip(p.iter().zip(drop))
                            .for_each(|(k, (p, m))| *k = p * m);
                        &kept
                    }
                    None => p,
                };
                let (dk_g, dv_g) = (dk_out, dv_out);
                let dq_h = dq_out;
                // SAFETY: task (r, g) alone writes key/value head g of row r and the columns of
                // its query heads in row r; every operand has the shapes described.
                unsafe {
                    // d(used) = dy_h·v_gᵀ; dv_g += usedᵀ·dy_h.
                    product(grad.as_mut_ptr(), skv, dy_h, v_g.t(), false, 1.0, false);
                    product(
                        dv_g.0.add(kv_at),
                        kvh * d,
                        Mat::rows(used, s, skv).t(),
                        dy_h,
                        true,
                        1.0,
                        false,
                    );
                }
                if let Some(drop) = drop {
                    grad.iter_mut().zip(drop).for_each(|(g, m)| *g *= m);
                }
                softmax_backward_rows(&mut grad, p, skv);
                unsafe {
                    product(
                        dq_h.0.add(q_at),
                        h * d,
                        Mat::rows(&grad, s, skv),
                        k_g,
                        false,
                        scale,
                        false,
                    );
                    product(
                        dk_g.0.add(kv_at),
                        kvh * d,
                        Mat::rows(&grad, s, skv).t(),
                        q_h,
                        true,
                        scale,
                        false,
                    );
                }
            }
        });
        add_grad(grads, &q, &dq)?;
        add_grad(grads, &k, &dk)?;
        add_grad(grads, &v, &dv)?;
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    Ok(result.put_tape(tape))
}

/// Softmax of each row of `p` (rows of `width`) after adding `mask`, in place.
fn softmax_rows(p: &mut [f32], mask: &[f32], width: usize) {
    vectorized(|| {
        for (row, mask) in p.chunks_mut(width).zip(mask.chunks(width)) {
            row.iter_mut().zip(mask).for_each(|(x, m)| *x += m);
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0f32;
            for x in row.iter_mut() {
                *x = exp(*x - max);
                sum += *x;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    })
}

/// Turns the gradient with respect to softmax outputs `p` into the gradient with respect to
/// its inputs, row by row and in place: p ∘ (g − Σ g∘p).
fn softmax_backward_rows(g: &mut [f32], p: &[f32], width: usize) {
    vectorized(|| {
        for (g, p) in g.chunks_mut(width).zip(p.chunks(width)) {
            let dot: f32 = g.iter().zip(p).map(|(g, p)| g * p).sum();
            g.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::kernels::testing::*;

    /// The attention core written with dfdx ops, heads repeated for grouped queries.
    fn reference_attention(
        q: Taped<R3>,
        k: Taped<R3>,
        v: Taped<R3>,
        heads: Heads,
        mask: &[f32],
        dropout: Option<&[f32]>,
    ) -> Taped<R3> {
        let Heads {
            heads: h,
            kv_heads: kvh,
            dim: d,
        } = heads;
        let (b, s, _) = *q.shape();
        let skv = k.shape().1;
        let dev = Cpu::default();
        let expand = |t: Taped<R3>| {
            let t = t
                .reshape_like(&(b, skv, kvh, d))
                .permute::<_, Axes4<2, 0, 1, 3>>();
            let idx: Tensor<(usize,), usize, Cpu> =
                dev.tensor_from_vec((0..h).map(|i| i / (h / kvh)).collect(), (h,));
            let t: Taped<(usize, usize)> = t.reshape_like(&(kvh, b * skv * d)).gather(idx);
            t.reshape_like(&(h, b, skv, d))
                .permute::<_, Axes4<1, 0, 2, 3>>()
        };
        let q = q
            .reshape_like(&(b, s, h, d))
            .permute::<_, Axes4<0, 2, 1, 3>>();
        let scores = q.matmul(expand(k).permute::<_, Axes4<0, 1, 3, 2>>()) / (d as f32).sqrt();
        let mask = dev
            .tensor_from_vec(mask.to_vec(), (b, s, skv))
            .broadcast_like::<_, Axis<1>>(&(b, h, s, skv));
        let mut probs = (scores + mask).softmax::<Axis<3>>();
        if let Some(drop) = dropout {
            probs = probs * dev.tensor_from_vec(drop.to_vec(), (b, h, s, skv));
        }
        probs
            .matmul(expand(v))
            .permute::<_, Axes4<0, 2, 1, 3>>()
            .reshape_like(&(b, s, h * d))
    }

    #[test]
    fn attention_matches_dfdx_with_groups_prefixes_masks_and_dropout() {
        let heads = Heads {
            heads: 4,
            kv_heads: 2,
            dim: 3,
        };
        let (b, s, skv) = (2, 5, 7); // two keys of prefix before the sequence
        let q = t3((b, s, 12), 20);
        let k = t3((b, skv, 6), 21);
        let v = t3((b, skv, 6), 22);
        // Causal over the sequence, the prefix always visible, row 1's first token padded.
        let mut mask = vec![0.0f32; b * s * skv];
        for r in 0..b {
            for i in 0..s {
                for j in 0..skv {
                    if j > i + 2 || (r == 1 && j == 2) {
                        mask[(r * s + i) * skv + j] = f32::MIN;
                    }
                }
            }
        }
        let drop: Vec<f32> = values(b * 4 * s * skv, 23)
            .iter()
            .map(|v| if *v < -0.6 { 0.0 } else { 1.25 })
            .collect();
        for dropout in [None, Some(drop)] {
            let fast = attention(
                q.clone().leaky_traced(),
                k.clone(),
                v.clone(),
                heads,
                mask.clone(),
                dropout.clone(),
            )
            .unwrap();
            let (fy, fg) = probe(fast, 24);
            let reference = reference_attention(
                q.clone().leaky_traced(),
                k.clone().leaky_traced(),
                v.clone().leaky_traced(),
                heads,
                &mask,
                dropout.as_deref(),
            );
            let (ry, rg) = probe(reference, 24);
            close("y", &fy, &ry, 1e-5);
            close_grad("dq", &fg, &rg, &q, 1e-5);
            close_grad("dk", &fg, &rg, &k, 1e-5);
            close_grad("dv", &fg, &rg, &v, 1e-5);
        }
    }

    #[test]
    fn inconsistent_shapes_are_errors_not_out_of_bounds_accesses() {
        let heads = Heads {
            heads: 4,
            kv_heads: 2,
            dim: 3,
        };
        let q = t3((1, 5, 12), 60);
        let mask = vec![0.0; 5 * 7];
        for (k, v) in [
            ((1, 7, 6), (1, 7, 4)),
            ((1, 7, 6), (2, 7, 6)),
            ((1, 7, 5), (1, 7, 5)),
        ] {
            let run = attention(
                q.clone().leaky_traced(),
                t3(k, 61),
                t3(v, 62),
                heads,
                mask.clone(),
                None,
            );
            assert!(run.is_err(), "k {k:?}, v {v:?}");
        }
    }
}
