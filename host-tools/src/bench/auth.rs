//! `unipeer bench auth`: the trust layer's handshake and sealing cost on the host, and with
//! `--vm` the handshake against a node in a TCG guest (the responder runs in the kernel) and
//! the node's own per-datagram sealing cost (`bench-seal`), beside the host's on the same
//! code path.

use std::time::Duration;

use anyhow::Context;

use crate::bench::boot::stats;
use crate::cluster::{self, UpOptions};
use crate::hostinfo::{self, AccelChoice};

#[derive(clap::Args, Clone, Debug)]
pub struct AuthBenchArgs {
    /// Handshakes to time on the host.
    #[arg(long, default_value_t = 200)]
    pub handshakes: u32,
    /// Messages to seal and open per payload size.
    #[arg(long, default_value_t = 20_000)]
    pub messages: u32,
    /// Also time handshakes with a node in a VM (needs root: a one-node cluster).
    #[arg(long)]
    pub vm: bool,
    /// Handshakes with the VM.
    #[arg(long, default_value_t = 20)]
    pub vm_handshakes: u32,
    /// Datagrams per size the node seals and opens (`bench-seal`).
    #[arg(long, default_value_t = 2000)]
    pub vm_seals: u32,
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// Image name under images/ (for `--vm`: built with `--diag-test`, which carries the
    /// node's `bench-seal` helper; e.g. the test image `test`).
    #[arg(long, default_value = "default")]
    pub image: String,
}

pub fn run(args: &AuthBenchArgs) -> anyhow::Result<()> {
    print!(
        "{}",
        crate::ca::bench::bench(args.handshakes, args.messages)?
    );
    if !args.vm {
        return Ok(());
    }
    let accel = hostinfo::choose_accel(args.accel);
    let run_dir = crate::image::repo_root().join("run").join("bench-auth");
    let _ = cluster::down(&run_dir);
    let exe = std::env::current_exe().context("locating the unipeer binary")?;
    let mut opts = UpOptions::new(1, accel.accel, exe);
    opts.image = args.image.clone();
    opts.ca_store = Some(run_dir.join("authority"));
    let result = (|| -> anyhow::Result<(Vec<f64>, String)> {
        cluster::up(&run_dir, &opts)?;
        // Let the lone node settle so its boot does not share the first handshakes' CPU.
        cluster::wait_answering(&run_dir, Duration::from_secs(30))?;
        let times = cluster::handshakes(&run_dir, "n1", args.vm_handshakes)?;
        let seal = cluster::node_command(&run_dir, "n1", &format!("bench-seal {}", args.vm_seals))?;
        Ok((times, seal))
    })();
    let _ = cluster::down(&run_dir);
    let (times, seal_line) = result?;
    let s = stats(times);
    println!(
        "handshake with a node in a VM (microvm, {}; the responder's verification, key agreement and signature run in the kernel)",
        accel.accel
    );
    println!(
        "  {} of {} completed: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (round trips through the switch included)",
        s.n, args.vm_handshakes, s.p50, s.p99, s.max
    );
    print!(
        "{}",
        seal_table(&seal_line, args.vm_seals, &accel.accel.to_string())?
    );
    Ok(())
}

/// `key=value` words of the node's `bench-seal` line.
fn seal_fields(line: &str) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let line = line.trim();
    if !line.starts_with("bench-seal ") {
        anyhow::bail!("the node's bench-seal answer: {line:?}");
    }
    Ok(line
        .split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Host µs per seal+open of `size`-byte datagrams over the same in-memory session pair the
/// node uses (`unipeer_node::auth::bench::SealPair`).
fn host_seal_us(n: u32, size: usize) -> anyhow::Result<f64> {
    let mut pair = unipeer_node::auth::bench::SealPair::new()
        .ok_or_else(|| anyhow::anyhow!("the throwaway session did not establish"))?;
    let payload = vec![0x5a; size];
    let t = std::time::Instant::now();
    for _ in 0..n {
        if pair.seal_open(&payload).is_none() {
            anyhow::bail!("a {size}-byte datagram did not come through");
        }
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / f64::from(n.max(1)))
}

/// The node's seal+open figures beside the host's, same code path and count.
fn seal_table(line: &str, n: u32, accel: &str) -> anyhow::Result<String> {
    use std::fmt::Write;
    let f = seal_fields(line)?;
    let get = |k: &str| -> anyhow::Result<f64> {
        f.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no {k} in the node's answer {line:?}"))
    };
    let overhead = get("overhead")?;
    let mut out = String::new();
    writeln!(
        out,
        "\nper-datagram sealing in the node (bench-seal {n}: seal + open over an in-memory session pair, ChaCha20-Poly1305; microvm, {accel}; TSC-timed)"
    )?;
    writeln!(
        out,
        "{:>8} {:>10} {:>14} {:>14} {:>8}",
        "payload", "overhead", "host", "node (VM)", "VM/host"
    )?;
    for size in [64usize, 1200] {
        let vm = get(&format!("us_{size}"))?;
        let host = host_seal_us(n, size)?;
        writeln!(
            out,
            "{:>6} B {:>8} B {:>11.2} µs {:>11.2} µs {:>7.1}x",
            size,
            overhead,
            host,
            vm,
            vm / host.max(1e-6)
        )?;
    }
    writeln!(
        out,
        "  (the node's throwaway handshake: {} µs; host figures from this process, {} build)",
        f.get("handshake_us").map_or("?", String::as_str),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn seal_table_reads_the_nodes_line() {
        let t = super::seal_table(
            "bench-seal n=10 overhead=30 us_64=5.00 us_1200=40.00 handshake_us=900 path=session-pair\n",
            10,
            "tcg",
        )
        .unwrap();
        assert!(t.contains("node (VM)") && t.contains("1200 B"), "{t}");
        assert!(super::seal_table("error: nope", 10, "tcg").is_err());
    }
}
