//! Serves `/healthz`, `/readyz`, `/metrics`, `/api/v1/{status,services,datapath}`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;
use tracing::{info, warn};

use super::Status;
use crate::metrics::Metrics;
use crate::view::View;

#[derive(Clone)]
struct AppState {
    view: Arc<View>,
    metrics: Arc<Metrics>,
    node_name: String,
}

/// Binds `listen` now (so a taken port fails the start) and serves until `shutdown` fires.
pub async fn serve(
    listen: SocketAddr,
    view: Arc<View>,
    metrics: Arc<Metrics>,
    node_name: String,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    if !listen.ip().is_loopback() {
        warn!(%listen, "the admin API listens beyond loopback: anyone who reaches it can read the node's services");
    }
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("admin.listen {listen}"))?;
    info!(%listen, "admin API listening");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/status", get(status))
        .route("/api/v1/services", get(services))
        .route("/api/v1/datapath", get(datapath))
        .with_state(AppState { view, metrics, node_name });
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.changed().await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            warn!("admin API stopped: {e}");
        }
    }))
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.view.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: catalog not loaded or data path not programmed yet\n")
            .into_response()
    }
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    // At 10,000 frontends a scrape takes ~20 ms (a map lookup per kernel-served frontend, a few series per proxied
    // one): off the runtime's workers, so proxied connections never wait behind it.
    let encoded = tokio::task::spawn_blocking(move || s.metrics.encode().map_err(|e| e.to_string())).await;
    match encoded.unwrap_or_else(|e| Err(e.to_string())) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response(),
    }
}

async fn status(State(s): State<AppState>) -> Json<Status> {
    Json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        node_name: s.node_name.clone(),
        ready: s.view.ready(),
        catalog: s.view.catalog_source.status(),
        services: s.view.service_count(),
        applies: s.view.applies.load(Ordering::Relaxed),
        last_apply_seconds: s.view.last_apply_micros.load(Ordering::Relaxed) as f64 / 1e6,
        datapath: s.view.datapath(),
    })
}

async fn services(State(s): State<AppState>) -> Response {
    Json(s.view.services()).into_response()
}

async fn datapath(State(s): State<AppState>) -> Response {
    match s.view.datapath() {
        Some(d) => Json(d).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "data path not started yet\n").into_response(),
    }
}
