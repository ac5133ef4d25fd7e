//! `unipeer bench overlay`: simulated overlay hops, consistency and upkeep (overlay issue).
//!
//! Runs the deterministic simulator (`unipeer_sim::bench`) once per overlay size and prints
//! each measured figure next to its target. The baseline of the hop count is log16 N, printed
//! beside it with the ratio. Consistency is consistent answers over lookups issued (one that
//! never answers counts against it); memory per node is measured by the counting allocator the
//! `unipeer` binary installs (`unipeer_sim::heap`).

use anyhow::{Context, bail};
use unipeer_sim::bench::{BenchConfig, BenchResult, Consistency};

use crate::bench::{Verdict, cell};

#[derive(clap::Args, Clone, Debug)]
pub struct OverlayBenchArgs {
    /// Overlay sizes to simulate, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1000usize, 10000])]
    pub nodes: Vec<usize>,
    /// Simulated seconds measured per regime (no churn, 3 h sessions, 10 min sessions).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Seed of the simulation (the same seed gives the same figures, wall times aside).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

impl Default for OverlayBenchArgs {
    fn default() -> Self {
        OverlayBenchArgs {
            nodes: vec![1000, 10000],
            seconds: 60,
            seed: 1,
            json: false,
        }
    }
}

/// Upkeep target, bytes per second per node.
pub const UPKEEP_TARGET_BPS: f64 = 500.0;

/// Runs the benchmark and prints the table (or JSON with `--json`).
pub fn run(args: &OverlayBenchArgs) -> anyhow::Result<()> {
    let out = report(args)?;
    println!("{out}");
    Ok(())
}

/// Runs the benchmark and returns the table (or JSON with `--json`). Progress goes to stderr.
pub fn report(args: &OverlayBenchArgs) -> anyhow::Result<String> {
    if args.nodes.is_empty() || args.nodes.iter().any(|n| *n < 32 || *n > 100_000) {
        bail!("--nodes takes sizes between 32 and 100000");
    }
    if args.seconds == 0 || args.seconds > 3600 {
        bail!("--seconds must be in 1..=3600");
    }
    let mut results = Vec::new();
    for &n in &args.nodes {
        eprintln!(
            "bench overlay: simulating {n} nodes ({} s per regime, seed {}) ...",
            args.seconds, args.seed
        );
        let mut cfg = BenchConfig::new(n);
        cfg.seed = args.seed;
        cfg.measure_s = args.seconds;
        let r = unipeer_sim::bench::run(&cfg);
        eprintln!("bench overlay: {n} nodes done in {:.1} s", r.wall_s_total);
        results.push(r);
    }
    if args.json {
        let v: Vec<serde_json::Value> = results.iter().map(json).collect();
        return serde_json::to_string_pretty(&v).context("encoding the results");
    }
    Ok(table(args, &results))
}

fn consistency_json(c: &Consistency) -> serde_json::Value {
    serde_json::json!({
        "issued": c.issued,
        "answered": c.answered,
        "consistent": c.consistent,
        "failed": c.failed,
        "consistent_percent_of_issued": c.percent(),
        "churn_events": c.churn_events,
        "upkeep_bytes_per_node_s": c.upkeep_bytes_per_node_s,
    })
}

fn json(r: &BenchResult) -> serde_json::Value {
    serde_json::json!({
        "nodes": r.nodes,
        "log16_n": r.log16_n,
        "mean_hops": r.mean_hops,
        "p99_hops": r.p99_hops,
        "no_churn": consistency_json(&r.no_churn),
        "churn_median_3h": consistency_json(&r.churn_3h),
        "churn_median_10min": consistency_json(&r.churn_10min),
        "memory_per_node_bytes": r.memory_per_node_bytes,
        "wall_s_per_sim_minute": r.wall_s_per_sim_minute,
        "wall_s_total": r.wall_s_total,
        "formation_s": r.formation_s,
    })
}

fn mark(v: Verdict) -> &'static str {
    match v {
        Verdict::Met => "ok",
        Verdict::Missed => "MISS",
        Verdict::NoSamples => "no samples: MISS",
    }
}

fn consistency_cell(c: &Consistency, target_percent: f64) -> String {
    let p = c.percent();
    format!(
        "{} {}",
        cell(p, |p| format!("{p:.4}%")),
        mark(Verdict::of(p, |p| p >= target_percent))
    )
}

fn upkeep_cell(c: &Consistency) -> String {
    format!(
        "{:.0} {}",
        c.upkeep_bytes_per_node_s,
        mark(Verdict::of(Some(c.upkeep_bytes_per_node_s), |b| {
            b <= UPKEEP_TARGET_BPS
        }))
    )
}

/// The human table: one column per overlay size.
fn table(args: &OverlayBenchArgs, results: &[BenchResult]) -> String {
    type Row = (&'static str, &'static str, fn(&BenchResult) -> String);
    let rows: Vec<Row> = vec![
        ("mean hops (log16 N, ratio)", "<= log16 N", |r| {
            format!(
                "{:.2} ({:.2}, {:.2}x) {}",
                r.mean_hops,
                r.log16_n,
                r.mean_hops / r.log16_n,
                mark(Verdict::of(
                    (!r.mean_hops.is_nan()).then_some(r.mean_hops),
                    |h| h <= r.log16_n
                ))
            )
        }),
        ("p99 hops", "-", |r| format!("{}", r.p99_hops)),
        ("consistent, no churn", "100%", |r| {
            consistency_cell(&r.no_churn, 100.0)
        }),
        ("consistent, sessions median 3 h", ">= 99.99%", |r| {
            consistency_cell(&r.churn_3h, 99.99)
        }),
        ("consistent, sessions median 10 min", ">= 99.9%", |r| {
            consistency_cell(&r.churn_10min, 99.9)
        }),
        ("answered/issued, no churn", "-", |r| {
            format!("{}/{}", r.no_churn.answered, r.no_churn.issued)
        }),
        ("answered/issued, 3 h", "-", |r| {
            format!("{}/{}", r.churn_3h.answered, r.churn_3h.issued)
        }),
        ("answered/issued, 10 min", "-", |r| {
            format!("{}/{}", r.churn_10min.answered, r.churn_10min.issued)
        }),
        ("nodes replaced, 3 h / 10 min", "-", |r| {
            format!(
                "{} / {}",
                r.churn_3h.churn_events, r.churn_10min.churn_events
            )
        }),
        ("upkeep B/s/node, no churn", "<= 500", |r| {
            upkeep_cell(&r.no_churn)
        }),
        ("upkeep B/s/node, 3 h", "<= 500", |r| {
            upkeep_cell(&r.churn_3h)
        }),
        ("upkeep B/s/node, 10 min", "<= 500", |r| {
            upkeep_cell(&r.churn_10min)
        }),
        ("memory per node (counted allocator)", "-", |r| {
            cell(r.memory_per_node_bytes.map(|b| b as f64), |b| {
                format!("{:.1} KiB", b / 1024.0)
            })
        }),
        ("wall s per simulated minute", "-", |r| {
            format!("{:.2}", r.wall_s_per_sim_minute)
        }),
        ("wall s total (formation incl.)", "-", |r| {
            format!("{:.1}", r.wall_s_total)
        }),
    ];
    let mut out = format!(
        "unipeer bench overlay: simulated, seed {}, {} s per regime, L=16, k=3, keepalive 2 s\n",
        args.seed, args.seconds
    );
    let mut header = format!("{:<36} {:<12}", "metric", "target");
    for r in results {
        header.push_str(&format!(" {:<26}", format!("N={}", r.nodes)));
    }
    out.push_str(header.trim_end());
    out.push('\n');
    for (name, target, cell) in rows {
        let mut line = format!("{name:<36} {target:<12}");
        for r in results {
            line.push_str(&format!(" {:<26}", cell(r)));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(
        "consistent = the answer is the live node numerically closest to the key when it arrives,\n\
         over lookups issued (unanswered ones count against it);\n\
         upkeep = bytes sent for keepalives, leaf/table repair, joins and replication (UDP payload).",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_prints_every_row_and_targets() {
        let args = OverlayBenchArgs {
            nodes: vec![100],
            seconds: 10,
            seed: 3,
            json: false,
        };
        let out = report(&args).unwrap();
        eprintln!("{out}");
        assert!(out.contains("N=100"), "{out}");
        assert!(out.contains("consistent, sessions median 10 min"), "{out}");
        assert!(out.contains("<= log16 N"), "{out}");
        let json = report(&OverlayBenchArgs { json: true, ..args }).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["nodes"], 100);
        assert_eq!(
            v[0]["no_churn"]["consistent"], v[0]["no_churn"]["answered"],
            "{json}"
        );
        // Measured by the counting allocator this test binary installs (lib.rs).
        assert!(
            v[0]["memory_per_node_bytes"].as_u64().unwrap() > 1024,
            "{json}"
        );
        assert!(out.contains("KiB"), "{out}");
    }

    /// The default `unipeer bench overlay` run (minutes): `cargo test -p unipeer --lib
    /// bench::overlay -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn default_run() {
        let out = report(&OverlayBenchArgs::default()).unwrap();
        println!("{out}");
    }

    #[test]
    fn rejects_bad_arguments() {
        let args = OverlayBenchArgs {
            nodes: vec![5],
            ..Default::default()
        };
        assert!(report(&args).is_err());
    }
}
