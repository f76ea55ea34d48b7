//! [`KeyChooser`]: which key the next request addresses, uniformly or zipfian.
//!
//! Owns the key distributions only; the caller owns the random number generator (one per
//! request slot, seeded from the run's seed) and turns the index into a key name.
//!
//! The zipfian distribution is rand_distr's rejection-inversion sampler: rank r in `1..=K`
//! with weight `1/r^s`, for any exponent s > 0 (including 1), in O(1) per sample and with
//! no O(K) table. Rank r is key index r-1, so `PREFIX-0` is the hottest key. Unlike YCSB's
//! "scrambled" zipfian the ranks are not hashed first: the server hashes every key to its
//! shard anyway, so hot keys already land on unrelated shards.

use rand::Rng;
use rand_distr::{Distribution, Zipf};

use super::args::KeyDistribution;

/// Picks key indexes in `0..keys`.
#[derive(Debug, Clone)]
pub enum KeyChooser {
    /// Every index equally likely.
    Uniform {
        /// The number of keys.
        keys: u64,
    },
    /// Index r-1 with weight 1/r^s.
    Zipfian {
        /// The number of keys.
        keys: u64,
        /// The sampler over ranks `1..=keys`.
        zipf: Zipf<f64>,
    },
}

impl KeyChooser {
    /// A chooser over `keys` keys (at least 1). `zipf_exponent` is used by
    /// [`KeyDistribution::Zipfian`] only and must be above 0.
    pub fn new(keys: u64, distribution: KeyDistribution, zipf_exponent: f64) -> KeyChooser {
        assert!(keys >= 1, "a key chooser needs at least one key");
        match distribution {
            KeyDistribution::Uniform => KeyChooser::Uniform { keys },
            KeyDistribution::Zipfian => {
                assert!(
                    zipf_exponent > 0.0 && zipf_exponent.is_finite(),
                    "the zipfian exponent {zipf_exponent} was not checked"
                );
                match Zipf::new(keys, zipf_exponent) {
                    Ok(zipf) => KeyChooser::Zipfian { keys, zipf },
                    // Unreachable after the checks above (rand_distr refuses only n < 1 and
                    // s < 0); say so loudly rather than benchmark something else.
                    Err(err) => panic!("zipf({keys}, {zipf_exponent}): {err}"),
                }
            }
        }
    }

    /// The next key index, in `0..keys`.
    pub fn next_index(&self, rng: &mut impl Rng) -> u64 {
        match self {
            KeyChooser::Uniform { keys } => rng.gen_range(0..*keys),
            KeyChooser::Zipfian { keys, zipf } => {
                // Samples are integral ranks in 1..=keys; the clamp guards float rounding
                // for key counts near 2^53.
                let rank = zipf.sample(rng) as u64;
                rank.saturating_sub(1).min(keys - 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    /// How often each index came up in `samples` draws with a fixed seed.
    fn histogram(chooser: &KeyChooser, keys: u64, samples: usize, seed: u64) -> Vec<u64> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut counts = vec![0_u64; usize::try_from(keys).unwrap()];
        for _ in 0..samples {
            let index = chooser.next_index(&mut rng);
            assert!(index < keys, "index {index} out of 0..{keys}");
            counts[usize::try_from(index).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn uniform_spreads_evenly() {
        let chooser = KeyChooser::new(10, KeyDistribution::Uniform, 0.0);
        let samples = 100_000;
        let counts = histogram(&chooser, 10, samples, 1);
        for (index, count) in counts.iter().enumerate() {
            let share = *count as f64 / samples as f64;
            assert!((share - 0.1).abs() < 0.01, "key {index}: share {share}");
        }
    }

    #[test]
    fn one_key_is_always_index_zero() {
        for distribution in [KeyDistribution::Uniform, KeyDistribution::Zipfian] {
            let chooser = KeyChooser::new(1, distribution, 0.99);
            let counts = histogram(&chooser, 1, 1_000, 2);
            assert_eq!(counts, vec![1_000]);
        }
    }

    /// The expected share of rank r: (1/r^s) / Σ_{k=1..n} 1/k^s.
    fn zipf_share(rank: u64, keys: u64, exponent: f64) -> f64 {
        let total: f64 = (1..=keys).map(|k| (k as f64).powf(-exponent)).sum();
        (rank as f64).powf(-exponent) / total
    }

    #[test]
    fn zipfian_has_the_zipf_shape() {
        for exponent in [0.99, 1.0, 1.5] {
            let keys = 1_000;
            let samples = 400_000;
            let chooser = KeyChooser::new(keys, KeyDistribution::Zipfian, exponent);
            let counts = histogram(&chooser, keys, samples, 3);
            // The head: the first ranks get their expected share, within 5% of it.
            for rank in 1..=5_u64 {
                let share = counts[rank as usize - 1] as f64 / samples as f64;
                let expected = zipf_share(rank, keys, exponent);
                assert!(
                    (share / expected - 1.0).abs() < 0.05,
                    "s={exponent} rank {rank}: share {share}, expected {expected}"
                );
            }
            // Rank 1 over rank 2 is 2^s.
            let ratio = counts[0] as f64 / counts[1] as f64;
            assert!(
                (ratio / 2_f64.powf(exponent) - 1.0).abs() < 0.05,
                "s={exponent}: rank 1 / rank 2 = {ratio}"
            );
            // The tail still gets drawn: the last 500 keys together get their share.
            let tail: u64 = counts[500..].iter().sum();
            let tail_share = tail as f64 / samples as f64;
            let expected: f64 = (501..=keys).map(|r| zipf_share(r, keys, exponent)).sum();
            assert!(
                (tail_share / expected - 1.0).abs() < 0.1,
                "s={exponent}: tail share {tail_share}, expected {expected}"
            );
        }
    }

    #[test]
    fn the_same_seed_picks_the_same_keys() {
        let chooser = KeyChooser::new(1_000_000, KeyDistribution::Zipfian, 0.99);
        let draw = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..100)
                .map(|_| chooser.next_index(&mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(9), draw(9));
        assert_ne!(draw(9), draw(10));
    }
}
