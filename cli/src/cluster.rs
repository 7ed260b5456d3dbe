//! The cluster commands: `head`, `worker`, `up`, `down`, `status`, `job`, `selftest`,
//! `train`, `infer`, and
//! the client connection they share.

pub mod client;
pub mod head;
pub mod infer;
pub mod job;
pub mod selftest;
pub mod status;
pub mod train;
pub mod up;
pub mod worker;

/// A future that completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
