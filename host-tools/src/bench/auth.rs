//! `unipeer bench auth`: the trust layer's handshake and sealing cost on the host, and with
//! `--vm` the handshake against a node in a TCG guest (the responder runs in the kernel).

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
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// Image name under images/.
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
    let result = (|| -> anyhow::Result<Vec<f64>> {
        cluster::up(&run_dir, &opts)?;
        // Let the lone node settle so its boot does not share the first handshakes' CPU.
        cluster::wait_answering(&run_dir, Duration::from_secs(30))?;
        Ok(cluster::handshakes(&run_dir, "n1", args.vm_handshakes)?)
    })();
    let _ = cluster::down(&run_dir);
    let times = result?;
    let s = stats(times);
    println!(
        "handshake with a node in a VM (microvm, {}; the responder's verification, key agreement and signature run in the kernel)",
        accel.accel
    );
    println!(
        "  {} of {} completed: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (round trips through the switch included)",
        s.n, args.vm_handshakes, s.p50, s.p99, s.max
    );
    Ok(())
}
