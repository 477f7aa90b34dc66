//! `cargo xtask soak`: the release agent under steady mixed load for a long while, failing when its memory or
//! descriptors grow, when it dies, or when requests fail.
//!
//! Two agents run side by side for the whole duration, each in a bench topology of its own (`bench::netns`): one
//! on the userspace proxy, one on the eBPF data path (its clients in a child cgroup; left out, with the reason,
//! where the kernel cannot run it). Each gets the same load: wrk through the VIP, alternating keep-alive and
//! `Connection: close` runs; dnsperf at a fixed rate against the agent's DNS; and the catalog file rewritten every
//! few seconds (the VIP service's endpoints change, four of twelve pool-VIP services are removed and four come
//! back). Every few seconds each agent's RSS and descriptor count are sampled and printed; the samples and the
//! verdicts go to `target/soak/results.json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::bench::netns::{self, log_tail, Cgroup, Topology, BACKEND_IP};
use crate::bench::proxy::targets::{spawn_agent, start_backends, ADMIN, HTTP_PORT, VIP};
use crate::bench::tools::{self, Client};
use crate::{cmd, setup};

/// What the load needs (dig is not enough for a steady rate; dnsperf keeps one and counts what was lost), and
/// what the bench's backends run (nginx, and an iperf3 server the soak does not load).
const PACKAGES: &[&str] = &["wrk", "nginx-light", "iperf3", "dnsperf", "iproute2", "curl"];
/// The agent's default `dns.listen`.
const DNS: &str = "169.254.96.16";
/// DNS queries per second per agent: steady work for the DNS path without starving the HTTP load of the 2 CPUs.
const DNS_QPS: &str = "500";
/// Seconds per wrk or dnsperf run: a run that fails shows within this, and a stop waits at most this long.
const CHUNK_SECS: u64 = 10;
const CHURN_EVERY: Duration = Duration::from_secs(3);
/// Services removed and added back by the churn, with pool VIPs.
const CHURN_SERVICES: usize = 12;
/// Backend addresses beyond BACKEND_IP (10.251.0.3 up), all served by the one nginx, which listens on any.
const EXTRA_BACKENDS: usize = 6;

/// Memory is flat when the late mean RSS stays within this of the early one. Absolute: the allocator returns
/// and takes memory in whole pages and arenas, and the live set itself moves with what is in flight at the
/// sampling instant (catalog tables swapped every 3 s, connection buffers); relative: the same, proportionally.
/// A leak per request or per catalog change (thousands per second, hundreds per run) would go far past both.
const RSS_SLACK_KIB: f64 = 4096.0;
const RSS_SLACK_RELATIVE: f64 = 0.05;
/// Descriptors move with the connections open at the sampling instant (wrk's 64, two descriptors each on the
/// proxy) and the churned services' listeners; a leak per connection would add thousands.
const FD_SLACK: f64 = 2.0 * 64.0 + CHURN_SERVICES as f64;
/// Failed HTTP requests and lost DNS queries allowed per million: none is expected; a handful when the machine
/// stalls the load for seconds (2 CPUs shared with builds) is not the agent's doing, a steady rate is.
const FAILURES_PER_MILLION: f64 = 10.0;

#[derive(clap::Args)]
pub struct Args {
    /// How long the agents run under load: seconds, or with a unit (`90s`, `10m`, `1h`).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub duration: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("{text:?}: want seconds, or a number with s, m or h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (s, m or h)")),
    };
    if secs < 10 {
        return Err("at least 10 seconds: the verdict compares the run's early and late parts".into());
    }
    Ok(Duration::from_secs(secs))
}

/// One agent under soak. Field order is drop order: the topology stops the agent before the cgroup goes.
struct Soaked {
    datapath: &'static str,
    topo: Topology,
    cgroup: Option<Cgroup>,
    pid: u32,
    log: PathBuf,
    catalog: PathBuf,
    http: Mutex<Totals>,
    dns: Mutex<Totals>,
}

#[derive(Clone, Copy)]
struct Sample {
    secs: f64,
    rss_kib: u64,
    fds: usize,
}

#[derive(Default)]
struct Totals {
    requests: u64,
    failures: u64,
    /// A load run that could not run at all.
    error: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("soak needs root: it creates network namespaces and a cgroup");
    }
    setup::apt_install("soak", PACKAGES)?;
    netns::sweep_stale();
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "mesh-agent"]))?;
    let agent = cmd::target_dir().join("release/mesh-agent");
    let work = std::env::temp_dir().join(format!("mesh-soak-{}", std::process::id()));
    let result = soak(args.duration, &agent, &work);
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

fn soak(duration: Duration, agent: &Path, work: &Path) -> Result<()> {
    let mut agents = vec![Soaked::start("userspace", agent, &work.join("userspace"))?];
    match Soaked::start("ebpf", agent, &work.join("ebpf")) {
        Ok(soaked) => agents.push(soaked),
        // The agent in `mode: ebpf` says so and exits where the kernel (or the build) cannot run it.
        Err(err)
            if ["built without eBPF programs", "cannot run the eBPF data path"]
                .iter()
                .any(|why| format!("{err:#}").contains(why)) =>
        {
            println!("soak: eBPF data path left out: {err:#}")
        }
        Err(err) => return Err(err.context("the eBPF agent")),
    }
    let queries = work.join("queries.txt");
    std::fs::write(&queries, queries_text())?;
    let every = (duration / 120).clamp(Duration::from_secs(1), Duration::from_secs(5));
    println!("soak: {} s, sampling every {} s", duration.as_secs(), every.as_secs());
    print!("{:>6}", "t (s)");
    for a in &agents {
        print!("{:>22}{:>8}", format!("{} RSS MiB", a.datapath), "fds");
    }
    println!();

    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let deadline = start + duration;
    let watched = thread::scope(|s| {
        for a in &agents {
            let (stop, queries) = (&stop, &queries);
            s.spawn(move || keep_running(&a.http, stop, deadline, |secs, run| http_run(&a.client(), secs, run)));
            s.spawn(move || keep_running(&a.dns, stop, deadline, |secs, _| dns_run(&a.client(), queries, secs)));
        }
        let watched = watch(&agents, start, deadline, every);
        stop.store(true, Ordering::Relaxed);
        watched
    });
    report(&agents, &watched?, duration)
}

impl Soaked {
    /// Topology, backends, catalog and agent, ready.
    fn start(datapath: &'static str, agent: &Path, work: &Path) -> Result<Self> {
        std::fs::create_dir_all(work)?;
        let mut topo = Topology::new(&format!("soak-{datapath}"))?;
        for i in 0..EXTRA_BACKENDS {
            cmd::output(Command::new("ip").args(["-n", &topo.backend, "addr", "add"]).args([
                &format!("{}/24", backend_ip(i)),
                "dev",
                "veth0",
            ]))?;
        }
        start_backends(&mut topo, work)?;
        let cgroup = if datapath == "ebpf" { Some(Cgroup::new("soak-ebpf")?) } else { None };
        let catalog = work.join("catalog.yaml");
        write_catalog(&catalog, 0)?;
        let mut config = format!(
            "nodeName: soak\nstateDir: {}\ncatalog:\n  files: [{}]\nadmin:\n  listen: {ADMIN}\n\
             dns:\n  upstreams: [\"127.0.0.53\"]\ndataplane:\n  mode: {datapath}\n",
            work.join("state").display(),
            catalog.display()
        );
        if let Some(cgroup) = &cgroup {
            config.push_str(&format!("  cgroupPath: {}\n", cgroup.0.display()));
        }
        std::fs::write(work.join("config.yaml"), config)?;
        let log = work.join("agent.log");
        let pid = spawn_agent(&mut topo, agent, &work.join("config.yaml"), &log, Duration::from_secs(15))?;
        let soaked = Self { datapath, topo, cgroup, pid, log, catalog, http: Mutex::default(), dns: Mutex::default() };
        let (requests, failures) = http_run(&soaked.client(), 1, 0)?;
        if requests == 0 || failures > 0 {
            bail!("the VIP does not answer: {failures} of {requests} requests failed{}", log_tail(&soaked.log));
        }
        Ok(soaked)
    }

    fn client(&self) -> Client<'_> {
        Client { ns: &self.topo.node, host: VIP, cgroup: self.cgroup.as_ref().map(|c| c.0.as_path()) }
    }
}

fn backend_ip(i: usize) -> String {
    format!("10.251.0.{}", i + 3)
}

/// Runs `load(seconds, run number)` back to back until `deadline` or `stop`, adding up what it returns:
/// (requests, failures).
fn keep_running(
    totals: &Mutex<Totals>,
    stop: &AtomicBool,
    deadline: Instant,
    load: impl Fn(u64, u64) -> Result<(u64, u64)>,
) {
    for run in 0.. {
        let left = deadline.saturating_duration_since(Instant::now()).as_secs();
        if stop.load(Ordering::Relaxed) || left == 0 {
            return;
        }
        let result = load(left.min(CHUNK_SECS), run);
        let mut totals = totals.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok((requests, failures)) => {
                totals.requests += requests;
                totals.failures += failures;
            }
            Err(err) => {
                totals.error = Some(format!("{err:#}"));
                return;
            }
        }
    }
}

/// One wrk run through the VIP: keep-alive on even runs, a new connection per request on odd ones.
fn http_run(client: &Client, secs: u64, run: u64) -> Result<(u64, u64)> {
    let wrk = client.wrk(HTTP_PORT, run % 2 == 1, secs)?;
    Ok(((wrk.value * secs as f64) as u64, wrk.errors))
}

/// One dnsperf run at [`DNS_QPS`] against the agent's DNS: (sent, lost).
fn dns_run(client: &Client, queries: &Path, secs: u64) -> Result<(u64, u64)> {
    let mut dnsperf = client.command(secs + 20, "dnsperf");
    dnsperf.args(["-s", DNS, "-l", &secs.to_string(), "-Q", DNS_QPS, "-t", "2", "-d"]).arg(queries);
    let out = cmd::output(&mut dnsperf)?;
    let field = |name: &str| -> Result<u64> {
        let line = out.lines().find_map(|l| l.trim().strip_prefix(name)).with_context(|| format!("{name}:\n{out}"))?;
        Ok(line.split_whitespace().next().unwrap_or_default().parse()?)
    };
    Ok((field("Queries sent:")?, field("Queries lost:")?))
}

/// Every name the churned catalogs have (a removed service answers NXDOMAIN, which is an answer), and an SRV.
fn queries_text() -> String {
    let mut text = String::from("web.default.svc.cluster.local A\n_http._tcp.web.default.svc.cluster.local SRV\n");
    for i in 0..CHURN_SERVICES {
        text.push_str(&format!("svc-{i}.default.svc.cluster.local A\n"));
    }
    text
}

/// The catalog of churn step `step`: `web` on the VIP with BACKEND_IP and 0-3 of the extra backends, rotating;
/// the pool-VIP services `svc-N` but the third of them that this step leaves out.
fn write_catalog(path: &Path, step: usize) -> Result<()> {
    let mut web = vec![BACKEND_IP.to_owned()];
    web.extend((0..step % 4).map(|j| backend_ip((step + j) % EXTRA_BACKENDS)));
    let mut text = service("web", Some(VIP), &web);
    for i in (0..CHURN_SERVICES).filter(|i| !(i + step).is_multiple_of(3)) {
        text.push_str(&service(&format!("svc-{i}"), None, &[backend_ip(i % EXTRA_BACKENDS)]));
    }
    // Renamed into place, as an operator's tool writes it: the agent never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

fn service(name: &str, cluster_ip: Option<&str>, endpoints: &[String]) -> String {
    let cluster_ip = cluster_ip.map(|ip| format!("  clusterIP: {ip}\n")).unwrap_or_default();
    let endpoints: String = endpoints.iter().map(|ip| format!("  - addresses: [{ip}]\n    nodeName: soak\n")).collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{cluster_ip}  \
         ports:\n  - {{name: http, port: {HTTP_PORT}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports:\n  - {{name: http, port: {HTTP_PORT}}}\nendpoints:\n{endpoints}"
    )
}

/// Churns the catalogs, samples and prints every `every`, and checks the agents are alive, until `deadline`.
/// Returns each agent's samples.
fn watch(agents: &[Soaked], start: Instant, deadline: Instant, every: Duration) -> Result<Vec<Vec<Sample>>> {
    let mut samples = vec![Vec::new(); agents.len()];
    let (mut next_sample, mut next_churn, mut step) = (start, start + CHURN_EVERY, 0);
    while Instant::now() < deadline {
        let now = Instant::now();
        if now >= next_churn {
            step += 1;
            for a in agents {
                write_catalog(&a.catalog, step)?;
            }
            next_churn += CHURN_EVERY;
        }
        if now >= next_sample {
            let secs = now.duration_since(start).as_secs_f64();
            print!("{secs:>6.0}");
            for (a, samples) in agents.iter().zip(&mut samples) {
                let sample = sample(a, secs)?;
                print!("{:>22.1}{:>8}", sample.rss_kib as f64 / 1024.0, sample.fds);
                samples.push(sample);
            }
            println!();
            next_sample += every;
        }
        thread::sleep(next_sample.min(next_churn).saturating_duration_since(Instant::now()));
    }
    Ok(samples)
}

/// The agent's RSS and open descriptors now; an error if it is gone.
fn sample(a: &Soaked, secs: f64) -> Result<Sample> {
    let gone = || format!("the {} agent died{}", a.datapath, log_tail(&a.log));
    let status = std::fs::read_to_string(format!("/proc/{}/status", a.pid)).with_context(gone)?;
    if status.lines().any(|l| l.starts_with("State:") && l.contains("zombie")) {
        bail!(gone());
    }
    let rss_kib = tools::rss_kib(&status)?;
    let fds = std::fs::read_dir(format!("/proc/{}/fd", a.pid)).with_context(gone)?.count();
    Ok(Sample { secs, rss_kib, fds })
}

/// Early (the 20% after a 10% warm-up) and late (the last 20%) means of one measure, and whether it is flat.
struct Flatness {
    early: f64,
    late: f64,
    limit: f64,
}

impl Flatness {
    fn of(samples: &[Sample], duration: f64, value: fn(&Sample) -> f64, slack: f64, relative: f64) -> Self {
        let mean = |from: f64, to: f64| {
            let values: Vec<f64> = samples.iter().filter(|s| s.secs >= from && s.secs <= to).map(value).collect();
            values.iter().sum::<f64>() / values.len().max(1) as f64
        };
        let early = mean(0.1 * duration, 0.3 * duration);
        Self { early, late: mean(0.8 * duration, duration), limit: early * (1.0 + relative) + slack }
    }

    fn flat(&self) -> bool {
        self.late <= self.limit
    }

    fn json(&self) -> serde_json::Value {
        json!({ "early": self.early, "late": self.late, "limit": self.limit, "flat": self.flat() })
    }
}

/// Prints the verdicts, writes results.json, and fails if any agent's memory or descriptors grew or its load
/// failed.
fn report(agents: &[Soaked], samples: &[Vec<Sample>], duration: Duration) -> Result<()> {
    let secs = duration.as_secs_f64();
    let mut problems = Vec::new();
    let mut results = Vec::new();
    println!();
    for (a, samples) in agents.iter().zip(samples) {
        let rss = Flatness::of(samples, secs, |s| s.rss_kib as f64, RSS_SLACK_KIB, RSS_SLACK_RELATIVE);
        let fds = Flatness::of(samples, secs, |s| s.fds as f64, FD_SLACK, 0.0);
        let (http, dns) = (a.http.lock().unwrap(), a.dns.lock().unwrap());
        println!(
            "soak: {:<9} RSS {:.1} -> {:.1} MiB (limit {:.1}), fds {:.0} -> {:.0} (limit {:.0}), \
             HTTP {} requests {} failed, DNS {} queries {} lost",
            a.datapath,
            rss.early / 1024.0,
            rss.late / 1024.0,
            rss.limit / 1024.0,
            fds.early,
            fds.late,
            fds.limit,
            http.requests,
            http.failures,
            dns.requests,
            dns.failures
        );
        if !rss.flat() {
            problems.push(format!("{}: RSS grew from {:.0} to {:.0} KiB", a.datapath, rss.early, rss.late));
        }
        if !fds.flat() {
            problems.push(format!("{}: descriptors grew from {:.0} to {:.0}", a.datapath, fds.early, fds.late));
        }
        for (what, totals) in [("HTTP", &http), ("DNS", &dns)] {
            if let Some(error) = &totals.error {
                problems.push(format!("{}: {what} load stopped: {error}", a.datapath));
            } else if totals.requests == 0
                || totals.failures as f64 > totals.requests as f64 * FAILURES_PER_MILLION / 1e6
            {
                problems.push(format!("{}: {what}: {} of {} failed", a.datapath, totals.failures, totals.requests));
            }
        }
        results.push(json!({
            "datapath": a.datapath,
            "rssKiB": rss.json(),
            "fds": fds.json(),
            "http": { "requests": http.requests, "failures": http.failures },
            "dns": { "queries": dns.requests, "lost": dns.failures },
            "samples": samples.iter().map(|s| json!([s.secs, s.rss_kib, s.fds])).collect::<Vec<_>>(),
        }));
    }
    let path = cmd::target_dir().join("soak/results.json");
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let out = json!({
        "durationSecs": duration.as_secs(),
        "kernel": kernel.trim(),
        "agents": results,
        "problems": problems,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")?;
    println!("soak: wrote {}", path.display());
    if !problems.is_empty() {
        bail!("soak failed:\n  {}", problems.join("\n  "));
    }
    println!("soak: passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("600"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("10d").is_err());
    }

    #[test]
    fn growth_beyond_the_slack_is_not_flat() {
        let samples: Vec<Sample> =
            (0..100).map(|i| Sample { secs: i as f64, rss_kib: 10_000 + 100 * i, fds: 50 }).collect();
        assert!(!Flatness::of(&samples, 100.0, |s| s.rss_kib as f64, 4096.0, 0.05).flat());
        assert!(Flatness::of(&samples, 100.0, |s| s.fds as f64, 0.0, 0.0).flat());
    }
}
