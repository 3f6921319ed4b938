//! The runtime's random numbers, from two generators:
//!
//! - `Rng`, a sequential SplitMix64 stream, for what is drawn once before training (initial
//!   weights, the data order, masked-LM masks, PET's copies): the same wherever the run goes.
//! - `Key`, counter-based (Threefry-2x32, as JAX draws), for every decision made during a step
//!   (dropout, sampling). Its bits are a function of coordinates, not of a draw order: the
//!   mask of an element is `key(seed, purpose, step, node, global row)` applied to the element's
//!   index in its row of the whole tensor, so that a device holding any share of any microbatch
//!   computes exactly the bits one device would, and a run may change its mesh on resume.

/// SplitMix64 for initialisation and shuffling (seeded, reproducible everywhere).
pub(crate) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn uniform(&mut self) -> f64 {
        unit(self.next())
    }

    /// Box–Muller.
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// 64 bits as a uniform number in [0, 1) (their top 53).
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// What a run draws during its steps, each from a stream of its own under the run's seed, so
/// that no two kinds of decision share bits.
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    Dropout = 1,
    /// PPO's rollouts during training.
    Sampling = 2,
    /// PPO's evaluation rollouts: the same draws at every evaluation, whatever the run's
    /// length, so that runs compare.
    EvalSampling = 3,
}

/// A key of the counter-based generator: `bits(counter)` is a keyed bijection of the counter
/// (Threefry-2x32 with 20 rounds; Salmon et al. 2011, "Parallel Random Numbers: As Easy as 1,
/// 2, 3"), so any bit of a stream is computed on its own, in any order, on any device. Keys
/// of sub-streams are folded in from coordinates (JAX's `fold_in`): the key of the coordinates
/// `(a, b)` is `Key(seed).fold(a).fold(b)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key(u64);

impl Key {
    /// The root key of a run's `purpose`.
    pub fn of(seed: u64, purpose: Purpose) -> Key {
        Key(seed).fold(purpose as u64)
    }

    /// The key of the sub-stream numbered `data`.
    pub fn fold(self, data: u64) -> Key {
        Key(self.bits(data))
    }

    /// The 64 bits at `counter` of this key's stream.
    pub fn bits(self, counter: u64) -> u64 {
        let [hi, lo] = threefry2x32(halves(self.0), halves(counter));
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// The key itself, as a kernel that draws from its stream takes it.
    pub fn value(self) -> u64 {
        self.0
    }

    /// The number in [0, 1) at `counter` of this key's stream.
    pub fn uniform(self, counter: u64) -> f64 {
        unit(self.bits(counter))
    }
}

fn halves(x: u64) -> [u32; 2] {
    [(x >> 32) as u32, x as u32]
}

/// Threefry-2x32, 20 rounds (Random123's `threefry2x32`, JAX's `threefry_2x32`): five groups
/// of four add-rotate-xor rounds, the key schedule injected after each group.
fn threefry2x32(key: [u32; 2], counter: [u32; 2]) -> [u32; 2] {
    const ROTATIONS: [[u32; 4]; 2] = [[13, 15, 26, 6], [17, 29, 16, 24]];
    let ks = [key[0], key[1], key[0] ^ key[1] ^ 0x1BD1_1BDA];
    let mut x = [
        counter[0].wrapping_add(ks[0]),
        counter[1].wrapping_add(ks[1]),
    ];
    for group in 0..5 {
        for r in ROTATIONS[group % 2] {
            x[0] = x[0].wrapping_add(x[1]);
            x[1] = x[1].rotate_left(r) ^ x[0];
        }
        x[0] = x[0].wrapping_add(ks[(group + 1) % 3]);
        x[1] = x[1]
            .wrapping_add(ks[(group + 2) % 3])
            .wrapping_add(group as u32 + 1);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known answers (also JAX's `testThreefry2x32`): (key, counter, output).
    #[test]
    fn threefry_gives_the_known_answers() {
        for (key, counter, out) in [
            ([0, 0], [0, 0], [0x6b20_0159, 0x99ba_4efe]),
            ([u32::MAX; 2], [u32::MAX; 2], [0x1cb9_96fc, 0xbb00_2be7]),
            (
                [0x1319_8a2e, 0x0370_7344],
                [0x243f_6a88, 0x85a3_08d3],
                [0xc492_3a9c, 0x483d_f7a0],
            ),
        ] {
            assert_eq!(threefry2x32(key, counter), out);
        }
    }

    #[test]
    fn a_key_gives_the_same_bits_and_other_keys_other_bits() {
        let key = Key::of(7, Purpose::Dropout).fold(3).fold(11);
        let row: Vec<u64> = (0..64).map(|i| key.bits(i)).collect();
        assert_eq!(row, (0..64).map(|i| key.bits(i)).collect::<Vec<_>>());
        // Each coordinate matters: seed, purpose, every folded number, the counter.
        let others = [
            Key::of(8, Purpose::Dropout).fold(3).fold(11),
            Key::of(7, Purpose::Sampling).fold(3).fold(11),
            Key::of(7, Purpose::Dropout).fold(4).fold(11),
            Key::of(7, Purpose::Dropout).fold(3).fold(12),
            Key::of(7, Purpose::Dropout).fold(11).fold(3),
        ];
        for other in others {
            assert_ne!(other, key);
            let same = (0..64)
                .filter(|&i| other.bits(i) == row[i as usize])
                .count();
            assert_eq!(same, 0, "{other:?} repeats {key:?}'s bits");
        }
        let mut sorted = row.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), row.len(), "a stream does not repeat itself");
    }

    /// Bits are computed per coordinate: a slice of a row drawn alone (a device's share of a
    /// sequence, in reverse order even) is the whole row's bits at those coordinates.
    #[test]
    fn a_share_of_a_row_has_the_whole_rows_bits() {
        let key = Key::of(7, Purpose::Dropout).fold(5).fold(2);
        let whole: Vec<u64> = (0..1000).map(|i| key.bits(i)).collect();
        let share: Vec<u64> = (250..500).rev().map(|i| key.bits(i)).collect();
        assert!(share.iter().rev().eq(&whole[250..500]));
    }

    #[test]
    fn uniform_numbers_are_uniform() {
        let key = Key::of(1, Purpose::Sampling).fold(0);
        let n = 20_000;
        let mut buckets = [0usize; 10];
        for i in 0..n {
            let u = key.uniform(i);
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((b as f64 / n as f64 - 0.1).abs() < 0.01, "{buckets:?}");
        }
    }
}
