//! Local cluster networking: a user-space Ethernet switch with fault injection.
//!
//! Every VM's virtio-net attaches to a port through QEMU's `dgram` netdev (one Ethernet frame
//! per UDP datagram on loopback); the host joins through a tap uplink (port `host`, default
//! 10.77.0.1/16) when it can create one (root), and the switch says why not otherwise. The
//! switch learns MAC addresses, floods broadcast and unknown destinations, counts frames per
//! port, and injects faults at run time: cut links, partitions, loss (one seeded RNG), delay
//! per link, between port sets, and between declared physical servers.
//!
//! # Use
//!
//! ```no_run
//! use std::time::Duration;
//! use unipeer::net::{self, SwitchClient, SwitchConfig};
//!
//! // The process that owns the switch (e.g. a `unipeer net serve --run-dir D` daemon):
//! let switch = net::start(SwitchConfig::new("/tmp/run"))?; // or net::serve(config) to block
//! println!("uplink: {:?}", switch.uplink());
//!
//! // Any process, any shell:
//! let mut c = SwitchClient::connect("/tmp/run")?;
//! let port = c.add_port("n0", Some("server-1"))?;
//! let netdev = port.qemu_netdev_arg("net0").unwrap(); // -netdev <this>
//! // -device virtio-net-device,netdev=net0,mac=02:..  (microvm)
//! c.cut("n0")?;
//! c.restore("n0")?;
//! c.partition(&[vec!["n0", "n1"], vec!["n2", "n3"]])?;
//! c.heal()?;
//! c.loss(Some("n0"), 0.1)?; // None: global
//! c.delay("n0", Duration::from_millis(5))?;
//! c.delay_between(&["n0", "n1"], &["n2"], Duration::from_millis(20))?;
//! c.servers(&[("s1", vec!["n0", "n1"]), ("s2", vec!["n2", "n3"])], Duration::from_millis(20))?;
//! let stats = c.stats()?; // Display: a human table; Serialize: --json
//! c.delay("n1", net::parse_delay("1.5ms")?)?; // what the CLI's `20ms`-style arguments parse with
//! c.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A VM restarted with `vm restart` keeps its port (and so its netdev argument); to pin the
//! VM end yourself use [`SwitchClient::add_port_at`]. `unipeer bench cluster` takes the switch
//! figures from [`measure_forwarding`] (fake VMs, no QEMU). Tests and benchmarks drive ports
//! with [`fake::FakeVm`].
//!
//! Semantics worth knowing:
//! - Delays are one way and apply in each direction; they add up (link of sender + link of
//!   receiver + rules between sets + server delay). Deadlines are absolute; the timer has the
//!   millisecond resolution of epoll, so a delayed frame leaves up to ~1 ms late.
//! - Loss on a path is `1 - (1-global)(1-loss(sender))(1-loss(receiver))`, drawn per
//!   destination from the one RNG seeded by [`SwitchConfig::seed`].
//! - Partition: VM ports in no group form one more group; the uplink reaches every group
//!   unless a group names it. A cut link drops frames both ways; frames already delayed
//!   towards a cut port are dropped at their deadline.
//! - The control protocol (line-delimited JSON on `<run_dir>/switch.sock`) is [`Request`] /
//!   [`Response`]; [`SwitchClient`] wraps it. A rejected request changes nothing.

mod bench;
mod control;
mod fabric;
pub mod fake;
pub mod faults;
mod frame;
mod rng;
mod stats;
mod switch;
mod uplink;

pub use bench::{ForwardingBench, ForwardingReport, measure_forwarding};
pub use control::{
    CONTROL_TIMEOUT, ControlError, Request, Response, SOCKET_NAME, SwitchClient, parse_delay,
};
pub use fabric::{DELAY_RULES_MAX, DELAY_US_MAX, FaultError, PORTS_MAX};
pub use frame::{ETHERNET_HEADER_LEN, MacAddr, frame_addrs};
pub use stats::{
    DelayBetween, DropCounters, PortCounters, PortInfo, PortKind, PortStats, SwitchStats,
    UplinkStatus,
};
pub use switch::{StartError, SwitchConfig, SwitchHandle, qemu_netdev_arg, serve, start};
pub use uplink::UplinkConfig;

/// Name of the host uplink's port.
pub const UPLINK_PORT: &str = "host";
