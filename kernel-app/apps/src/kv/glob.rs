//! Glob patterns as Redis's KEYS takes them: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\x`.
//!
//! Matched iteratively with one backtrack point for the last `*`, so time is bounded by
//! pattern length × key length whatever the pattern (no recursion on stars).

/// Matches one class `[...]` starting at `p[0] == b'['` against `c`; returns (matched,
/// bytes of pattern used). An unclosed class runs to the pattern's end, as in Redis.
fn class(p: &[u8], c: u8) -> (bool, usize) {
    let mut i = 1;
    let negate = p.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut hit = false;
    while i < p.len() && p[i] != b']' {
        if p[i] == b'\\' && i + 1 < p.len() {
            hit |= p[i + 1] == c;
            i += 2;
        } else if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
            let (lo, hi) = (p[i].min(p[i + 2]), p[i].max(p[i + 2]));
            hit |= (lo..=hi).contains(&c);
            i += 3;
        } else {
            hit |= p[i] == c;
            i += 1;
        }
    }
    let used = if i < p.len() { i + 1 } else { i };
    (hit != negate, used)
}

/// Whether `key` matches the glob `pattern`.
pub fn matches(pattern: &[u8], key: &[u8]) -> bool {
    let (mut p, mut k) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while k < key.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                while pattern.get(p) == Some(&b'*') {
                    p += 1;
                }
                if p == pattern.len() {
                    return true;
                }
                star = Some((p, k));
                continue;
            }
            Some(b'?') => Some(1),
            Some(b'[') => {
                let (hit, used) = class(&pattern[p..], key[k]);
                hit.then_some(used)
            }
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == key[k]).then_some(2),
            Some(&c) => (c == key[k]).then_some(1),
            None => None,
        };
        match step {
            Some(used) => {
                p += used;
                k += 1;
            }
            None => match star {
                Some((sp, sk)) => {
                    star = Some((sp, sk + 1));
                    p = sp;
                    k = sk + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs() {
        let yes: &[(&str, &str)] = &[
            ("*", ""),
            ("*", "abc"),
            ("a*", "abc"),
            ("*c", "abc"),
            ("a?c", "abc"),
            ("h[ae]llo", "hello"),
            ("h[^e]llo", "hallo"),
            ("h[a-b]llo", "hbllo"),
            ("a\\*b", "a*b"),
            ("*a*b*", "xxaxxbxx"),
            ("user:*:name", "user:42:name"),
        ];
        let no: &[(&str, &str)] = &[
            ("a*", "bac"),
            ("a?c", "ac"),
            ("h[ae]llo", "hillo"),
            ("h[^e]llo", "hello"),
            ("a\\*b", "axb"),
            ("abc", "abcd"),
            ("", "a"),
        ];
        for (p, k) in yes {
            assert!(matches(p.as_bytes(), k.as_bytes()), "{p} ~ {k}");
        }
        for (p, k) in no {
            assert!(!matches(p.as_bytes(), k.as_bytes()), "{p} !~ {k}");
        }
        // Many stars against a long key stay fast (bounded by pattern × key).
        let key = [b'a'; 4000];
        assert!(!matches(b"*a*a*a*a*a*a*a*a*a*a*b", &key));
    }
}
