//! `primes`: counts the primes in `[a, b)` (CPU-bound). Parameters: `a` and `b` as two
//! little-endian u64; output: the count in decimal ASCII.

use alloc::boxed::Box;
use alloc::format;
use unipeer_node::jobs::app::{App, Slice, SliceState, TaskError, TaskKind, TaskOutput, TaskSpec};

/// Largest `b`: trial division stays below 2^16 divisors per number.
pub const MAX_END: u64 = 1 << 32;
/// Widest range one task may count.
pub const MAX_SPAN: u64 = 1 << 24;

pub struct Primes;

/// The parameters of the task counting primes in `[a, b)`.
pub fn params(a: u64, b: u64) -> alloc::vec::Vec<u8> {
    let mut p = a.to_le_bytes().to_vec();
    p.extend_from_slice(&b.to_le_bytes());
    p
}

/// Whether `n` is prime (trial division by 6k +- 1).
pub fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// Primes in `[a, b)`.
pub fn count(a: u64, b: u64) -> u64 {
    (a..b).filter(|n| is_prime(*n)).count() as u64
}

/// Numbers tested between two questions to `yield_now` (about 5k trial divisions each near
/// the top of the range).
const YIELD_EVERY: u64 = 64;

struct Progress {
    next: u64,
    found: u64,
}

fn range(task: &TaskSpec, inputs: &[&[u8]]) -> Result<(u64, u64), TaskError> {
    if task.kind != TaskKind::Single || !inputs.is_empty() || task.params.len() != 16 {
        return Err(TaskError::BadParams);
    }
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&task.params[..8]);
    b.copy_from_slice(&task.params[8..]);
    let (a, b) = (u64::from_le_bytes(a), u64::from_le_bytes(b));
    if a > b || b > MAX_END || b - a > MAX_SPAN {
        return Err(TaskError::BadParams);
    }
    Ok((a, b))
}

impl App for Primes {
    fn name(&self) -> &'static str {
        "primes"
    }

    fn run(&self, task: &TaskSpec, inputs: &[&[u8]]) -> Result<TaskOutput, TaskError> {
        let (a, b) = range(task, inputs)?;
        Ok(TaskOutput::single(
            format!("{}\n", count(a, b)).into_bytes(),
        ))
    }

    fn run_slice(
        &self,
        task: &TaskSpec,
        inputs: &[&[u8]],
        state: &mut SliceState,
        yield_now: &mut dyn FnMut() -> bool,
    ) -> Slice {
        let (a, b) = match range(task, inputs) {
            Ok(r) => r,
            Err(e) => return Slice::Done(Err(e)),
        };
        let p = state.get_or_insert_with(|| Box::new(Progress { next: a, found: 0 }));
        let Some(p) = p.downcast_mut::<Progress>() else {
            return Slice::Done(Err(TaskError::Failed(1)));
        };
        while p.next < b {
            let end = p.next.saturating_add(YIELD_EVERY).min(b);
            p.found += count(p.next, end);
            p.next = end;
            if p.next < b && yield_now() {
                return Slice::More;
            }
        }
        Slice::Done(Ok(TaskOutput::single(
            format!("{}\n", p.found).into_bytes(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn spec(a: u64, b: u64) -> TaskSpec {
        TaskSpec {
            app: "primes".to_string(),
            kind: TaskKind::Single,
            params: params(a, b),
        }
    }

    #[test]
    fn known_counts() {
        // pi(10) = 4, pi(100) = 25, pi(10^4) = 1229, pi(10^5) = 9592.
        assert_eq!(count(0, 10), 4);
        assert_eq!(count(0, 100), 25);
        assert_eq!(count(0, 10_000), 1229);
        assert_eq!(count(0, 50_000) + count(50_000, 100_000), 9592);
        let out = Primes.run(&spec(0, 100_000), &[]).unwrap();
        assert_eq!(out.parts, vec![b"9592\n".to_vec()]);
        assert!(is_prime(4_294_967_291) && !is_prime(4_294_967_295));
    }

    #[test]
    fn bad_params_are_errors() {
        assert_eq!(Primes.run(&spec(10, 5), &[]), Err(TaskError::BadParams));
        assert_eq!(
            Primes.run(&spec(0, MAX_END + 1), &[]),
            Err(TaskError::BadParams)
        );
        assert_eq!(
            Primes.run(&spec(0, MAX_SPAN + 1), &[]),
            Err(TaskError::BadParams)
        );
        let mut s = spec(0, 10);
        s.params.pop();
        assert_eq!(Primes.run(&s, &[]), Err(TaskError::BadParams));
        assert_eq!(Primes.run(&spec(0, 10), &[b"x"]), Err(TaskError::BadParams));
    }

    #[test]
    fn slices_give_the_whole_count() {
        let task = spec(1_000_000_000, 1_000_003_000);
        let whole = Primes.run(&task, &[]).unwrap();
        let mut state = None;
        let mut slices = 0;
        let out = loop {
            slices += 1;
            match Primes.run_slice(&task, &[], &mut state, &mut || true) {
                Slice::More => continue,
                Slice::Done(r) => break r.unwrap(),
            }
        };
        assert_eq!(out, whole);
        assert!(slices > 10, "{slices} slices");
        let mut none = None;
        assert!(matches!(
            Primes.run_slice(&spec(5, 1), &[], &mut none, &mut || false),
            Slice::Done(Err(TaskError::BadParams))
        ));
    }
}
