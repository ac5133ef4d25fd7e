//! `unipeer bench auth`: the trust layer's cost on this host: full peer handshakes (six
//! datagrams, both ends' CPU) and sealing + opening datagrams of overlay sizes, against a
//! plaintext copy as baseline in the same run.

use anyhow::{Result, bail};
use std::fmt::Write;
use std::time::Instant as WallInstant;
use unipeer_node::Instant;
use unipeer_node::auth::bench::{addr, throwaway_layer};
use unipeer_node::auth::{Channel, IdentityKey, SEAL_OVERHEAD, SessionLayer};

fn layer(authority: &IdentityKey, seed: u8, round: u32) -> SessionLayer {
    let mut rng_seed = [seed; 32];
    rng_seed[..4].copy_from_slice(&round.to_le_bytes());
    throwaway_layer(authority, seed, rng_seed)
}

/// Moves datagrams between two layers until quiet; returns (datagrams, bytes).
fn pump(a: &mut SessionLayer, b: &mut SessionLayer) -> (u64, u64) {
    let (mut n, mut bytes) = (0, 0);
    loop {
        let mut moved = false;
        while let Some(t) = a.poll_transmit() {
            n += 1;
            bytes += t.payload.len() as u64;
            b.handle_datagram(Instant::from_millis(1), addr(1), &t.payload);
            moved = true;
        }
        while let Some(t) = b.poll_transmit() {
            n += 1;
            bytes += t.payload.len() as u64;
            a.handle_datagram(Instant::from_millis(1), addr(2), &t.payload);
            moved = true;
        }
        if !moved {
            return (n, bytes);
        }
    }
}

fn per_op_us(start: WallInstant, ops: u32) -> f64 {
    start.elapsed().as_secs_f64() * 1e6 / ops.max(1) as f64
}

/// Runs the benchmark with `handshakes` full handshakes and `messages` datagrams per size;
/// returns the printed table.
pub fn bench(handshakes: u32, messages: u32) -> Result<String> {
    if handshakes == 0 || messages == 0 {
        bail!("handshakes and messages must be positive");
    }
    let authority = IdentityKey::from_seed(&[0xa0; 32]);
    let mut out = String::new();
    writeln!(
        out,
        "unipeer bench auth (host, {} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    )?;

    // Primitive costs, for context.
    let k = IdentityKey::from_seed(&[1; 32]);
    let t = WallInstant::now();
    let mut sig = k.sign(b"m");
    for i in 0..handshakes {
        sig = k.sign(&i.to_le_bytes());
    }
    let sign_us = per_op_us(t, handshakes);
    let t = WallInstant::now();
    for _ in 0..handshakes {
        std::hint::black_box(unipeer_node::auth::keys::verify(&k.public(), b"m", &sig));
    }
    let verify_us = per_op_us(t, handshakes);

    // Full handshakes: a fresh pair each time, first datagram queued until confirmed.
    let mut hs_bytes = 0;
    let mut hs_datagrams = 0;
    let mut total = 0.0;
    for round in 0..handshakes {
        let mut a = layer(&authority, 1, round);
        let mut b = layer(&authority, 2, round);
        let t = WallInstant::now();
        a.send(Instant::from_millis(1), addr(2), Channel::Overlay, b"x")?;
        let (n, bytes) = pump(&mut a, &mut b);
        total += t.elapsed().as_secs_f64();
        if b.poll_delivered().is_none() {
            bail!("handshake {round} did not complete");
        }
        hs_datagrams = n - 1;
        hs_bytes = bytes - (1 + SEAL_OVERHEAD) as u64;
    }
    let hs_us = total * 1e6 / handshakes as f64;
    writeln!(out, "{:<34} {:>12}", "operation", "time")?;
    writeln!(out, "{:<34} {:>9.1} µs", "ed25519 sign", sign_us)?;
    writeln!(
        out,
        "{:<34} {:>9.1} µs",
        "ed25519 verify (strict)", verify_us
    )?;
    writeln!(
        out,
        "{:<34} {:>9.1} µs   ({} datagrams, {} bytes, both ends' CPU)",
        "full handshake", hs_us, hs_datagrams, hs_bytes
    )?;

    // Sealed datagrams over one established session.
    let mut a = layer(&authority, 1, 0);
    let mut b = layer(&authority, 2, 0);
    a.send(Instant::from_millis(1), addr(2), Channel::Overlay, b"x")?;
    pump(&mut a, &mut b);
    b.poll_delivered();
    writeln!(
        out,
        "\n{:>8} {:>10} {:>14} {:>14} {:>8}",
        "payload", "overhead", "seal+open", "plain copy", "ratio"
    )?;
    for size in [64usize, 512, 1200] {
        let payload = vec![0x5a; size];
        let t = WallInstant::now();
        for _ in 0..messages {
            a.send(Instant::from_millis(1), addr(2), Channel::Overlay, &payload)?;
            let d = a.poll_transmit().expect("sealed datagram");
            b.handle_datagram(Instant::from_millis(1), addr(1), &d.payload);
            let got = b.poll_delivered().expect("opened datagram");
            std::hint::black_box(got);
        }
        let sealed_us = per_op_us(t, messages);
        let t = WallInstant::now();
        for _ in 0..messages {
            std::hint::black_box(std::hint::black_box(&payload).clone());
        }
        let plain_us = per_op_us(t, messages);
        writeln!(
            out,
            "{:>6} B {:>8} B {:>11.2} µs {:>11.3} µs {:>7.0}x",
            size,
            SEAL_OVERHEAD,
            sealed_us,
            plain_us,
            sealed_us / plain_us.max(1e-6)
        )?;
    }
    let c = b.counters();
    if c.rejected() != 0 {
        bail!("the benchmark saw rejections: {c:?}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bench_runs_and_reports() {
        let out = super::bench(2, 10).unwrap();
        assert!(
            out.contains("full handshake") && out.contains("1200 B"),
            "{out}"
        );
    }
}
