//! `unipeer bench auth`: handshake time and per-message overhead of the trust layer.

/// Placeholder until the session layer lands.
pub fn bench() -> anyhow::Result<String> {
    Ok(String::new())
}
