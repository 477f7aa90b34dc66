//! The admin HTTP API (`admin.listen`, loopback by default) and its client used by the CLI.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::catalog::SourceStatus;
use crate::datapath::DatapathStatus;

/// `/api/v1/status`: what `mesh-agent status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub version: String,
    pub node_name: String,
    pub ready: bool,
    pub catalog: SourceStatus,
    pub services: usize,
    /// Catalog snapshots applied so far, and how long the last one took to reach IPAM, edge0 and the data path.
    #[serde(default)]
    pub applies: u64,
    #[serde(default)]
    pub last_apply_seconds: f64,
    pub datapath: Option<DatapathStatus>,
}
