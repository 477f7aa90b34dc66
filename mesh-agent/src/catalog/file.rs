//! The file source: catalog files of Kubernetes manifests, watched.
//!
//! Files are polled (every [`POLL`]) rather than watched with inotify: polling sees atomic renames, editors'
//! swap-and-replace and files on any filesystem alike, and bounds the time to apply an edit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Catalog, Objects};
use crate::catalog::SourceState;

pub const POLL: Duration = Duration::from_millis(200);

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Fingerprint { modified: meta.modified().ok()?, len: meta.len(), inode: meta.ino() })
}

/// One watched file and the objects of its last good version.
struct Watched {
    path: PathBuf,
    seen: Option<Fingerprint>,
    objects: Objects,
}

impl Watched {
    /// Re-reads the file when it changed. Returns whether its objects changed; a file that fails to read or parse
    /// is reported and its last good objects stay in force.
    fn refresh(&mut self, state: &SourceState) -> bool {
        let now = fingerprint(&self.path);
        if now == self.seen {
            return false;
        }
        self.seen = now;
        if now.is_none() {
            let error = format!("{}: missing; keeping its last good objects", self.path.display());
            warn!("{error}");
            state.set_error(error);
            return false;
        }
        match read_objects(&self.path) {
            Ok(objects) => {
                self.objects = objects;
                true
            }
            Err(e) => {
                let error = format!("{e:#}; keeping the last good catalog");
                warn!("{error}");
                state.set_error(error);
                false
            }
        }
    }
}

pub fn read_objects(path: &Path) -> Result<Objects> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Objects::parse(&text).with_context(|| path.display().to_string())
}

/// Reads `paths` now and then watches them, publishing each new good catalog. The first catalog is built before
/// this returns, so the agent starts with the files' services in place.
pub fn spawn(paths: Vec<PathBuf>, state: Arc<SourceState>) -> watch::Receiver<Arc<Catalog>> {
    let mut files: Vec<Watched> =
        paths.into_iter().map(|path| Watched { path, seen: None, objects: Objects::default() }).collect();
    let initial = rebuild(&mut files, &state).unwrap_or_default();
    let (tx, rx) = watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(catalog) = rebuild(&mut files, &state) {
                if **tx.borrow() != catalog && tx.send(Arc::new(catalog)).is_err() {
                    return; // the agent is shutting down
                }
            }
        }
    });
    rx
}

/// A new catalog when some file changed and the whole set still makes a valid catalog.
fn rebuild(files: &mut [Watched], state: &SourceState) -> Option<Catalog> {
    let changed = files.iter_mut().fold(false, |changed, f| f.refresh(state) | changed);
    if !changed && state.files_synced() {
        return None;
    }
    let mut all = Objects::default();
    for f in files.iter() {
        all.extend(f.objects.clone());
    }
    match all.to_catalog() {
        Ok(catalog) => {
            info!(services = catalog.services.len(), "catalog files loaded");
            state.set_synced();
            Some(catalog)
        }
        Err(e) => {
            let names: Vec<_> = files.iter().map(|f| f.path.display().to_string()).collect();
            let error = format!("{}: {e:#}; keeping the last good catalog", names.join(", "));
            warn!("{error}");
            state.set_error(error);
            None
        }
    }
}
