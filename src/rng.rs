//! A small deterministic random generator (xorshift64*), so a seed always gives the same run on
//! every platform: integer arithmetic only, and no dependency on a randomness crate.

#[derive(Debug, Clone)]
pub struct Rng {
    // Never zero: xorshift maps zero to zero forever.
    state: u64,
}

impl Rng {
    /// Any seed, 0 included: splitmix64 spreads it so nearby seeds give unrelated streams.
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng {
            state: if z == 0 { 0x2545_F491_4F6C_DD1D } else { z },
        }
    }

    /// An independent stream for one purpose (one key, one team), so adding draws in one place
    /// does not shift every other stream.
    pub fn stream(seed: u64, purpose: u64) -> Rng {
        Rng::new(seed ^ purpose.wrapping_mul(0xD6E8_FEB8_6659_FD93))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..bound`; `bound` must be positive. The multiply-high method: no modulo bias
    /// worth measuring at the bounds used here (all far below 2^32).
    pub fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        debug_assert!(low <= high);
        low + self.below(high - low + 1)
    }

    /// True with probability `per_million / 1,000,000`.
    pub fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_stream() {
        let mut first = Rng::new(42);
        let mut second = Rng::new(42);
        let a: Vec<u64> = (0..100).map(|_| first.next_u64()).collect();
        let b: Vec<u64> = (0..100).map(|_| second.next_u64()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn different_seeds_and_purposes_give_different_streams() {
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
        assert_ne!(Rng::stream(1, 1).next_u64(), Rng::stream(1, 2).next_u64());
    }

    #[test]
    fn seed_zero_still_moves() {
        let mut rng = Rng::new(0);
        let values: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert!(values.iter().all(|value| *value != 0));
        assert_ne!(values[0], values[1]);
    }

    #[test]
    fn draws_stay_within_their_bounds_and_cover_them() {
        let mut rng = Rng::new(7);
        let mut seen = [false; 6];
        for _ in 0..1_000 {
            let value = rng.between(10, 15);
            assert!((10..=15).contains(&value));
            seen[(value - 10) as usize] = true;
        }
        assert!(seen.iter().all(|hit| *hit));
    }

    #[test]
    fn chance_follows_its_probability_roughly() {
        let mut rng = Rng::new(3);
        let hits = (0..100_000).filter(|_| rng.chance(250_000)).count();
        assert!((23_000..27_000).contains(&hits), "{hits}");
    }
}
