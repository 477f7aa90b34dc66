//! `cargo xtask setup`: provisions a fresh Debian machine for building and testing, idempotently. Each step says
//! what it checks and skips when the thing is already there (DESIGN.md "Toolchain facts").

use std::process::Command;

use anyhow::{bail, Result};

use crate::cmd;

/// Debian packages the build and the tests need.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker 0.13 links against LLVM 22.
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    // Clients and tools the integration tests drive: namespaces, HTTP, DNS, the DNAT comparison, BPF inspection.
    "iproute2",
    "curl",
    "dnsutils",
    "iptables",
    "bpftool",
    // DNS tests: an upstream resolver inside the test namespace; eBPF tests: socket clients in a child cgroup.
    "dnsmasq-base",
    "python3",
];

const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

pub fn run() -> Result<()> {
    apt_install("setup", APT_PACKAGES)?;
    nightly()?;
    bpf_linker()?;
    println!("setup: done");
    Ok(())
}

pub fn dpkg_installed(package: &str) -> bool {
    // `dpkg -s` also succeeds for removed packages whose config files remain; the status field tells them apart.
    cmd::probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.trim() == "install ok installed")
}

/// Installs the missing ones of `packages`, running `apt-get update` first only when something is missing
/// (a fresh machine's package lists do not know llvm-22-dev yet).
pub fn apt_install(step: &str, packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        println!("{step}: apt packages already installed, skipping: {}", packages.join(" "));
        return Ok(());
    }
    println!("{step}: installing missing apt packages: {}", missing.join(" "));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("installing packages needs root; run as root or install them yourself: {}", missing.join(" "));
    }
    cmd::run(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    cmd::run(
        Command::new("apt-get").args(["install", "-y", "-q"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn nightly() -> Result<()> {
    let toolchains = cmd::output(Command::new("rustup").args(["toolchain", "list"]))?;
    if toolchains.lines().any(|l| l.starts_with("nightly-")) {
        println!("setup: nightly toolchain present, skipping");
    } else {
        println!("setup: installing the nightly toolchain (the eBPF programs need -Z build-std)");
        cmd::run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let components =
        cmd::output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if components.lines().any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-")) {
        println!("setup: rust-src for nightly present, skipping");
        Ok(())
    } else {
        println!("setup: adding rust-src to nightly (build-std=core compiles core from it)");
        cmd::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
    }
}

fn bpf_linker() -> Result<()> {
    match bpf_linker_state() {
        Linker::Good(version) => {
            println!("setup: {version} (LLVM 22) present, skipping");
            return Ok(());
        }
        Linker::Missing => println!("setup: installing bpf-linker 0.13 built against LLVM 22"),
        Linker::Wrong(why) => println!("setup: reinstalling bpf-linker 0.13 with LLVM 22 ({why})"),
    }
    // llvm-sys finds LLVM through llvm-config, which Debian keeps in the versioned directory.
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    cmd::run(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", "~0.13", "--locked", "--force"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path),
    )
}

enum Linker {
    Missing,
    Good(String),
    Wrong(String),
}

fn bpf_linker_state() -> Linker {
    let Some(version) = cmd::probe(Command::new("bpf-linker").arg("--version")) else {
        return Linker::Missing;
    };
    let version = version.trim().to_owned();
    if !version.starts_with("bpf-linker 0.13.") {
        return Linker::Wrong(format!("found {version}"));
    }
    // A dynamically linked bpf-linker names its libLLVM; a static one (none listed) is taken as built right.
    let exe = cmd::probe(Command::new("sh").args(["-c", "command -v bpf-linker"])).unwrap_or_default();
    let libs = cmd::probe(Command::new("ldd").arg(exe.trim())).unwrap_or_default();
    match libs.lines().find(|l| l.contains("libLLVM")) {
        Some(lib) if !lib.contains("libLLVM.so.22") => Linker::Wrong(format!("linked to {}", lib.trim())),
        _ => Linker::Good(version),
    }
}
