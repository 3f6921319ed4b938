//! Dynamic loss scaling for fp16 (Micikevicius et al. 2018, "Mixed Precision Training"; the
//! defaults of PyTorch's `GradScaler`): the backward pass starts from the loss times `scale`, so
//! that small gradients stay inside fp16's range; the gradients are divided by it again before
//! clipping and the optimizer. A step whose gradients overflowed (an infinite or NaN global
//! norm, agreed by every device) is skipped, weights and optimizer state untouched, and the
//! scale halved; after `GROWTH_INTERVAL` steps in a row without overflow it doubles.

/// Where the scale starts: 2^16.
const INITIAL: f32 = 65536.0;
const GROWTH_INTERVAL: u64 = 2000;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScale {
    /// What the next step's loss is multiplied by before its backward pass.
    pub scale: f32,
    /// Steps since the last overflow or growth.
    good: u64,
    /// Steps skipped so far: the optimizer has taken that many fewer updates than the run
    /// has taken steps (Adam's bias correction counts updates).
    pub skipped: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale::starting_at(INITIAL)
    }
}

impl LossScale {
    /// A scale that starts at `scale`.
    pub fn starting_at(scale: f32) -> Self {
        LossScale {
            scale,
            good: 0,
            skipped: 0,
        }
    }

    /// After a step: `overflowed` its gradients (the step was skipped) or not.
    pub fn after(&mut self, overflowed: bool) {
        if overflowed {
            // Never down to zero, where no gradient could be seen again.
            self.scale = (self.scale * 0.5).max(f32::MIN_POSITIVE);
            self.good = 0;
            self.skipped += 1;
        } else {
            self.good += 1;
            if self.good == GROWTH_INTERVAL {
                // Never up to infinity, where every step would overflow.
                self.scale = (self.scale * 2.0).min(f32::MAX / 2.0);
                self.good = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_and_doubles_after_a_clean_interval() {
        let mut s = LossScale::default();
        s.after(true);
        assert_eq!((s.scale, s.skipped), (32768.0, 1));
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.after(false);
        }
        assert_eq!(s.scale, 32768.0);
        s.after(false);
        assert_eq!(s.scale, 65536.0);
        s.after(true);
        s.after(false);
        assert_eq!(
            (s.scale, s.skipped),
            (32768.0, 2),
            "an overflow restarts the interval"
        );
    }
}
