//! `cargo xtask test`: the one test command (`.ci/run` calls it). Style and lints first so they fail fast, then
//! the build, then the tests with their output streamed. The environment is passed through untouched: tests
//! read `CI=true` to fail instead of skipping.

use anyhow::{Context, Result};

use crate::{cmd, fuzz, setup, soak, vm};

/// Seconds each fuzz target runs within `cargo xtask test`: long enough to catch shallow crashes, short enough for CI.
const FUZZ_SECONDS: u64 = 20;

/// The soak within `cargo xtask test`: a minute keeps its machinery working and catches a fast leak; the full
/// 10-minute run is `cargo xtask soak`.
const SOAK: std::time::Duration = std::time::Duration::from_secs(60);

/// `vm`: then the kernel matrix (`cargo xtask test-vm`), the eBPF data path's tests on Debian's 5.10 and 6.1.
pub fn run(args: &[String], harness: &[String], vm: bool) -> Result<()> {
    setup::run()?;
    step("formatting (cargo fmt --check; fix with `cargo fmt`)", &["fmt", "--all", "--check"])?;
    step("lints (cargo clippy)", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    step("build", &["build", "--workspace"])?;
    let mut test = cmd::cargo();
    test.args(["test", "--workspace"]).args(args);
    if !harness.is_empty() {
        test.arg("--").args(harness);
    }
    cmd::run(&mut test)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 || std::env::var("CI").is_ok_and(|v| v == "true") {
        soak::run(&soak::Args { duration: SOAK })?;
    } else {
        println!("test: SKIPPED the soak: it needs root for its network namespaces");
    }
    fuzz::run(FUZZ_SECONDS)?;
    if vm {
        vm::run(&vm::Args::default())?;
    }
    Ok(())
}

fn step(what: &str, args: &[&str]) -> Result<()> {
    println!("test: checking {what}");
    cmd::run(cmd::cargo().args(args)).with_context(|| format!("{what} failed"))
}
