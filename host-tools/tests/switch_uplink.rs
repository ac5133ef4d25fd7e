//! The tap uplink, end to end, inside a private network namespace: the host's UDP socket
//! reaches a fake VM (which answers ARP and echoes UDP) through the tap and the switch, and the
//! tap and its route are gone once the switch stops. Nothing leaves the namespace.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use unipeer::net::fake::{FakeVm, ethernet_frame, vm_mac};
use unipeer::net::{self, MacAddr, SwitchClient, SwitchConfig, UplinkConfig, UplinkStatus};

const INNER_ENV: &str = "UNIPEER_SWITCH_UPLINK_NETNS";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().expect("runs ip")
}

/// Deletes the namespace however the test ends.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

#[test]
fn uplink_reaches_a_vm_and_is_removed_on_stop() {
    let can = Command::new("ip").arg("-V").output().is_ok()
        && std::path::Path::new("/dev/net/tun").exists()
        && std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")));
    if !can {
        common::skip("needs root, iproute2 and /dev/net/tun");
        return;
    }
    let ns = Netns(format!("unipeer-switch-{}", std::process::id()));
    let out = ip(&["netns", "add", &ns.0]);
    assert!(out.status.success(), "ip netns add: {out:?}");
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(exe)
        .args([
            "--exact",
            "inner_uplink_in_netns",
            "--ignored",
            "--nocapture",
        ])
        .env(INNER_ENV, "1")
        .output()
        .expect("runs the inner test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "inner test failed:\n{text}");
    assert!(text.contains("1 passed"), "inner test did not run:\n{text}");
}

/// Runs only inside the namespace the test above makes.
#[test]
#[ignore = "run by uplink_reaches_a_vm_and_is_removed_on_stop inside a network namespace"]
fn inner_uplink_in_netns() {
    assert_eq!(
        std::env::var(INNER_ENV).as_deref(),
        Ok("1"),
        "run me only through uplink_reaches_a_vm_and_is_removed_on_stop"
    );
    assert!(ip(&["link", "set", "lo", "up"]).status.success());
    let dir = std::env::temp_dir().join(format!("unipeer-switch-uplink-{}", std::process::id()));
    let mut cfg = SwitchConfig::new(&dir);
    cfg.uplink = UplinkConfig {
        enabled: true,
        ifname: "uptest%d".into(),
        address: HOST_IP,
        prefix_len: 16,
    };
    let switch = net::start(cfg).expect("switch starts");
    let UplinkStatus::Up { ifname, .. } = switch.uplink().clone() else {
        panic!("uplink is off: {:?}", switch.uplink());
    };
    assert!(ifname.starts_with("uptest"));
    let route = String::from_utf8_lossy(&ip(&["route"]).stdout).to_string();
    assert!(
        route.contains(&format!("10.77.0.0/16 dev {ifname}")),
        "{route}"
    );

    let mut c = SwitchClient::connect(&dir).unwrap();
    let port = c.add_port("vm1", None).unwrap();
    let vm = FakeVm::attach(&port, vm_mac(1)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_responder = stop.clone();
    let responder = std::thread::spawn(move || {
        answer(
            &vm,
            &stop_responder,
            Instant::now() + Duration::from_secs(10),
        )
    });

    let host = UdpSocket::bind((HOST_IP, 0)).unwrap();
    host.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 256];
    let mut answered = None;
    // The first datagram may wait for ARP; retry a bounded number of times.
    for _ in 0..20 {
        host.send_to(b"hello-vm", (VM_IP, 7777)).unwrap();
        if let Ok((n, from)) = host.recv_from(&mut buf) {
            answered = Some((buf[..n].to_vec(), from));
            break;
        }
    }
    let (reply, from) = answered.expect("the fake VM answered through the tap");
    assert_eq!(reply, b"echo:hello-vm");
    assert_eq!(from, (VM_IP, 7777).into());
    let st = c.stats().unwrap();
    let h = st.port(net::UPLINK_PORT).unwrap().counters;
    assert!(h.rx_frames >= 2 && h.tx_frames >= 2, "{h:?}");

    // A cut uplink makes the VM unreachable from the host.
    c.cut(net::UPLINK_PORT).unwrap();
    host.send_to(b"cut", (VM_IP, 7777)).unwrap();
    assert!(
        host.recv_from(&mut buf).is_err(),
        "no answer through a cut link"
    );
    c.restore(net::UPLINK_PORT).unwrap();

    stop.store(true, Ordering::Relaxed);
    let _ = responder.join();
    c.shutdown().unwrap();
    switch.wait();
    let link = ip(&["link", "show", &ifname]);
    assert!(!link.status.success(), "tap {ifname} still exists");
    let route = String::from_utf8_lossy(&ip(&["route"]).stdout).to_string();
    assert!(
        !route.contains("10.77.0.0/16"),
        "route left behind: {route}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A minimal IPv4 host at `VM_IP`: answers ARP requests for it and echoes UDP to port 7777.
fn answer(vm: &FakeVm, stop: &AtomicBool, until: Instant) {
    for _ in 0..10_000 {
        if stop.load(Ordering::Relaxed) || Instant::now() > until {
            return;
        }
        let Some(f) = vm.recv_frame(Instant::now() + Duration::from_millis(20)) else {
            continue;
        };
        if f.len() < 42 {
            continue;
        }
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        let src = MacAddr(f[6..12].try_into().unwrap());
        if ethertype == 0x0806 && f[20..22] == [0, 1] && f[38..42] == VM_IP.octets() {
            let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 2];
            arp.extend_from_slice(&vm.mac.0);
            arp.extend_from_slice(&VM_IP.octets());
            arp.extend_from_slice(&f[22..32]); // requester's MAC and IP
            let _ = vm.send_frame(&ethernet_frame(src, vm.mac, 0x0806, &arp));
        } else if ethertype == 0x0800 && f[23] == 17 && f[30..34] == VM_IP.octets() {
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let udp = 14 + ihl;
            let sport = [f[udp], f[udp + 1]];
            let ulen = usize::from(u16::from_be_bytes([f[udp + 4], f[udp + 5]]));
            let data = &f[udp + 8..udp + ulen];
            let mut payload = b"echo:".to_vec();
            payload.extend_from_slice(data);
            let peer: [u8; 4] = f[26..30].try_into().unwrap();
            let _ = vm.send_frame(&ethernet_frame(
                src,
                vm.mac,
                0x0800,
                &ipv4_udp(peer, sport, &payload),
            ));
        }
    }
}

fn ipv4_udp(dst: [u8; 4], dport: [u8; 2], payload: &[u8]) -> Vec<u8> {
    let total = (20 + 8 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&VM_IP.octets());
    p.extend_from_slice(&dst);
    let mut sum: u32 = p
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(&7777u16.to_be_bytes());
    p.extend_from_slice(&dport);
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    p.extend_from_slice(payload);
    p
}

const NOROOT_ENV: &str = "UNIPEER_SWITCH_UPLINK_NOROOT";

#[test]
fn without_root_the_uplink_is_off_and_vms_still_connect() {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")));
    let has_setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !root || !has_setpriv {
        common::skip("needs root and setpriv to drop to an unprivileged user");
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "inner_without_root", "--ignored", "--nocapture"])
        .env(NOROOT_ENV, "1")
        .env("TMPDIR", "/tmp")
        .output()
        .expect("runs the inner test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "inner test failed:\n{text}");
    assert!(text.contains("1 passed"), "inner test did not run:\n{text}");
}

/// Runs only as an unprivileged user, through the test above.
#[test]
#[ignore = "run by without_root_the_uplink_is_off_and_vms_still_connect as user nobody"]
fn inner_without_root() {
    assert_eq!(std::env::var(NOROOT_ENV).as_deref(), Ok("1"));
    let dir = std::env::temp_dir().join(format!("unipeer-switch-noroot-{}", std::process::id()));
    let switch = net::start(SwitchConfig::new(&dir)).expect("starts without root");
    let UplinkStatus::Off { reason } = switch.uplink().clone() else {
        panic!("uplink up without root: {:?}", switch.uplink());
    };
    assert!(reason.contains("not root"), "{reason}");
    let mut c = SwitchClient::connect(&dir).unwrap();
    let a = FakeVm::attach(&c.add_port("a", None).unwrap(), vm_mac(1)).unwrap();
    let b = FakeVm::attach(&c.add_port("b", None).unwrap(), vm_mac(2)).unwrap();
    a.send_to(b.mac, b"no-root").unwrap();
    assert!(
        b.recv_tagged(b"no-root", Instant::now() + Duration::from_secs(2))
            .is_some()
    );
    let st = c.stats().unwrap();
    assert!(st.port(net::UPLINK_PORT).is_none());
    assert!(st.to_string().contains("uplink: off"));
    switch.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
