//! Running external programs. Every command is echoed before it runs so a log shows exactly what was done,
//! and a failure carries the child's exit code back to `main`.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

/// A child that ran and failed; `main` exits with its code so `cargo xtask test` fails like `cargo test` does.
#[derive(Debug)]
pub struct Failed {
    pub command: String,
    pub code: Option<i32>,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "`{}` exited with {code}", self.command),
            None => write!(f, "`{}` was killed by a signal", self.command),
        }
    }
}

impl std::error::Error for Failed {}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").to_path_buf()
}

/// The cargo that started us, so stable commands use the same toolchain as `cargo xtask`.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

pub fn display(cmd: &Command) -> String {
    let mut s = String::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            s.push_str(&format!("{}={} ", key.to_string_lossy(), value.to_string_lossy()));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(arg));
    }
    s
}

fn quote(arg: &OsStr) -> String {
    let arg = arg.to_string_lossy();
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=+,@%".contains(c)) {
        arg.into_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio, echoing it first.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("+ {line}");
    let status = cmd.status().with_context(|| format!("cannot start `{line}`"))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failed { command: line, code: status.code() }.into())
    }
}

/// Runs `cmd` quietly and returns its stdout; for probes whose failure is an answer, see [`probe`].
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd.stderr(Stdio::piped()).output().with_context(|| format!("cannot start `{line}`"))?;
    if !out.status.success() {
        anyhow::bail!("`{line}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` quietly: its stdout if it ran and succeeded, `None` otherwise (not installed, not present).
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .context("cgroup v2 is not mounted (no cgroup2 line in /proc/mounts)")
}
