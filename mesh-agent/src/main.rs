//! The `mesh-agent` binary: parses the command line and runs the agent or a client command.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use mesh_agent::cli::{Cli, Command, LogFormat};
use mesh_agent::config::Config;
use mesh_agent::{agent, render};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config, catalog } => {
            let mut config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::embedded(),
            };
            config.catalog.files.extend(catalog);
            tokio::runtime::Runtime::new()?.block_on(agent::run(config))
        }
        Command::CheckConfig { config } => {
            Config::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Services { admin, output } => render::services(admin, output),
        Command::Endpoints { service, admin, output } => render::endpoints(admin, &service, output),
        Command::Status { admin, output } => render::status(admin, output),
        Command::Version => {
            println!("mesh-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

/// Logs go to stderr; `RUST_LOG` sets levels (default: info; hickory's server logs every TCP query at info).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,hickory_server=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
