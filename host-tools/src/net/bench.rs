//! `unipeer bench cluster`'s switch figures, measured with fake VMs (no QEMU): the round trip
//! through the switch and the frames per second it forwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::fake::{FakeVm, ethernet_frame, vm_mac};
use super::frame::{ETHERNET_HEADER_LEN, frame_addrs};
use super::switch::{SwitchConfig, start};
use super::uplink::UplinkConfig;

/// What to measure.
#[derive(Clone, Debug)]
pub struct ForwardingBench {
    /// Ping-pong round trips for the latency figures (one frame in flight).
    pub rtt_samples: usize,
    /// Echoed frames for the throughput figure.
    pub frames: u64,
    /// Frames in flight during the throughput run.
    pub window: usize,
    /// Ethernet frame length, bytes.
    pub frame_len: usize,
    /// Bound on the whole measurement.
    pub time_limit: Duration,
}

impl Default for ForwardingBench {
    fn default() -> Self {
        ForwardingBench {
            rtt_samples: 2_000,
            frames: 200_000,
            window: 32,
            frame_len: 128,
            time_limit: Duration::from_secs(20),
        }
    }
}

/// What was measured.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ForwardingReport {
    pub rtt_samples: usize,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// Frames the switch forwarded during the throughput run (both directions).
    pub frames_forwarded: u64,
    pub elapsed_s: f64,
    pub frames_per_s: f64,
    /// Frames that did not come back in time (should be 0).
    pub lost: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Starts a private switch (no uplink) with two fake VMs, A and an echoing B, and measures.
pub fn measure_forwarding(b: &ForwardingBench) -> Result<ForwardingReport, String> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "unipeer-switch-bench-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let mut cfg = SwitchConfig::new(&dir);
    cfg.uplink = UplinkConfig {
        enabled: false,
        ..UplinkConfig::default()
    };
    let switch = start(cfg).map_err(|e| e.to_string())?;
    let result = run(&switch, b);
    switch.stop();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(switch: &super::SwitchHandle, b: &ForwardingBench) -> Result<ForwardingReport, String> {
    let mut c = switch.client().map_err(|e| e.to_string())?;
    let pa = c.add_port("bench-a", None).map_err(|e| e.to_string())?;
    let pb = c.add_port("bench-b", None).map_err(|e| e.to_string())?;
    let a = FakeVm::attach(&pa, vm_mac(1)).map_err(|e| e.to_string())?;
    let echo = FakeVm::attach(&pb, vm_mac(2)).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let end = Instant::now() + b.time_limit;
    let echo_stop = stop.clone();
    let echoer = thread::spawn(move || {
        // Swap the addresses and send the frame back.
        let mut buf = vec![0u8; 65_536];
        while !echo_stop.load(Ordering::Relaxed) && Instant::now() < end {
            let Some(n) = echo.recv_into(&mut buf, Instant::now() + Duration::from_millis(50))
            else {
                continue;
            };
            let f = &mut buf[..n];
            if let Some((dst, src)) = frame_addrs(f) {
                f[0..6].copy_from_slice(&src.0);
                f[6..12].copy_from_slice(&dst.0);
                let _ = echo.send_frame(f);
            }
        }
    });
    let len = b.frame_len.max(ETHERNET_HEADER_LEN + 8);
    let frame = |seq: u64| {
        let mut payload = seq.to_be_bytes().to_vec();
        payload.resize(len - ETHERNET_HEADER_LEN, 0);
        ethernet_frame(vm_mac(2), vm_mac(1), 0x88b5, &payload)
    };
    // Learning: the first frame floods, its echo teaches the switch A's port.
    let mut lost = 0u64;
    let warm = Instant::now() + Duration::from_secs(2);
    let _ = a.send_frame(&frame(0));
    if a.recv_frame(warm).is_none() {
        stop.store(true, Ordering::Relaxed);
        let _ = echoer.join();
        return Err("no echo through the switch within 2 s".into());
    }
    let mut buf = vec![0u8; 65_536];
    let mut rtts = Vec::with_capacity(b.rtt_samples);
    for i in 0..b.rtt_samples as u64 {
        if Instant::now() >= end {
            break;
        }
        let t0 = Instant::now();
        let _ = a.send_frame(&frame(i));
        match a.recv_into(&mut buf, t0 + Duration::from_millis(500)) {
            Some(_) => rtts.push(t0.elapsed().as_secs_f64() * 1e6),
            None => lost += 1,
        }
    }
    rtts.sort_by(f64::total_cmp);
    let before = forwarded(&mut c)?;
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut back = 0u64;
    for _ in 0..b.window.max(1) {
        let _ = a.send_frame(&frame(sent));
        sent += 1;
    }
    while back < b.frames && Instant::now() < end {
        match a.recv_into(&mut buf, Instant::now() + Duration::from_millis(200)) {
            Some(_) => {
                back += 1;
                if sent < b.frames {
                    let _ = a.send_frame(&frame(sent));
                    sent += 1;
                }
            }
            None => {
                // A frame vanished (socket buffer overrun): refill the window.
                let missing = sent - back;
                lost += missing;
                back += missing;
                for _ in 0..missing.min(b.window as u64) {
                    if sent < b.frames {
                        let _ = a.send_frame(&frame(sent));
                        sent += 1;
                    }
                }
            }
        }
    }
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = echoer.join();
    let frames_forwarded = forwarded(&mut c)? - before;
    Ok(ForwardingReport {
        rtt_samples: rtts.len(),
        rtt_p50_us: percentile(&rtts, 0.5),
        rtt_p99_us: percentile(&rtts, 0.99),
        frames_forwarded,
        elapsed_s: elapsed.as_secs_f64(),
        frames_per_s: frames_forwarded as f64 / elapsed.as_secs_f64().max(1e-9),
        lost,
    })
}

fn forwarded(c: &mut super::SwitchClient) -> Result<u64, String> {
    let s = c.stats().map_err(|e| e.to_string())?;
    Ok(s.ports.iter().map(|p| p.counters.tx_frames).sum())
}
