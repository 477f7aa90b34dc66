//! The Kubernetes source's state as status shows it: synced, stale since T, or never synced.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::catalog::SourceState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SyncState {
    /// Listed, and the watches are healthy.
    Synced,
    /// Serving objects that may be behind the API: the API failed after a sync, or they came from the cache.
    Stale,
    /// Nothing from the API yet, and no cache: the source serves nothing.
    NeverSynced,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The API server, or `""` until a client is configured.
    pub server: String,
    pub state: SyncState,
    /// Seconds since the Unix epoch when the source last knew it was in step with the API.
    pub last_sync: Option<u64>,
    /// Since when (seconds since the Unix epoch) the objects served may be behind the API; for objects served from
    /// the cache, when the cache was written.
    pub stale_since: Option<u64>,
    /// Serving objects from the stateDir cache, not yet confirmed by the API.
    pub from_cache: bool,
    pub services: usize,
    pub endpoint_slices: usize,
    pub last_error: Option<String>,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Synced => "synced",
            SyncState::Stale => "stale",
            SyncState::NeverSynced => "neverSynced",
        }
    }
}

impl Status {
    /// Whether the source has objects to serve (from the API or the cache).
    pub fn serving(&self) -> bool {
        self.state != SyncState::NeverSynced
    }
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// Moves the status through its states and publishes every change to the agent's [`SourceState`].
pub struct Health {
    status: Status,
    state: Arc<SourceState>,
}

impl Health {
    pub fn new(state: Arc<SourceState>) -> Self {
        let status = Status {
            server: String::new(),
            state: SyncState::NeverSynced,
            last_sync: None,
            stale_since: None,
            from_cache: false,
            services: 0,
            endpoint_slices: 0,
            last_error: None,
        };
        state.set_kubernetes(status.clone());
        Self { status, state }
    }

    pub fn is_synced(&self) -> bool {
        self.status.state == SyncState::Synced
    }

    fn update(&mut self, f: impl FnOnce(&mut Status)) {
        let before = self.status.clone();
        f(&mut self.status);
        if self.status != before {
            self.state.set_kubernetes(self.status.clone());
        }
    }

    pub fn from_cache(&mut self, saved_at: u64, counts: (usize, usize)) {
        self.update(|s| {
            s.state = SyncState::Stale;
            s.stale_since = Some(saved_at);
            s.from_cache = true;
            (s.services, s.endpoint_slices) = counts;
        });
    }

    pub fn server(&mut self, server: String) {
        self.update(|s| s.server = server);
    }

    /// A catalog was published from `counts` objects; `object_error` says why some service is not at its newest.
    pub fn published(&mut self, counts: (usize, usize), object_error: Option<String>) {
        self.update(|s| {
            (s.services, s.endpoint_slices) = counts;
            if s.state == SyncState::Synced {
                s.last_error = object_error;
            }
        });
    }

    /// The API answered and the objects are current.
    pub fn synced(&mut self) {
        if self.status.state != SyncState::Synced {
            info!(server = %self.status.server, "Kubernetes API in sync");
        }
        self.update(|s| {
            if s.state != SyncState::Synced {
                s.state = SyncState::Synced;
                s.stale_since = None;
                s.from_cache = false;
                s.last_error = None;
            }
            s.last_sync = Some(now());
        });
    }

    /// The API failed: what is served is kept, and marked stale from now if it was current.
    pub fn failed(&mut self, error: String) {
        if self.status.last_error.as_ref() != Some(&error) {
            warn!(server = %self.status.server, "Kubernetes API: {error}; serving the last known objects");
        }
        self.update(|s| {
            if s.state == SyncState::Synced {
                s.state = SyncState::Stale;
                s.stale_since = Some(now());
            }
            s.last_error = Some(error);
        });
    }
}
