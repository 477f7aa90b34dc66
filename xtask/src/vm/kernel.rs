//! The kernels of the matrix: Debian's cloud kernels, fetched with `apt-get download` through a private sources
//! list, lists dir and cache (the machine's own apt state is never touched) and unpacked with `dpkg -x` into
//! `target/vm/kernels/PACKAGE/`. A kernel already unpacked there is used as it is: fetching is idempotent and,
//! once done, offline.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// One kernel of the matrix.
pub struct Kernel {
    /// What `--kernel` calls it.
    pub name: &'static str,
    /// The Debian suite that carries the package.
    pub suite: &'static str,
    pub package: &'static str,
}

/// Debian's cloud kernels: 5.10 (bullseye), the oldest our users run, and 6.1 (bookworm). Both have BTF and cgroup
/// BPF; veth, tun and cls_bpf are modules of the same package.
pub const KERNELS: &[Kernel] = &[
    Kernel { name: "5.10", suite: "bullseye", package: "linux-image-5.10.0-32-cloud-amd64-unsigned" },
    Kernel { name: "6.1", suite: "bookworm", package: "linux-image-6.1.0-47-cloud-amd64-unsigned" },
];

/// A kernel unpacked on disk.
pub struct Unpacked {
    /// `uname -r` of the kernel, e.g. `5.10.0-32-cloud-amd64`.
    pub release: String,
    /// The package version, e.g. `5.10.223-1`.
    pub version: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/RELEASE` of the package.
    pub modules: PathBuf,
}

/// Written last into an unpacked kernel's directory: the package version it came from.
const DONE: &str = ".mesh-agent-unpacked";

/// The unpacked kernel, fetching and unpacking it first when the cache does not have it yet.
pub fn fetch(kernel: &Kernel, cache: &Path) -> Result<Unpacked> {
    let dir = cache.join("kernels").join(kernel.package);
    if !dir.join(DONE).exists() {
        download(kernel, cache, &dir)?;
    } else {
        println!("test-vm: kernel {} cached in {}", kernel.name, dir.display());
    }
    let version = fs::read_to_string(dir.join(DONE))?.trim().to_owned();
    let modules_root = dir.join("lib/modules");
    let release = fs::read_dir(&modules_root)
        .with_context(|| format!("{}: no lib/modules in the package", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{}: lib/modules is empty", modules_root.display()))?;
    let vmlinuz = dir.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{}: the package has no kernel image", vmlinuz.display());
    }
    Ok(Unpacked { modules: modules_root.join(&release), release, version, vmlinuz })
}

fn download(kernel: &Kernel, cache: &Path, dir: &Path) -> Result<()> {
    let apt = Apt::new(&cache.join("apt"))?;
    // The private lists are refreshed only when they do not know the package (first use, or a new kernel here).
    if apt.version(kernel.package).is_none() {
        println!("test-vm: updating the private package lists in {}", apt.dir.display());
        cmd::run(apt.command("apt-get").args(["update", "-q"]))?;
    }
    let Some(version) = apt.version(kernel.package) else {
        let pattern = "^linux-image-[0-9.]+-[0-9]+-cloud-amd64-unsigned$";
        let known = cmd::output(apt.command("apt-cache").args(["search", "--names-only", pattern])).unwrap_or_default();
        bail!(
            "Debian's {} lists have no package {}; kernel packages they have:\n{}\nupdate KERNELS in {}",
            kernel.suite,
            kernel.package,
            known.trim(),
            file!()
        );
    };
    let tmp = cache.join("kernels").join(format!(".{}.tmp-{}", kernel.package, std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    println!("test-vm: downloading {} {version} ({})", kernel.package, kernel.suite);
    cmd::run(apt.command("apt-get").args(["download", "-q", kernel.package]).current_dir(&tmp))?;
    let deb = fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let root = tmp.join("root");
    cmd::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    fs::write(root.join(DONE), format!("{version}\n"))?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(&root, dir).with_context(|| format!("moving the unpacked kernel to {}", dir.display()))?;
    fs::remove_dir_all(&tmp)?;
    Ok(())
}

/// apt with a private sources list, lists dir and cache: the bullseye and bookworm suites of the mirror the
/// machine already uses.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let mirror = mirror();
        let suites: Vec<&str> = KERNELS.iter().map(|k| k.suite).collect();
        let mut list = String::new();
        for suite in suites.iter().enumerate().filter(|(i, s)| !suites[..*i].contains(s)).map(|(_, s)| s) {
            list.push_str(&format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n"
            ));
        }
        fs::write(dir.join("sources.list"), list)?;
        Ok(Self { dir: dir.to_owned() })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let d = self.dir.display();
        for opt in [
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".into(),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            // Only the package indexes: no translations, no AppStream metadata.
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false".into(),
            // Our directories belong to root; apt's _apt sandbox user could not write the download there.
            "APT::Sandbox::User=root".into(),
        ] {
            cmd.args(["-o", &opt]);
        }
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// The candidate version of `package` in the private lists.
    fn version(&self, package: &str) -> Option<String> {
        let out = cmd::probe(self.command("apt-cache").args(["show", "--no-all-versions", package]))?;
        out.lines().find_map(|l| l.strip_prefix("Version: ")).map(|v| v.trim().to_owned())
    }
}

/// The Debian mirror of the machine's own sources (the site of a main suite's Packages index), else
/// deb.debian.org.
fn mirror() -> String {
    let targets = cmd::probe(Command::new("apt-get").args([
        "indextargets",
        "--format",
        "$(SITE) $(RELEASE)",
        "Identifier: Packages",
    ]))
    .unwrap_or_default();
    targets
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(site, release)| site.trim_end_matches('/').ends_with("/debian") && !release.contains('-'))
        .map(|(site, _)| site.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}
