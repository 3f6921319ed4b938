//! Layer norm and RMS norm over the last axis (one kernel: RMS norm is layer norm without
//! centring or bias), with their statistics kept per row for the backward.

use super::buffer::{add_grad, elements, row_major, sum_blocks, vectorized};
use super::linear::Vector;
use super::{Taped, CHUNK, R3};
use dfdx::prelude::*;
use rayon::prelude::*;

/// How a norm treats each row's mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Centring {
    /// Layer norm: (x − mean)/√(var + eps)·w (+ b), var biased as in PyTorch.
    Centred,
    /// RMS norm (LLaMA's, Zhang & Sennrich 2019): x/√(mean(x²) + eps)·w.
    Uncentred,
}

/// Layer norm or RMS norm over the last axis (see [`Centring`]).
pub fn norm(
    x: Taped<R3>,
    weight: Vector,
    bias: Option<Vector>,
    eps: f32,
    centring: Centring,
) -> Result<Taped<R3>, String> {
    let centred = centring == Centring::Centred;
    let (x, mut tape) = row_major(x).split_tape();
    let shape = *x.shape();
    let h = shape.2;
    let rows = shape.0 * shape.1;
    if h == 0 || rows == 0 {
        return Err(format!("layer norm of a tensor of shape {shape:?}"));
    }
    let w = elements(&weight.v).into_owned();
    let b = match &bias {
        Some(b) => elements(&b.v).into_owned(),
        None => vec![0.0; h],
    };
    if w.len() != h || b.len() != h {
        return Err(format!("norm parameters of {} for width {h}", w.len()));
    }
    let mut y = vec![0.0f32; rows * h];
    // (mean, 1/σ) per row, kept for the backward.
    let mut stats = vec![0.0f32; rows * 2];
    {
        let xs = elements(&x);
        y.par_chunks_mut(h)
            .zip(xs.par_chunks(h))
            .zip(stats.par_chunks_mut(2))
            .for_each(|((y, x), stat)| {
                vectorized(|| {
                    let mean = if centred {
                        x.iter().sum::<f32>() / h as f32
                    } else {
                        0.0
                    };
                    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
                    let inv = 1.0 / (var + eps).sqrt();
                    for (((y, x), w), b) in y.iter_mut().zip(x).zip(&w).zip(&b) {
                        *y = (x - mean) * inv * w + b;
                    }
                    stat[0] = mean;
                    stat[1] = inv;
                })
            });
    }
    let out = x.device().tensor_from_vec(y, shape);
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let xs = elements(&x);
        let rows_per_task = (CHUNK / h).max(1);
        let gx_all = grads.get_or_alloc_mut(&x)?;
        // Per block of rows: the input gradient, and partial sums for w (first half) and b.
        let mut partial = vec![0.0f32; rows.div_ceil(rows_per_task) * 2 * h];
        gx_all
            .par_chunks_mut(rows_per_task * h)
            .zip(xs.par_chunks(rows_per_task * h))
            .zip(dy.par_chunks(rows_per_task * h))
            .zip(stats.par_chunks(rows_per_task * 2))
            .zip(partial.par_chunks_mut(2 * h))
            .for_each(|((((gx, x), dy), stats), sums)| {
                let (gw, gb) = sums.split_at_mut(h);
                vectorized(|| {
                    for (((gx, x), dy), stat) in gx
                        .chunks_mut(h)
                        .zip(x.chunks(h))
                        .zip(dy.chunks(h))
                        .zip(stats.chunks(2))
                    {
                        let (mean, inv) = (stat[0], stat[1]);
                        let mut mean_g = 0.0f32;
                        let mut mean_gx = 0.0f32;
                        for (((x, dy), w), (gw, gb)) in x
                            .iter()
                            .zip(dy)
                            .zip(&w)
                            .zip(gw.iter_mut().zip(gb.iter_mut()))
                        {
                            let xhat = (x - mean) * inv;
                            let g = dy * w;
                            mean_g += g;
                            mean_gx += g * xhat;
                            *gw += dy * xhat;
                            *gb += dy;
                        }
                        // Without centring, the mean's gradient term is absent.
                        mean_g = if centred { mean_g / h as f32 } else { 0.0 };
                        mean_gx /= h as f32;
                        for ((gx, x), (dy, w)) in gx.iter_mut().zip(x).zip(dy.iter().zip(&w)) {
                            let xhat = (x - mean) * inv;
                            *gx += inv * (dy * w - mean_g - xhat * mean_gx);
                        }
                    }
                });
            });
        let sums = sum_blocks(&partial, 2 * h);
        let (gw, gb) = sums.split_at(h);
        if weight.trainable {
            add_grad(grads, &weight.v, gw)?;
        }
        if let Some(b) = bias.as_ref().filter(|b| b.trainable) {
            add_grad(grads, &b.v, gb)?;
        }
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    Ok(result.put_tape(tape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::kernels::testing::*;

    #[test]
    fn layer_norm_matches_dfdx() {
        let shape = (2, 33, 37);
        let x = t3(shape, 10);
        let (w, b) = (t1(37, 11), t1(37, 12));
        let fast = norm(
            x.clone().leaky_traced(),
            Vector {
                v: w.clone(),
                trainable: true,
            },
            Some(Vector {
                v: b.clone(),
                trainable: true,
            }),
            1e-5,
            Centring::Centred,
        )
        .unwrap();
        let (fy, fg) = probe(fast, 13);
        let reference = x.clone().leaky_traced().normalize::<Axis<2>>(1e-5)
            * w.clone()
                .leaky_traced()
                .broadcast_like::<_, Axes2<0, 1>>(&shape)
            + b.clone()
                .leaky_traced()
                .broadcast_like::<_, Axes2<0, 1>>(&shape);
        let (ry, rg) = probe(reference, 13);
        close("y", &fy, &ry, 1e-5);
        close_grad("dx", &fg, &rg, &x, 1e-4);
        close_grad("dw", &fg, &rg, &w, 1e-4);
        close_grad("db", &fg, &rg, &b, 1e-4);
    }

    #[test]
    fn rms_norm_matches_dfdx() {
        let shape = (3, 17, 45);
        let x = t3(shape, 20);
        let w = t1(45, 21);
        let weight = Vector {
            v: w.clone(),
            trainable: true,
        };
        let fast = norm(
            x.clone().leaky_traced(),
            weight,
            None,
            1e-6,
            Centring::Uncentred,
        )
        .unwrap();
        let (fy, fg) = probe(fast, 22);
        let (xs, tape) = x.clone().leaky_traced().split_tape();
        let ms = xs
            .clone()
            .put_tape(tape)
            .square()
            .mean::<(usize, usize), Axis<2>>();
        let inv = (ms + 1e-6)
            .sqrt()
            .recip()
            .broadcast_like::<_, Axis<2>>(&shape);
        let reference = inv
            * xs
            * w.clone()
                .leaky_traced()
                .broadcast_like::<_, Axes2<0, 1>>(&shape);
        let (ry, rg) = probe(reference, 22);
        close("y", &fy, &ry, 1e-5);
        close_grad("dx", &fg, &rg, &x, 1e-4);
        close_grad("dw", &fg, &rg, &w, 1e-4);
    }
}
