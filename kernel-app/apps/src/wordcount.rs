//! `wordcount`: map tasks count the words of a text chunk and split the counts into one part per
//! reduce partition; reduce tasks (spawned inside the overlay as map outputs register) merge one
//! partition's parts. A `Single` task counts a chunk's words in one part.
//!
//! A word is a maximal run of ASCII letters and digits, lower-cased. Parts and outputs are lines
//! `word count\n` sorted by word, so equal counts give equal bytes (and output hashes).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use unipeer_node::jobs::app::{App, Slice, SliceState, TaskError, TaskKind, TaskOutput, TaskSpec};

/// Longest word kept whole; longer runs are cut (bounded lines).
pub const MAX_WORD: usize = 64;

pub struct WordCount;

/// Word counts of `text`.
pub fn count_words(text: &[u8]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for w in text.split(|b| !b.is_ascii_alphanumeric()) {
        if w.is_empty() {
            continue;
        }
        let w = &w[..w.len().min(MAX_WORD)];
        let word: String = w.iter().map(|b| b.to_ascii_lowercase() as char).collect();
        *counts.entry(word).or_insert(0) += 1;
    }
    counts
}

/// The reduce partition of `word` among `reducers` (FNV-1a, stable on every node).
pub fn partition_of(word: &str, reducers: u8) -> u8 {
    let mut h: u32 = 0x811c_9dc5;
    for b in word.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % reducers.max(1) as u32) as u8
}

/// The `word count\n` lines of `counts`, sorted by word.
pub fn render<'a>(counts: impl IntoIterator<Item = (&'a String, &'a u64)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (w, c) in counts {
        out.extend_from_slice(format!("{w} {c}\n").as_bytes());
    }
    out
}

/// Parses `word count\n` lines; `None` when malformed.
pub fn parse(part: &[u8]) -> Option<BTreeMap<String, u64>> {
    let text = core::str::from_utf8(part).ok()?;
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let (w, c) = line.split_once(' ')?;
        if w.is_empty() || w.len() > MAX_WORD || !w.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        let c: u64 = c.parse().ok()?;
        let e: &mut u64 = counts.entry(String::from(w)).or_insert(0);
        *e = e.checked_add(c)?;
    }
    Some(counts)
}

/// Progress of a sliced task: inputs counted so far.
struct Progress {
    next: usize,
    counts: BTreeMap<String, u64>,
}

impl App for WordCount {
    fn name(&self) -> &'static str {
        "wordcount"
    }

    fn run(&self, task: &TaskSpec, inputs: &[&[u8]]) -> Result<TaskOutput, TaskError> {
        match self.run_slice(task, inputs, &mut None, &mut || false) {
            Slice::Done(r) => r,
            Slice::More => Err(TaskError::Failed(1)),
        }
    }

    /// One input chunk (at most 64 KiB) per slice.
    fn run_slice(
        &self,
        task: &TaskSpec,
        inputs: &[&[u8]],
        state: &mut SliceState,
        yield_now: &mut dyn FnMut() -> bool,
    ) -> Slice {
        if !task.params.is_empty() {
            return Slice::Done(Err(TaskError::BadParams));
        }
        match task.kind {
            TaskKind::Map { reducers } if inputs.is_empty() || reducers == 0 => {
                return Slice::Done(Err(TaskError::BadInput));
            }
            TaskKind::Reduce { maps, .. } if inputs.len() != maps as usize => {
                return Slice::Done(Err(TaskError::BadInput));
            }
            _ => {}
        }
        let st = state.get_or_insert_with(|| {
            Box::new(Progress {
                next: 0,
                counts: BTreeMap::new(),
            })
        });
        let Some(st) = st.downcast_mut::<Progress>() else {
            return Slice::Done(Err(TaskError::Failed(1)));
        };
        while st.next < inputs.len() {
            let input = inputs[st.next];
            let counted = match task.kind {
                TaskKind::Reduce { .. } => match parse(input) {
                    Some(c) => c,
                    None => return Slice::Done(Err(TaskError::BadInput)),
                },
                _ => count_words(input),
            };
            for (w, c) in counted {
                let e = st.counts.entry(w).or_insert(0);
                match e.checked_add(c) {
                    Some(v) => *e = v,
                    None => return Slice::Done(Err(TaskError::BadInput)),
                }
            }
            st.next += 1;
            if st.next < inputs.len() && yield_now() {
                return Slice::More;
            }
        }
        let counts = core::mem::take(&mut st.counts);
        Slice::Done(Ok(match task.kind {
            TaskKind::Map { reducers } => {
                let mut parts: Vec<BTreeMap<String, u64>> =
                    (0..reducers).map(|_| BTreeMap::new()).collect();
                for (w, c) in counts {
                    let p = partition_of(&w, reducers) as usize;
                    parts[p].insert(w, c);
                }
                TaskOutput {
                    parts: parts.iter().map(render).collect(),
                }
            }
            _ => TaskOutput::single(render(&counts)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn spec(kind: TaskKind) -> TaskSpec {
        TaskSpec {
            app: "wordcount".to_string(),
            kind,
            params: vec![],
        }
    }

    #[test]
    fn counts_words() {
        let c = count_words(b"The cat; the DOG, the end-end 42");
        assert_eq!(c.get("the"), Some(&3));
        assert_eq!(c.get("end"), Some(&2));
        assert_eq!(c.get("42"), Some(&1));
        assert_eq!(c.len(), 5);
        let out = WordCount
            .run(&spec(TaskKind::Single), &[b"b a b", b"a"])
            .unwrap();
        assert_eq!(out.parts, vec![b"a 2\nb 2\n".to_vec()]);
    }

    #[test]
    fn map_then_reduce_equals_direct_count() {
        let chunks: [&[u8]; 3] = [
            b"alpha beta gamma alpha",
            b"beta delta epsilon zeta eta theta",
            b"alpha iota kappa lambda mu nu xi omicron pi beta",
        ];
        let reducers = 3u8;
        let maps: Vec<TaskOutput> = chunks
            .iter()
            .map(|c| {
                WordCount
                    .run(&spec(TaskKind::Map { reducers }), &[c])
                    .unwrap()
            })
            .collect();
        let mut merged = BTreeMap::new();
        for p in 0..reducers {
            let inputs: Vec<&[u8]> = maps
                .iter()
                .map(|m| m.parts[p as usize].as_slice())
                .collect();
            let out = WordCount
                .run(
                    &spec(TaskKind::Reduce {
                        partition: p,
                        maps: 3,
                    }),
                    &inputs,
                )
                .unwrap();
            for (w, c) in parse(&out.parts[0]).unwrap() {
                assert_eq!(partition_of(&w, reducers), p, "{w} in the wrong partition");
                assert!(merged.insert(w, c).is_none());
            }
        }
        let direct = count_words(&chunks.join(&b' '));
        let mut direct2 = BTreeMap::new();
        for c in chunks {
            for (w, n) in count_words(c) {
                *direct2.entry(w).or_insert(0) += n;
            }
        }
        assert_eq!(merged, direct2);
        assert_eq!(merged.get("alpha"), Some(&3));
        assert_eq!(merged.get("beta"), Some(&3));
        assert!(!direct.is_empty());
    }

    #[test]
    fn malformed_reduce_input_is_an_error() {
        let r = spec(TaskKind::Reduce {
            partition: 0,
            maps: 1,
        });
        assert_eq!(WordCount.run(&r, &[b"a x\n"]), Err(TaskError::BadInput));
        assert_eq!(WordCount.run(&r, &[b"noline"]), Err(TaskError::BadInput));
        assert_eq!(
            WordCount.run(&r, &[b"a 1\n", b"b 1\n"]),
            Err(TaskError::BadInput)
        );
        assert_eq!(
            WordCount.run(&r, &[&[0xff, b' ', b'1']]),
            Err(TaskError::BadInput)
        );
        let r2 = spec(TaskKind::Reduce {
            partition: 0,
            maps: 2,
        });
        let max = format!("a {}\n", u64::MAX);
        assert_eq!(
            WordCount.run(&r2, &[max.as_bytes(), b"a 1\n"]),
            Err(TaskError::BadInput),
            "overflow is an error, not a panic"
        );
    }

    #[test]
    fn slices_equal_the_whole_run() {
        let inputs: [&[u8]; 3] = [b"a b a", b"c a", b"b"];
        for kind in [TaskKind::Single, TaskKind::Map { reducers: 3 }] {
            let whole = WordCount.run(&spec(kind), &inputs).unwrap();
            let mut state = None;
            let mut slices = 0;
            let sliced = loop {
                slices += 1;
                match WordCount.run_slice(&spec(kind), &inputs, &mut state, &mut || true) {
                    Slice::More => continue,
                    Slice::Done(r) => break r.unwrap(),
                }
            };
            assert_eq!(sliced, whole);
            assert_eq!(slices, 3);
        }
    }
}
