//! Steady HTTP load through a VIP while a backend dies, for either data path: a client process (python3, so the
//! eBPF tests can put it in their cgroup) runs a few concurrent request loops, each request a new connection,
//! and reports every request as it ends. Times are CLOCK_MONOTONIC seconds, python's `time.monotonic()`, so the
//! test's own marks (the death, the ejection) compare with the client's.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::agent::Agent;
use super::backend::ServerProcess;
use super::netns::Topology;
use super::wait_for;

/// Request loops running at once: each has at most one request in flight.
pub const CLIENTS: usize = 4;

/// Per socket operation. Longer than the proxy's 2 s connect timeout, so a connection the proxy moves on from a
/// silent backend to a live one still succeeds.
const TIMEOUT_SECS: &str = "5";

const LOAD: &str = r#"
import http.client, json, sys, threading, time

host, port, clients, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
lock = threading.Lock()

def get():
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise OSError("status %d: %s" % (response.status, body))
        return body
    finally:
        conn.close()

def loop():
    while True:
        start = time.monotonic()
        try:
            record = {"start": start, "backend": get()}
        except Exception as e:
            record = {"start": start, "error": repr(e)}
        with lock:
            print(json.dumps(record), flush=True)

for _ in range(clients):
    threading.Thread(target=loop, daemon=True).start()
threading.Event().wait()
"#;

/// CLOCK_MONOTONIC now, in seconds.
pub fn monotonic() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only the struct passed.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// One request: when it started, and the backend that answered or why it failed.
#[derive(Debug, Clone)]
pub struct Request {
    pub start: f64,
    pub outcome: Result<String, String>,
}

/// The client process, killed when the load stops (or the test ends).
pub struct Load {
    child: Child,
    done: Arc<Mutex<Vec<Request>>>,
}

impl Load {
    /// Starts [`CLIENTS`] loops of GETs to `vip`; `python3` is the client command, already placed in the node
    /// namespace (and for the eBPF path, the cgroup).
    pub fn start(mut python3: Command, vip: SocketAddr) -> Self {
        let mut child = python3
            .args(["-c", LOAD, &vip.ip().to_string(), &vip.port().to_string(), &CLIENTS.to_string(), TIMEOUT_SECS])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the load client");
        let done = Arc::new(Mutex::new(Vec::new()));
        let (lines, sink) = (BufReader::new(child.stdout.take().unwrap()), Arc::clone(&done));
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                let record: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
                let outcome = match record["backend"].as_str() {
                    Some(backend) => Ok(backend.to_owned()),
                    None => Err(record["error"].as_str().unwrap_or_default().to_owned()),
                };
                sink.lock().unwrap().push(Request { start: record["start"].as_f64().unwrap(), outcome });
            }
        });
        Self { child, done }
    }

    /// Waits until `n` requests started after `since` have ended.
    pub fn wait(&mut self, since: f64, n: usize) {
        let reached = wait_for(Duration::from_secs(60), || {
            assert!(self.child.try_wait().unwrap().is_none(), "the load client exited");
            let done = self.done.lock().unwrap();
            (done.iter().filter(|r| r.start > since).count() >= n).then_some(())
        });
        assert!(reached.is_some(), "fewer than {n} requests after {since} within 60 s: {:?}", self.done.lock());
    }

    /// Stops the client; the requests that ended, in the order they did.
    pub fn stop(mut self) -> Vec<Request> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::take(&mut *self.done.lock().unwrap())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a backend dies.
#[derive(Debug, Clone, Copy)]
pub enum Death {
    /// SIGKILL: its sockets close, so a connect is refused at once and established connections are reset.
    Killed,
    /// Its address goes away: packets to it vanish, so a connect times out and established connections hang.
    Vanished,
}

/// What the load saw around the death of one backend.
pub struct Outcome {
    pub requests: Vec<Request>,
    /// When the backend died.
    pub died: f64,
    /// When the admin API first showed the backend out of rotation. The agent publishes its view after the data
    /// path took the change, so every connect after this avoids the dead backend.
    pub ejected: f64,
}

/// Runs `load` until every backend served, kills `victim` as `death` says, waits until the agent shows it
/// unhealthy, then for more requests after that.
pub fn kill_under_load(
    agent: &Agent,
    t: &Topology,
    victim: &mut ServerProcess,
    death: Death,
    mut load: Load,
) -> Outcome {
    load.wait(0.0, 30);
    let died = monotonic();
    match death {
        Death::Killed => victim.kill(),
        // A secondary address of the backend namespace's veth: deleting it leaves the others.
        Death::Vanished => t.backends.ip(&["addr", "del", &format!("{}/24", victim.addr.ip()), "dev", "veth-b"]),
    }
    let ejected = wait_for(Duration::from_secs(10), || unhealthy(agent, victim.addr).then(monotonic));
    let ejected =
        ejected.unwrap_or_else(|| panic!("{} not out of rotation after 10 s: {}", victim.name, agent.services()));
    load.wait(ejected, 40);
    Outcome { requests: load.stop(), died, ejected }
}

/// Whether `/api/v1/services` shows the endpoint at `backend` unhealthy.
fn unhealthy(agent: &Agent, backend: SocketAddr) -> bool {
    let services = agent.services();
    let endpoints =
        services.as_array().into_iter().flatten().flat_map(|s| s["endpoints"].as_array().into_iter().flatten());
    endpoints.into_iter().any(|e| e["ip"] == backend.ip().to_string() && e["healthy"] == false)
}

impl Outcome {
    pub fn failed(&self) -> Vec<&Request> {
        self.requests.iter().filter(|r| r.outcome.is_err()).collect()
    }

    /// Requests started between the death and the ejection: the ones that could still be sent to the dead backend.
    pub fn started_while_in_rotation(&self) -> usize {
        self.requests.iter().filter(|r| r.start >= self.died && r.start <= self.ejected).count()
    }

    /// What holds on both data paths: at most `max_failed` failures, none of them started after the ejection,
    /// and every request after it answered by a live backend, each of them taking part.
    pub fn assert_bounded(&self, victim: &str, live: &[&str], max_failed: usize) {
        let failed = self.failed();
        let summary = format!(
            "{} requests, {} failed, {} started between the death and the ejection ({:.2} s); first failures: {:?}",
            self.requests.len(),
            failed.len(),
            self.started_while_in_rotation(),
            self.ejected - self.died,
            &failed[..failed.len().min(5)]
        );
        eprintln!("{summary}");
        assert!(failed.len() <= max_failed, "more than {max_failed} failures: {summary}");
        let late: Vec<&&Request> = failed.iter().filter(|r| r.start > self.ejected).collect();
        assert!(late.is_empty(), "requests started after the ejection failed: {late:?}; {summary}");
        let after: Vec<&str> =
            self.requests.iter().filter(|r| r.start > self.ejected).filter_map(|r| r.outcome.as_deref().ok()).collect();
        assert!(!after.contains(&victim), "{victim} answered after its ejection");
        for name in live {
            assert!(after.contains(name), "{name} served nothing after the ejection: {after:?}");
        }
    }
}
