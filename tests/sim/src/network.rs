//! The simulated network: a topology of physical servers (near inside a server, far between
//! them), and the faults the simulator injects (loss, duplication, reordering, partitions).

use unipeer_node::rng::Rng;

/// Per-pair one-way latency from the "servers" the two nodes run on.
#[derive(Clone, Debug)]
pub struct Topology {
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    /// One-way base latency in microseconds, `[server][server]`, symmetric.
    Matrix(Vec<Vec<u64>>),
    /// Each server a point in the unit square; latency grows with the distance (see
    /// [`Topology::plane`]).
    Plane {
        points: Vec<[f32; 2]>,
        floor_us: u64,
        side_us: f64,
    },
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
        Topology {
            kind: Kind::Matrix(latency_us),
        }
    }

    /// The latency model of Pastry's proximity experiments: every node a point drawn uniformly
    /// in a square (added with [`Topology::add_point`]), one-way latency `floor_us` plus the
    /// Euclidean distance at `side_us` per side of the square. Triangle inequality holds, so a
    /// route's latency over the direct one (the relative delay penalty) is at least 1.
    pub fn plane(floor_us: u64, side_us: u64) -> Self {
        Topology {
            kind: Kind::Plane {
                points: Vec::new(),
                floor_us,
                side_us: side_us as f64,
            },
        }
    }

    /// Whether servers are points added one per node ([`Topology::plane`]).
    pub fn is_plane(&self) -> bool {
        matches!(self.kind, Kind::Plane { .. })
    }

    /// Adds a random point (a server of its own) to a plane topology; returns its index.
    ///
    /// # Panics
    /// On a matrix topology, whose servers are fixed.
    pub fn add_point(&mut self, rng: &mut Rng) -> usize {
        let Kind::Plane { points, .. } = &mut self.kind else {
            panic!("add_point on a matrix topology");
        };
        let p = [rng.unit_f64() as f32, rng.unit_f64() as f32];
        points.push(p);
        points.len() - 1
    }

    pub fn servers(&self) -> usize {
        match &self.kind {
            Kind::Matrix(m) => m.len(),
            Kind::Plane { points, .. } => points.len(),
        }
    }

    pub fn base_us(&self, a: usize, b: usize) -> u64 {
        match &self.kind {
            Kind::Matrix(m) => m[a][b],
            Kind::Plane {
                points,
                floor_us,
                side_us,
            } => {
                let (p, q) = (points[a], points[b]);
                let (dx, dy) = (f64::from(p[0] - q[0]), f64::from(p[1] - q[1]));
                floor_us + ((dx * dx + dy * dy).sqrt() * side_us) as u64
            }
        }
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
