//! The load generators: wrk for requests and connections, iperf3 for throughput. Each run is bounded by the
//! tool's own duration and, in case a data path wedges, by `timeout`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::netns;
use crate::cmd;

/// Where a client connects and which cgroup it must run in (the eBPF path rewrites only that cgroup's sockets).
pub struct Client<'a> {
    pub ns: &'a str,
    pub host: &'a str,
    pub cgroup: Option<&'a Path>,
}

impl Client<'_> {
    /// `timeout PROGRAM` in the client's namespace, joining the cgroup first (before exec, so every socket the
    /// program opens is in it).
    pub fn command(&self, limit_secs: u64, program: &str) -> Command {
        let limit = format!("{limit_secs}");
        let mut command = netns::exec(self.ns, "sh");
        match self.cgroup {
            Some(cgroup) => {
                let procs = cgroup.join("cgroup.procs");
                command.args(["-c", r#"echo $$ > "$0" && exec "$@""#]).arg(procs);
            }
            None => {
                command.args(["-c", r#"exec "$@""#, "sh"]);
            }
        }
        command.args(["timeout", "-k", "5", &limit, program]);
        command
    }

    /// Requests per second over `secs`: keep-alive connections, or a new connection per request with `close`.
    pub fn wrk(&self, port: u16, close: bool, secs: u64) -> Result<Run> {
        let url = format!("http://{}:{port}/", self.host);
        let mut command = self.command(secs + 20, "wrk");
        command.args(["-t1", "-c64", &format!("-d{secs}s")]);
        if close {
            command.args(["-H", "Connection: close"]);
        }
        command.arg(url);
        let out = cmd::output(&mut command)?;
        parse_wrk(&out).with_context(|| format!("unexpected wrk output:\n{out}"))
    }

    /// Gbit/s received by the server over `secs` of one TCP stream.
    pub fn iperf3(&self, port: u16, secs: u64) -> Result<Run> {
        let mut command = self.command(secs + 20, "iperf3");
        command.args(["-c", self.host, "-p", &port.to_string(), "-t", &secs.to_string(), "-J"]);
        command.args(["--connect-timeout", "3000"]);
        // iperf3 reports its own failures in the JSON and exits non-zero; keep the JSON for the message.
        let out = command.output().context("cannot start iperf3")?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 printed no JSON: {}", String::from_utf8_lossy(&out.stderr).trim()))?;
        if let Some(error) = json.get("error").and_then(|e| e.as_str()) {
            bail!("iperf3: {error}");
        }
        let bps = json
            .pointer("/end/sum_received/bits_per_second")
            .and_then(|v| v.as_f64())
            .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
        Ok(Run { value: bps / 1e9, errors: 0 })
    }
}

/// One measurement; `errors` counts failed connections and requests, which make the number suspect.
#[derive(Clone)]
pub struct Run {
    pub value: f64,
    pub errors: u64,
}

pub fn median(runs: &[Run]) -> f64 {
    median_of(runs.iter().map(|r| r.value).collect())
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// VmRSS (KiB) from the text of `/proc/PID/status`.
pub fn rss_kib(status: &str) -> Result<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

fn parse_wrk(out: &str) -> Result<Run> {
    let value = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .context("no Requests/sec line")?
        .trim()
        .parse()?;
    // "Socket errors: connect 0, read 12, write 0, timeout 0" and "Non-2xx or 3xx responses: 7".
    let mut errors = 0;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            errors += rest.split(',').filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok()).sum::<u64>();
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += n.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok(Run { value, errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let out = "Running 5s test @ http://10.250.0.10:80/\n  1 threads and 64 connections\n  \
                   Socket errors: connect 1, read 12, write 0, timeout 3\n  Non-2xx or 3xx responses: 2\n\
                   Requests/sec: 203123.45\nTransfer/sec:     29.64MB\n";
        let run = parse_wrk(out).unwrap();
        assert_eq!(run.value, 203123.45);
        assert_eq!(run.errors, 18);
    }
}
