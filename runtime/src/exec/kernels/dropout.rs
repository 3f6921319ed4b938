//! Inverted dropout from a mask of kept elements.

use super::buffer::elementwise;
use super::Taped;
use dfdx::prelude::*;
use std::sync::Arc;

/// Inverted dropout: `x · scale` where `keep`, else 0. The backward needs only the mask, one
/// byte an element (a product with a mask tensor keeps its input and a float mask).
pub fn dropout<S: Shape>(x: Taped<S>, keep: Vec<bool>, scale: f32) -> Result<Taped<S>, String> {
    let n = x.shape().num_elements();
    if keep.len() != n {
        return Err(format!("a dropout mask of {} for {n} values", keep.len()));
    }
    // Forward and backward alike: add the values kept, scaled.
    let masked = |keep: Arc<Vec<bool>>| {
        move |out: &mut [f32], values: &[f32], start: usize| {
            let keep = &keep[start..start + out.len()];
            // A dropped value multiplies by 0, so that an infinity still shows (as NaN).
            for ((o, &v), &k) in out.iter_mut().zip(values).zip(keep) {
                *o += v * if k { scale } else { 0.0 };
            }
        }
    };
    let keep = Arc::new(keep);
    Ok(elementwise(x, masked(keep.clone()), masked(keep)))
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
        // A dropped infinity still shows, as the product with a zero mask shows it.
        let inf = Cpu::default().tensor_from_vec(vec![f32::INFINITY, 1.0], (2,));
        let out = dropout(inf.leaky_traced(), vec![false, true], scale).unwrap();
        assert!(out.as_vec()[0].is_nan());
    }
}
