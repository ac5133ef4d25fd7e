//! A job's result from its tasks' outputs, and the same result computed natively on the host
//! (the reference `submit --check` and the tests compare with, and the benchmark's baseline).

use std::collections::BTreeMap;

use anyhow::{Result, anyhow};
use unipeer_apps::wordcount;
use unipeer_node::jobs::app::{TaskKind, TaskSpec};

use super::manifest::{JobManifest, PlannedTask};

/// A job's combined result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobResult {
    /// What goes into `result.txt`.
    pub bytes: Vec<u8>,
    /// One line for the summary.
    pub summary: String,
}

/// Combines the outputs (per task index: its output parts) of a job of `app`; `None` for apps
/// without a combined form.
pub fn combine(app: &str, outputs: &[(u16, Vec<Vec<u8>>)]) -> Option<JobResult> {
    match app {
        "wordcount" => {
            let mut all: BTreeMap<String, u64> = BTreeMap::new();
            for (_, parts) in outputs {
                for p in parts {
                    for (w, c) in wordcount::parse(p)? {
                        *all.entry(w).or_insert(0) += c;
                    }
                }
            }
            let total: u64 = all.values().sum();
            let mut top: Vec<(&String, &u64)> = all.iter().collect();
            top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let top: Vec<String> = top
                .iter()
                .take(5)
                .map(|(w, c)| format!("{w} {c}"))
                .collect();
            Some(JobResult {
                bytes: wordcount::render(&all),
                summary: format!(
                    "{total} words, {} distinct; most frequent: {}",
                    all.len(),
                    top.join(", ")
                ),
            })
        }
        "primes" => {
            let mut sum = 0u64;
            for (_, parts) in outputs {
                for p in parts {
                    let n: u64 = std::str::from_utf8(p).ok()?.trim().parse().ok()?;
                    sum = sum.checked_add(n)?;
                }
            }
            Some(JobResult {
                bytes: format!("{sum}\n").into_bytes(),
                summary: format!("{sum} primes in the job's ranges"),
            })
        }
        "sha256" => {
            let mut sorted: Vec<&(u16, Vec<Vec<u8>>)> = outputs.iter().collect();
            sorted.sort_by_key(|(i, _)| *i);
            let bytes: Vec<u8> = sorted
                .iter()
                .flat_map(|(_, parts)| parts.iter().flatten().copied())
                .collect();
            Some(JobResult {
                summary: format!(
                    "{} digest line(s)",
                    bytes.iter().filter(|b| **b == b'\n').count()
                ),
                bytes,
            })
        }
        _ => None,
    }
}

/// Runs every planned task natively with the shipped application (single tasks: a map task's
/// reduce is the combination) and combines the outputs.
pub fn reference(m: &JobManifest, planned: &[PlannedTask]) -> Result<JobResult> {
    let outputs = native_outputs(&m.application, planned)?;
    combine(&m.application, &outputs)
        .ok_or_else(|| anyhow!("no combined result for application {}", m.application))
}

/// Every planned task's output, run natively on the host.
pub fn native_outputs(app_name: &str, planned: &[PlannedTask]) -> Result<Vec<(u16, Vec<Vec<u8>>)>> {
    let app = unipeer_apps::by_name(app_name)
        .ok_or_else(|| anyhow!("unknown application {app_name:?}"))?;
    let mut outputs = Vec::with_capacity(planned.len());
    for (i, t) in planned.iter().enumerate() {
        let (params, inputs): (&[u8], &[Vec<u8>]) = match t {
            PlannedTask::Params(p) => (p, &[]),
            PlannedTask::Inputs { params, inputs } => (params, inputs),
        };
        let spec = TaskSpec {
            app: app_name.to_string(),
            kind: TaskKind::Single,
            params: params.to_vec(),
        };
        let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
        let out = app
            .run(&spec, &refs)
            .map_err(|e| anyhow!("task {i} fails natively: {e:?}"))?;
        outputs.push((i as u16, out.parts));
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wordcount_partitions_combine_to_the_whole_count() {
        let a = b"the cat the dog".to_vec();
        let b = b"a cat".to_vec();
        let parts = vec![
            (0xff00, vec![b"cat 2\nthe 2\n".to_vec()]),
            (0xff01, vec![b"a 1\ndog 1\n".to_vec()]),
        ];
        let r = combine("wordcount", &parts).unwrap();
        assert_eq!(r.bytes, b"a 1\ncat 2\ndog 1\nthe 2\n");
        let native = native_outputs(
            "wordcount",
            &[
                PlannedTask::Inputs {
                    params: vec![],
                    inputs: vec![a],
                },
                PlannedTask::Inputs {
                    params: vec![],
                    inputs: vec![b],
                },
            ],
        )
        .unwrap();
        assert_eq!(combine("wordcount", &native).unwrap().bytes, r.bytes);
        assert!(
            r.summary.starts_with("6 words, 4 distinct"),
            "{}",
            r.summary
        );
    }

    #[test]
    fn primes_sum_and_bad_outputs_give_no_result() {
        let r = combine(
            "primes",
            &[(0, vec![b"4\n".to_vec()]), (1, vec![b"2\n".to_vec()])],
        )
        .unwrap();
        assert_eq!(r.bytes, b"6\n");
        let native = native_outputs(
            "primes",
            &[
                PlannedTask::Params(unipeer_apps::primes::params(0, 10)),
                PlannedTask::Params(unipeer_apps::primes::params(10, 14)),
            ],
        )
        .unwrap();
        assert_eq!(combine("primes", &native).unwrap(), r);
        assert_eq!(combine("primes", &[(0, vec![b"x".to_vec()])]), None);
        assert_eq!(
            combine("wordcount", &[(0, vec![b"no-count".to_vec()])]),
            None
        );
        assert!(native_outputs("nope", &[]).is_err());
    }
}
