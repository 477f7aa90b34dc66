//! `cargo xtask fuzz [SECONDS]`: runs every cargo-fuzz target under fuzz/ for a bounded time each (DNS queries,
//! catalog files, config files). `cargo xtask test` runs it briefly, so a crash the fuzzer finds fails CI; a crash
//! becomes a regression test in the module it hit.

use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd;

pub fn run(seconds: u64) -> Result<()> {
    if cmd::probe(Command::new("cargo").args(["+nightly", "fuzz", "--version"])).is_none() {
        println!("fuzz: installing cargo-fuzz");
        cmd::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    } else {
        println!("fuzz: cargo-fuzz already installed, skipping");
    }
    let dir = cmd::root().join("fuzz");
    let mut targets: Vec<String> = std::fs::read_dir(dir.join("fuzz_targets"))
        .context("reading fuzz/fuzz_targets")?
        .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(String::from))
        .collect();
    targets.sort();
    for target in targets {
        let corpus = dir.join("corpus").join(&target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        println!("fuzz: {target} for {seconds} s");
        cmd::run(
            Command::new("cargo")
                .current_dir(&dir)
                .args(["+nightly", "fuzz", "run", &target])
                .arg(&corpus)
                .arg(dir.join("seeds").join(&target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}")),
        )
        .with_context(|| format!("fuzz target {target} found a crash (see fuzz/artifacts/{target})"))?;
    }
    Ok(())
}
