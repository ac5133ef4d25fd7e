//! `sha256`: hashes data chunks (data-bound). Output: one line per input, the SHA-256 of that
//! input in lower-case hex.

use alloc::vec::Vec;
use sha2::{Digest, Sha256};
use unipeer_node::jobs::app::{App, TaskError, TaskKind, TaskOutput, TaskSpec};

pub struct Sha256Chunks;

/// The hex digest line of one chunk, as the app writes it.
pub fn digest_line(data: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let d = Sha256::digest(data);
    let mut out = Vec::with_capacity(65);
    for b in d {
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 0xf) as usize]);
    }
    out.push(b'\n');
    out
}

impl App for Sha256Chunks {
    fn name(&self) -> &'static str {
        "sha256"
    }

    fn run(&self, task: &TaskSpec, inputs: &[&[u8]]) -> Result<TaskOutput, TaskError> {
        if task.kind != TaskKind::Single || !task.params.is_empty() {
            return Err(TaskError::BadParams);
        }
        if inputs.is_empty() {
            return Err(TaskError::BadInput);
        }
        Ok(TaskOutput::single(
            inputs.iter().flat_map(|i| digest_line(i)).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn known_digests() {
        let t = TaskSpec {
            app: "sha256".to_string(),
            kind: TaskKind::Single,
            params: vec![],
        };
        let out = Sha256Chunks.run(&t, &[b"abc", b""]).unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n\
                    e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n";
        assert_eq!(out.parts, vec![want.as_bytes().to_vec()]);
        assert_eq!(Sha256Chunks.run(&t, &[]), Err(TaskError::BadInput));
    }
}
