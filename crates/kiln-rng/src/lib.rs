//! kiln's one random number generator: SplitMix64 (Steele, Lea & Flood 2014). One u64 of state,
//! passes BigCrush, trivial to port (the Python references use the same function), and
//! serialisable, so exact resume restores every stream (initialisation, dropout, sampling,
//! data order, bootstrap resampling) from saved state. Candle's CPU `rand`/`randn` cannot be
//! seeded, which is why kiln draws its own.

/// Golden-ratio increment of the state (and the data sampler's row spreading).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output for state `x` before its increment: `splitmix64(x)` is the first value
/// of `SplitMix64::new(x)`. Stateless, for hashing a seed and an index into one draw.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator: its whole state is `state`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SplitMix64 {
    pub state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        let out = splitmix64(self.state);
        self.state = self.state.wrapping_add(GOLDEN);
        out
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform index in `0..n` (n > 0), by the high bits of a 128-bit product (no modulo bias
    /// worth the name for the n kiln uses).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal by Box-Muller.
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference values of the published algorithm (seed 0), and the stateless form
    /// agreeing with the stream.
    #[test]
    fn reference_values() {
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(r.next_u64(), 0x06C4_5D18_8009_454F);
        let mut s = SplitMix64::new(1337);
        assert_eq!(s.next_u64(), splitmix64(1337));
        assert_eq!(s.next_u64(), splitmix64(1337u64.wrapping_add(GOLDEN)));
        let mut t = SplitMix64::new(9);
        for _ in 0..1000 {
            let u = t.next_f64();
            assert!((0.0..1.0).contains(&u));
            assert!(t.below(7) < 7);
            assert!(t.next_normal().is_finite());
        }
    }
}
