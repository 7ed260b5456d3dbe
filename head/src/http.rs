//! The head's HTTP endpoints for operations: `/healthz` (the process serves), `/readyz`
//! (at least the configured number of workers have joined) and `/metrics` (Prometheus).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use ractor::ActorRef;

use crate::metrics::Metrics;
use crate::registry::RegistryMsg;
use crate::store::Store;
use crate::{HeadError, Result};

#[derive(Clone)]
struct Ops {
    registry: ActorRef<RegistryMsg>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    min_workers: u32,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ops): State<Ops>) -> (StatusCode, String) {
    let live = ops
        .registry
        .call(RegistryMsg::LiveCount, Some(Duration::from_secs(2)))
        .await
        .ok()
        .and_then(|r| r.success_or(()).ok());
    match live {
        Some(n) if n >= ops.min_workers => (StatusCode::OK, format!("ready: {n} worker(s)\n")),
        Some(n) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {n} of {} worker(s)\n", ops.min_workers),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: registry busy\n".into(),
        ),
    }
}

async fn render_metrics(
    State(ops): State<Ops>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        {
            if let Ok(counts) = ops.store.job_counts() {
                ops.metrics.set_jobs(&counts);
            }
            ops.metrics.render()
        },
    )
}

/// Binds the HTTP listener; returns its address and the server future.
///
/// # Errors
/// [`HeadError::Io`] if the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    registry: ActorRef<RegistryMsg>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    min_workers: u32,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HeadError::Io {
            what: format!("binding the HTTP listener {addr}"),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| HeadError::Io {
        what: "HTTP listener address".into(),
        source,
    })?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(Ops {
            registry,
            store,
            metrics,
            min_workers,
        });
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok((local, handle))
}
