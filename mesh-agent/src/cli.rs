//! The command line: `run` starts the agent; the other commands are clients of a running agent's admin API.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "mesh-agent", version, about = "Edge service mesh data plane: service VIPs, DNS and load balancing")]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (embedded default config unless --config is given).
    Run {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Extra catalog files, added to `catalog.files`.
        #[arg(long)]
        catalog: Vec<PathBuf>,
    },
    /// Validate a config file and exit: non-zero with the file, field and reason when it is bad.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List the services the agent serves.
    Services {
        #[arg(long, default_value = "127.0.0.1:9099", env = "MESH_AGENT_ADMIN")]
        admin: SocketAddr,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// List the endpoints of one service (`NAME` or `NAMESPACE/NAME`; the namespace defaults to `default`).
    Endpoints {
        service: String,
        #[arg(long, default_value = "127.0.0.1:9099", env = "MESH_AGENT_ADMIN")]
        admin: SocketAddr,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show the agent's state: data path mode and why, catalog state, counts.
    Status {
        #[arg(long, default_value = "127.0.0.1:9099", env = "MESH_AGENT_ADMIN")]
        admin: SocketAddr,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print the version.
    Version,
}
