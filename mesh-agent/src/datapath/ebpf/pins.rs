//! Where the pinned maps and links live: a bpffs directory per cgroup, so several agents (one per child cgroup
//! in tests) never share state, and a restarted agent finds its predecessor's.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// `/sys/fs/bpf/mesh-agent/<inode of the cgroup directory>`: unique per cgroup, stable across restarts.
pub fn default_pin_dir(cgroup: &Path) -> io::Result<PathBuf> {
    Ok(Path::new(BPFFS).join("mesh-agent").join(fs::metadata(cgroup)?.ino().to_string()))
}

/// The pin directory's layout.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// Mounts bpffs at /sys/fs/bpf when nothing is mounted there, then creates `root` (which must be on a
    /// bpffs) with its `maps` and `links` subdirectories.
    pub fn create(root: &Path) -> anyhow::Result<Self> {
        if fs_magic(Path::new(BPFFS)).ok() != Some(BPF_FS_MAGIC) {
            mount_bpffs()?;
        }
        let dir = Self { root: root.to_path_buf() };
        for sub in [dir.maps(), dir.links()] {
            fs::create_dir_all(&sub).with_context(|| format!("creating pin directory {}", sub.display()))?;
        }
        if fs_magic(root)? != BPF_FS_MAGIC {
            bail!("pin directory {} is not on a bpf filesystem", root.display());
        }
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.links().join(name)
    }

    /// Removes every pin, which detaches the links and frees the maps once no process holds them.
    pub fn remove(self) -> io::Result<()> {
        match fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Fails unless `path` is a cgroup v2 directory.
pub fn check_cgroup2(path: &Path) -> anyhow::Result<()> {
    let magic = fs_magic(path).with_context(|| format!("cgroup {}", path.display()))?;
    if magic != CGROUP2_SUPER_MAGIC {
        bail!("{} is not a cgroup v2 directory (filesystem magic {magic:#x})", path.display());
    }
    Ok(())
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid C string and an out-parameter the kernel fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

fn mount_bpffs() -> anyhow::Result<()> {
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    // SAFETY: constant C strings; no data argument.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), c"/sys/fs/bpf".as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        bail!("mounting bpffs at {BPFFS}: {e} (pinned state needs it: mount -t bpf bpf {BPFFS})");
    }
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
}
