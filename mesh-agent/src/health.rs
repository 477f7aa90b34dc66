//! Endpoint health: active TCP checks of every backend, plus passive reports (a connect the proxy saw refused).
//! A backend that fails `unhealthyThreshold` checks in a row leaves rotation; `healthyThreshold` passes in a row
//! bring it back. Readiness in the catalog still decides which endpoints exist; health only takes dead ones out.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{info, warn};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HealthConfig {
    pub enable: bool,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Default for HealthConfig {
    /// A dead backend is out within interval × unhealthyThreshold + timeout ≈ 1.3 s.
    fn default() -> Self {
        Self {
            enable: true,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(300),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        }
    }
}

/// Checks at most this many backends at once, so a large catalog does not open thousands of sockets per round.
const CONCURRENT_CHECKS: usize = 256;

/// The agent's side of the checker: what to check, failures seen elsewhere, and the verdict.
#[derive(Clone)]
pub struct Health {
    targets: watch::Sender<BTreeSet<SocketAddr>>,
    passive: mpsc::UnboundedSender<SocketAddr>,
    unhealthy: watch::Receiver<Arc<BTreeSet<SocketAddr>>>,
}

impl Health {
    /// Starts the checker. Disabled, it never reports a backend unhealthy.
    pub fn spawn(config: HealthConfig) -> Self {
        let (targets, targets_rx) = watch::channel(BTreeSet::new());
        let (passive, passive_rx) = mpsc::unbounded_channel();
        let (verdict, unhealthy) = watch::channel(Arc::default());
        if config.enable {
            tokio::spawn(Checker { config, states: HashMap::new(), verdict }.run(targets_rx, passive_rx));
        }
        Self { targets, passive, unhealthy }
    }

    /// Sets the backends to check (every backend of every frontend).
    pub fn check(&self, backends: BTreeSet<SocketAddr>) {
        self.targets.send_if_modified(|current| {
            let changed = *current != backends;
            *current = backends;
            changed
        });
    }

    /// Reports a failed connection to `backend` seen by the data path; it counts as a failed check.
    pub fn report_failure(&self, backend: SocketAddr) {
        let _ = self.passive.send(backend);
    }

    pub fn unhealthy(&self) -> watch::Receiver<Arc<BTreeSet<SocketAddr>>> {
        self.unhealthy.clone()
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    healthy: bool,
    fails: u32,
    passes: u32,
}

struct Checker {
    config: HealthConfig,
    states: HashMap<SocketAddr, State>,
    verdict: watch::Sender<Arc<BTreeSet<SocketAddr>>>,
}

impl Checker {
    async fn run(
        mut self,
        mut targets: watch::Receiver<BTreeSet<SocketAddr>>,
        mut passive: mpsc::UnboundedReceiver<SocketAddr>,
    ) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let list: Vec<SocketAddr> = targets.borrow_and_update().iter().copied().collect();
                    self.states.retain(|addr, _| list.binary_search(addr).is_ok());
                    let results = probe_all(&list, self.config.timeout).await;
                    for (addr, ok) in list.into_iter().zip(results) {
                        self.record(addr, ok);
                    }
                    self.publish();
                }
                Some(addr) = passive.recv() => {
                    if targets.borrow().contains(&addr) {
                        self.record(addr, false);
                        self.publish();
                    }
                }
                else => return,
            }
        }
    }

    fn record(&mut self, addr: SocketAddr, ok: bool) {
        let state = self.states.entry(addr).or_insert(State { healthy: true, fails: 0, passes: 0 });
        if ok {
            state.fails = 0;
            state.passes += 1;
            if !state.healthy && state.passes >= self.config.healthy_threshold {
                state.healthy = true;
                info!(backend = %addr, "backend healthy again, back in rotation");
            }
        } else {
            state.passes = 0;
            state.fails += 1;
            if state.healthy && state.fails >= self.config.unhealthy_threshold {
                state.healthy = false;
                warn!(backend = %addr, "backend failed its health checks, out of rotation");
            }
        }
    }

    fn publish(&self) {
        let unhealthy: BTreeSet<SocketAddr> =
            self.states.iter().filter(|(_, s)| !s.healthy).map(|(addr, _)| *addr).collect();
        self.verdict.send_if_modified(|current| {
            let changed = **current != unhealthy;
            if changed {
                *current = Arc::new(unhealthy);
            }
            changed
        });
    }
}

async fn probe_all(targets: &[SocketAddr], timeout: Duration) -> Vec<bool> {
    let limit = Arc::new(Semaphore::new(CONCURRENT_CHECKS));
    let checks = targets.iter().map(|addr| {
        let limit = Arc::clone(&limit);
        let addr = *addr;
        async move {
            let _permit = limit.acquire().await;
            matches!(tokio::time::timeout(timeout, TcpStream::connect(addr)).await, Ok(Ok(_)))
        }
    });
    futures::future::join_all(checks).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> HealthConfig {
        HealthConfig {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            ..HealthConfig::default()
        }
    }

    async fn wait_until(
        rx: &mut watch::Receiver<Arc<BTreeSet<SocketAddr>>>,
        f: impl Fn(&BTreeSet<SocketAddr>) -> bool,
    ) {
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| f(s))).await.expect("verdict").expect("open");
    }

    #[tokio::test]
    async fn dead_backend_leaves_and_returns() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let live = listener.local_addr().unwrap();
        // A port that was just free: nothing listens there.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let health = Health::spawn(fast());
        let mut verdict = health.unhealthy();
        health.check([live, dead].into());
        wait_until(&mut verdict, |s| s.contains(&dead) && !s.contains(&live)).await;
        let revived = std::net::TcpListener::bind(dead).unwrap();
        wait_until(&mut verdict, |s| s.is_empty()).await;
        drop((listener, revived));
    }

    #[tokio::test]
    async fn passive_failures_count() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = HealthConfig { interval: Duration::from_secs(3600), unhealthy_threshold: 2, ..fast() };
        let health = Health::spawn(config);
        let mut verdict = health.unhealthy();
        health.check([addr].into());
        health.report_failure(addr);
        health.report_failure(addr);
        wait_until(&mut verdict, |s| s.contains(&addr)).await;
    }
}
