//! Optimizers and learning-rate schedules over host tensors: AdamW with decoupled weight decay
//! (Loshchilov & Hutter), SGD with momentum, global-norm gradient clipping. Frozen parameters
//! are never given state nor updated.

use kiln_compiler::spec::{LrSchedule, Optimizer, ScheduleKind};
use rayon::prelude::*;

/// Elements per parallel task of an update (each element's update is independent of the
/// others, so splitting changes nothing in the result).
const CHUNK: usize = 1 << 15;

/// Learning rate at `step` (0-based) of `total`: linear warmup, then the schedule's decay down
/// to `min_lr_ratio` of the peak.
pub fn learning_rate(peak: f64, schedule: &LrSchedule, step: u64, total: u64) -> f64 {
    let warmup = schedule.warmup;
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let floor = schedule.min_lr_ratio;
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let factor = match schedule.kind {
        ScheduleKind::Constant | ScheduleKind::Warmup => 1.0,
        ScheduleKind::Linear => floor + (1.0 - floor) * (1.0 - progress),
        ScheduleKind::Cosine => {
            floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    };
    peak * factor
}

/// What gradients of global L2 norm `norm` are multiplied by to bring it to at most
/// `max_norm` (PyTorch's `clip_grad_norm_`).
pub fn clip_factor(norm: f64, max_norm: f64) -> f32 {
    if norm > max_norm && norm > 0.0 {
        (max_norm / (norm + 1e-6)) as f32
    } else {
        1.0
    }
}

/// Per-parameter optimizer state (first and second moments, or momentum).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// Applies one step to every parameter that has a gradient; `step` counts from 1.
pub fn step(
    optimizer: &Optimizer,
    lr: f64,
    step: u64,
    params: &mut [Vec<f32>],
    grads: &[Option<Vec<f32>>],
    states: &mut [Option<State>],
) {
    for ((p, g), state) in params.iter_mut().zip(grads).zip(states.iter_mut()) {
        let Some(g) = g else { continue };
        let st = state.get_or_insert_with(|| State {
            m: vec![0.0; p.len()],
            v: vec![0.0; p.len()],
        });
        match *optimizer {
            Optimizer::Adamw {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => {
                let (b1, b2) = (beta1 as f32, beta2 as f32);
                let c1 = 1.0 - beta1.powi(step as i32);
                let c2 = 1.0 - beta2.powi(step as i32);
                let (lr32, wd) = (lr as f32, (lr * weight_decay) as f32);
                p.par_chunks_mut(CHUNK)
                    .zip(st.m.par_chunks_mut(CHUNK))
                    .zip(st.v.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)))
                    .for_each(|((p, m), (v, g))| {
                        for (((p, m), v), g) in p.iter_mut().zip(m).zip(v).zip(g) {
                            *m = b1 * *m + (1.0 - b1) * g;
                            *v = b2 * *v + (1.0 - b2) * g * g;
                            let m_hat = *m as f64 / c1;
                            let v_hat = *v as f64 / c2;
                            // Decoupled weight decay: applied to the weight, not mixed into the
                            // gradient.
                            *p -= wd * *p;
                            *p -= lr32 * (m_hat / (v_hat.sqrt() + eps)) as f32;
                        }
                    });
            }
            Optimizer::Sgd {
                momentum,
                weight_decay,
                nesterov,
                ..
            } => {
                let (mu, wd, lr32) = (momentum as f32, weight_decay as f32, lr as f32);
                p.par_chunks_mut(CHUNK)
                    .zip(st.m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)))
                    .for_each(|(p, (m, g))| {
                        for ((p, m), g) in p.iter_mut().zip(m).zip(g) {
                            let d = g + wd * *p;
                            *m = mu * *m + d;
                            let update = if nesterov { d + mu * *m } else { *m };
                            *p -= lr32 * update;
                        }
                    });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind, warmup: u64) -> LrSchedule {
        LrSchedule {
            kind,
            warmup,
            min_lr_ratio: 0.0,
        }
    }

    #[test]
    fn schedules() {
        let cos = schedule(ScheduleKind::Cosine, 10);
        assert!(
            (learning_rate(1.0, &cos, 0, 110) - 0.1).abs() < 1e-12,
            "warmup starts at lr/warmup"
        );
        assert!((learning_rate(1.0, &cos, 9, 110) - 1.0).abs() < 1e-12);
        assert!(
            (learning_rate(1.0, &cos, 60, 110) - 0.5).abs() < 1e-12,
            "half way down the cosine"
        );
        assert!(learning_rate(1.0, &cos, 109, 110) < 1e-3);
        assert_eq!(
            learning_rate(2.0, &schedule(ScheduleKind::Constant, 0), 50, 100),
            2.0
        );
        assert!(
            (learning_rate(1.0, &schedule(ScheduleKind::Linear, 0), 50, 100) - 0.5).abs() < 1e-12
        );
    }

    /// One AdamW step from zero state, checked by hand: m̂ = g, v̂ = g², so the update is
    /// lr·g/(|g| + eps) = lr·sign(g) (for eps ≪ |g|), after the decay p·(1 − lr·wd).
    #[test]
    fn adamw_first_step() {
        let opt = Optimizer::Adamw {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.5,
        };
        let mut params = vec![vec![1.0f32, -2.0]];
        let grads = vec![Some(vec![0.3f32, -0.7])];
        let mut states = vec![None];
        step(&opt, 0.1, 1, &mut params, &grads, &mut states);
        let expected = [1.0 * (1.0 - 0.05) - 0.1, -2.0 * (1.0 - 0.05) + 0.1];
        for (p, e) in params[0].iter().zip(expected) {
            assert!((*p as f64 - e).abs() < 1e-6, "{p} vs {e}");
        }
    }

    #[test]
    fn frozen_parameters_are_untouched_and_clipping_bounds_the_norm() {
        let opt = Optimizer::Sgd {
            lr: 1.0,
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        };
        let mut params = vec![vec![1.0f32], vec![5.0]];
        let factor = clip_factor(3.0, 1.0);
        assert!((factor - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(
            clip_factor(0.5, 1.0),
            1.0,
            "a norm within the bound is left alone"
        );
        let grads = vec![Some(vec![3.0 * factor]), None];
        let mut states = vec![None, None];
        step(&opt, 1.0, 1, &mut params, &grads, &mut states);
        assert!((params[0][0] - 0.0).abs() < 1e-5, "1 − clipped gradient 1");
        assert_eq!(params[1][0], 5.0);
        assert!(states[1].is_none(), "no state for a frozen parameter");
    }
}
