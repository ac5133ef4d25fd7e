//! The simulated network: a topology of physical servers (near inside a server, far between
//! them), and the faults the simulator injects (loss, duplication, reordering, partitions).

use unipeer_node::rng::Rng;

/// Per-pair one-way latency from the servers the two nodes run on.
#[derive(Clone, Debug)]
pub struct Topology {
    /// One-way base latency in microseconds, `[server][server]`, symmetric.
    latency_us: Vec<Vec<u64>>,
}

impl Topology {
    /// `servers` servers: `near_us` inside one, uniform in `far_us` between two.
    pub fn random(rng: &mut Rng, servers: usize, near_us: u64, far_us: (u64, u64)) -> Self {
        assert!(servers > 0 && far_us.0 <= far_us.1);
        let mut latency_us = vec![vec![near_us; servers]; servers];
        #[allow(clippy::needless_range_loop)] // a symmetric matrix: both indices matter
        for a in 0..servers {
            for b in a + 1..servers {
                let l = far_us.0 + rng.below(far_us.1 - far_us.0 + 1);
                latency_us[a][b] = l;
                latency_us[b][a] = l;
            }
        }
        Topology { latency_us }
    }

    pub fn servers(&self) -> usize {
        self.latency_us.len()
    }

    pub fn base_us(&self, a: usize, b: usize) -> u64 {
        self.latency_us[a][b]
    }
}

/// What the network does to datagrams right now.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Probability a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability a datagram gets an extra delay of up to one base latency (reordering).
    pub reorder: f64,
    /// Group per node slot; datagrams between different groups are dropped. `None`: whole.
    pub partition: Option<Vec<u8>>,
}

impl Faults {
    /// Whether `a` and `b` can talk.
    pub fn connected(&self, a: usize, b: usize) -> bool {
        match &self.partition {
            None => true,
            Some(g) => g.get(a).copied().unwrap_or(0) == g.get(b).copied().unwrap_or(0),
        }
    }

    /// Whether the network is whole and clean.
    pub fn is_healed(&self) -> bool {
        self.partition.is_none() && self.loss == 0.0
    }
}
