//! Linear layers: `x·W (+ bias)` for either stored layout of the weight, a range of a fused
//! weight's outputs computed alone, and the feature ranges that split a fused output.

use super::buffer::{column_sums, elements, row_major};
use super::product::{product, Mat};
use super::{Taped, R3};
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use rayon::prelude::*;

/// The weight of a linear layer as stored: `[in, out]` (GPT-2's Conv1D) or `[out, in]`.
pub struct Weight {
    pub w: Tensor<(usize, usize), f32, Cpu>,
    pub out_in: bool,
    pub trainable: bool,
}

/// A parameter vector (bias, norm weight) and whether it is trained (gets a gradient).
pub struct Vector {
    pub v: Tensor<(usize,), f32, Cpu>,
    pub trainable: bool,
}

/// `x·W (+ bias)` over the last axis of `x` `[b, s, in]`, for the outputs `outputs` (all when
/// `None`): a range of a fused weight (GPT-2's c_attn read as q, k, v) is computed alone, from
/// that block of the weight, with no full product to slice.
pub fn linear(
    x: Taped<R3>,
    weight: Weight,
    bias: Option<Vector>,
    outputs: Option<(usize, usize)>,
) -> Result<Taped<R3>, String> {
    let (x, mut tape) = row_major(x).split_tape();
    let (b, s, k) = *x.shape();
    let (rows, cols) = *weight.w.shape();
    let (w_in, all) = if weight.out_in {
        (cols, rows)
    } else {
        (rows, cols)
    };
    if w_in != k {
        return Err(format!(
            "an input of width {k} meets a weight of [{rows}, {cols}]"
        ));
    }
    let (first, end) = outputs.unwrap_or((0, all));
    if first >= end || end > all {
        return Err(format!("outputs {first}..{end} of a weight with {all}"));
    }
    let (m, n) = (b * s, end - first);
    // Where output `first` starts in the weight (and its gradient), as stored.
    let offset = if weight.out_in { first * cols } else { first };
    // The used block of W as the [in, out] matrix of the product, whichever way it is stored.
    let as_in_out = move |w: &[f32]| {
        if weight.out_in {
            Mat::at(&w[offset..], n, cols, cols).t()
        } else {
            Mat::at(&w[offset..], rows, n, cols)
        }
    };
    let mut y = match &bias {
        Some(bias) => {
            let bias = elements(&bias.v);
            if bias.len() != all {
                return Err(format!("a bias of {} for {all} outputs", bias.len()));
            }
            let bias = &bias[first..end];
            let mut y = vec![0.0f32; m * n];
            y.par_chunks_mut(n)
                .for_each(|row| row.copy_from_slice(bias));
            y
        }
        None => vec![0.0f32; m * n],
    };
    {
        let xs = elements(&x);
        let ws = elements(&weight.w);
        // SAFETY: `y` is m × n; `xs` m × k; `ws` holds the k × n weight.
        unsafe {
            product(
                y.as_mut_ptr(),
                n,
                Mat::rows(&xs, m, k),
                as_in_out(&ws),
                bias.is_some(),
                1.0,
                true,
            )
        };
    }
    let out = x.device().tensor_from_vec(y, (b, s, n));
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    // The input's values only for the weight's gradient: a frozen weight's input is not kept.
    let x_grad = x.ghost();
    let x = weight.trainable.then_some(x);
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let ws = elements(&weight.w);
        let dy_mat = Mat::rows(&dy, m, n);
        let gx = grads.get_or_alloc_mut(&x_grad)?;
        // SAFETY: shapes as in the forward product; gradients are row-major like their tensors.
        unsafe {
            product(
                gx.as_mut_ptr(),
                k,
                dy_mat,
                as_in_out(&ws).t(),
                true,
                1.0,
                true,
            )
        };
        if let Some(x) = &x {
            let xs = elements(x);
            let gw = grads.get_or_alloc_mut(&weight.w)?;
            let x_mat = Mat::rows(&xs, m, k);
            let dst = gw[offset..].as_mut_ptr();
            // SAFETY: the weight's gradient is rows × cols like the weight; the used block
            // starts at `offset` with rows `cols` apart.
            unsafe {
                if weight.out_in {
                    product(dst, cols, dy_mat.t(), x_mat, true, 1.0, true)
                } else {
                    product(dst, cols, x_mat.t(), dy_mat, true, 1.0, true)
                }
            }
        }
        if let Some(bias) = bias.as_ref().filter(|b| b.trainable) {
            let gb = grads.get_or_alloc_mut(&bias.v)?;
            let sums = column_sums(&dy, n);
            gb[first..end]
                .iter_mut()
                .zip(&sums)
                .for_each(|(g, s)| *g += s);
        }
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    Ok(result.put_tape(tape))
}

/// Features `start..end` of `x` `[b, s, n]` (GPT-2's q, k and v from the fused c_attn output):
/// a copy per row forward, an add into the range backward (dfdx's slice walks indices one
/// element at a time).
pub fn columns(x: Taped<R3>, start: usize, end: usize) -> Result<Taped<R3>, String> {
    let (x, mut tape) = row_major(x).split_tape();
    let (b, s, n) = *x.shape();
    if start >= end || end > n {
        return Err(format!("features {start}..{end} of a tensor with {n}"));
    }
    let width = end - start;
    let mut y = vec![0.0f32; b * s * width];
    {
        let xs = elements(&x);
        y.par_chunks_mut(width)
            .zip(xs.par_chunks(n))
            .for_each(|(y, x)| y.copy_from_slice(&x[start..end]));
    }
    let out = x.device().tensor_from_vec(y, (b, s, width));
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    let x = x.ghost();
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let gx = grads.get_or_alloc_mut(&x)?;
        gx.par_chunks_mut(n)
            .zip(dy.par_chunks(width))
            .for_each(|(g, dy)| {
                g[start..end].iter_mut().zip(dy).for_each(|(g, d)| *g += d);
            });
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
    fn linear_matches_matmul_for_both_layouts_with_and_without_bias() {
        for (out_in, with_bias, trainable) in [
            (false, true, true),
            (true, false, true),
            (true, true, false),
        ] {
            let (b, s, k, n) = (2, 5, 7, 3);
            let x = t3((b, s, k), 1);
            let w = if out_in { t2(n, k, 2) } else { t2(k, n, 2) };
            let bias = t1(n, 3);
            let fast = linear(
                x.clone().leaky_traced(),
                Weight {
                    w: w.clone(),
                    out_in,
                    trainable,
                },
                with_bias.then(|| Vector {
                    v: bias.clone(),
                    trainable: true,
                }),
                None,
            )
            .unwrap();
            let (fast_y, fast_g) = probe(fast, 9);
            let xt = x.clone().leaky_traced();
            let wt = w.clone().leaky_traced();
            let y = if out_in {
                xt.matmul(wt.permute::<_, Axes2<1, 0>>())
            } else {
                xt.matmul(wt)
            };
            let y = if with_bias {
                y + bias
                    .clone()
                    .leaky_traced()
                    .broadcast_like::<_, Axes2<0, 1>>(&(b, s, n))
            } else {
                y
            };
            let (ref_y, ref_g) = probe(y, 9);
            close("y", &fast_y, &ref_y, 1e-5);
            close_grad("dx", &fast_g, &ref_g, &x, 1e-5);
            if trainable {
                close_grad("dw", &fast_g, &ref_g, &w, 1e-5);
            }
            if with_bias {
                close_grad("db", &fast_g, &ref_g, &bias, 1e-5);
            }
        }
    }

    #[test]
    fn a_range_of_outputs_is_the_slice_of_the_full_product() {
        let (b, s, k, all) = (2, 3, 4, 9);
        for out_in in [false, true] {
            let x = t3((b, s, k), 40);
            let w = if out_in {
                t2(all, k, 41)
            } else {
                t2(k, all, 41)
            };
            let bias = t1(all, 42);
            let run = |range: Option<(usize, usize)>| {
                let y = linear(
                    x.clone().leaky_traced(),
                    Weight {
                        w: w.clone(),
                        out_in,
                        trainable: true,
                    },
                    Some(Vector {
                        v: bias.clone(),
                        trainable: true,
                    }),
                    range,
                )
                .unwrap();
                match range {
                    Some(_) => probe(y, 43),
                    None => probe(y.slice((.., .., 3..6)).realize::<R3>(), 43),
                }
            };
            let ((fy, fg), (ry, rg)) = (run(Some((3, 6))), run(None));
            close("y", &fy, &ry, 1e-6);
            close_grad("dx", &fg, &rg, &x, 1e-6);
            close_grad("dw", &fg, &rg, &w, 1e-6);
            close_grad("db", &fg, &rg, &bias, 1e-6);
        }
    }

    #[test]
    fn columns_match_dfdx_slices() {
        let x = t3((2, 3, 9), 50);
        let (fy, fg) = probe(columns(x.clone().leaky_traced(), 3, 7).unwrap(), 51);
        let reference = x
            .clone()
            .leaky_traced()
            .slice((.., .., 3..7))
            .realize::<R3>();
        let (ry, rg) = probe(reference, 51);
        close("y", &fy, &ry, 0.0);
        close_grad("dx", &fg, &rg, &x, 0.0);
        assert!(columns(x.leaky_traced(), 7, 10).is_err());
    }

    #[test]
    fn a_strided_input_is_read_in_its_logical_order() {
        // A transposed view: the kernel must not read the buffer in storage order.
        let x = t3((3, 4, 2), 4);
        let w = t2(4, 5, 5);
        let run = |fast: bool| {
            let xt = x.clone().leaky_traced().permute::<_, Axes3<0, 2, 1>>();
            let out = if fast {
                linear(
                    xt,
                    Weight {
                        w: w.clone(),
                        out_in: false,
                        trainable: true,
                    },
                    None,
                    None,
                )
                .unwrap()
            } else {
                xt.matmul(w.clone().leaky_traced())
            };
            probe(out, 6)
        };
        let ((fy, fg), (ry, rg)) = (run(true), run(false));
        close("y", &fy, &ry, 1e-5);
        close_grad("dx", &fg, &rg, &x, 1e-5);
    }
}
