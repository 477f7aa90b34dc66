//! The proxy suite: one backend, the same clients, through each way of getting from a VIP to a backend (see
//! [`Target`]), measured for keep-alive requests, new connections and throughput, with 1, 1,000 and 10,000
//! services in the catalog (or the iptables chain); for the agent, also the time a catalog change takes to reach
//! the data path and the agent's memory.

mod scale;
pub(crate) mod targets;

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use super::tools::{median, median_of, Run};
use super::Args;
pub use targets::{Target, ALL};
use targets::{HTTP_PORT, IPERF_PORT};

/// The three proxy-suite metrics, in table order.
pub const METRICS: [(&str, &str); 3] =
    [("keepAliveRps", "keep-alive req/s"), ("newConnRps", "new conn/s"), ("throughputGbps", "Gbit/s")];

struct Row {
    target: Target,
    /// Per metric: the runs, or why it could not be measured.
    metrics: Vec<Result<Vec<Run>, String>>,
    skipped: Option<String>,
    datapath: Option<serde_json::Value>,
    /// Agent targets: catalog change latency and memory, or why they could not be measured.
    scale: Option<Result<scale::Scale, String>>,
}

/// Measures every service count in turn (one topology per target and count, torn down before the next count)
/// and returns the suite's part of results.json.
pub fn run(args: &Args, which: &[Target], work: &Path, agent: Result<&Path, &str>) -> Result<serde_json::Value> {
    let mut counts = Vec::new();
    for &services in &args.services {
        let rows = measure(args, which, &work.join(services.to_string()), agent, services)?;
        counts.push(json!({ "services": services, "results": results_json(&rows) }));
    }
    Ok(json!({ "byServices": counts }))
}

/// Sets every target up with `services` services, then measures in rounds, each round visiting every target in
/// turn, so a burst of other load on the machine spreads over all targets instead of skewing one ratio. Each round
/// starts one target further on, so no target always runs first or right after the same one (what a run leaves
/// behind, TIME_WAIT sockets and cache state, then weighs on every target alike). Prints the table.
fn measure(
    args: &Args,
    which: &[Target],
    work: &Path,
    agent: Result<&Path, &str>,
    services: usize,
) -> Result<Vec<Row>> {
    let mut ready = Vec::new();
    let mut rows = Vec::new();
    for &target in which {
        println!("bench: setting up {} with {services} service(s)", target.name());
        let dir = work.join(target.name());
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        match targets::prepare(target, &dir, agent, services) {
            Ok(r) => {
                rows.push(Row {
                    target,
                    metrics: vec![Ok(Vec::new()); METRICS.len()],
                    skipped: None,
                    datapath: r.datapath.clone(),
                    scale: None,
                });
                ready.push(Some(r));
            }
            Err(err) => {
                let why = format!("{err:#}");
                println!("bench:   skipped: {why}");
                rows.push(Row { target, metrics: Vec::new(), skipped: Some(why), datapath: None, scale: None });
                ready.push(None);
            }
        }
    }
    let secs = args.duration;
    for (m, (_, title)) in METRICS.iter().enumerate() {
        for round in 1..=args.runs {
            for i in rotated(rows.len(), round) {
                let (row, Some(r)) = (&mut rows[i], &ready[i]) else { continue };
                let Ok(runs) = &mut row.metrics[m] else { continue };
                let client = r.client();
                let run = match m {
                    0 => client.wrk(HTTP_PORT, false, secs),
                    1 => client.wrk(HTTP_PORT, true, secs),
                    _ => client.iperf3(IPERF_PORT, secs),
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
    for (row, r) in rows.iter_mut().zip(&ready) {
        let Some(agent) = r.as_ref().and_then(|r| r.agent.as_ref().map(|a| (r, a))) else { continue };
        println!("bench: timing catalog changes: {}", row.target.name());
        row.scale = Some(scale::measure(&agent.0.topology.node, agent.1).map_err(|e| format!("{e:#}")));
    }
    print_table(&rows, services);
    Ok(rows)
}

/// The order of the targets in round `round` (1-based): `0..n` rotated left by `round - 1`.
fn rotated(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + round - 1) % n)
}

/// Medians of the row's metrics (None where not measured).
fn medians(row: &Row) -> Vec<Option<f64>> {
    (0..METRICS.len()).map(|i| runs(row, i).map(median)).collect()
}

fn runs(row: &Row, metric: usize) -> Option<&[Run]> {
    row.metrics.get(metric).and_then(|m| m.as_ref().ok()).map(Vec::as_slice)
}

/// A target against a baseline on one metric: per round, the target's run over the baseline's run of the same
/// round. Targets run back to back within a round, so a slow stretch of this shared machine (its load drifts by
/// 10-20% over minutes, while two back-to-back runs of one target differ by ~3%) weighs on both sides of each
/// ratio instead of on whichever target it fell on.
struct Ratio {
    rounds: Vec<f64>,
}

impl Ratio {
    fn of(row: &Row, base: &Row, metric: usize) -> Option<Self> {
        let (runs, base) = (runs(row, metric)?, runs(base, metric)?);
        let rounds: Vec<f64> =
            runs.iter().zip(base).filter(|(_, b)| b.value > 0.0).map(|(r, b)| r.value / b.value).collect();
        (!rounds.is_empty()).then_some(Self { rounds })
    }

    fn median(&self) -> f64 {
        median_of(self.rounds.clone())
    }

    /// The middle half of the rounds' ratios (first to third quartile, nearest rank): how far to trust the
    /// median.
    fn middle_half(&self) -> (f64, f64) {
        let mut sorted = self.rounds.clone();
        sorted.sort_by(f64::total_cmp);
        let q = (sorted.len() - 1) / 4;
        (sorted[q], sorted[sorted.len() - 1 - q])
    }

    fn json(&self) -> serde_json::Value {
        let (low, high) = self.middle_half();
        json!({ "median": self.median(), "middleHalf": [low, high], "rounds": self.rounds })
    }
}

fn find(rows: &[Row], target: Target) -> Option<&Row> {
    rows.iter().find(|r| r.target == target && r.skipped.is_none())
}

fn print_table(rows: &[Row], services: usize) {
    let base = find(rows, Target::Direct);
    println!();
    println!("{services} service(s):");
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
            let cell = match (value, base.and_then(|b| Ratio::of(row, b, i))) {
                (Some(v), Some(r)) => format!("{} ({:.2}x)", format_value(i, v), r.median()),
                (Some(v), None) => format_value(i, v),
                (None, _) => "failed".into(),
            };
            print!("{cell:>24}");
        }
        println!();
    }
    println!("(medians of the runs; ratios to direct: the median of the rounds' ratios)");
    for (target, against) in COMPARED {
        let (Some(row), Some(base)) = (find(rows, target), find(rows, against)) else { continue };
        print!("{} / {}:", target.name(), against.name());
        for (i, (_, title)) in METRICS.iter().enumerate() {
            if let Some(r) = Ratio::of(row, base, i) {
                let (low, high) = r.middle_half();
                print!("  {title} {:.2}x ({low:.2}-{high:.2})", r.median());
            }
        }
        println!();
    }
    for row in rows {
        match &row.scale {
            Some(Ok(scale)) => println!("{}: {}", row.target.name(), scale.describe()),
            Some(Err(why)) => println!("{}: catalog change timing failed: {why}", row.target.name()),
            None => {}
        }
    }
}

/// The comparisons the goals name beyond "x direct", printed with the middle half of the rounds' ratios and
/// written under `ratioTo` in results.json; direct over haproxy is the most any proxy could gain over haproxy.
const COMPARED: [(Target, Target); 4] = [
    (Target::AgentEbpf, Target::Direct),
    (Target::AgentEbpf, Target::IptablesDnat),
    (Target::AgentUserspace, Target::Haproxy),
    (Target::Direct, Target::Haproxy),
];

fn format_value(metric: usize, v: f64) -> String {
    if metric == 2 {
        format!("{v:.1}")
    } else {
        format!("{:.1}k", v / 1000.0)
    }
}

fn results_json(rows: &[Row]) -> serde_json::Value {
    let base = find(rows, Target::Direct);
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
                    Ok(runs) => json!({
                        "median": median(runs),
                        "ratio": base.and_then(|b| Ratio::of(row, b, i)).map(|r| r.median()),
                        "runs": runs.iter().map(|r| r.value).collect::<Vec<_>>(),
                        "errors": runs.iter().map(|r| r.errors).sum::<u64>(),
                    }),
                    Err(why) => json!({ "failed": why }),
                };
            }
            for (target, against) in COMPARED {
                let Some(base) = find(rows, against).filter(|_| target == row.target) else { continue };
                for (i, (key, _)) in METRICS.iter().enumerate() {
                    if let Some(r) = Ratio::of(row, base, i) {
                        entry["ratioTo"][against.name()][*key] = r.json();
                    }
                }
            }
            if let Some(datapath) = &row.datapath {
                entry["datapath"] = datapath.clone();
            }
            match &row.scale {
                Some(Ok(scale)) => entry["scale"] = scale.json(),
                Some(Err(why)) => entry["scale"] = json!({ "failed": why }),
                None => {}
            }
            entry
        })
        .collect();
    json!(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::tools::Run;

    fn row(target: Target, value: f64) -> Row {
        rounds(target, &[value])
    }

    fn rounds(target: Target, values: &[f64]) -> Row {
        let runs = Ok(values.iter().map(|&value| Run { value, errors: 0 }).collect());
        Row { target, metrics: vec![runs; METRICS.len()], skipped: None, datapath: None, scale: None }
    }

    #[test]
    fn ratios_pair_the_runs_of_a_round() {
        // The machine ran at half speed in round 3: each run is divided by its own round's.
        let rows = [
            rounds(Target::Direct, &[200.0, 210.0, 100.0]),
            rounds(Target::Haproxy, &[100.0, 100.0, 50.0]),
            rounds(Target::AgentUserspace, &[99.0, 99.0, 51.0]),
        ];
        let r = Ratio::of(&rows[2], &rows[1], 0).unwrap();
        assert_eq!(r.median(), 0.99);
        assert_eq!(r.middle_half(), (0.99, 1.02));
        let json = results_json(&rows);
        let vs = &json[2]["ratioTo"]["haproxy"]["keepAliveRps"];
        assert_eq!(vs["median"], 0.99, "{json}");
        assert_eq!(vs["rounds"], json!([0.99, 0.99, 1.02]));
        assert_eq!(json[1]["keepAliveRps"]["ratio"], 0.5);
        assert_eq!(json[0]["ratioTo"]["haproxy"]["keepAliveRps"]["median"], 2.0, "the ceiling over haproxy: {json}");
        assert!(json[1].get("ratioTo").is_none(), "haproxy is compared with nothing: {json}");
    }

    #[test]
    fn the_plot_reads_what_the_suite_writes() {
        let rows = [row(Target::Direct, 100.0), row(Target::AgentEbpf, 98.0)];
        let proxy = json!({ "byServices": [{ "services": 1, "results": results_json(&rows) }] });
        let svg = crate::bench::plot::svg(&METRICS, &proxy);
        assert!(svg.contains("agent-ebpf: 0.98x"), "{svg}");
        assert_eq!(svg.matches("<rect x=").count(), 2 * METRICS.len() + 2, "a bar per target and metric, 2 swatches");
    }

    #[test]
    fn every_round_visits_every_target_once_starting_one_further_on() {
        let rounds: Vec<Vec<usize>> = (1..=4).map(|round| rotated(3, round).collect()).collect();
        assert_eq!(rounds, [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]);
    }
}
