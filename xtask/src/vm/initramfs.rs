//! What a guest boots into: busybox as PID 1's shell ([`INIT`]), the agent and the test binaries (at the paths
//! they have here, since the integration tests find the agent through the compile-time `CARGO_BIN_EXE_mesh-agent`),
//! the tools the tests run (iproute2's `ip`, `bpftool`, `python3` with its standard library), every shared
//! library they load (from `ldd`), and the kernel's own modules the tests need (`veth`, `tun`) with their
//! dependencies.
//!
//! Host files land at their canonical directory under their own name (`/lib/x86_64-linux-gnu/libc.so.6` becomes
//! `/usr/lib/x86_64-linux-gnu/libc.so.6` on a merged-/usr host), and the host's `/bin`, `/lib`... symlinks are
//! recreated, so the dynamic loader finds the libraries where it looks without a cache.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::cpio::Archive;
use super::kernel::Unpacked;
use crate::cmd;

/// PID 1 of every guest.
pub const INIT: &str = include_str!("init.sh");

/// Kernel modules the tests need when the kernel has them as modules: veth for the test topologies, tun for edge0.
/// (cls_bpf is not needed: the data path under test uses cgroup hooks only.)
const MODULES: &[&str] = &["veth", "tun"];

/// Top-level directories of the standard library that no test imports (tests, GUIs, packaging, build files).
const PYTHON_SKIP: &[&str] = &[
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "distutils",
    "site-packages",
    "dist-packages",
    "__phello__",
];

/// The kernel modules of a guest: the files to load, dependencies first, and the wanted ones built in.
pub struct Modules {
    pub load: Vec<(String, PathBuf)>,
    pub builtin: Vec<String>,
}

impl Modules {
    pub fn loaded(&self) -> Vec<String> {
        self.load.iter().map(|(name, _)| name.clone()).collect()
    }
}

/// Where a file comes from.
enum Source {
    Host(PathBuf),
    Data(Vec<u8>),
}

/// The files of every guest, resolved on the host once; [`Payload::write`] adds a kernel's modules.
#[derive(Default)]
pub struct Payload {
    files: BTreeMap<String, (Source, u32)>,
    symlinks: BTreeMap<String, String>,
    dirs: BTreeSet<String>,
    /// Files whose shared libraries are still to be resolved.
    elves: Vec<PathBuf>,
    /// Shared libraries already resolved.
    resolved: BTreeSet<PathBuf>,
}

impl Payload {
    /// Copies host `/bin`, `/sbin`, `/lib*` symlinks (merged /usr) so binaries and the loader find each other.
    pub fn new() -> Result<Self> {
        let mut p = Self::default();
        for top in ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] {
            if let Ok(target) = fs::read_link(top) {
                p.symlinks.insert(top.into(), target.to_string_lossy().into_owned());
            }
        }
        for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/etc", "/vm"] {
            p.dirs.insert(dir.into());
        }
        p.data("/etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n");
        p.data("/etc/group", 0o644, "root:x:0:\n");
        p.data("/etc/hosts", 0o644, "127.0.0.1 localhost\n::1 localhost\n");
        p.data("/init", 0o755, INIT);
        Ok(p)
    }

    pub fn data(&mut self, guest: &str, mode: u32, text: &str) {
        self.files.insert(guest.into(), (Source::Data(text.as_bytes().to_vec()), mode));
    }

    pub fn symlink(&mut self, guest: &str, target: &str) {
        self.symlinks.insert(guest.into(), target.into());
    }

    pub fn dir(&mut self, guest: &str) {
        self.dirs.insert(guest.into());
    }

    /// A host program (found on PATH unless absolute) at its canonical place, with its libraries.
    pub fn program(&mut self, name: &str) -> Result<String> {
        let host = if name.starts_with('/') { PathBuf::from(name) } else { which(name)? };
        let guest = guest_path(&host)?;
        self.host_file(&guest, &host)?;
        Ok(guest)
    }

    /// The host file `host` at `guest`, with its libraries when it is an ELF file.
    pub fn host_file(&mut self, guest: &str, host: &Path) -> Result<()> {
        let mode = fs::metadata(host).with_context(|| host.display().to_string())?.permissions().mode() & 0o7777;
        self.files.insert(guest.into(), (Source::Host(host.to_owned()), mode));
        if is_elf(host) {
            self.elves.push(host.to_owned());
        }
        Ok(())
    }

    /// `binary` with its debug information stripped into `scratch` (the guest needs a fraction of the size in
    /// RAM), at `guest`; its libraries are read from the original.
    pub fn stripped(&mut self, guest: &str, binary: &Path, scratch: &Path) -> Result<()> {
        let out = scratch.join(guest.trim_start_matches('/').replace('/', "_"));
        cmd::output(Command::new("objcopy").arg("--strip-debug").arg(binary).arg(&out))?;
        self.elves.push(binary.to_owned());
        let mode = fs::metadata(binary)?.permissions().mode() & 0o7777;
        self.files.insert(guest.into(), (Source::Host(out), mode));
        Ok(())
    }

    /// The python3 of Debian's package and its standard library (without its tests, GUIs and build files); C
    /// extension modules whose libraries are missing here are left out.
    pub fn python(&mut self) -> Result<()> {
        let python = "/usr/bin/python3";
        let stdlib =
            cmd::output(Command::new(python).args(["-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"]))?;
        self.program(python)?;
        let stdlib = PathBuf::from(stdlib.trim());
        let mut stack = vec![stdlib.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
                let path = entry?.path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let meta = fs::metadata(&path);
                if meta.as_ref().is_ok_and(|m| m.is_dir()) {
                    let top = dir == stdlib;
                    if !(top && (PYTHON_SKIP.contains(&name.as_str()) || name.starts_with("config-"))) {
                        stack.push(path);
                    }
                } else if meta.is_ok_and(|m| m.is_file()) {
                    if name.ends_with(".so") && ldd(&path).is_err() {
                        continue;
                    }
                    self.host_file(&path.to_string_lossy(), &path)?;
                }
            }
        }
        Ok(())
    }

    /// Resolves the shared libraries of every ELF file added so far.
    pub fn resolve_libraries(&mut self) -> Result<()> {
        while let Some(elf) = self.elves.pop() {
            for lib in ldd(&elf)? {
                if self.resolved.insert(lib.clone()) {
                    let guest = guest_path(&lib)?;
                    let mode = fs::metadata(&lib)?.permissions().mode() & 0o7777;
                    self.files.insert(guest, (Source::Host(lib.clone()), mode));
                    self.elves.push(lib);
                }
            }
        }
        Ok(())
    }

    /// The initramfs for `kernel`: everything here plus the kernel's modules, listed in /vm/modules for init.
    pub fn write(&self, path: &Path, kernel: &Unpacked) -> Result<Modules> {
        assert!(self.elves.is_empty(), "resolve_libraries first");
        let modules = modules(&kernel.modules, MODULES)?;
        let mut a = Archive::create(path)?;
        a.char_device("/dev/console", 0o600, 5, 1)?;
        for dir in &self.dirs {
            a.dir(dir)?;
        }
        for (link, target) in &self.symlinks {
            a.symlink(link, target)?;
        }
        let mut list = String::new();
        for (name, ko) in &modules.load {
            let guest = format!("/vm/modules.d/{name}.ko");
            a.file(&guest, 0o644, &fs::read(ko)?)?;
            list.push_str(&format!("{name} {guest}\n"));
        }
        a.file("/vm/modules", 0o644, list.as_bytes())?;
        for (guest, (source, mode)) in &self.files {
            match source {
                Source::Data(data) => a.file(guest, *mode, data)?,
                Source::Host(host) => {
                    a.file(guest, *mode, &fs::read(host).with_context(|| host.display().to_string())?)?
                }
            }
        }
        a.finish()?;
        Ok(modules)
    }
}

fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file() && !p.to_string_lossy().contains("/shims/"))
        .with_context(|| format!("{name} is not installed (not on PATH)"))
}

/// The canonical directory of `host` with its own file name (a library's soname link keeps its name).
fn guest_path(host: &Path) -> Result<String> {
    let parent = host.parent().context("a file at /")?;
    let dir = fs::canonicalize(parent).with_context(|| parent.display().to_string())?;
    Ok(dir.join(host.file_name().unwrap()).to_string_lossy().into_owned())
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"\x7fELF"
}

/// The shared libraries and the loader `elf` needs, as `ldd` resolves them here; none for a static binary.
fn ldd(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(elf).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable") || text.contains("statically") {
            return Ok(Vec::new());
        }
        bail!("ldd {}: {}", elf.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        let path = match line.split_once("=>") {
            Some((name, rest)) => match rest.split_whitespace().next() {
                Some(p) if p.starts_with('/') => p,
                _ if line.contains("not found") => bail!("{}: {} not found", elf.display(), name.trim()),
                _ => continue,
            },
            None => match line.split_whitespace().next() {
                Some(p) if p.starts_with('/') => p,
                _ => continue,
            },
        };
        libs.push(PathBuf::from(path));
    }
    Ok(libs)
}

/// The module files to load for `wanted`, dependencies first, and the wanted ones built into the kernel.
fn modules(dir: &Path, wanted: &[&str]) -> Result<Modules> {
    let norm = |s: &str| s.replace('-', "_");
    let builtin_list = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin_list
        .lines()
        .filter_map(|l| Path::new(l).file_name())
        .map(|f| norm(f.to_string_lossy().trim_end_matches(".ko")))
        .collect();
    let mut index = BTreeMap::new();
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| d.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|f| f.to_str()) {
                if let Some(stem) = name.strip_suffix(".ko") {
                    index.insert(norm(stem), path.clone());
                } else if name.contains(".ko.") {
                    bail!("{}: compressed modules are not supported yet", path.display());
                }
            }
        }
    }
    let mut order = Vec::new();
    let mut built_in = Vec::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<bool> {
        if builtin.contains(name) || order.iter().any(|(n, _)| n == name) {
            return Ok(false);
        }
        if depth > 32 {
            bail!("module dependency loop at {name}");
        }
        let path = index.get(name).with_context(|| format!("the kernel has no module {name}"))?;
        for dep in modinfo_depends(path)? {
            visit(&dep.replace('-', "_"), index, builtin, order, depth + 1)?;
        }
        order.push((name.to_owned(), path.clone()));
        Ok(true)
    }
    for want in wanted {
        let name = norm(want);
        if builtin.contains(&name) {
            built_in.push(name);
        } else {
            visit(&name, &index, &builtin, &mut order, 0)?;
        }
    }
    Ok(Modules { load: order, builtin: built_in })
}

/// The `depends=` of a module's `.modinfo` section (what depmod reads).
fn modinfo_depends(ko: &Path) -> Result<Vec<String>> {
    let elf = fs::read(ko)?;
    let bad = || anyhow::anyhow!("{}: not an ELF64 module", ko.display());
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize).ok_or_else(bad);
    let u32_at =
        |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize).ok_or_else(bad);
    let u64_at =
        |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize).ok_or_else(bad);
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return Err(bad());
    }
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    let section = |i: usize| -> Result<(usize, usize, usize)> {
        let h = shoff + i * shentsize;
        Ok((u32_at(h)?, u64_at(h + 0x18)?, u64_at(h + 0x20)?))
    };
    let (_, strtab, _) = section(shstrndx)?;
    for i in 0..shnum {
        let (name, offset, size) = section(i)?;
        let name_bytes = elf.get(strtab + name..).ok_or_else(bad)?;
        let name = &name_bytes[..name_bytes.iter().position(|&b| b == 0).ok_or_else(bad)?];
        if name == b".modinfo" {
            let info = elf.get(offset..offset + size).ok_or_else(bad)?;
            let depends = info
                .split(|&b| b == 0)
                .find_map(|s| s.strip_prefix(b"depends="))
                .map(|d| String::from_utf8_lossy(d).into_owned())
                .unwrap_or_default();
            return Ok(depends.split(',').filter(|d| !d.is_empty()).map(str::to_owned).collect());
        }
    }
    Ok(Vec::new())
}
