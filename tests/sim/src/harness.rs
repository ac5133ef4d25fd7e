//! The simulation harness every unipeer simulator shares (overlay, jobs, and the next ones):
//! virtual time stepped from one deadline to the next with a step bound, the seeded network
//! model (delay, loss, duplication, reordering, partitions), crash/restart incarnations for
//! node timers, an invariant hook after every step, and `SIM_SEED` replay with failures that
//! print their seed.
//!
//! A simulator owns its nodes and implements [`Simulation`] (its event type, one step, its
//! invariants); [`run_until`] drives it. One seeded [`Rng`] decides everything, so a seed
//! replays exactly.

use crate::network::{Faults, Topology};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use unipeer_node::Instant;
use unipeer_node::rng::Rng;

/// Events at one virtual instant beyond which a run is declared livelocked.
pub const MAX_STEPS_PER_INSTANT: u64 = 1_000_000;

/// `SIM_SEED` from the environment, if set: the one seed to replay.
pub fn replay_seed() -> Option<u64> {
    std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The seeds a seeded test runs: `SIM_SEED` alone when set, else `default`.
pub fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match replay_seed() {
        Some(s) => vec![s],
        None => default.collect(),
    }
}

/// A failure message that names its seed and how to replay it.
pub fn failure(seed: u64, what: &str, replay_command: &str) -> String {
    format!("seed {seed} failed: {what}\n  replay: SIM_SEED={seed} {replay_command}")
}

struct Scheduled<E> {
    at: Instant,
    seq: u64,
    ev: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<E> Eq for Scheduled<E> {}
impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Scheduled<E> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Width of the agenda's wheel in one-millisecond buckets (about 16 s ahead).
const WHEEL_MS: u64 = 1 << 14;

/// The virtual clock's agenda: events in time order (ties in scheduling order), popped one
/// step at a time, with a bound on steps at one instant (a livelock fails the run with its
/// seed instead of hanging).
///
/// A timing wheel of one-millisecond buckets (a calendar queue): scheduling appends to the
/// bucket of its millisecond, and only the current millisecond's events sit in a (small)
/// binary heap, so a 100,000-node run does not pay a cache miss per level of one huge heap.
/// Events beyond the wheel's window wait in an overflow heap. The order is exactly the one a
/// single heap on `(time, scheduling order)` gives, so a seed's history does not depend on it.
pub struct Clock<E> {
    seed: u64,
    seq: u64,
    last: Instant,
    same_instant: u64,
    /// Events at or before millisecond `cur_ms`, in `(at, seq)` order.
    current: BinaryHeap<Reverse<Scheduled<E>>>,
    /// Every event in `wheel` and `overflow` is at a later millisecond than this.
    cur_ms: u64,
    /// Bucket `ms % WHEEL_MS` holds the events of millisecond `ms`, for
    /// `cur_ms < ms < cur_ms + WHEEL_MS`.
    wheel: Vec<Vec<Scheduled<E>>>,
    in_wheel: usize,
    /// Events scheduled at least `WHEEL_MS` ahead of the wheel when they were scheduled.
    overflow: BinaryHeap<Reverse<Scheduled<E>>>,
    /// Steps taken so far.
    pub steps: u64,
}

impl<E> Clock<E> {
    pub fn new(seed: u64) -> Self {
        Clock {
            seed,
            seq: 0,
            last: Instant::ZERO,
            same_instant: 0,
            current: BinaryHeap::new(),
            cur_ms: 0,
            wheel: (0..WHEEL_MS).map(|_| Vec::new()).collect(),
            in_wheel: 0,
            overflow: BinaryHeap::new(),
            steps: 0,
        }
    }

    pub fn schedule(&mut self, at: Instant, ev: E) {
        self.seq += 1;
        let s = Scheduled {
            at,
            seq: self.seq,
            ev,
        };
        let ms = at.as_micros() / 1000;
        if ms <= self.cur_ms {
            self.current.push(Reverse(s));
        } else if ms - self.cur_ms < WHEEL_MS {
            self.wheel[(ms % WHEEL_MS) as usize].push(s);
            self.in_wheel += 1;
        } else {
            self.overflow.push(Reverse(s));
        }
    }

    /// Moves the wheel to the next millisecond holding events, if it is not after `limit_ms`;
    /// returns whether `current` got events. When nothing is due by `limit_ms`, the wheel
    /// still moves up to it (those buckets are empty), so no bucket is scanned twice.
    fn advance(&mut self, limit_ms: u64) -> bool {
        let overflow_ms = self
            .overflow
            .peek()
            .map(|Reverse(s)| s.at.as_micros() / 1000);
        let mut next = overflow_ms;
        if self.in_wheel > 0 {
            // The wheel holds an event within the window: the scan ends there at the latest.
            let stop = limit_ms
                .min(overflow_ms.unwrap_or(u64::MAX))
                .min(self.cur_ms + WHEEL_MS - 1);
            let mut ms = self.cur_ms + 1;
            while ms <= stop {
                if !self.wheel[(ms % WHEEL_MS) as usize].is_empty() {
                    next = Some(ms);
                    break;
                }
                ms += 1;
            }
        }
        match next {
            Some(m) if m <= limit_ms => {
                self.cur_ms = m;
                let bucket = &mut self.wheel[(m % WHEEL_MS) as usize];
                self.in_wheel -= bucket.len();
                self.current.extend(bucket.drain(..).map(Reverse));
                while let Some(Reverse(s)) = self.overflow.peek()
                    && s.at.as_micros() / 1000 <= m
                {
                    let Reverse(s) = self.overflow.pop().expect("peeked");
                    self.current.push(Reverse(s));
                }
                true
            }
            _ => {
                // Nothing due by `limit_ms`: every bucket up to it is empty.
                if limit_ms > self.cur_ms && limit_ms < u64::MAX / 2 {
                    self.cur_ms = limit_ms;
                }
                false
            }
        }
    }

    /// The next event due at or before `until`, with its time.
    ///
    /// # Panics
    /// After [`MAX_STEPS_PER_INSTANT`] events at one instant (a livelock), naming the seed.
    pub fn pop_until(&mut self, until: Instant) -> Option<(Instant, E)> {
        loop {
            if let Some(Reverse(head)) = self.current.peek() {
                if head.at > until {
                    return None;
                }
                break;
            }
            if !self.advance(until.as_micros() / 1000) {
                return None;
            }
        }
        let Reverse(s) = self.current.pop().expect("peeked");
        if s.at == self.last {
            self.same_instant += 1;
            assert!(
                self.same_instant < MAX_STEPS_PER_INSTANT,
                "seed {}: livelock, {MAX_STEPS_PER_INSTANT} events at {:?}",
                self.seed,
                s.at
            );
        } else {
            self.same_instant = 0;
        }
        self.last = s.at;
        self.steps += 1;
        Some((s.at, s.ev))
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty() && self.in_wheel == 0 && self.overflow.is_empty()
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.current.len() + self.in_wheel + self.overflow.len()
    }
}

/// A simulator as the harness drives it: its agenda, one step, its invariants.
pub trait Simulation {
    /// What the agenda carries (datagrams, timers, work completions, ...).
    type Event;
    fn clock(&mut self) -> &mut Clock<Self::Event>;
    /// Sets the simulator's notion of now (events never go back in time).
    fn set_now(&mut self, now: Instant);
    /// Handles one event, at the time just set.
    fn step(&mut self, ev: Self::Event);
    /// Checks invariants after every step; violations are the simulator's to record.
    fn after_step(&mut self) {}
}

/// Runs every event due up to `until` (each followed by the invariant hook), then sets the
/// clock to `until`.
pub fn run_until<S: Simulation>(sim: &mut S, until: Instant) {
    while let Some((at, ev)) = sim.clock().pop_until(until) {
        sim.set_now(at);
        sim.step(ev);
        sim.after_step();
    }
    sim.set_now(until);
}

/// A datagram's fate in the network model: when each copy arrives (none: lost).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fate {
    pub arrivals: [Option<Instant>; 2],
}

impl Fate {
    pub fn is_lost(&self) -> bool {
        self.arrivals[0].is_none()
    }

    pub fn arrivals(&self) -> impl Iterator<Item = Instant> + '_ {
        self.arrivals.iter().flatten().copied()
    }
}

/// Decides a datagram's fate from node slot `from` (on server `from_server`) to slot `to`:
/// dropped across a partition or by loss; else delivered once or (duplication) twice, each
/// copy after the servers' base latency plus up to 10 % jitter, plus `extra_us` (e.g. a bulk
/// transfer's time), plus up to one base latency more when reordered.
///
/// The draws from `rng`, in order: loss (only when connected), duplication (only when
/// enabled), then per copy jitter and reordering (only when enabled; and its delay when it
/// happens). A seed's history depends on it.
#[allow(clippy::too_many_arguments)] // the model's inputs, each needed
pub fn fate(
    rng: &mut Rng,
    topology: &Topology,
    faults: &Faults,
    now: Instant,
    (from, from_server): (usize, usize),
    (to, to_server): (usize, usize),
    extra_us: u64,
) -> Fate {
    let mut out = Fate::default();
    if !faults.connected(from, to) || rng.chance(faults.loss) {
        return out;
    }
    let copies = if drawn(rng, faults.duplicate) { 2 } else { 1 };
    let base = topology.base_us(from_server, to_server);
    for slot in out.arrivals.iter_mut().take(copies) {
        let mut delay = base + rng.below(base / 10 + 1) + extra_us;
        if drawn(rng, faults.reorder) {
            delay += rng.below(base + 1);
        }
        *slot = Some(now.plus_us(delay));
    }
    out
}

/// True with probability `p`; a fault switched off (`p == 0`) takes no draw, so a simulator
/// that never enables it keeps the random history it had before the fault existed.
fn drawn(rng: &mut Rng, p: f64) -> bool {
    p > 0.0 && rng.chance(p)
}

/// A node slot's timer across crashes and restarts: one armed deadline per incarnation, so a
/// timer (or work) scheduled for a crashed incarnation is recognised as void when it fires.
#[derive(Clone, Copy, Debug, Default)]
pub struct Incarnation {
    timer_at: Option<Instant>,
    number: u32,
}

impl Incarnation {
    /// A fresh start (or restart with empty state): earlier timers and work are void.
    pub fn restart(&mut self) {
        self.number += 1;
        self.timer_at = None;
    }

    /// A crash: the timer stops, and whatever the dead incarnation scheduled is void.
    pub fn crash(&mut self) {
        self.restart();
    }

    pub fn number(&self) -> u32 {
        self.number
    }

    /// Arms the timer for the node's `wanted` deadline (not before `now`); returns what to
    /// schedule when it moves earlier (a later deadline waits for the armed one to fire).
    pub fn arm(&mut self, now: Instant, wanted: Option<Instant>) -> Option<(Instant, u32)> {
        let at = wanted?.max(now);
        if self.timer_at.is_none_or(|cur| at < cur) {
            self.timer_at = Some(at);
            return Some((at, self.number));
        }
        None
    }

    /// Whether a timer event for `number` at `at` is the armed one; if so it is consumed.
    pub fn fire(&mut self, number: u32, at: Instant) -> bool {
        if self.number != number || self.timer_at != Some(at) {
            return false; // superseded
        }
        self.timer_at = None;
        true
    }

    /// Whether work started by incarnation `number` still counts.
    pub fn is_current(&self, number: u32) -> bool {
        self.number == number
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_pops_in_time_then_scheduling_order_and_stops_at_until() {
        let mut c = Clock::new(1);
        c.schedule(Instant::from_millis(5), "b");
        c.schedule(Instant::from_millis(1), "a");
        c.schedule(Instant::from_millis(5), "c");
        c.schedule(Instant::from_millis(9), "d");
        let until = Instant::from_millis(5);
        let got: Vec<&str> = std::iter::from_fn(|| c.pop_until(until).map(|x| x.1)).collect();
        assert_eq!(got, ["a", "b", "c"]);
        assert!(!c.is_empty());
        assert_eq!(c.steps, 3);
    }

    #[test]
    #[should_panic(expected = "seed 42: livelock")]
    fn a_livelock_fails_with_its_seed() {
        let mut c = Clock::new(42);
        for _ in 0..MAX_STEPS_PER_INSTANT + 1 {
            c.schedule(Instant::ZERO, ());
        }
        while c.pop_until(Instant::ZERO).is_some() {}
    }

    #[test]
    fn partitions_and_loss_drop_duplication_doubles() {
        let mut rng = Rng::from_u64(3);
        let topo = Topology::random(&mut rng, 2, 100, (1_000, 1_000));
        let mut faults = Faults {
            partition: Some(vec![0, 1]),
            ..Faults::default()
        };
        let f = fate(&mut rng, &topo, &faults, Instant::ZERO, (0, 0), (1, 1), 0);
        assert!(f.is_lost());
        faults.partition = None;
        faults.duplicate = 1.0;
        let f = fate(&mut rng, &topo, &faults, Instant::ZERO, (0, 0), (1, 1), 7);
        let at: Vec<Instant> = f.arrivals().collect();
        assert_eq!(at.len(), 2);
        for t in at {
            assert!((1_007..=1_107).contains(&t.as_micros()), "{t:?}");
        }
        faults.loss = 1.0;
        let f = fate(&mut rng, &topo, &faults, Instant::ZERO, (0, 0), (1, 1), 0);
        assert!(f.is_lost());
    }

    #[test]
    fn timers_of_a_crashed_incarnation_are_void() {
        let mut inc = Incarnation::default();
        inc.restart();
        let (at, n) = inc
            .arm(Instant::ZERO, Some(Instant::from_millis(10)))
            .unwrap();
        assert_eq!(inc.arm(Instant::ZERO, Some(Instant::from_millis(20))), None);
        inc.crash();
        assert!(!inc.fire(n, at));
        assert!(!inc.is_current(n));
        let (at2, n2) = inc
            .arm(Instant::ZERO, Some(Instant::from_millis(10)))
            .unwrap();
        assert!(inc.fire(n2, at2));
        assert!(!inc.fire(n2, at2), "consumed");
    }
}
