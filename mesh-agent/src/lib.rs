//! mesh-agent: Kubernetes-style services for the apps of one edge node.
//!
//! `cli` parses the command; `agent::run` starts the daemon: catalog sources → `reconcile` → `ipam`, `device`
//! (edge0), `datapath` → `view` → `admin` API. The other commands ask a running agent over its admin API.

pub mod admin;
pub mod agent;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod device;
pub mod dns;
pub mod health;
pub mod ipam;
pub mod lb;
pub mod metrics;
pub mod reconcile;
pub mod render;
pub mod sources;
pub mod state_file;
pub mod view;
