//! Applications linked into a unipeer image (the unikernel way): each is a set of named,
//! deterministic task functions implementing [`unipeer_node::jobs::app::App`]. The kernel (or
//! the simulator) picks which to link with [`by_name`] and hands them to the node core.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod fail;
pub mod kv;
pub mod primes;
pub mod sha256;
pub mod wordcount;

use unipeer_node::jobs::app::App;

pub use fail::Fail;
pub use primes::Primes;
pub use sha256::Sha256Chunks;
pub use wordcount::WordCount;

/// Every application this crate ships, by name.
pub const ALL: &[&dyn App] = &[&WordCount, &Primes, &Sha256Chunks, &Fail];

/// The shipped application called `name`, if any (`unipeer image build --apps a,b`).
pub fn by_name(name: &str) -> Option<&'static dyn App> {
    ALL.iter().copied().find(|a| a.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_found() {
        for a in ALL {
            assert_eq!(by_name(a.name()).map(|b| b.name()), Some(a.name()));
        }
        assert!(by_name("nope").is_none());
        assert_eq!(ALL.len(), 4);
    }
}
