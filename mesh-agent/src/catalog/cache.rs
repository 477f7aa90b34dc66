//! The last-known Kubernetes API objects, persisted in stateDir so an edge node that restarts without its cloud link
//! still serves them. Written atomically (0600, `state_file`) off the source's loop, at most every [`INTERVAL`]:
//! a 10,000-service cluster's objects are megabytes, and edge storage is often flash.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, error, warn};

use super::kubernetes::status::now;
use super::kubernetes::store::Snapshot;
use crate::state_file;

pub const FILE: &str = "kubernetes-objects.json";
pub const INTERVAL: Duration = Duration::from_secs(10);
const VERSION: u32 = 1;

/// The file: the objects as the API sent them, minus the fields the catalog never reads.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheFile {
    version: u32,
    /// Seconds since the Unix epoch.
    saved_at: u64,
    services: Vec<Arc<K8sService>>,
    endpoint_slices: Vec<Arc<EndpointSlice>>,
}

pub struct Cached {
    pub saved_at: u64,
    pub snapshot: Snapshot,
}

/// The cached objects, if there is a cache (a corrupt one is set aside by `state_file`).
pub fn load(path: &Path) -> Option<Cached> {
    let file: CacheFile = state_file::read_json_or_set_aside(path);
    match file.version {
        0 => None, // no file
        VERSION => Some(Cached {
            saved_at: file.saved_at,
            snapshot: Snapshot { services: file.services, slices: file.endpoint_slices },
        }),
        v => {
            warn!(file = %path.display(), "cache format {v} is not {VERSION}, ignoring it");
            None
        }
    }
}

/// Writes each snapshot sent to it (the newest, when several arrive within [`INTERVAL`]).
pub fn spawn_writer(path: PathBuf) -> watch::Sender<Arc<Snapshot>> {
    let (tx, mut rx) = watch::channel(Arc::<Snapshot>::default());
    rx.mark_unchanged();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let snapshot = rx.borrow_and_update().clone();
            let path = path.clone();
            let wrote = tokio::task::spawn_blocking(move || {
                let file = CacheFile {
                    version: VERSION,
                    saved_at: now(),
                    services: snapshot.services.clone(),
                    endpoint_slices: snapshot.slices.clone(),
                };
                state_file::write_json(&path, &file)
            })
            .await;
            match wrote {
                Ok(Ok(())) => debug!("Kubernetes objects cached"),
                Ok(Err(e)) => error!("{e:#}"),
                Err(e) => error!("writing the Kubernetes cache: {e}"),
            }
            tokio::time::sleep(INTERVAL).await;
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_private_and_corrupt_set_aside() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert!(load(&path).is_none());

        let svc: K8sService = serde_json::from_value(serde_json::json!({"metadata": {"name": "web"}})).unwrap();
        let tx = spawn_writer(path.clone());
        tx.send_replace(Arc::new(Snapshot { services: vec![Arc::new(svc)], slices: Vec::new() }));
        for _ in 0..200 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cached = load(&path).expect("cache");
        assert_eq!(cached.snapshot.services[0].metadata.name.as_deref(), Some("web"));
        assert!(cached.saved_at > 0);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        std::fs::write(&path, "{not json").unwrap();
        assert!(load(&path).is_none());
        assert!(dir.path().join(format!("{FILE}.corrupt")).exists());
    }
}
