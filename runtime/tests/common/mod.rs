//! Helpers shared by the runtime's integration tests.

/// ‖got − want‖ / ‖want‖, the measure the Hugging Face comparisons use for tensors.
pub fn relative_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (num, den) = got
        .iter()
        .zip(want)
        .fold((0.0f64, 0.0f64), |(n, d), (g, w)| {
            (n + f64::from(g - w).powi(2), d + f64::from(*w).powi(2))
        });
    num.sqrt() / den.sqrt().max(1e-30)
}
