//! `cargo xtask test-vm [--kernel 5.10|6.1|all]`: the kernel matrix (issue 7). The eBPF data path's tests run
//! inside QEMU/TCG guests booted on Debian's own kernels, so a program this machine's verifier accepts but an
//! older one rejects, or a hook an older kernel lacks, fails here instead of on a user's node.
//!
//! Per kernel: fetch and cache the package ([`kernel`]), build an initramfs with the test binaries and what they
//! need ([`initramfs`]), boot it ([`guest`]): init mounts cgroup2, bpffs and /run/netns, loads veth and tun,
//! asks an agent in mode auto which hooks this kernel gets and why, runs the tests with `CI=true` (a test that
//! cannot do its real check fails), and powers off. The report says per kernel: passed or failed, each test
//! binary's result, and the agent's choice per feature.

mod cpio;
mod guest;
mod initramfs;
mod kernel;

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cmd, setup};
use guest::{Boot, Outcome};
use kernel::{Kernel, KERNELS};

/// Debian packages the guests are made of (iproute2, bpftool and python3 are the tests' own tools, copied in).
const APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "binutils", "iproute2", "bpftool", "python3"];

/// Guest size: two vCPUs as on the host, and room for the initramfs (155 MiB, unpacked into RAM) and the tests'
/// agents.
const CPUS: usize = 2;
const MEMORY_MIB: usize = 2048;

#[derive(clap::Args)]
pub struct Args {
    /// Which kernel to boot.
    #[arg(long, default_value = "all", value_parser = ["5.10", "6.1", "all"])]
    pub kernel: String,
    /// Run only the tests whose names contain this (the test binaries' own filter).
    #[arg(long)]
    pub filter: Option<String>,
    /// Seconds a guest may run before it is killed and reported as failed.
    #[arg(long, default_value_t = DEADLINE_SECONDS)]
    pub timeout: u64,
}

/// A guest's deadline: each ran in under 2 minutes here; a hung one must not eat CI's 90 minutes.
const DEADLINE_SECONDS: u64 = 900;

impl Default for Args {
    fn default() -> Self {
        Self { kernel: "all".into(), filter: None, timeout: DEADLINE_SECONDS }
    }
}

/// A test binary to run in the guests.
struct TestBinary {
    label: &'static str,
    path: PathBuf,
    args: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let kernels: Vec<&Kernel> = KERNELS.iter().filter(|k| args.kernel == "all" || args.kernel == k.name).collect();
    setup::apt_install("test-vm", APT_PACKAGES)?;
    let (agent, tests) = build(args.filter.as_deref())?;

    let cache = cmd::target_dir().join("vm");
    fs::create_dir_all(&cache)?;
    let unpacked = {
        // Concurrent runs in one checkout share the cache: one fetches at a time.
        let _lock = Lock::take(&cache.join(".lock"))?;
        kernels.iter().map(|k| kernel::fetch(k, &cache)).collect::<Result<Vec<_>>>()?
    };
    // This run's own files (stripped binaries, initramfs, result lines), removed at the end.
    let scratch = Scratch::create(cache.join(format!("run-{}", std::process::id())))?;
    let payload = payload(&agent, &tests, args, &scratch.0)?;
    let prepared = started.elapsed();
    println!("test-vm: build, kernels and guest files ready in {prepared:.0?}");

    let mut outcomes = Vec::new();
    for (k, u) in kernels.iter().zip(&unpacked) {
        let initramfs = scratch.0.join(format!("{}.cpio", k.name));
        let modules = payload.write(&initramfs, u)?;
        let size = fs::metadata(&initramfs)?.len() >> 20;
        println!(
            "test-vm: {} ({} {}): initramfs {size} MiB, modules {} (built in: {})",
            k.name,
            k.package,
            u.version,
            list(&modules.loaded()),
            list(&modules.builtin)
        );
        let boot = Boot {
            name: k.name,
            vmlinuz: &u.vmlinuz,
            initramfs: &initramfs,
            dir: &scratch.0,
            deadline: Duration::from_secs(args.timeout),
            cpus: CPUS,
            memory_mib: MEMORY_MIB,
        };
        let mut outcome = guest::boot(&boot)?;
        // The emulator's known hang (a stale translation of patched kernel text) is avoided in `guest::boot`; for
        // any other, one more boot, said in the report and kept in its console log, tells a stuck emulator from a
        // hang of ours, which comes back.
        if let Some(hang) = if outcome.passed() { None } else { outcome.kernel_hang() } {
            let first = cache.join(format!("{}-hung-console.log", k.name));
            fs::rename(&outcome.console, &first)?;
            println!(
                "test-vm: {}: the guest's kernel hung ({hang}; console log {}): booting it once more",
                k.name,
                first.display()
            );
            outcome = guest::boot(&boot)?;
            outcome.hung_before = Some(hang);
        }
        fs::remove_file(&initramfs)?;
        // The last run's console log stays for reading.
        let log = cache.join(format!("{}-console.log", k.name));
        fs::rename(&outcome.console, &log)?;
        outcome.console = log;
        println!("{}", report(k, u, &outcome));
        outcomes.push(outcome);
    }

    println!("test-vm: kernel matrix ({:.0?} in all, {prepared:.0?} of it before the first boot)", started.elapsed());
    for ((k, u), o) in kernels.iter().zip(&unpacked).zip(&outcomes) {
        let verdict = if o.passed() { "PASSED" } else { "FAILED" };
        println!("  {:<5} {:<22} {verdict} in {:.0?}: {}", k.name, u.release, o.wall, summary(o));
    }
    let failed: Vec<&str> = kernels.iter().zip(&outcomes).filter(|(_, o)| !o.passed()).map(|(k, _)| k.name).collect();
    if !failed.is_empty() {
        bail!("the eBPF data path failed on kernel {} (console logs in {})", failed.join(", "), cache.display());
    }
    Ok(())
}

/// A directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn create(dir: PathBuf) -> Result<Self> {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds the agent and the test binaries; returns the agent's path and the binaries to run.
fn build(filter: Option<&str>) -> Result<(PathBuf, Vec<TestBinary>)> {
    println!("test-vm: building the agent and the eBPF data path's test binaries");
    let mut cargo = cmd::cargo();
    // `--workspace` as `cargo xtask test` builds: the same features, so the same (already built) binaries. With
    // `-p mesh-agent` cargo would unify features differently and build the agent a second time.
    cargo.args(["test", "--workspace", "--lib", "--test", "ebpf", "--no-run"]);
    cargo.arg("--message-format=json-render-diagnostics").stderr(std::process::Stdio::inherit());
    println!("+ {}", cmd::display(&cargo));
    let out = cargo.output().context("running cargo")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let json = String::from_utf8_lossy(&out.stdout);
    let (mut agent, mut lib, mut ebpf) = (None, None, None);
    for line in json.lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact" || msg["target"]["name"].is_null() {
            continue;
        }
        let Some(exe) = msg["executable"].as_str().map(PathBuf::from) else { continue };
        let kind = &msg["target"]["kind"][0];
        match (msg["target"]["name"].as_str().unwrap_or(""), kind.as_str().unwrap_or("")) {
            ("mesh-agent", "bin") => agent = Some(exe),
            ("mesh_agent", "lib") if msg["profile"]["test"] == true => lib = Some(exe),
            ("ebpf", "test") => ebpf = Some(exe),
            _ => {}
        }
    }
    let agent = agent.context("cargo built no mesh-agent binary")?;
    let filter: Vec<String> = filter.map(|f| vec![f.to_owned()]).unwrap_or_default();
    let tests = vec![
        // The whole agent on the eBPF data path, end to end (tests/ebpf.rs).
        TestBinary { label: "ebpf", path: ebpf.context("cargo built no ebpf test")?, args: filter.clone() },
        // The loader's kernel-facing unit tests: every program variant through this kernel's verifier.
        TestBinary {
            label: "lib-ebpf",
            path: lib.context("cargo built no mesh-agent lib test")?,
            args: if filter.is_empty() { vec!["datapath::ebpf".into()] } else { filter },
        },
    ];
    Ok((agent, tests))
}

/// Everything but the kernel's modules.
fn payload(agent: &Path, tests: &[TestBinary], args: &Args, scratch: &Path) -> Result<initramfs::Payload> {
    let mut p = initramfs::Payload::new()?;
    // Placed at its canonical path; the host's /bin symlink, recreated in the guest, leads there as here. It is
    // the guest's sh too, for tests that run `sh -c`.
    let busybox = p.program("/bin/busybox")?;
    let bin = busybox.rsplit_once('/').map_or("", |(dir, _)| dir);
    p.symlink(&format!("{bin}/sh"), "busybox");
    p.program("ip")?;
    p.program("bpftool")?;
    p.python()?;
    // The test binaries find the agent at the absolute path it was built at (CARGO_BIN_EXE_mesh-agent).
    let agent_path = agent.to_string_lossy().into_owned();
    p.stripped(&agent_path, agent, scratch)?;
    let mut list = String::new();
    for t in tests {
        let guest = t.path.to_string_lossy().into_owned();
        p.stripped(&guest, &t.path, scratch)?;
        list.push_str(&format!("{} {guest} {}\n", t.label, t.args.join(" ")));
    }
    p.resolve_libraries()?;
    p.data("/vm/tests", 0o644, &list);
    // Cargo runs a test binary in its package's directory.
    let workdir = cmd::root().join("mesh-agent").to_string_lossy().into_owned();
    p.dir(&workdir);
    let test_timeout = args.timeout.saturating_sub(120).max(60);
    p.data(
        "/vm/env",
        0o644,
        &format!("AGENT={agent_path}\nWORKDIR={workdir}\nTEST_TIMEOUT={test_timeout}\nPROBE_TIMEOUT=120\n"),
    );
    p.data("/vm/probe.yaml", 0o644, PROBE_CONFIG);
    p.data("/vm/probe-catalog.yaml", 0o644, PROBE_CATALOG);
    Ok(p)
}

/// The agent that reports this kernel's choice: mode auto, so it says per feature whether eBPF serves it and why.
const PROBE_CONFIG: &str = "\
nodeName: vm
stateDir: /tmp/probe/state
dns: {enable: false}
catalog: {files: [/tmp/probe/catalog.yaml]}
dataplane: {mode: auto, cgroupPath: /sys/fs/cgroup/vm-probe}
";

const PROBE_CATALOG: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.250.0.10
  ports:
  - {name: http, port: 80, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-0, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 8080, protocol: UDP}
endpoints:
- addresses: [10.201.0.2]
  conditions: {ready: true}
  nodeName: vm
";

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// One line per kernel: each binary's counts (and failed tests), the programs the agent chose.
fn summary(o: &Outcome) -> String {
    let mut parts: Vec<String> = o
        .tests
        .iter()
        .map(|t| {
            let counts = t.results.last().map(|r| counts(r)).unwrap_or_else(|| "no result".into());
            match t.exit {
                Some(0) => format!("{} {counts}", t.label),
                Some(code) => format!("{} {counts}, exit {code} [{}]", t.label, t.failed.join(" ")),
                None => format!("{} never finished", t.label),
            }
        })
        .collect();
    if let Ok(status) = &o.probe {
        let programs: Vec<&str> =
            status["programs"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        parts.push(format!("programs {}", programs.join(" ")));
    }
    if o.timed_out {
        parts.push("killed at the deadline".into());
    }
    if let Some(hang) = &o.hung_before {
        parts.push(format!("second boot: the first hung ({hang})"));
    }
    parts.join("; ")
}

/// "test result: ok. 13 passed; 0 failed; 0 ignored; ..." → "13 passed, 0 failed".
fn counts(result: &str) -> String {
    let fields: Vec<&str> = result.split(['.', ';']).map(str::trim).collect();
    let find = |what: &str| fields.iter().find(|f| f.ends_with(what)).copied().unwrap_or("?");
    format!("{}, {}", find(" passed"), find(" failed"))
}

/// The full report of one kernel.
fn report(k: &Kernel, u: &kernel::Unpacked, o: &Outcome) -> String {
    let mut r = format!(
        "test-vm: kernel {} ({}, {} {}): {} in {:.0?}\n",
        k.name,
        o.release.as_deref().unwrap_or("did not boot"),
        k.package,
        u.version,
        if o.passed() { "PASSED" } else { "FAILED" },
        o.wall
    );
    r.push_str(&format!("  boot to init: {} s\n", o.boot_seconds.as_deref().unwrap_or("?")));
    for (name, state) in &o.modules {
        r.push_str(&format!("  module {name}: {state}\n"));
    }
    match &o.probe {
        Ok(status) => {
            r.push_str(&format!(
                "  agent (mode auto) chose {}: {}\n",
                status["mode"].as_str().unwrap_or("?"),
                status["why"].as_str().unwrap_or("")
            ));
            let programs: Vec<&str> =
                status["programs"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            r.push_str(&format!("    programs: {}\n", programs.join(", ")));
            for f in status["features"].as_array().into_iter().flatten() {
                r.push_str(&format!(
                    "    {:<12} {:<10} {}\n",
                    f["feature"].as_str().unwrap_or("?"),
                    f["implementation"].as_str().unwrap_or("?"),
                    f["why"].as_str().unwrap_or("")
                ));
            }
        }
        Err(why) => r.push_str(&format!("  agent (mode auto): {why}\n")),
    }
    for t in &o.tests {
        let state = match t.exit {
            Some(0) if t.passed() => "passed".to_owned(),
            Some(code) => format!("FAILED (exit {code})"),
            None => "FAILED (never finished)".into(),
        };
        let time = t.seconds.map(|s| format!(" in {s} s")).unwrap_or_default();
        r.push_str(&format!("  {}: {state}{time}\n", t.label));
        for line in &t.results {
            r.push_str(&format!("    {line}\n"));
        }
        for name in &t.failed {
            r.push_str(&format!("    failed: {name}\n"));
        }
    }
    if o.timed_out {
        r.push_str("  killed at the deadline\n");
    } else if !o.done {
        r.push_str("  the guest stopped before its init finished\n");
    }
    r.push_str(&format!("  console log: {}", o.console.display()));
    r
}

/// An exclusive flock(2), released on drop.
struct Lock {
    _file: File,
}

impl Lock {
    fn take(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| path.display().to_string())?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("locking {}: {}", path.display(), std::io::Error::last_os_error());
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_of_a_libtest_result() {
        let line =
            "test result: FAILED. 10 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out; finished in 37.72s";
        assert_eq!(counts(line), "10 passed, 3 failed");
        assert_eq!(counts("test result: ok. 9 passed; 0 failed; 0 ignored"), "9 passed, 0 failed");
    }
}
