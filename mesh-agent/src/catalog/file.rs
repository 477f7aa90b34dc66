//! The file source: catalog files of Kubernetes manifests, watched.
//!
//! Files are polled (every [`POLL`]): polling sees atomic renames, editors' swap-and-replace and files on any
//! filesystem alike, and bounds the time to apply an edit. Where inotify works, a write to a file's directory
//! wakes the poll at once, so an edit takes effect in milliseconds rather than at the next tick.
//!
//! A file's documents are kept with their parsed objects: an edit to one service of a 10,000-service file
//! re-parses that service's documents only, the rest are found unchanged by their text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use futures::StreamExt;
use inotify::{EventStream, Inotify, WatchMask};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::manifest::{self, Converted};
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

/// One watched file and the objects of its last good version, per document.
struct Watched {
    path: PathBuf,
    seen: Option<Fingerprint>,
    documents: Vec<(String, Arc<Converted>)>,
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
        match self.read() {
            Ok(documents) => {
                // Rewritten with the same documents (a touch, a save without edits): nothing to rebuild, unless
                // the file is back to them after a bad edit, whose error the rebuild clears.
                let same = documents.len() == self.documents.len()
                    && documents.iter().zip(&self.documents).all(|((_, new), (_, old))| Arc::ptr_eq(new, old));
                self.documents = documents;
                !same || state.has_error()
            }
            Err(e) => {
                let error = format!("{e:#}; keeping the last good catalog");
                warn!("{error}");
                state.set_error(error);
                false
            }
        }
    }

    /// The file's documents, parsing only those whose text the last good version did not have.
    fn read(&self) -> Result<Vec<(String, Arc<Converted>)>> {
        let text =
            std::fs::read_to_string(&self.path).with_context(|| format!("{}: cannot read", self.path.display()))?;
        let known: HashMap<&str, &Arc<Converted>> = self.documents.iter().map(|(t, o)| (t.as_str(), o)).collect();
        manifest::documents(&text)
            .into_iter()
            .map(|(line, doc)| {
                let objects = match known.get(doc) {
                    Some(objects) => Arc::clone(objects),
                    None => {
                        let objects = Objects::parse_document(line, doc).and_then(|objects| objects.convert());
                        Arc::new(objects.with_context(|| self.path.display().to_string())?)
                    }
                };
                Ok((doc.to_owned(), objects))
            })
            .collect()
    }
}

/// Reads `paths` now and then watches them, publishing each new good catalog. The first catalog is built before
/// this returns, so the agent starts with the files' services in place.
pub fn spawn(paths: Vec<PathBuf>, state: Arc<SourceState>) -> watch::Receiver<Arc<Catalog>> {
    let mut wake = notifications(&paths);
    let mut files: Vec<Watched> =
        paths.into_iter().map(|path| Watched { path, seen: None, documents: Vec::new() }).collect();
    let initial = rebuild(&mut files, &state).unwrap_or_default();
    let (tx, rx) = watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                event = next(&mut wake) => match event {
                    Some(Ok(())) => {}
                    // A failed or ended stream would wake this loop at once forever: the poll carries on alone.
                    stopped => {
                        debug!(error = ?stopped.and_then(Result::err), "inotify stopped, polling only");
                        wake = None;
                    }
                },
            }
            if let Some(catalog) = rebuild(&mut files, &state) {
                if tx.send(Arc::new(catalog)).is_err() {
                    return; // the agent is shutting down
                }
            }
        }
    });
    rx
}

/// Events in the files' directories (a file replaced by rename is a new inode, so the directory is what to watch).
/// `None` where inotify is unavailable: polling alone then sees every change.
fn notifications(paths: &[PathBuf]) -> Option<EventStream<Vec<u8>>> {
    let inotify = Inotify::init().map_err(|e| debug!(error = %e, "no inotify, polling only")).ok()?;
    let mask = WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE;
    for path in paths {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if let Err(e) = inotify.watches().add(dir, mask) {
            debug!(dir = %dir.display(), error = %e, "cannot watch, polling only");
        }
    }
    inotify.into_event_stream(vec![0; 4096]).map_err(|e| debug!(error = %e, "no inotify, polling only")).ok()
}

/// The next directory event; pending forever without inotify.
async fn next(wake: &mut Option<EventStream<Vec<u8>>>) -> Option<std::io::Result<()>> {
    match wake {
        Some(events) => events.next().await.map(|e| e.map(drop)),
        None => std::future::pending().await,
    }
}

/// A new catalog when some file changed and the whole set still makes a valid catalog.
fn rebuild(files: &mut [Watched], state: &SourceState) -> Option<Catalog> {
    let changed = files.iter_mut().fold(false, |changed, f| f.refresh(state) | changed);
    if !changed && state.files_synced() {
        return None;
    }
    let parts = files.iter().flat_map(|f| f.documents.iter().map(|(_, objects)| objects.as_ref()));
    match manifest::join(parts) {
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

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
    const DB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {ports: [{port: 5432}]}\n";

    fn write(path: &Path, docs: &[&str]) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, docs.join("---\n")).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn an_edit_reparses_only_the_documents_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.yaml");
        write(&path, &[WEB, DB]);
        let state = SourceState::default();
        let mut files = [Watched { path: path.clone(), seen: None, documents: Vec::new() }];
        assert!(rebuild(&mut files, &state).is_some());
        let web = Arc::clone(&files[0].documents[0].1);

        let edited = DB.replace("5432", "5433");
        write(&path, &[WEB, &edited]);
        let catalog = rebuild(&mut files, &state).unwrap();
        assert!(Arc::ptr_eq(&web, &files[0].documents[0].1), "the unchanged document was not parsed again");
        let ports: Vec<u16> = catalog.services.values().map(|s| s.ports[0].port).collect();
        assert_eq!(ports, [5433, 80], "db then web, the edit in force");
        write(&path, &[WEB, &edited]);
        assert!(rebuild(&mut files, &state).is_none(), "the same documents again: nothing to apply");

        // A bad edit keeps the last good documents, and says where the error is.
        write(&path, &[WEB, "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {ports: [{port: x}]}\n"]);
        assert!(rebuild(&mut files, &state).is_none());
        assert!(Arc::ptr_eq(&web, &files[0].documents[0].1));
        let error = state.status().last_error.unwrap();
        assert!(error.contains("catalog.yaml") && error.contains("line 9"), "{error}");
        // Back to the last good documents: the error goes.
        write(&path, &[WEB, &edited]);
        assert!(rebuild(&mut files, &state).is_some());
        assert!(!state.has_error());
    }

    #[tokio::test]
    async fn a_write_to_the_files_directory_wakes_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.yaml");
        let Some(wake) = notifications(std::slice::from_ref(&path)) else {
            eprintln!("SKIPPED: inotify is unavailable here, the source polls only");
            return;
        };
        let mut wake = Some(wake);
        write(&path, &[WEB]);
        let event = tokio::time::timeout(Duration::from_secs(5), next(&mut wake)).await.expect("an event");
        assert!(matches!(event, Some(Ok(()))), "{event:?}");
    }
}
