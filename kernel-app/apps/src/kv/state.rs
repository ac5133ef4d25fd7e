//! The key space of one `kv` instance, its change records and snapshot chunks.
//!
//! Change records are absolute (the value written, the absolute expiry time in milliseconds,
//! like Redis's PEXPIREAT-style propagation), so a slave applying them never reads a clock and
//! ends with the master's exact state. Encoding, little-endian, no external codec:
//! `1 key value expire_at` (set), `2 key` (delete), `3` (flush); byte strings are a u32 length
//! then the bytes; `expire_at` is a u64, `u64::MAX` for none. A snapshot chunk is a run of sets.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use sha2::{Digest, Sha256};
use unipeer_node::replication::service::BadRecord;

/// Bytes an entry costs beyond its key and value (the tree node, the expiry index).
pub const ENTRY_OVERHEAD: usize = 64;
const NO_EXPIRY: u64 = u64::MAX;

/// One value and when it expires (ms, the master's clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub expire_at_ms: Option<u64>,
}

/// One change to the key space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
        expire_at_ms: Option<u64>,
    },
    Del {
        key: Vec<u8>,
    },
    Flush,
}

/// The key space: ordered (KEYS, snapshots and the state hash are deterministic), with an
/// expiry index and a running memory estimate.
#[derive(Clone, Debug, Default)]
pub struct KeySpace {
    map: BTreeMap<Vec<u8>, Entry>,
    expiries: BTreeSet<(u64, Vec<u8>)>,
    used: usize,
}

pub fn cost(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

impl KeySpace {
    pub fn used(&self) -> usize {
        self.used
    }

    /// The live entry of `key` at `now_ms` (an expired one reads as absent).
    pub fn get(&self, key: &[u8], now_ms: u64) -> Option<&Entry> {
        self.map
            .get(key)
            .filter(|e| e.expire_at_ms.is_none_or(|t| t > now_ms))
    }

    /// Whether `key` is stored at all, expired or not.
    pub fn holds(&self, key: &[u8]) -> bool {
        self.map.contains_key(key)
    }

    pub fn live_len(&self, now_ms: u64) -> usize {
        self.map.len() - self.expiries.range(..(now_ms + 1, Vec::new())).count()
    }

    pub fn live_keys(&self, now_ms: u64) -> impl Iterator<Item = &Vec<u8>> {
        self.map
            .iter()
            .filter(move |(_, e)| e.expire_at_ms.is_none_or(|t| t > now_ms))
            .map(|(k, _)| k)
    }

    pub fn apply(&mut self, c: &Change) {
        match c {
            Change::Set {
                key,
                value,
                expire_at_ms,
            } => {
                self.remove(key);
                self.used += cost(key, value);
                if let Some(t) = expire_at_ms {
                    self.expiries.insert((*t, key.clone()));
                }
                self.map.insert(
                    key.clone(),
                    Entry {
                        value: value.clone(),
                        expire_at_ms: *expire_at_ms,
                    },
                );
            }
            Change::Del { key } => {
                self.remove(key);
            }
            Change::Flush => {
                *self = KeySpace::default();
            }
        }
    }

    fn remove(&mut self, key: &[u8]) -> bool {
        match self.map.remove(key) {
            Some(e) => {
                self.used -= cost(key, &e.value);
                if let Some(t) = e.expire_at_ms {
                    self.expiries.remove(&(t, key.to_vec()));
                }
                true
            }
            None => false,
        }
    }

    /// Keys expired by `now_ms`, at most `max`, oldest expiry first.
    pub fn expired(&self, now_ms: u64, max: usize) -> Vec<Vec<u8>> {
        self.expiries
            .range(..(now_ms + 1, Vec::new()))
            .take(max)
            .map(|(_, k)| k.clone())
            .collect()
    }

    /// SHA-256 over every entry in key order, expired ones included (master and slaves hold
    /// the same entries; expiry removals travel through the log).
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for (k, e) in &self.map {
            h.update((k.len() as u32).to_le_bytes());
            h.update(k);
            h.update((e.value.len() as u32).to_le_bytes());
            h.update(&e.value);
            h.update(e.expire_at_ms.unwrap_or(NO_EXPIRY).to_le_bytes());
        }
        h.finalize().into()
    }

    /// Entries from `cursor` (exclusive; `None`: the first) adding up to about `max_bytes`
    /// (at least one), encoded as a run of sets, and the cursor after them.
    pub fn chunk(&self, cursor: Option<&[u8]>, max_bytes: usize) -> (Vec<u8>, Option<Vec<u8>>) {
        use core::ops::Bound;
        let lower = match cursor {
            Some(c) => Bound::Excluded(c.to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        let mut last = None;
        let mut iter = self.map.range((lower, Bound::Unbounded)).peekable();
        for (k, e) in iter.by_ref() {
            encode(
                &mut out,
                &Change::Set {
                    key: k.clone(),
                    value: e.value.clone(),
                    expire_at_ms: e.expire_at_ms,
                },
            );
            last = Some(k.clone());
            if out.len() >= max_bytes {
                break;
            }
        }
        let more = iter.peek().is_some();
        (out, if more { last } else { None })
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Appends one change's encoding to `out`.
pub fn encode(out: &mut Vec<u8>, c: &Change) {
    match c {
        Change::Set {
            key,
            value,
            expire_at_ms,
        } => {
            out.push(1);
            put_bytes(out, key);
            put_bytes(out, value);
            out.extend_from_slice(&expire_at_ms.unwrap_or(NO_EXPIRY).to_le_bytes());
        }
        Change::Del { key } => {
            out.push(2);
            put_bytes(out, key);
        }
        Change::Flush => out.push(3),
    }
}

/// Encodes a record of several changes.
pub fn encode_all(changes: &[Change]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in changes {
        encode(&mut out, c);
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], BadRecord> {
        if self.0.len() < n {
            return Err(BadRecord);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, BadRecord> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| BadRecord)?,
        ))
    }
    fn u64(&mut self) -> Result<u64, BadRecord> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| BadRecord)?,
        ))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, BadRecord> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
}

/// Decodes a whole record; any trailing or truncated byte is an error.
pub fn decode_all(mut b: &[u8]) -> Result<Vec<Change>, BadRecord> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = b.split_first() {
        let mut r = Reader(rest);
        out.push(match tag {
            1 => {
                let key = r.bytes()?;
                let value = r.bytes()?;
                let t = r.u64()?;
                Change::Set {
                    key,
                    value,
                    expire_at_ms: (t != NO_EXPIRY).then_some(t),
                }
            }
            2 => Change::Del { key: r.bytes()? },
            3 => Change::Flush,
            _ => return Err(BadRecord),
        });
        b = r.0;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let cs = vec![
            Change::Set {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                expire_at_ms: Some(5),
            },
            Change::Del { key: b"x".to_vec() },
            Change::Flush,
            Change::Set {
                key: vec![],
                value: vec![0; 300],
                expire_at_ms: None,
            },
        ];
        let b = encode_all(&cs);
        assert_eq!(decode_all(&b).unwrap(), cs);
        for cut in 0..b.len() {
            let r = decode_all(&b[..cut]);
            assert!(r.is_err() || cut == 0 || r.unwrap().len() < cs.len());
        }
        assert_eq!(decode_all(&[9]), Err(BadRecord));
        assert_eq!(decode_all(&[1, 255, 255, 255, 255]), Err(BadRecord));
    }

    #[test]
    fn memory_and_expiry_index_follow_changes() {
        let mut ks = KeySpace::default();
        ks.apply(&Change::Set {
            key: b"a".to_vec(),
            value: b"12".to_vec(),
            expire_at_ms: Some(10),
        });
        ks.apply(&Change::Set {
            key: b"b".to_vec(),
            value: b"1".to_vec(),
            expire_at_ms: None,
        });
        assert_eq!(ks.used(), cost(b"a", b"12") + cost(b"b", b"1"));
        assert_eq!(ks.live_len(9), 2);
        assert_eq!(ks.live_len(10), 1);
        assert_eq!(ks.expired(10, 8), vec![b"a".to_vec()]);
        assert!(ks.get(b"a", 10).is_none() && ks.holds(b"a"));
        ks.apply(&Change::Set {
            key: b"a".to_vec(),
            value: b"x".to_vec(),
            expire_at_ms: None,
        });
        assert!(
            ks.expired(100, 8).is_empty(),
            "a rewrite drops the old expiry"
        );
        ks.apply(&Change::Del { key: b"a".to_vec() });
        ks.apply(&Change::Del { key: b"b".to_vec() });
        assert_eq!(ks.used(), 0);
        assert_eq!(ks.hash(), KeySpace::default().hash());
    }
}
