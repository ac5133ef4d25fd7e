//! `unipeer bench overlay`: simulated overlay hops, relative delay penalty, consistency under
//! churn (down to Bamboo's hardest, 1.4-minute sessions) and upkeep (overlay issue).
//!
//! Runs the deterministic simulator (`unipeer_sim::bench`) once per overlay size and prints
//! each measured figure next to its target. The baseline of the hop count is log16 N, printed
//! beside it with the ratio. Consistency is consistent answers over lookups issued (one that
//! never answers counts against it); memory per node is measured by the counting allocator the
//! `unipeer` binary installs (`unipeer_sim::heap`).

use anyhow::{Context, bail};
use std::path::PathBuf;
use unipeer_sim::bench::{BAMBOO_MEDIAN_SESSION_S, BenchConfig, BenchResult, Consistency};

use crate::bench::plot::{Panel, Series};
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
    /// Also draw hops against N, consistency against churn and the relative delay penalty
    /// into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

impl Default for OverlayBenchArgs {
    fn default() -> Self {
        OverlayBenchArgs {
            nodes: vec![1000, 10000],
            seconds: 60,
            seed: 1,
            json: false,
            plot: None,
        }
    }
}

/// Relative delay penalty target (Pastry reports about 1.3-1.4).
pub const RDP_TARGET: f64 = 1.4;
/// Consistency target at Bamboo's hardest churn, percent (Bamboo measured 95 %).
pub const BAMBOO_TARGET_PERCENT: f64 = 99.9;

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
    if let Some(path) = &args.plot {
        crate::bench::plot::write_svg(path, &panels(&results))?;
        eprintln!("bench overlay: plot written to {}", path.display());
    }
    if args.json {
        let v: Vec<serde_json::Value> = results.iter().map(json).collect();
        return serde_json::to_string_pretty(&v).context("encoding the results");
    }
    Ok(table(args, &results))
}

/// Departures per node per hour for exponential sessions of this median (0: no churn).
fn churn_per_node_hour(median_session_s: Option<f64>) -> f64 {
    median_session_s.map_or(0.0, |m| std::f64::consts::LN_2 * 3600.0 / m)
}

/// The figures of `--plot`: hops against N, consistency against churn, relative delay penalty.
pub fn panels(results: &[BenchResult]) -> Vec<Panel> {
    let by_n = |f: fn(&BenchResult) -> f64| -> Vec<(f64, f64)> {
        results.iter().map(|r| (r.nodes as f64, f(r))).collect()
    };
    let hops = Panel::new("Hops against N", "N (nodes)", "hops per lookup")
        .log_x()
        .with(Series::line("mean hops", by_n(|r| r.mean_hops)))
        .with(Series::line("p99 hops", by_n(|r| f64::from(r.p99_hops))))
        .with(Series::line("log16 N", by_n(|r| r.log16_n)));
    let mut churn = Panel::new(
        "Consistency against churn",
        "departures per node per hour",
        "consistent lookups (%)",
    );
    for r in results {
        let points = [
            (None, &r.no_churn),
            (Some(3.0 * 3600.0), &r.churn_3h),
            (Some(600.0), &r.churn_10min),
            (Some(BAMBOO_MEDIAN_SESSION_S), &r.churn_bamboo),
        ]
        .into_iter()
        .map(|(m, c)| (churn_per_node_hour(m), c.percent().unwrap_or(f64::NAN)))
        .collect();
        churn = churn.with(Series::line(&format!("N={}", r.nodes), points));
    }
    let rdp = Panel::new(
        "Relative delay penalty",
        "N (nodes)",
        "route / direct latency",
    )
    .log_x()
    .with(Series::line("mean RDP", by_n(|r| r.rdp_mean)))
    .with(Series::line("median RDP", by_n(|r| r.rdp_p50)))
    .with(Series::line(
        &format!("target {RDP_TARGET}"),
        by_n(|_| RDP_TARGET),
    ));
    vec![hops, churn, rdp]
}

fn consistency_json(c: &Consistency) -> serde_json::Value {
    serde_json::json!({
        "issued": c.issued,
        "orphaned": c.orphaned,
        "answered": c.answered,
        "consistent": c.consistent,
        "consistent_at_answer": c.consistent_at_answer,
        "consistent_percent_at_answer": c.percent_at_answer(),
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
        "churn_median_1_4min": consistency_json(&r.churn_bamboo),
        "rdp_mean": r.rdp_mean,
        "rdp_p50": r.rdp_p50,
        "rdp_p90": r.rdp_p90,
        "rdp_samples": r.rdp_samples,
        "memory_per_node_bytes": r.memory_per_node_bytes,
        "wall_s_per_sim_minute": r.wall_s_per_sim_minute,
        "cpu_s_per_sim_minute": r.cpu_s_per_sim_minute,
        "events_per_sim_s": r.events_per_sim_s,
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
        ("relative delay penalty (p50, p90)", "<= 1.4", |r| {
            let v = (r.rdp_samples > 0).then_some(r.rdp_mean);
            format!(
                "{} ({:.2}, {:.2}) {}",
                cell(v, |m| format!("{m:.2}")),
                r.rdp_p50,
                r.rdp_p90,
                mark(Verdict::of(v, |m| m <= RDP_TARGET))
            )
        }),
        ("consistent, no churn", "100%", |r| {
            consistency_cell(&r.no_churn, 100.0)
        }),
        ("consistent, sessions median 3 h", ">= 99.99%", |r| {
            consistency_cell(&r.churn_3h, 99.99)
        }),
        ("consistent, sessions median 10 min", ">= 99.9%", |r| {
            consistency_cell(&r.churn_10min, 99.9)
        }),
        ("consistent, sessions median 1.4 min", ">= 99.9%", |r| {
            consistency_cell(&r.churn_bamboo, BAMBOO_TARGET_PERCENT)
        }),
        ("  same, judged at the root's answer", ">= 99.9%", |r| {
            let p = r.churn_bamboo.percent_at_answer();
            format!(
                "{} {}",
                cell(p, |p| format!("{p:.4}%")),
                mark(Verdict::of(p, |p| p >= BAMBOO_TARGET_PERCENT))
            )
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
        ("answered/issued, 1.4 min", "-", |r| {
            format!("{}/{}", r.churn_bamboo.answered, r.churn_bamboo.issued)
        }),
        ("nodes replaced 3h / 10min / 1.4min", "-", |r| {
            format!(
                "{} / {} / {}",
                r.churn_3h.churn_events, r.churn_10min.churn_events, r.churn_bamboo.churn_events
            )
        }),
        ("lookups orphaned (origin died)", "-", |r| {
            format!(
                "{} / {} / {}",
                r.churn_3h.orphaned, r.churn_10min.orphaned, r.churn_bamboo.orphaned
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
        ("upkeep B/s/node, 1.4 min", "-", |r| {
            format!("{:.0}", r.churn_bamboo.upkeep_bytes_per_node_s)
        }),
        ("memory per node (counted allocator)", "-", |r| {
            cell(r.memory_per_node_bytes.map(|b| b as f64), |b| {
                format!("{:.1} KiB", b / 1024.0)
            })
        }),
        ("wall s per simulated minute", "<= 60", |r| {
            format!(
                "{:.2} {}",
                r.wall_s_per_sim_minute,
                mark(Verdict::of(Some(r.wall_s_per_sim_minute), |w| w <= 60.0))
            )
        }),
        ("CPU s per simulated minute", "-", |r| {
            cell(r.cpu_s_per_sim_minute, |c| format!("{c:.2}"))
        }),
        ("simulated events per simulated s", "-", |r| {
            format!("{:.0}", r.events_per_sim_s)
        }),
        ("wall s total (formation incl.)", "-", |r| {
            format!("{:.1}", r.wall_s_total)
        }),
    ];
    let mut out = format!(
        "unipeer bench overlay: simulated, seed {}, {} s per regime, L=16, k=3, keepalive 2 s;\n\
         latency: each node a point in a square, 0.2 ms + distance at 100 ms per side (one way)\n",
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
        let plot = std::env::temp_dir().join(format!("unipeer-overlay-{}.svg", std::process::id()));
        let args = OverlayBenchArgs {
            nodes: vec![100, 300],
            seconds: 10,
            seed: 3,
            json: false,
            plot: Some(plot.clone()),
        };
        let out = report(&args).unwrap();
        eprintln!("{out}");
        assert!(out.contains("N=100"), "{out}");
        assert!(out.contains("consistent, sessions median 10 min"), "{out}");
        assert!(out.contains("<= log16 N"), "{out}");
        assert!(out.contains("consistent, sessions median 1.4 min"), "{out}");
        assert!(out.contains("relative delay penalty"), "{out}");
        // The plot parses and names every series it draws, one consistency line per N.
        let svg = std::fs::read_to_string(&plot).unwrap();
        let _ = std::fs::remove_file(&plot);
        let texts = crate::bench::plot::tests::svg_texts(&svg);
        for want in [
            "Hops against N",
            "mean hops",
            "log16 N",
            "Consistency against churn",
            "N=100",
            "N=300",
            "Relative delay penalty",
            "mean RDP",
            "target 1.4",
        ] {
            assert!(texts.iter().any(|t| t == want), "{want} not in {texts:?}");
        }
        // One consistency line per N, four regimes each.
        assert_eq!(
            crate::bench::plot::tests::svg_polylines(&svg, 4),
            2,
            "{svg}"
        );
        let json = report(&OverlayBenchArgs {
            json: true,
            plot: None,
            ..args
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["nodes"], 100);
        assert!(v[0]["rdp_samples"].as_u64().unwrap() > 0, "{json}");
        assert!(v[0]["rdp_mean"].as_f64().unwrap() >= 1.0, "{json}");
        assert!(
            v[0]["churn_median_1_4min"]["churn_events"]
                .as_u64()
                .unwrap()
                > 0,
            "{json}"
        );
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
