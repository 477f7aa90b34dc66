//! `cargo xtask bench`: performance side by side in one run, as ratios to a direct connection (DESIGN.md
//! "Rules of the house"). Each suite is a module that measures, prints its table and returns its part of
//! `target/bench/results.json`, under its own key: `proxy` (keep-alive req/s, new conn/s, throughput) is the
//! first, measured at 1, 1,000 and 10,000 services (`--services`), `dns` (the agent against dnsmasq) beside it. `cargo xtask bench` runs the proxy suite, `cargo xtask bench dns` only DNS; each run rewrites
//! its own key and keeps the others.

mod dns;
pub(crate) mod netns;
mod plot;
pub(crate) mod proxy;
pub(crate) mod tools;

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;

use crate::{cmd, setup};
use proxy::Target;

/// Tools the bench drives; nginx-light is the HTTP backend (fast, and in Debian main).
const BENCH_PACKAGES: &[&str] = &["wrk", "iperf3", "haproxy", "nginx-light", "iproute2", "iptables", "curl"];

/// Padding services get VIPs 10.250.1.1 to 10.250.250.250.
const MAX_SERVICES: usize = 62_500;

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Suite {
    /// The proxy suite (the default).
    Proxy,
    /// The agent's DNS server against dnsmasq.
    Dns,
}

#[derive(clap::Args)]
pub struct Args {
    /// Which suite to run (default: proxy).
    #[arg(value_enum)]
    pub suite: Option<Suite>,
    /// Runs per measurement; the median is reported. Many short runs rather than a few long ones: on a shared
    /// machine the noise is in the runs' count (two 3 s runs of one target differ by ~3% here, 5 s runs hardly
    /// less), and ratios are the median over rounds.
    #[arg(long, default_value_t = 9)]
    pub runs: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 3)]
    pub duration: u64,
    /// Catalog sizes the proxy suite measures at, e.g. `--services 1,1000`.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 1_000, 10_000])]
    pub services: Vec<usize>,
    /// Only these proxy-suite targets (default: all), e.g. `--target direct,agent-userspace`.
    #[arg(long = "target", value_enum, value_delimiter = ',')]
    pub targets: Vec<Target>,
}

pub fn run(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench needs root: it creates network namespaces, iptables rules and a cgroup");
    }
    if args.runs == 0 || args.duration == 0 || args.services.contains(&0) {
        bail!("--runs, --duration and --services must be at least 1");
    }
    if args.services.iter().any(|&n| n > MAX_SERVICES) {
        bail!("--services: at most {MAX_SERVICES} (the bench's VIPs come from one /16)");
    }
    let suite = args.suite.unwrap_or(Suite::Proxy);
    let work = std::env::temp_dir().join(format!("mesh-bench-{}", std::process::id()));
    let (key, result) = match suite {
        Suite::Proxy => {
            setup::apt_install("bench", BENCH_PACKAGES)?;
            netns::sweep_stale();
            let targets = if args.targets.is_empty() { proxy::ALL.to_vec() } else { args.targets.clone() };
            let needs_agent = targets.iter().any(|t| matches!(t, Target::AgentUserspace | Target::AgentEbpf));
            let agent = build_agent(needs_agent);
            ("proxy", proxy::run(args, &targets, &work.join("proxy"), agent.as_deref().map_err(String::as_str)))
        }
        Suite::Dns => {
            setup::apt_install("bench", dns::PACKAGES)?;
            netns::sweep_stale();
            let agent = build_agent(true);
            ("dns", dns::run(args, &work.join("dns"), agent.as_deref().map_err(String::as_str)))
        }
    };
    let _ = std::fs::remove_dir_all(&work);
    let result = result?;

    // Keep the other suites' keys from earlier runs.
    let path = cmd::target_dir().join("bench/results.json");
    let mut results = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| json!({}));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    results["kernel"] = json!(kernel.trim());
    results["cpus"] = json!(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    if suite == Suite::Proxy {
        results["runs"] = json!(args.runs);
        results["durationSecs"] = json!(args.duration);
    }
    results[key] = result;
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("bench: wrote {}", path.display());
    if suite == Suite::Proxy {
        let plot = path.with_file_name("proxy.svg");
        std::fs::write(&plot, plot::svg(&proxy::METRICS, &results["proxy"]))?;
        println!("bench: wrote {}", plot.display());
    }
    Ok(())
}

/// The agent binary, or why the agent targets must be skipped. A failing agent build does not stop the
/// comparison targets.
fn build_agent(needed: bool) -> Result<PathBuf, String> {
    if !needed {
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
