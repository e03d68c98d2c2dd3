//! Deterministic randomness: the schedule's generator and the upload data.
//!
//! Both are written here rather than taken from a crate so that a seed means
//! the same schedule and the same bytes for as long as this file does not
//! change, whatever version of a dependency the lock file moves to.

/// The SplitMix64 increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: a bijective 64-bit mix with good avalanche.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A SplitMix64 generator: small, fast and stable, which is all a schedule
/// needs (nothing here is security-relevant).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(mix(seed ^ 0x6466_732d_6368_616f)) // "dfs-chao"
    }

    /// An independent stream derived from `seed` and a stream number, so
    /// that the operations and the faults do not shift each other when one
    /// of them draws a different number of values.
    pub fn stream(seed: u64, stream: u64) -> Self {
        Self::new(mix(seed ^ mix(stream.wrapping_add(1))))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix(self.0)
    }

    /// A value in `0..n` (0 when `n` is 0), without modulo bias worth noting.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// An index chosen with probability proportional to its weight; `None`
    /// when every weight is zero.
    pub fn weighted(&mut self, weights: &[u64]) -> Option<usize> {
        let total: u64 = weights.iter().sum();
        if total == 0 {
            return None;
        }
        let mut r = self.below(total);
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return Some(i);
            }
            r -= w;
        }
        None
    }
}

/// The bytes of one upload, a pure function of `(run seed, op id, offset)`:
/// any range can be regenerated without the rest, so the history stores a
/// SHA-1 and a size instead of the data, and a checker can recompute any
/// byte range a ranged read returned.
#[derive(Debug, Clone, Copy)]
pub struct DataGen {
    key: u64,
}

impl DataGen {
    pub fn new(seed: u64, op: u64) -> Self {
        Self {
            key: mix(seed ^ mix(op ^ 0x0075_706c_6f61_6400)), // "upload"
        }
    }

    /// Fills `buf` with the bytes at `offset..offset + buf.len()`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = offset;
        let mut i = 0;
        while i < buf.len() {
            let word = mix(self.key ^ (pos / 8).wrapping_mul(GOLDEN)).to_le_bytes();
            let start = (pos % 8) as usize;
            let n = (8 - start).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&word[start..start + n]);
            i += n;
            pos += n as u64;
        }
    }

    /// The bytes at `offset..offset + len`.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.fill(offset, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        let a: Vec<u64> = (0..5).map(|_| Rng::new(7).next_u64()).collect();
        let mut r = Rng::new(7);
        let b: Vec<u64> = (0..5).map(|_| r.next_u64()).collect();
        assert!(a.iter().all(|v| *v == a[0]));
        assert_eq!(b[0], a[0]);
        assert_ne!(b[0], b[1]);
        assert_ne!(Rng::stream(7, 1).next_u64(), Rng::stream(7, 2).next_u64());
    }

    #[test]
    fn data_ranges_match_the_whole() {
        let g = DataGen::new(1, 2);
        let whole = g.bytes(0, 1000);
        for (off, len) in [(0, 1), (3, 17), (8, 8), (999, 1), (123, 500)] {
            assert_eq!(g.bytes(off, len), whole[off as usize..off as usize + len]);
        }
        assert_ne!(DataGen::new(1, 3).bytes(0, 16), whole[..16]);
    }

    #[test]
    fn below_and_range_stay_in_bounds() {
        let mut r = Rng::new(3);
        for _ in 0..1000 {
            assert!(r.below(10) < 10);
            let v = r.range(5, 9);
            assert!((5..=9).contains(&v));
        }
        assert_eq!(r.below(0), 0);
        assert_eq!(r.weighted(&[0, 0]), None);
        assert_eq!(r.weighted(&[0, 3]), Some(1));
    }
}
