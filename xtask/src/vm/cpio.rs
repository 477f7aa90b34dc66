//! An uncompressed initramfs: the cpio "newc" format the kernel unpacks into its rootfs. Written directly (no
//! staging tree to copy into) and left uncompressed, since decompressing under TCG costs more than QEMU reading
//! a bigger file.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

pub struct Archive {
    out: BufWriter<File>,
    next_ino: u32,
    /// Every path written so far: parents are created once, duplicates are skipped.
    written: BTreeSet<String>,
}

impl Archive {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self { out: BufWriter::with_capacity(1 << 20, File::create(path)?), next_ino: 1, written: BTreeSet::new() })
    }

    /// A directory (and its parents).
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = path.trim_end_matches('/');
        if path.is_empty() || self.written.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.entry(path, S_IFDIR | 0o755, (0, 0), b"")
    }

    /// A regular file with `data`; a path written before is kept as it was.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        if self.written.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.entry(path, S_IFREG | (mode & 0o7777), (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        if self.written.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFCHR | mode, (major, minor), b"")
    }

    pub fn finish(mut self) -> io::Result<()> {
        self.header("TRAILER!!!", 0, 0, (0, 0), 1)?;
        self.out.flush()
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !parent.is_empty() {
                self.dir(parent)?;
            }
        }
        Ok(())
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        assert!(path.starts_with('/'), "initramfs paths are absolute: {path}");
        self.written.insert(path.to_owned());
        let ino = self.next_ino;
        self.next_ino += 1;
        // The kernel wants names relative to the root.
        self.header(&path[1..], mode, data.len(), rdev, ino)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32), ino: u32) -> io::Result<()> {
        let size = u32::try_from(size).map_err(|_| io::Error::other(format!("{name}: over 4 GiB")))?;
        let nlink = if mode & 0o170_000 == S_IFDIR { 2 } else { 1 };
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + name.len() + 1)
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let pad = (4 - len % 4) % 4;
        self.out.write_all(&[0; 3][..pad])
    }
}
