//! The DNS suite: dnsperf against the agent's DNS server and against dnsmasq serving the same 1,000 names from
//! a hosts file, in one namespace (loopback only, no default route), measured in alternating rounds so a burst
//! of other load on the machine spreads over both. Reports queries/s and latency p50/p99 for each, and the
//! agent's ratios to dnsmasq.

use std::fmt::Write as _;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use super::netns::{self, log_tail, Topology};
use super::tools::median_of;
use super::Args;
use crate::cmd;

/// Debian packages the suite drives (dig comes with dnsutils).
pub const PACKAGES: &[&str] = &["dnsperf", "dnsmasq-base", "dnsutils", "iproute2"];

const SERVICES: usize = 1000;
/// The agent's node-local DNS address (its default `dns.listen`).
const AGENT_DNS: &str = "169.254.96.16";
const DNSMASQ_DNS: &str = "127.0.0.2";
/// The agent's admin API, on loopback inside the namespace.
const ADMIN: &str = "127.0.0.1:19099";
const DOMAIN: &str = "default.svc.cluster.local";

/// The servers, in round order: (name, address, process name).
const SERVERS: [(&str, &str, &str); 2] = [("agent", AGENT_DNS, "mesh-agent"), ("dnsmasq", DNSMASQ_DNS, "dnsmasq")];

/// One dnsperf run.
#[derive(Clone, Copy)]
struct Sample {
    qps: f64,
    p50_us: f64,
    p99_us: f64,
    lost: u64,
}

fn cluster_ip(i: usize) -> String {
    format!("10.250.{}.{}", i / 250, i % 250 + 2)
}

pub fn run(args: &Args, work: &Path, agent: Result<&Path, &str>) -> Result<serde_json::Value> {
    let agent = agent.map_err(|why| anyhow!("{why}"))?;
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    let (catalog, hosts, queries) = (work.join("catalog.yaml"), work.join("hosts"), work.join("queries.txt"));
    write_inputs(&catalog, &hosts, &queries)?;

    println!("bench: setting up the DNS suite ({SERVICES} services)");
    // The topology's node namespace has lo up and no default route; the backend namespace stays unused.
    let mut topo = Topology::new("dns")?;
    let ns = topo.node.clone();

    let config = work.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "nodeName: bench\nstateDir: {}\ncatalog:\n  files: [{}]\nadmin:\n  listen: {ADMIN}\n\
             dataplane: {{mode: userspace}}\ndns: {{upstreams: [\"127.0.0.53\"]}}\n",
            work.join("state").display(),
            catalog.display()
        ),
    )?;
    let mut run = netns::exec(&ns, agent);
    run.arg("run").arg("--config").arg(&config).env("RUST_LOG", "warn").env("NO_COLOR", "1");
    let agent_log = work.join("agent.log");
    topo.spawn("mesh-agent", run, &agent_log)?;

    let mut dnsmasq = netns::exec(&ns, "dnsmasq");
    dnsmasq.args(["-k", "--no-resolv", "--no-hosts", "--bind-interfaces"]);
    dnsmasq.arg(format!("--listen-address={DNSMASQ_DNS}")).arg(format!("--addn-hosts={}", hosts.display()));
    dnsmasq.args(["--local=/cluster.local/", "--cache-size=10000", "-u", "root"]);
    let dnsmasq_log = work.join("dnsmasq.log");
    topo.spawn("dnsmasq", dnsmasq, &dnsmasq_log)?;

    for ((_, addr, name), log) in SERVERS.iter().zip([&agent_log, &dnsmasq_log]) {
        wait_answer(&mut topo, addr, name, log)?;
    }

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); SERVERS.len()];
    for round in 1..=args.runs {
        for (s, (name, addr, process)) in SERVERS.iter().enumerate() {
            let log = if s == 0 { &agent_log } else { &dnsmasq_log };
            topo.check_alive(process, log)?;
            let sample = dnsperf(&ns, addr, &queries, args.duration)
                .with_context(|| format!("dnsperf against {name} ({addr})"))?;
            println!(
                "bench: dns {round}/{}: {name:<8} {:>9.0} q/s  p50 {:>6.0} us  p99 {:>6.0} us  lost {}",
                args.runs, sample.qps, sample.p50_us, sample.p99_us, sample.lost
            );
            samples[s].push(sample);
        }
    }
    let medians: Vec<Sample> = samples.iter().map(|runs| median(runs)).collect();
    print_table(&medians);
    Ok(results_json(&samples, &medians, args))
}

fn write_inputs(catalog: &Path, hosts: &Path, queries: &Path) -> Result<()> {
    let (mut c, mut h, mut q) = (String::new(), String::new(), String::new());
    for i in 0..SERVICES {
        let ip = cluster_ip(i);
        writeln!(
            c,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: default}}\nspec:\n  \
             clusterIP: {ip}\n  ports:\n  - {{name: http, port: 80, protocol: TCP}}\n---"
        )?;
        writeln!(h, "{ip} svc-{i}.{DOMAIN}")?;
        writeln!(q, "svc-{i}.{DOMAIN} A")?;
    }
    std::fs::write(catalog, c)?;
    std::fs::write(hosts, h)?;
    std::fs::write(queries, q)?;
    Ok(())
}

/// Waits until the server at `addr` answers svc-5's name with its clusterIP, failing early if `name` has exited.
fn wait_answer(topo: &mut Topology, addr: &str, name: &str, log: &Path) -> Result<()> {
    let want = cluster_ip(5);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let server = format!("@{addr}");
        let answer = cmd::probe(netns::exec(&topo.node, "dig").args([
            "+short",
            "+time=1",
            "+tries=1",
            &server,
            &format!("svc-5.{DOMAIN}"),
            "A",
        ]));
        if answer.is_some_and(|a| a.lines().any(|l| l.trim() == want)) {
            return Ok(());
        }
        topo.check_alive(name, log)?;
        if Instant::now() > deadline {
            bail!("{name} does not answer svc-5.{DOMAIN} on {addr} after 20 s{}", log_tail(log));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn dnsperf(ns: &str, addr: &str, queries: &Path, secs: u64) -> Result<Sample> {
    let mut command = netns::exec(ns, "timeout");
    command.args(["-k", "5", &(secs + 20).to_string(), "dnsperf", "-s", addr, "-d"]).arg(queries);
    command.args(["-l", &secs.to_string(), "-c", "4", "-T", "1", "-q", "100", "-v"]);
    let out = cmd::output(&mut command)?;
    parse_dnsperf(&out).with_context(|| {
        let summary: Vec<&str> = out.lines().filter(|l| !l.starts_with("> ")).collect();
        format!("unexpected dnsperf output:\n{}", summary.join("\n"))
    })
}

/// dnsperf 2.x prints the throughput in its summary and, with -v, one `> RCODE NAME TYPE LATENCY` line per
/// answered query (latency in seconds); it prints no percentiles, so they come from those lines.
fn parse_dnsperf(out: &str) -> Result<Sample> {
    let field = |prefix: &str| -> Result<&str> {
        let rest = out.lines().find_map(|l| l.trim().strip_prefix(prefix)).with_context(|| format!("no {prefix}"))?;
        rest.split_whitespace().next().with_context(|| format!("empty {prefix}"))
    };
    let qps: f64 = field("Queries per second:")?.parse()?;
    let lost: u64 = field("Queries lost:")?.parse()?;
    let mut latencies: Vec<f64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    if latencies.is_empty() {
        bail!("no per-query `> ` lines (is -v given?)");
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies[((q * latencies.len() as f64) as usize).min(latencies.len() - 1)] * 1e6;
    Ok(Sample { qps, p50_us: pct(0.5), p99_us: pct(0.99), lost })
}

/// Per-metric medians over the rounds; `lost` is the total.
fn median(runs: &[Sample]) -> Sample {
    Sample {
        qps: median_of(runs.iter().map(|r| r.qps).collect()),
        p50_us: median_of(runs.iter().map(|r| r.p50_us).collect()),
        p99_us: median_of(runs.iter().map(|r| r.p99_us).collect()),
        lost: runs.iter().map(|r| r.lost).sum(),
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn print_table(medians: &[Sample]) {
    println!();
    println!("{:<17}{:>14}{:>14}{:>14}{:>10}", "dns server", "queries/s", "p50 us", "p99 us", "lost");
    for ((name, _, _), m) in SERVERS.iter().zip(medians) {
        println!("{name:<17}{:>14.0}{:>14.0}{:>14.0}{:>10}", m.qps, m.p50_us, m.p99_us, m.lost);
    }
    let (a, d) = (&medians[0], &medians[1]);
    let cell = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
    println!(
        "{:<17}{:>14}{:>14}{:>14}",
        "agent/dnsmasq",
        cell(ratio(a.qps, d.qps)),
        cell(ratio(a.p50_us, d.p50_us)),
        cell(ratio(a.p99_us, d.p99_us))
    );
    println!("(median of the runs; {SERVICES} names; lost is the total over the runs)");
}

fn results_json(samples: &[Vec<Sample>], medians: &[Sample], args: &Args) -> serde_json::Value {
    let mut entry = json!({
        "services": SERVICES,
        "runs": args.runs,
        "durationSecs": args.duration,
    });
    for (((name, addr, _), runs), m) in SERVERS.iter().zip(samples).zip(medians) {
        entry[*name] = json!({
            "server": addr,
            "qps": m.qps,
            "p50Us": m.p50_us,
            "p99Us": m.p99_us,
            "lost": m.lost,
            "runs": runs.iter().map(|r| json!({"qps": r.qps, "p50Us": r.p50_us, "p99Us": r.p99_us, "lost": r.lost}))
                .collect::<Vec<_>>(),
        });
    }
    let (a, d) = (&medians[0], &medians[1]);
    entry["ratio"] = json!({
        "qps": ratio(a.qps, d.qps),
        "p50": ratio(a.p50_us, d.p50_us),
        "p99": ratio(a.p99_us, d.p99_us),
    });
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dnsperf() {
        let out = "DNS Performance Testing Tool\n> NOERROR svc-1.default.svc.cluster.local A 0.000100\n\
                   > NOERROR svc-2.default.svc.cluster.local A 0.000300\n\
                   > NOERROR svc-3.default.svc.cluster.local A 0.000200\nStatistics:\n\n  \
                   Queries sent:         3\n  Queries completed:    3 (100.00%)\n  Queries lost:         0 (0.00%)\n\n  \
                   Queries per second:   51234.5\n";
        let s = parse_dnsperf(out).unwrap();
        assert_eq!(s.qps, 51234.5);
        assert_eq!(s.lost, 0);
        assert!((s.p50_us - 200.0).abs() < 1e-6);
        assert!((s.p99_us - 300.0).abs() < 1e-6);
    }

    #[test]
    fn cluster_ips() {
        assert_eq!(cluster_ip(0), "10.250.0.2");
        assert_eq!(cluster_ip(249), "10.250.0.251");
        assert_eq!(cluster_ip(999), "10.250.3.251");
    }
}
