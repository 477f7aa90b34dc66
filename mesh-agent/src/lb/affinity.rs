//! `sessionAffinity: ClientIP`: a client keeps its backend while it comes back within the timeout.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries are refreshed on every use and expire `timeout` after the last one, as kube-proxy's do. Sized by the
/// number of distinct node-local clients, which is small; expired entries are swept when the table grows.
#[derive(Debug)]
pub struct AffinityTable {
    timeout: Duration,
    entries: Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>,
}

const SWEEP_ABOVE: usize = 4096;

impl AffinityTable {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, entries: Mutex::default() }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn lookup(&self, client: IpAddr) -> Option<SocketAddr> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match entries.get_mut(&client) {
            Some((backend, last)) if now.duration_since(*last) < self.timeout => {
                *last = now;
                Some(*backend)
            }
            Some(_) => {
                entries.remove(&client);
                None
            }
            None => None,
        }
    }

    pub fn remember(&self, client: IpAddr, backend: SocketAddr) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if entries.len() >= SWEEP_ABOVE {
            entries.retain(|_, (_, last)| now.duration_since(*last) < self.timeout);
        }
        entries.insert(client, (backend, now));
    }

    /// Drops entries whose backend left the set.
    pub fn retain_backends(&self, backends: &[SocketAddr]) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (backend, _)| backends.contains(backend));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_after_timeout() {
        let table = AffinityTable::new(Duration::from_millis(20));
        let client = IpAddr::from([127, 0, 0, 1]);
        let backend = SocketAddr::from(([10, 0, 0, 1], 80));
        table.remember(client, backend);
        assert_eq!(table.lookup(client), Some(backend));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(table.lookup(client), None);
    }
}
