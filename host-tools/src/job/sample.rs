//! Deterministic sample inputs for demos, tests and benchmarks.

/// `words` words of text drawn from a 2,000-word vocabulary with a skewed (roughly Zipf-like)
/// distribution, twelve words a line; the same `seed` gives the same text.
pub fn text(seed: u64, words: usize) -> Vec<u8> {
    let vocab: Vec<String> = (0..2000).map(|i| format!("w{i:x}q{}", i % 7)).collect();
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(words * 8);
    for i in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let r = (x % 2000) as usize;
        out.extend_from_slice(vocab[(r * r) / 2000].as_bytes());
        out.push(if i % 12 == 11 { b'\n' } else { b' ' });
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_is_deterministic_and_skewed() {
        let a = super::text(3, 10_000);
        assert_eq!(a, super::text(3, 10_000));
        assert_ne!(a, super::text(4, 10_000));
        let counts = unipeer_apps::wordcount::count_words(&a);
        assert_eq!(counts.values().sum::<u64>(), 10_000);
        let most = counts.values().max().copied().unwrap();
        assert!(most > 10_000 / 2000 * 5, "skewed: most frequent {most}");
    }
}
