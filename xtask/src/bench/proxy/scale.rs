//! What a large catalog costs the agent: the time from a catalog change to the data path carrying it, the
//! agent's memory, and the time a `/metrics` scrape takes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::targets::{self, RunningAgent, ALT_HTTP_PORT, HTTP_PORT};
use crate::bench::{netns, tools};

/// Catalog changes timed per agent target.
const CHANGES: usize = 50;
/// `/metrics` scrapes timed per agent target.
const SCRAPES: usize = 5;

/// Milliseconds, per catalog change.
pub struct ChangeTimes {
    /// From the catalog file's rename to the agent reporting the change applied (file polling included).
    pub end_to_end: Vec<f64>,
    /// The agent's own time from the new snapshot to IPAM, edge0 and the data path programmed.
    pub apply: Vec<f64>,
}

pub struct Scale {
    pub changes: ChangeTimes,
    pub rss_mib: f64,
    /// Milliseconds per `/metrics` scrape.
    pub scrape_ms: Vec<f64>,
}

impl Scale {
    pub fn json(&self) -> serde_json::Value {
        let summary = |ms: &[f64]| json!({ "p50": percentile(ms, 50.0), "p99": percentile(ms, 99.0) });
        json!({
            "catalogChangeMs": {
                "changes": self.changes.end_to_end.len(),
                "endToEnd": summary(&self.changes.end_to_end),
                "apply": summary(&self.changes.apply),
            },
            "rssMiB": self.rss_mib,
            "scrapeMs": { "p50": percentile(&self.scrape_ms, 50.0) },
        })
    }

    pub fn describe(&self) -> String {
        let (e, a) = (&self.changes.end_to_end, &self.changes.apply);
        format!(
            "catalog change -> data path p50 {:.1} ms, p99 {:.1} ms (the reconciler's part p50 {:.1} ms, p99 {:.1} \
             ms; {} changes); RSS {:.1} MiB; a /metrics scrape p50 {:.1} ms",
            percentile(e, 50.0),
            percentile(e, 99.0),
            percentile(a, 50.0),
            percentile(a, 99.0),
            e.len(),
            self.rss_mib,
            percentile(&self.scrape_ms, 50.0)
        )
    }
}

/// Moves the measured service's HTTP endpoint between the backend's two ports [`CHANGES`] times, each time
/// waiting for the agent to have applied it, then reads the agent's RSS and times [`SCRAPES`] scrapes.
pub fn measure(node_ns: &str, agent: &RunningAgent) -> Result<Scale> {
    let scrape_ms = netns::in_namespace(node_ns, || {
        (0..SCRAPES)
            .map(|_| {
                let start = Instant::now();
                get("/metrics")?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let changes = netns::in_namespace(node_ns, || {
        let mut times = ChangeTimes { end_to_end: Vec::new(), apply: Vec::new() };
        for i in 0..CHANGES {
            let before = applies(&status()?)?;
            let port = if i % 2 == 0 { ALT_HTTP_PORT } else { HTTP_PORT };
            targets::write_catalog(&agent.catalog, agent.services, port)?;
            let written = Instant::now();
            let status = wait_applied(before)?;
            times.end_to_end.push(written.elapsed().as_secs_f64() * 1e3);
            let apply = status.get("lastApplySeconds").and_then(|s| s.as_f64()).context("status: lastApplySeconds")?;
            times.apply.push(apply * 1e3);
            // Spread the writes over the file source's polling phase.
            thread::sleep(Duration::from_millis(17 * (i as u64 % 7)));
        }
        Ok(times)
    })?;
    Ok(Scale { changes, rss_mib: rss_kib(agent.pid)? as f64 / 1024.0, scrape_ms })
}

fn wait_applied(before: u64) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = status()?;
        if applies(&status)? > before {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("the agent did not apply a catalog change within 30 s");
        }
        thread::sleep(Duration::from_micros(500));
    }
}

fn applies(status: &serde_json::Value) -> Result<u64> {
    status.get("applies").and_then(|a| a.as_u64()).context("status: applies")
}

fn status() -> Result<serde_json::Value> {
    let body = get("/api/v1/status")?;
    serde_json::from_str(&body).with_context(|| format!("admin API: status is not JSON: {body}"))
}

/// The body of an admin API `path`, over plain HTTP/1.0: where spawning curl would dominate the time measured.
fn get(path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(targets::ADMIN).context("admin API")?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (_, body) = response.split_once("\r\n\r\n").with_context(|| format!("admin API {path}: no HTTP body"))?;
    Ok(body.to_owned())
}

fn rss_kib(pid: u32) -> Result<u64> {
    tools::rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).context("the agent's /proc status")?)
}

/// Nearest-rank percentile.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
    }
}
