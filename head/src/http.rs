//! The head's HTTP endpoints: for operations `/healthz` (the process serves), `/readyz`
//! (at least the configured number of workers have joined) and `/metrics` (Prometheus);
//! for people, `/jobs` (the recent inference jobs) and `/jobs/<job>/report/` (the
//! inference report of [`crate::report`], its pictures under `cases/`).
//!
//! Like the metrics, the pages are not behind the cluster token: bind `--http-listen` to
//! loopback or a private network, or put an authenticating proxy in front.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use ractor::ActorRef;

use crate::context::HeadContext;
use crate::ids::JobId;
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
    ctx: HeadContext,
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

/// A job id from a URL path: the characters job ids are made of, else 404.
fn path_job_id(id: &str) -> Option<JobId> {
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .then(|| JobId(id.to_string()))
}

/// A head error as an HTTP answer (plain text).
fn error_response(e: &HeadError) -> Response {
    let status = match e {
        HeadError::NotFound { .. } => StatusCode::NOT_FOUND,
        HeadError::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::warn!(error = %e, "report page failed");
    }
    (status, format!("{e}\n")).into_response()
}

fn not_found(what: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("{what} not found\n")).into_response()
}

/// The recent inference jobs, newest first, with links to their reports.
async fn jobs_page(State(ops): State<Ops>) -> Response {
    let jobs = match ops.store.jobs(200) {
        Ok(jobs) => jobs,
        Err(e) => return error_response(&e),
    };
    let mut rows = String::new();
    for job in jobs.iter().filter(|j| j.kind == "infer") {
        let Ok(info) = crate::report::report_job(job) else {
            continue;
        };
        rows.push_str(&format!(
            "<tr><td><a href=\"/jobs/{id}/report/\">{id}</a></td><td>{state}</td><td>{dataset}</td><td>{model} {version}</td><td>{created}</td></tr>\n",
            id = medray_core::report::escape(&info.id),
            state = medray_core::report::escape(&info.state),
            dataset = medray_core::report::escape(&info.dataset),
            model = medray_core::report::escape(&info.model),
            version = medray_core::report::escape(&info.version),
            created = medray_core::report::escape(&info.created_at),
        ));
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"5\">No inference job yet.</td></tr>\n");
    }
    Html(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>medray: inference jobs</title>\
         <link rel=\"icon\" href=\"data:,\"></head>\n<body>\n<h1>Inference jobs</h1>\n<table>\n\
         <thead><tr><th>job</th><th>state</th><th>dataset</th><th>model</th><th>submitted</th></tr></thead>\n\
         <tbody>\n{rows}</tbody>\n</table>\n</body>\n</html>\n"
    ))
    .into_response()
}

/// `/jobs/<job>/report` without the slash: the page's relative links need it.
async fn report_redirect(Path(id): Path<String>) -> Response {
    match path_job_id(&id) {
        Some(id) => Redirect::permanent(&format!("/jobs/{id}/report/")).into_response(),
        None => not_found("job"),
    }
}

async fn report_page(State(ops): State<Ops>, Path(id): Path<String>) -> Response {
    let Some(id) = path_job_id(&id) else {
        return not_found("job");
    };
    match crate::report::build(&ops.ctx, &id).await {
        Ok((_, page)) => Html(page.html).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn report_picture(
    State(ops): State<Ops>,
    Path((id, name)): Path<(String, String)>,
) -> Response {
    let Some(id) = path_job_id(&id) else {
        return not_found("job");
    };
    match crate::report::picture(&ops.ctx, &id, &name).await {
        Ok(png) => ([(header::CONTENT_TYPE, "image/png")], png).into_response(),
        Err(e) => error_response(&e),
    }
}

/// Binds the HTTP listener; returns its address and the server future.
///
/// # Errors
/// [`HeadError::Io`] if the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    registry: ActorRef<RegistryMsg>,
    ctx: HeadContext,
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
        .route("/jobs", get(jobs_page))
        .route("/jobs/{id}/report", get(report_redirect))
        .route("/jobs/{id}/report/", get(report_page))
        .route("/jobs/{id}/report/cases/{name}", get(report_picture))
        .with_state(Ops {
            registry,
            store: ctx.store.clone(),
            metrics: ctx.metrics.clone(),
            min_workers,
            ctx,
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
