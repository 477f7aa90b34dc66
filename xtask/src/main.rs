//! `cargo xtask …`: the developer tasks of mesh-agent (DESIGN.md "Workspace").

mod bench;
mod build_ebpf;
mod cmd;
mod fuzz;
mod run;
mod setup;
mod soak;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "mesh-agent developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, nightly + rust-src, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF programs (mesh-ebpf) alone with nightly for bpfel-unknown-none.
    BuildEbpf,
    /// Build the agent and run it on a demo catalog with two local HTTP backends.
    Run {
        /// Extra arguments for `mesh-agent run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// fmt + clippy, then build and test the workspace: `cargo xtask test [CARGO TEST ARGS] [-- HARNESS ARGS]`.
    Test {
        /// Skip the kernel matrix (`test-vm`) that runs after the host's tests. Give it before other arguments.
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for `cargo test`, e.g. a test name filter or `-p mesh-agent`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every fuzz target under fuzz/ for a bounded time each.
    Fuzz {
        /// Seconds per target.
        #[arg(default_value_t = 60)]
        seconds: u64,
    },
    /// Compare direct, iptables DNAT, haproxy and the agent's datapaths side by side.
    Bench(bench::Args),
    /// Run the release agent for a long while under mixed load; fail if its memory or descriptors grow.
    Soak(soak::Args),
    /// Run the eBPF data path's tests in QEMU guests on Debian's 5.10 and 6.1 kernels (the kernel matrix).
    TestVm(vm::Args),
}

/// Splits the command line at its first `--`. clap would drop a `--` that comes right after the subcommand, and
/// `cargo xtask test -- --nocapture` must mean what `cargo test -- --nocapture` means.
fn split_at_dashes(mut argv: Vec<String>) -> (Vec<String>, Vec<String>) {
    match argv.iter().position(|a| a == "--") {
        Some(i) => {
            let after = argv.split_off(i + 1);
            argv.pop();
            (argv, after)
        }
        None => (argv, Vec::new()),
    }
}

fn main() {
    let (argv, after) = split_at_dashes(std::env::args().collect());
    let cli = Cli::parse_from(argv);
    let passes_args = matches!(cli.task, Task::Run { .. } | Task::Test { .. });
    if !passes_args && !after.is_empty() {
        eprintln!("xtask: error: unexpected arguments after `--`: {}", after.join(" "));
        std::process::exit(2);
    }
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf::run(),
        Task::Run { mut args } => {
            args.extend(after);
            run::run(&args)
        }
        Task::Test { no_vm, args } => test::run(&args, &after, !no_vm),
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::Bench(args) => bench::run(&args),
        Task::Soak(args) => soak::run(&args),
        Task::TestVm(args) => vm::run(&args),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        let code = err.downcast_ref::<cmd::Failed>().and_then(|f| f.code).unwrap_or(1);
        std::process::exit(code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> (Vec<String>, Vec<String>) {
        let (argv, after) = split_at_dashes(argv.iter().map(|a| a.to_string()).collect());
        match Cli::try_parse_from(argv).unwrap().task {
            Task::Test { args, .. } | Task::Run { args } => (args, after),
            _ => unreachable!(),
        }
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    /// `cargo xtask test NAME -- --nocapture` must mean what `cargo test NAME -- --nocapture` means.
    #[test]
    fn test_args_pass_through() {
        assert_eq!(parse(&["xtask", "test"]), (strings(&[]), strings(&[])));
        assert_eq!(
            parse(&["xtask", "test", "cfg", "--", "--nocapture"]),
            (strings(&["cfg"]), strings(&["--nocapture"]))
        );
        assert_eq!(parse(&["xtask", "test", "-p", "mesh-agent"]), (strings(&["-p", "mesh-agent"]), strings(&[])));
        assert_eq!(parse(&["xtask", "test", "--", "--nocapture"]), (strings(&[]), strings(&["--nocapture"])));
        assert_eq!(parse(&["xtask", "test", "--no-vm", "cfg"]), (strings(&["cfg"]), strings(&[])));
        let cli = Cli::try_parse_from(["xtask", "test", "--no-vm", "cfg"]).unwrap();
        assert!(matches!(cli.task, Task::Test { no_vm: true, .. }));
    }

    #[test]
    fn run_args_pass_through() {
        assert_eq!(
            parse(&["xtask", "run", "--", "--log-format", "json"]),
            (strings(&[]), strings(&["--log-format", "json"]))
        );
        assert_eq!(
            parse(&["xtask", "run", "--log-format", "json"]),
            (strings(&["--log-format", "json"]), strings(&[]))
        );
    }
}
