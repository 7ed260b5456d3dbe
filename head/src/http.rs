//! The head's HTTP endpoints: for operations `/healthz` (the process serves), `/readyz`
//! (at least the configured number of workers have joined) and `/metrics` (Prometheus);
//! for people, `/jobs` (the recent inference jobs) and `/jobs/<job>/report/` (the
//! inference report of [`crate::report`], its pictures under `cases/`).
//!
//! The health and metrics endpoints are open and carry no patient data. The pages show
//! patients' images, so they need the client credential: a link signed with a key derived
//! from the cluster token, with an expiry (`medray report --job ID --link`;
//! [`medray_proto::auth::LinkSigner`]). A valid link sets a cookie (HttpOnly,
//! SameSite=Strict, scoped to the page's path, expiring with the link) so that the page's
//! pictures and links work; anything else is answered 401.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use ractor::ActorRef;

use medray_proto::auth::{LinkSigner, INDEX_SCOPE};

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
    signer: LinkSigner,
}

/// The signature part of a link.
#[derive(Debug, Default)]
struct Link {
    exp: Option<u64>,
    sig: Option<String>,
}

impl Link {
    /// `exp` and `sig` of a query string (anything else is ignored).
    fn parse(query: Option<&str>) -> Self {
        let mut link = Self::default();
        for pair in query.unwrap_or_default().split('&') {
            match pair.split_once('=') {
                Some(("exp", v)) => link.exp = v.parse().ok(),
                Some(("sig", v)) if v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    link.sig = Some(v.to_string());
                }
                _ => {}
            }
        }
        link
    }
}

/// The name of the cookie a valid link sets.
const COOKIE: &str = "medray_link";

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `(exp, sig)` of the request's cookie, if it carries one.
fn cookie_link(headers: &HeaderMap) -> Option<(u64, String)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .find_map(|v| {
            let (exp, sig) = v.split_once('.')?;
            Some((exp.parse().ok()?, sig.to_string()))
        })
}

/// Whether the request may see `scope`: a valid signed link in its query (then the answer
/// also sets the cookie for `path`, which is returned) or in its cookie.
enum Access {
    Denied,
    Cookie,
    Link(String),
}

fn access(ops: &Ops, scope: &str, path: &str, link: &Link, headers: &HeaderMap) -> Access {
    let now = now_s();
    if let (Some(exp), Some(sig)) = (link.exp, link.sig.as_deref()) {
        if ops.signer.verify(scope, exp, sig, now) {
            return Access::Link(format!(
                "{COOKIE}={exp}.{sig}; Path={path}; Max-Age={}; HttpOnly; SameSite=Strict",
                exp - now
            ));
        }
    }
    match cookie_link(headers) {
        Some((exp, sig)) if ops.signer.verify(scope, exp, &sig, now) => Access::Cookie,
        _ => Access::Denied,
    }
}

fn denied() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "this page shows patient data and needs a signed link: `medray report --job ID --link` \
         (or `medray report --index-link` for the list of jobs) prints one\n",
    )
        .into_response()
}

/// `response`, with the cookie of a link when the request came with one.
fn with_access(access: Access, response: Response) -> Response {
    match access {
        Access::Link(cookie) => {
            let mut response = response;
            if let Ok(v) = axum::http::HeaderValue::from_str(&cookie) {
                response.headers_mut().append(header::SET_COOKIE, v);
            }
            response
        }
        _ => response,
    }
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
async fn jobs_page(
    State(ops): State<Ops>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let link = Link::parse(query.as_deref());
    let granted = access(&ops, INDEX_SCOPE, "/jobs", &link, &headers);
    if matches!(granted, Access::Denied) {
        return denied();
    }
    // Links to the reports, valid as long as the index's own.
    let until = link
        .exp
        .or_else(|| cookie_link(&headers).map(|(e, _)| e))
        .unwrap_or(0);
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
            "<tr><td><a href=\"/jobs/{id}/report/?{query}\">{id}</a></td><td>{state}</td><td>{dataset}</td><td>{model} {version}</td><td>{created}</td></tr>\n",
            query = ops.signer.query(&info.id, until),
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
    let page = Html(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>medray: inference jobs</title>\
         <link rel=\"icon\" href=\"data:,\"></head>\n<body>\n<h1>Inference jobs</h1>\n<table>\n\
         <thead><tr><th>job</th><th>state</th><th>dataset</th><th>model</th><th>submitted</th></tr></thead>\n\
         <tbody>\n{rows}</tbody>\n</table>\n</body>\n</html>\n"
    ))
    .into_response();
    with_access(granted, page)
}

/// `/jobs/<job>/report` without the slash: the page's relative links need it (the link's
/// signature comes along).
async fn report_redirect(Path(id): Path<String>, RawQuery(query): RawQuery) -> Response {
    let link = Link::parse(query.as_deref());
    let query = match (link.exp, link.sig) {
        (Some(exp), Some(sig)) => format!("?exp={exp}&sig={sig}"),
        _ => String::new(),
    };
    match path_job_id(&id) {
        Some(id) => Redirect::permanent(&format!("/jobs/{id}/report/{query}")).into_response(),
        None => not_found("job"),
    }
}

/// The job of a report URL and the request's access to it; the answer to give instead when
/// the id is not a job id (404) or the request has no valid link (401).
fn report_access(
    ops: &Ops,
    id: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> std::result::Result<(JobId, Access), Box<Response>> {
    let id = path_job_id(id).ok_or_else(|| Box::new(not_found("job")))?;
    let path = format!("/jobs/{id}/report/");
    match access(ops, id.as_str(), &path, &Link::parse(query), headers) {
        Access::Denied => Err(Box::new(denied())),
        granted => Ok((id, granted)),
    }
}

async fn report_page(
    State(ops): State<Ops>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let (id, granted) = match report_access(&ops, &id, query.as_deref(), &headers) {
        Ok(ok) => ok,
        Err(answer) => return *answer,
    };
    let page = match crate::report::build(&ops.ctx, &id).await {
        Ok((_, page)) => Html(page.html).into_response(),
        Err(e) => error_response(&e),
    };
    with_access(granted, page)
}

async fn report_picture(
    State(ops): State<Ops>,
    Path((id, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let id = match report_access(&ops, &id, query.as_deref(), &headers) {
        Ok((id, _)) => id,
        Err(answer) => return *answer,
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
            signer: LinkSigner::new(ctx.config.token.expose()),
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
