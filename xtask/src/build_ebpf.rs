//! `cargo xtask build-ebpf`: builds the kernel-side crate alone, for work on the eBPF programs without a full
//! agent build (the agent's build.rs builds the same crate through aya-build).

use std::process::Command;

use anyhow::{bail, Result};

use crate::{cmd, setup};

pub fn run() -> Result<()> {
    let dir = cmd::root().join("mesh-ebpf");
    // Without its own manifest cargo would walk up and build the whole workspace for the BPF target.
    if !dir.join("Cargo.toml").is_file() {
        bail!("{} has no Cargo.toml yet", dir.display());
    }
    setup::run()?;
    let mut build = Command::new("cargo");
    build
        .current_dir(&dir)
        .args(["+nightly", "build", "-Z", "build-std=core", "--target", "bpfel-unknown-none", "--release"])
        // We run under stable cargo: its toolchain choice and compiler overrides must not leak into the
        // nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO");
    cmd::run(&mut build)?;
    println!("build-ebpf: object in mesh-ebpf/target/bpfel-unknown-none/release/");
    Ok(())
}
