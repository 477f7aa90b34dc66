//! DNS clients and servers for tests: `dig` run inside a namespace and parsed, a `dnsmasq` upstream, and the
//! agent's DNS metrics.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::agent::Agent;
use super::netns::Netns;
use super::wait_for;

/// The agent's default DNS address.
pub const SERVER: &str = "169.254.96.16";

/// What dig printed, in parts.
#[derive(Debug, Default)]
pub struct Dig {
    pub status: String,
    pub flags: Vec<String>,
    /// Records as `name ttl class type rdata`, whitespace collapsed.
    pub answers: Vec<String>,
    pub authority: Vec<String>,
    pub raw: String,
}

impl Dig {
    /// The rdata of every answer record.
    pub fn rdata(&self) -> Vec<String> {
        self.answers.iter().map(|r| r.splitn(5, ' ').nth(4).unwrap_or_default().to_owned()).collect()
    }
}

/// Runs `dig @SERVER ARGS` in `ns` (one try, 3 s) and parses its output.
pub fn dig(ns: &Netns, args: &[&str]) -> Dig {
    let out = ns
        .command("dig")
        .arg(format!("@{SERVER}"))
        .args(["+time=3", "+tries=1"])
        .args(args)
        .output()
        .expect("running dig");
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut dig = Dig { raw: raw.clone(), ..Dig::default() };
    let mut section = "";
    for line in raw.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            dig.status = rest.split(',').next().unwrap_or_default().to_owned();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            dig.flags = rest.split(';').next().unwrap_or_default().split_whitespace().map(Into::into).collect();
        } else if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.trim().is_empty() || line.starts_with(';') {
            section = "";
        } else {
            let record = line.split_whitespace().collect::<Vec<_>>().join(" ");
            match section {
                "answer" => dig.answers.push(record),
                "authority" => dig.authority.push(record),
                _ => {}
            }
        }
    }
    dig
}

/// A dnsmasq answering from its command line only (`--no-resolv --no-hosts`), bound to `address` in `ns`, logging
/// every query it gets. Killed on drop.
pub struct Dnsmasq {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    pub fn start(ns: &Netns, address: &str, records: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dnsmasq.log");
        let child = ns
            .command("dnsmasq")
            .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces", "--user=root"])
            .arg(format!("--listen-address={address}"))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!("--log-facility={}", log.display()))
            .arg("--log-queries")
            .args(records)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning dnsmasq");
        let dnsmasq = Self { child, log, _dir: dir };
        let up = wait_for(Duration::from_secs(5), || dnsmasq.log().contains("started").then_some(()));
        assert!(up.is_some(), "dnsmasq did not start: {}", dnsmasq.log());
        dnsmasq
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many queries for `name` it has received.
    pub fn queries_for(&self, name: &str) -> usize {
        self.log().lines().filter(|l| l.contains("query[") && l.contains(&format!(" {name} from"))).count()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's `mesh_agent_dns_*` samples, keyed by series as written (`name{labels}`).
pub fn dns_metrics(agent: &Agent) -> BTreeMap<String, f64> {
    let (status, text) = agent.get("/metrics").expect("scraping /metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|line| line.starts_with("mesh_agent_dns_"))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            (series.to_owned(), value.parse().unwrap_or_else(|_| panic!("a number in {line:?}")))
        })
        .collect()
}
