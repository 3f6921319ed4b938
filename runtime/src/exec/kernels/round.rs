//! Rounding a value to the run's number format (`exec::precision`), recorded on the tape: the
//! gradient that flows back into a rounded value is rounded too, as it would be held in that
//! format.

use super::buffer::elementwise;
use super::Taped;
use crate::exec::precision::Format;
use dfdx::prelude::*;

/// `x` rounded to `format` (itself in f32).
pub fn rounded<S: Shape>(x: Taped<S>, format: Format) -> Taped<S> {
    if format == Format::F32 {
        return x;
    }
    // Forward and backward alike: add the values rounded.
    let round = move |out: &mut [f32], values: &[f32], _: usize| {
        for (o, &v) in out.iter_mut().zip(values) {
            *o += format.round(v);
        }
    };
    elementwise(x, round, round)
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
