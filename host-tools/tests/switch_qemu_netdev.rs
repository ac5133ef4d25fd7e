//! The `-netdev` string the switch hands the launcher is accepted by this machine's QEMU, and
//! QEMU binds the VM end of the port with it. No guest runs (`-S`).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use unipeer::net::{self, SwitchClient, SwitchConfig};

/// Kills QEMU however the test ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_accepts_the_netdev_arg_and_binds_the_vm_end() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        common::skip("qemu-system-x86_64 not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("unipeer-switch-qemu-{}", std::process::id()));
    let mut cfg = SwitchConfig::new(&dir);
    cfg.uplink.enabled = false;
    let switch = net::start(cfg).unwrap();
    let mut c = SwitchClient::connect(&dir).unwrap();
    let port = c.add_port("n0", None).unwrap();
    let netdev = port.qemu_netdev_arg("net0").unwrap();
    let args = [
        "-machine",
        "microvm,acpi=off",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01",
    ];
    assert!(
        !udp_bound(port.vm_addr.unwrap().port()),
        "VM end free before QEMU"
    );
    let mut qemu = Qemu(
        Command::new("qemu-system-x86_64")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let vm_addr = port.vm_addr.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut bound = false;
    while Instant::now() < deadline {
        if let Some(status) = qemu.0.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = qemu.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("qemu {args:?} exited ({status}): {err}");
        }
        // QEMU holds the VM end once its netdev is up. (Read, don't bind: a probe bind could
        // take the port from under QEMU.)
        if udp_bound(vm_addr.port()) {
            bound = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20)); // poll interval of a bounded wait
    }
    assert!(bound, "QEMU did not bind {vm_addr} within 10 s");
    drop(qemu);
    switch.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether some socket is bound to 127.0.0.1:`port` (UDP), from `/proc/net/udp`.
fn udp_bound(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp").is_ok_and(|t| {
        t.lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
    })
}
