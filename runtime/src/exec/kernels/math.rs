//! Scalar math written so that loops over it vectorize: e^x for the softmaxes and activations,
//! tanh and erf for the GELUs.

/// e^x to about one ulp: 2^n · e^r with r = x − n·ln 2 in [−ln2/2, ln2/2] and a degree-7
/// Taylor polynomial for e^r; 0 below e^−87.3 (where f32 leaves normal numbers).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let clamped = x.clamp(-87.3, 88.3);
    // Ties to even: one vector instruction (`round` is a library call).
    let n = (clamped * std::f32::consts::LOG2_E).round_ties_even();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// tanh(u) = 1 − 2/(e^{2u} + 1): exact to a few 1e-8 in absolute terms, which is what GELU's
/// (1 + tanh) and (1 − tanh²) need.
#[inline(always)]
pub(super) fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u.clamp(-10.0, 10.0)) + 1.0)
}

/// erf(x) to 1.5e-7 (Abramowitz & Stegun 7.1.26), in absolute terms, which is what the erf
/// GELU's 1 + erf needs.
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_range_softmax_uses() {
        for i in 0..18_800 {
            let x = -100.0 + i as f32 * 0.01;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            if x < -87.3 {
                assert_eq!(got, 0.0);
            } else {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            }
        }
    }
}
