//! Builds the kernel programs (`mesh-ebpf`) with nightly for the BPF target through aya-build and leaves the
//! object in `OUT_DIR/mesh-ebpf`, which `datapath::ebpf` embeds. A machine without the BPF toolchain still
//! builds the agent: the object is then empty and the agent runs its userspace data path only.

use std::path::Path;
use std::process::Command;
use std::{env, fs};

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let manifest_dir = env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../mesh-ebpf").canonicalize().context("finding mesh-ebpf")?;
    let object = Path::new(&env::var("OUT_DIR")?).join("mesh-ebpf");
    // aya-build reruns us when mesh-ebpf changes; the shared types live elsewhere.
    println!("cargo:rerun-if-changed=../mesh-common/src");
    println!("cargo:rerun-if-env-changed=PATH");
    // Installing bpf-linker later touches this directory, so the next build picks the toolchain up.
    if let Some(home) =
        env::var_os("CARGO_HOME").or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into()))
    {
        println!("cargo:rerun-if-changed={}", Path::new(&home).join("bin").display());
    }
    // Written first: aya-build leaves no file when AYA_BUILD_SKIP is set.
    fs::write(&object, [])?;
    if let Some(missing) = missing_toolchain() {
        println!(
            "cargo:warning=eBPF programs not built ({missing}); this mesh-agent runs the userspace data path only. \
             Install the toolchain with `cargo xtask setup`."
        );
        return Ok(());
    }
    // aya-build runs `cargo build --package mesh-ebpf` in the current directory, and mesh-ebpf is outside the
    // workspace (it targets BPF on nightly), so run it from mesh-ebpf's own directory.
    env::set_current_dir(&ebpf_dir)?;
    // aya-build turns every line the inner cargo prints into a warning; keep it to compiler diagnostics.
    env::set_var("CARGO_TERM_QUIET", "true");
    let root_dir = ebpf_dir.to_str().context("mesh-ebpf path is not UTF-8")?;
    let package = aya_build::Package { name: "mesh-ebpf", root_dir, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

/// What of the BPF toolchain is missing, if anything: bpf-linker, nightly, or nightly's rust-src.
fn missing_toolchain() -> Option<String> {
    let runs = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if !runs(Command::new("bpf-linker").arg("--version")) {
        return Some("no bpf-linker on PATH".into());
    }
    let sysroot = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output();
    let Some(sysroot) = sysroot.ok().filter(|o| o.status.success()) else {
        return Some("no nightly toolchain (rustup run nightly)".into());
    };
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if !Path::new(&sysroot).join("lib/rustlib/src/rust/library/core").is_dir() {
        return Some("nightly lacks rust-src".into());
    }
    None
}
