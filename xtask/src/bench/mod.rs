//! `cargo xtask bench`: performance side by side in one run, as ratios to a direct connection (DESIGN.md
//! "Rules of the house"). Suites live in their own modules and their own key of `target/bench/results.json`;
//! `proxy` (keep-alive req/s, new conn/s, throughput) is the first. Service-count scaling (1 / 1,000 / 10,000
//! services) and DNS (against dnsmasq) go beside it.

mod netns;
mod proxy;
mod tools;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{cmd, setup};
use proxy::Target;
use tools::Run;

/// Tools the bench drives; nginx-light is the HTTP backend (fast, and in Debian main).
const BENCH_PACKAGES: &[&str] = &["wrk", "iperf3", "haproxy", "nginx-light", "iproute2", "iptables", "curl"];

#[derive(clap::Args)]
pub struct Args {
    /// Runs per measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Only these targets (default: all), e.g. `--target direct,agent-userspace`.
    #[arg(long = "target", value_enum, value_delimiter = ',')]
    targets: Vec<Target>,
}

/// The three proxy-suite metrics, in table order.
const METRICS: [(&str, &str); 3] =
    [("keepAliveRps", "keep-alive req/s"), ("newConnRps", "new conn/s"), ("throughputGbps", "Gbit/s")];

struct Row {
    target: Target,
    /// Per metric: the runs, or why it could not be measured.
    metrics: Vec<Result<Vec<Run>, String>>,
    skipped: Option<String>,
    datapath: Option<serde_json::Value>,
}

pub fn run(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench needs root: it creates network namespaces, iptables rules and a cgroup");
    }
    if args.runs == 0 || args.duration == 0 {
        bail!("--runs and --duration must be at least 1");
    }
    setup::apt_install("bench", BENCH_PACKAGES)?;
    netns::sweep_stale();
    let targets = if args.targets.is_empty() { proxy::ALL.to_vec() } else { args.targets.clone() };
    let agent = build_agent(&targets);

    let work = std::env::temp_dir().join(format!("mesh-bench-{}", std::process::id()));
    let rows = proxy_suite(args, &targets, &work, agent.as_deref().map_err(String::as_str));
    let _ = std::fs::remove_dir_all(&work);
    let rows = rows?;

    print_table(&rows);
    let path = cmd::target_dir().join("bench/results.json");
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    std::fs::write(&path, serde_json::to_string_pretty(&results_json(args, &rows))? + "\n")?;
    println!("bench: wrote {}", path.display());
    Ok(())
}

/// The agent binary, or why the agent targets must be skipped. A failing agent build does not stop the
/// comparison targets.
fn build_agent(targets: &[Target]) -> Result<PathBuf, String> {
    if !targets.iter().any(|t| matches!(t, Target::AgentUserspace | Target::AgentEbpf)) {
        return Err("not requested".into());
    }
    match cmd::run(cmd::cargo().args(["build", "--release", "-p", "mesh-agent"])) {
        Ok(()) => Ok(cmd::target_dir().join("release/mesh-agent")),
        Err(err) => {
            println!("bench: the agent does not build, its targets will be skipped: {err:#}");
            Err(format!("the agent does not build: {err:#}"))
        }
    }
}

/// Sets every target up, then measures in rounds, each round visiting every target in turn, so a burst of
/// other load on the machine spreads over all targets instead of skewing one ratio.
fn proxy_suite(args: &Args, targets: &[Target], work: &Path, agent: Result<&Path, &str>) -> Result<Vec<Row>> {
    let mut ready = Vec::new();
    let mut rows = Vec::new();
    for &target in targets {
        println!("bench: setting up {}", target.name());
        let dir = work.join(target.name());
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        match proxy::prepare(target, &dir, agent) {
            Ok(r) => {
                rows.push(Row {
                    target,
                    metrics: vec![Ok(Vec::new()); METRICS.len()],
                    skipped: None,
                    datapath: r.datapath.clone(),
                });
                ready.push(Some(r));
            }
            Err(err) => {
                let why = format!("{err:#}");
                println!("bench:   skipped: {why}");
                rows.push(Row { target, metrics: Vec::new(), skipped: Some(why), datapath: None });
                ready.push(None);
            }
        }
    }
    let secs = args.duration;
    for (m, (_, title)) in METRICS.iter().enumerate() {
        for round in 1..=args.runs {
            for (row, r) in rows.iter_mut().zip(&ready) {
                let Some(r) = r else { continue };
                let Ok(runs) = &mut row.metrics[m] else { continue };
                let client = r.client();
                let run = match m {
                    0 => client.wrk(proxy::HTTP_PORT, false, secs),
                    1 => client.wrk(proxy::HTTP_PORT, true, secs),
                    _ => client.iperf3(proxy::IPERF_PORT, secs),
                };
                let name = row.target.name();
                match run {
                    Ok(run) => {
                        let errors = if run.errors > 0 { format!(" ({} errors)", run.errors) } else { String::new() };
                        println!("bench: {title} {round}/{}: {name:<16} {:.2}{errors}", args.runs, run.value);
                        runs.push(run);
                    }
                    Err(err) => {
                        println!("bench: {title} {round}/{}: {name:<16} failed: {err:#}", args.runs);
                        row.metrics[m] = Err(format!("{err:#}"));
                    }
                }
            }
        }
    }
    Ok(rows)
}

fn median(runs: &[Run]) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(|r| r.value).collect();
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Medians of the row's metrics (None where not measured).
fn medians(row: &Row) -> Vec<Option<f64>> {
    (0..METRICS.len()).map(|i| row.metrics.get(i).and_then(|m| m.as_ref().ok()).map(|runs| median(runs))).collect()
}

fn baseline(rows: &[Row]) -> Vec<Option<f64>> {
    rows.iter().find(|r| r.target == Target::Direct).map(medians).unwrap_or_else(|| vec![None; METRICS.len()])
}

fn print_table(rows: &[Row]) {
    let base = baseline(rows);
    println!();
    print!("{:<17}", "target");
    for (_, title) in METRICS {
        print!("{title:>24}");
    }
    println!();
    for row in rows {
        print!("{:<17}", row.target.name());
        if let Some(why) = &row.skipped {
            // The last line is the cause (a multi-line reason ends with the log line that says what failed).
            println!("  skipped: {}", why.lines().last().unwrap_or_default().trim());
            continue;
        }
        for (i, value) in medians(row).into_iter().enumerate() {
            let cell = match (value, base[i]) {
                (Some(v), Some(b)) if b > 0.0 => format!("{} ({:.2}x)", format_value(i, v), v / b),
                (Some(v), _) => format_value(i, v),
                (None, _) => "failed".into(),
            };
            print!("{cell:>24}");
        }
        println!();
    }
    println!("(median of the runs; ratios to direct)");
}

fn format_value(metric: usize, v: f64) -> String {
    if metric == 2 {
        format!("{v:.1}")
    } else {
        format!("{:.1}k", v / 1000.0)
    }
}

fn results_json(args: &Args, rows: &[Row]) -> serde_json::Value {
    let base = baseline(rows);
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            let mut entry = json!({ "target": row.target.name() });
            if let Some(why) = &row.skipped {
                entry["skipped"] = json!(why);
                return entry;
            }
            for (i, (key, _)) in METRICS.iter().enumerate() {
                entry[*key] = match &row.metrics[i] {
                    Ok(runs) => {
                        let m = median(runs);
                        json!({
                            "median": m,
                            "ratio": base[i].filter(|b| *b > 0.0).map(|b| m / b),
                            "runs": runs.iter().map(|r| r.value).collect::<Vec<_>>(),
                            "errors": runs.iter().map(|r| r.errors).sum::<u64>(),
                        })
                    }
                    Err(why) => json!({ "failed": why }),
                };
            }
            if let Some(datapath) = &row.datapath {
                entry["datapath"] = datapath.clone();
            }
            entry
        })
        .collect();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "proxy": {
            "kernel": kernel.trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "runs": args.runs,
            "durationSecs": args.duration,
            "results": results,
        }
    })
}
