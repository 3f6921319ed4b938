//! Inverted dropout from a mask of kept elements.

use super::buffer::{elements, row_major};
use super::{Taped, CHUNK};
use dfdx::prelude::*;
use rayon::prelude::*;

/// Inverted dropout: `x · scale` where `keep`, else 0. The backward needs only the mask, one
/// byte an element (a product with a mask tensor keeps its input and a float mask).
pub fn dropout<S: Shape>(x: Taped<S>, keep: Vec<bool>, scale: f32) -> Result<Taped<S>, String> {
    let (x, mut tape) = row_major(x).split_tape();
    let shape = *x.shape();
    if keep.len() != shape.num_elements() {
        return Err(format!(
            "a dropout mask of {} for {} values",
            keep.len(),
            shape.num_elements()
        ));
    }
    let factor = move |k: bool| if k { scale } else { 0.0 };
    let mut y = vec![0.0f32; keep.len()];
    {
        let xs = elements(&x);
        y.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(keep.par_chunks(CHUNK)))
            .for_each(|(y, (x, keep))| {
                for ((y, &x), &k) in y.iter_mut().zip(x).zip(keep) {
                    *y = x * factor(k);
                }
            });
    }
    let out = x.device().tensor_from_vec(y, shape);
    let result = out.clone();
    let (out, x) = (out.ghost(), x.ghost());
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let gx = grads.get_or_alloc_mut(&x)?;
        gx.par_chunks_mut(CHUNK)
            .zip(dy.par_chunks(CHUNK).zip(keep.par_chunks(CHUNK)))
            .for_each(|(g, (dy, keep))| {
                for ((g, &dy), &k) in g.iter_mut().zip(dy).zip(keep) {
                    *g += dy * factor(k);
                }
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
    fn dropout_equals_a_product_with_its_mask() {
        let shape = (2, 3, 5);
        let x = t3(shape, 40);
        let keep: Vec<bool> = (0..30).map(|i| i % 3 != 1).collect();
        let scale = 1.0 / 0.9f32;
        let mask: Vec<f32> = keep.iter().map(|&k| if k { scale } else { 0.0 }).collect();
        let fast = dropout(x.clone().leaky_traced(), keep, scale).unwrap();
        let fast_values = fast.as_vec();
        let fast_grads = (fast * t3(shape, 41)).sum::<(), _>().backward();
        let reference = x.clone().leaky_traced() * Cpu::default().tensor_from_vec(mask, shape);
        let ref_values = reference.as_vec();
        let ref_grads = (reference * t3(shape, 41)).sum::<(), _>().backward();
        assert_eq!(fast_values, ref_values);
        assert_eq!(fast_grads.get(&x).as_vec(), ref_grads.get(&x).as_vec());
        assert!(dropout(x.leaky_traced(), vec![true; 29], scale).is_err());
    }
}
