//! The one seeded random generator of the trainer, the samplers and the LoRA initialisers.
//!
//! SplitMix64: its whole state is one `u64`, saved in every training checkpoint, so a resumed
//! run draws the same numbers as one that never stopped.

/// A small deterministic generator (SplitMix64) whose whole state is one `u64`, saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed ^ 0x5851_F42D_4C95_7F2D }
    }
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in (0, 1].
    pub fn uniform_open0(&mut self) -> f64 {
        1.0 - self.uniform()
    }
    /// Standard normal (Box–Muller, one value per call so the state stays one word).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform_open0();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n - 1)
    }
    pub fn categorical(&mut self, w: &[f64]) -> usize {
        let tot: f64 = w.iter().sum();
        let mut u = self.uniform() * tot;
        for (i, x) in w.iter().enumerate() {
            if u < *x {
                return i;
            }
            u -= x;
        }
        w.len() - 1
    }
    pub fn normals_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }
    /// An independent generator derived from this one's next output.
    pub fn fork(&mut self) -> Rng {
        Rng { state: self.next_u64() }
    }
}
