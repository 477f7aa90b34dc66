//! The CLI's side of the admin API: one HTTP/1.0 GET on loopback, small enough not to need an HTTP client crate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;

const TIMEOUT: Duration = Duration::from_secs(5);

/// GETs `path` from the agent at `admin` and parses the JSON body.
pub fn get_json<T: DeserializeOwned>(admin: SocketAddr, path: &str) -> Result<T> {
    let body = get(admin, path)?;
    serde_json::from_str(&body).with_context(|| format!("agent at {admin} sent an unexpected answer to {path}"))
}

pub fn get(admin: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&admin, TIMEOUT).map_err(|e| {
        anyhow!("cannot reach the agent's admin API at {admin}: {e} (is `mesh-agent run` running? see --admin)")
    })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response).with_context(|| format!("reading the agent's answer to {path}"))?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| anyhow!("malformed HTTP answer from {admin}"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        bail!("agent at {admin} answered {path} with {status}: {}", body.trim());
    }
    Ok(body.to_owned())
}
