//! `cargo xtask bench`: phase 2.

use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: &Args) -> Result<()> {
    bail!("bench: not written yet")
}
