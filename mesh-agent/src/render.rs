//! Client commands' output: kubectl-like tables, or JSON with `-o json`.

use std::net::SocketAddr;

use anyhow::Result;

use crate::admin::{client, Status};
use crate::cli::Output;
use crate::view::ServiceView;

pub fn services(admin: SocketAddr, output: Output) -> Result<()> {
    let services: Vec<ServiceView> = client::get_json(admin, "/api/v1/services")?;
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&services)?);
        return Ok(());
    }
    let rows: Vec<[String; 5]> = services
        .iter()
        .map(|s| {
            let vip = match (s.vip, s.headless) {
                (Some(ip), _) => ip.to_string(),
                (None, true) => "None".into(),
                (None, false) => "<pending>".into(),
            };
            let ports: Vec<String> = s.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect();
            let ready = s.endpoints.iter().filter(|e| e.ready).count();
            [
                s.namespace.clone(),
                s.name.clone(),
                vip,
                if ports.is_empty() { "<none>".into() } else { ports.join(",") },
                format!("{ready}/{}", s.endpoints.len()),
            ]
        })
        .collect();
    print_table(["NAMESPACE", "NAME", "VIP", "PORT(S)", "READY"], &rows);
    Ok(())
}

pub fn endpoints(admin: SocketAddr, service: &str, output: Output) -> Result<()> {
    let (namespace, name) = service.split_once('/').unwrap_or(("default", service));
    let services: Vec<ServiceView> = client::get_json(admin, "/api/v1/services")?;
    let Some(svc) = services.into_iter().find(|s| s.namespace == namespace && s.name == name) else {
        anyhow::bail!("service {namespace}/{name} is not in the agent's catalog");
    };
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&svc.endpoints)?);
        return Ok(());
    }
    let rows: Vec<[String; 5]> = svc
        .endpoints
        .iter()
        .map(|e| {
            let ports: Vec<String> = e.ports.iter().map(u16::to_string).collect();
            [
                e.ip.to_string(),
                if ports.is_empty() { "<none>".into() } else { ports.join(",") },
                e.node.clone().unwrap_or_else(|| "<none>".into()),
                e.hostname.clone().unwrap_or_else(|| "<none>".into()),
                e.ready.to_string(),
            ]
        })
        .collect();
    print_table(["IP", "PORT(S)", "NODE", "HOSTNAME", "READY"], &rows);
    Ok(())
}

pub fn status(admin: SocketAddr, output: Output) -> Result<()> {
    let status: Status = client::get_json(admin, "/api/v1/status")?;
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!("node:      {}", status.node_name);
    println!("version:   {}", status.version);
    println!("ready:     {}", status.ready);
    let catalog = match (&status.catalog.last_error, status.catalog.synced) {
        (Some(e), _) => format!("error: {e}"),
        (None, true) => "synced".into(),
        (None, false) => "never synced".into(),
    };
    println!("catalog:   {catalog}");
    if let Some(k) = &status.catalog.kubernetes {
        let since = |t: Option<u64>| t.map(|t| format!(" since {t} (unix time)")).unwrap_or_default();
        let detail = match k.state.as_str() {
            "stale" => format!("stale{}{}", since(k.stale_since), if k.from_cache { ", from cache" } else { "" }),
            state => state.to_owned(),
        };
        println!("kubernetes: {} {detail}, {} services, {} endpoint slices", k.server, k.services, k.endpoint_slices);
        if let Some(e) = &k.last_error {
            println!("            last error: {e}");
        }
    }
    println!("services:  {}", status.services);
    println!("applied:   {} catalog snapshots, the last in {:.1} ms", status.applies, status.last_apply_seconds * 1e3);
    if let Some(d) = &status.datapath {
        println!("datapath:  {} ({})", d.mode, d.why);
        println!("frontends: {}", d.frontends);
        for f in &d.features {
            println!("  {:<12} {:<10} {}", f.feature, f.implementation, f.why);
        }
    }
    Ok(())
}

fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; N]| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("   ").trim_end());
    };
    line(header);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
}
