//! `unipeer bench directory`: the service directory, simulated (the directory issue).
//!
//! Runs `unipeer_sim::directory` once per overlay size: every node advertises itself under
//! the `node` service, random nodes discover providers meeting random requirements. Baselines
//! come from the same run: hops of a plain DHT lookup of the ServiceId from the same askers,
//! and the load of storing every advert and serving every lookup at the ServiceId's root.

use anyhow::{Context, bail};
use unipeer_node::directory::DirectoryConfig;
use unipeer_sim::directory::{DirReport, DirSimConfig, Load};

use crate::bench::{Unmeasured, Verdict, cell};

#[derive(clap::Args, Clone, Debug)]
pub struct DirectoryBenchArgs {
    /// Overlay sizes to simulate, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1000usize, 10000])]
    pub nodes: Vec<usize>,
    /// R: the lowest directory level.
    #[arg(long, default_value_t = DirectoryConfig::default().min_level)]
    pub r: u8,
    /// M: the highest directory level explored.
    #[arg(long, default_value_t = DirectoryConfig::default().max_level)]
    pub m: u8,
    /// Nearest-provider lookups issued per size.
    #[arg(long, default_value_t = 400)]
    pub lookups: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

/// Targets: discover hops ≤ the plain lookup's; load max/mean ≤ 1/4 of the single root's;
/// nearest answers ≥ 95 %; a crashed provider gone within the TTL (plus one sweep).
pub const LOAD_TARGET: f64 = 0.25;
pub const NEAREST_TARGET_PCT: f64 = 95.0;

pub fn run(args: &DirectoryBenchArgs) -> anyhow::Result<()> {
    if args.nodes.is_empty() || args.nodes.iter().any(|n| *n < 32 || *n > 100_000) {
        bail!("--nodes takes sizes between 32 and 100000");
    }
    if args.r > args.m || args.m > 32 {
        bail!("need R <= M <= 32");
    }
    if args.lookups == 0 || args.lookups > 100_000 {
        bail!("--lookups must be in 1..=100000");
    }
    let mut reports = Vec::new();
    for &n in &args.nodes {
        eprintln!(
            "bench directory: simulating {n} nodes (R={}, M={}) ...",
            args.r, args.m
        );
        let mut cfg = DirSimConfig::new(n, args.seed);
        cfg.directory.min_level = args.r;
        cfg.directory.max_level = args.m;
        cfg.lookups = args.lookups;
        let r = unipeer_sim::directory::run(&cfg);
        eprintln!("bench directory: {n} nodes done in {:.1} s", r.wall_s);
        reports.push(r);
    }
    let mut unmeasured = Unmeasured::default();
    if args.json {
        let v: Vec<serde_json::Value> = reports.iter().map(json).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).context("encoding the results")?
        );
    } else {
        println!("{}", table(args, &reports, &mut unmeasured));
    }
    unmeasured.check()
}

fn mean_opt(v: &[u32]) -> Option<f64> {
    let m = DirReport::mean(v);
    m.is_finite().then_some(m)
}

fn rel(load: Load, base: Load) -> Option<f64> {
    let x = load.ratio() / base.ratio();
    x.is_finite().then_some(x)
}

fn freshness_max(r: &DirReport) -> Option<f64> {
    if r.freshness_ms.is_empty() {
        return None;
    }
    // A provider still advertised at the end counts as infinitely stale.
    Some(
        r.freshness_ms
            .iter()
            .map(|f| f.map_or(f64::INFINITY, |ms| ms as f64))
            .fold(0.0, f64::max),
    )
}

fn json(r: &DirReport) -> serde_json::Value {
    serde_json::json!({
        "nodes": r.nodes,
        "discover_hops_mean": mean_opt(&r.hops),
        "plain_lookup_hops_mean": mean_opt(&r.plain_hops),
        "lookups_issued": r.lookups_issued,
        "lookups_answered": r.lookups_answered,
        "nearest_percent": r.nearest_percent(),
        "unique_found": r.unique_found,
        "unique_total": r.unique_total,
        "records_max_over_mean": r.records.ratio(),
        "records_single_root_max_over_mean": r.baseline_records.ratio(),
        "lookups_max_over_mean": r.lookups_load.ratio(),
        "lookups_single_root_max_over_mean": r.baseline_lookups.ratio(),
        "freshness_ms": r.freshness_ms,
        "ttl_ms": r.ttl_ms,
        "stale_answers": r.stale_answers,
        "answers_after_crash": r.answers_after_crash,
        "wall_s": r.wall_s,
    })
}

fn table(args: &DirectoryBenchArgs, reports: &[DirReport], un: &mut Unmeasured) -> String {
    let mut out = format!(
        "unipeer bench directory: simulated, seed {}, R={}, M={}, TTL {} s, every node a provider of `node`\n\n",
        args.seed,
        args.r,
        args.m,
        DirectoryConfig::default().ttl_ms / 1000
    );
    out.push_str(&format!(
        "{:<7} {:<44} {:>14} {:>16} {:>10}\n",
        "nodes", "figure", "measured", "baseline/target", "verdict"
    ));
    for r in reports {
        let mut row =
            |name: &str, value: Option<f64>, shown: String, target: String, v: Verdict| {
                un.note(&format!("{} nodes: {name}", r.nodes), v);
                out.push_str(&format!(
                    "{:<7} {:<44} {:>14} {:>16} {:>10}\n",
                    r.nodes,
                    name,
                    if value.is_some() {
                        shown
                    } else {
                        "no samples".into()
                    },
                    target,
                    v
                ));
            };
        let dh = mean_opt(&r.hops);
        let ph = mean_opt(&r.plain_hops);
        let v = match (dh, ph) {
            (Some(d), Some(p)) => Verdict::of(Some(d), |x| x <= p),
            _ => Verdict::NoSamples,
        };
        row(
            "discover hops (mean) vs plain lookup",
            dh,
            cell(dh, |x| format!("{x:.2}")),
            format!("<= {}", cell(ph, |x| format!("{x:.2}"))),
            v,
        );
        let np = r.nearest_percent();
        row(
            "nearest matching provider first",
            np,
            cell(np, |x| format!("{x:.1} %")),
            format!(">= {NEAREST_TARGET_PCT} %"),
            Verdict::of(np, |x| x >= NEAREST_TARGET_PCT),
        );
        let uf =
            (r.unique_total > 0).then(|| 100.0 * r.unique_found as f64 / r.unique_total as f64);
        row(
            "every live provider found (unique apps)",
            uf,
            format!("{}/{}", r.unique_found, r.unique_total),
            "100 %".into(),
            Verdict::of(uf, |x| x >= 100.0),
        );
        let rr = rel(r.records, r.baseline_records);
        row(
            "records max/mean vs single root",
            rr,
            cell(rr, |x| format!("{:.1} ({x:.3}x)", r.records.ratio())),
            format!("<= {LOAD_TARGET}x of {:.0}", r.baseline_records.ratio()),
            Verdict::of(rr, |x| x <= LOAD_TARGET),
        );
        let lr = rel(r.lookups_load, r.baseline_lookups);
        row(
            "lookups max/mean vs single root",
            lr,
            cell(lr, |x| format!("{:.1} ({x:.3}x)", r.lookups_load.ratio())),
            format!("<= {LOAD_TARGET}x of {:.0}", r.baseline_lookups.ratio()),
            Verdict::of(lr, |x| x <= LOAD_TARGET),
        );
        let fm = freshness_max(r);
        let bound = (r.ttl_ms + 1_500) as f64;
        row(
            "crashed provider gone (max ms)",
            fm,
            cell(fm, |x| format!("{x:.0}")),
            format!("<= TTL+1.5 s ({bound:.0})"),
            Verdict::of(fm, |x| x <= bound),
        );
        let sa = (r.answers_after_crash > 0).then_some(r.stale_answers as f64);
        row(
            "answers naming a provider dead > TTL",
            sa,
            format!("{}/{}", r.stale_answers, r.answers_after_crash),
            "0".into(),
            Verdict::of(sa, |x| x == 0.0),
        );
    }
    out
}
