//! Files under `stateDir`: written atomically (temp file + rename) and private (0700 dir, 0600 files), so a crash
//! mid-write never leaves a torn file and other users cannot read the node's state.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::error;

/// Creates `dir` (0700) if missing.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("{}: cannot create state directory", dir.display()))
}

/// The parsed file, or the default when it does not exist. A file that does not parse is renamed to
/// `NAME.corrupt` and reported: the agent starts from scratch rather than not at all.
pub fn read_json_or_set_aside<T: DeserializeOwned + Default>(path: &Path) -> T {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return T::default(),
        Err(e) => {
            error!(file = %path.display(), "cannot read state file, starting without it: {e}");
            return T::default();
        }
    };
    match serde_json::from_str(&text) {
        Ok(value) => value,
        Err(e) => {
            let aside = PathBuf::from(format!("{}.corrupt", path.display()));
            error!(file = %path.display(), moved_to = %aside.display(), "corrupt state file, starting without it: {e}");
            let _ = std::fs::rename(path, &aside);
            T::default()
        }
    }
}

/// Writes `value` as JSON to `path` atomically, creating the directory if needed.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    ensure_dir(dir)?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("state")));
    let body = serde_json::to_vec_pretty(value)?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("{}: cannot write", path.display()))
}
