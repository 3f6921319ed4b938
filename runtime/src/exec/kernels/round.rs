//! Rounding a value to the run's number format (`exec::precision`), recorded on the tape: the
//! gradient that flows back into a rounded value is rounded too, as it would be held in that
//! format.

use super::buffer::{elements, row_major};
use super::{Taped, CHUNK};
use crate::exec::precision::Format;
use dfdx::prelude::*;
use rayon::prelude::*;

/// `x` rounded to `format` (itself in f32).
pub fn rounded<S: Shape>(x: Taped<S>, format: Format) -> Taped<S> {
    if format == Format::F32 {
        return x;
    }
    let (x, mut tape) = row_major(x).split_tape();
    let shape = *x.shape();
    let mut y = elements(&x).into_owned();
    format.round_all(&mut y);
    let out = x.device().tensor_from_vec(y, shape);
    let result = out.clone();
    let (out, x) = (out.ghost(), x.ghost());
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let gx = grads.get_or_alloc_mut(&x)?;
        gx.par_chunks_mut(CHUNK)
            .zip(dy.par_chunks(CHUNK))
            .for_each(|(g, dy)| {
                for (g, &dy) in g.iter_mut().zip(dy) {
                    *g += format.round(dy);
                }
            });
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    result.put_tape(tape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::kernels::testing::*;

    #[test]
    fn values_and_gradients_are_rounded() {
        let shape = (2, 3, 5);
        let x = t3(shape, 7);
        let upstream = t3(shape, 8);
        let y = rounded(x.clone().leaky_traced(), Format::Bf16);
        let values = y.as_vec();
        let grads = (y * upstream.clone()).sum::<(), _>().backward();
        let round = |v: Vec<f32>| {
            v.into_iter()
                .map(|x| Format::Bf16.round(x))
                .collect::<Vec<_>>()
        };
        assert_eq!(values, round(x.as_vec()));
        assert_eq!(grads.get(&x).as_vec(), round(upstream.as_vec()));
        assert_ne!(values, x.as_vec(), "the test values are not bf16 already");
    }
}
