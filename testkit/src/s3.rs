//! An S3-compatible server in process: `s3s` (the S3 protocol, SigV4 authentication) over
//! `s3s-fs` (buckets are folders, objects are files), served with hyper on `127.0.0.1:0`.
//! Path-style requests only; the credentials are [`S3Server::ACCESS_KEY`] /
//! [`S3Server::SECRET_KEY`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The server; it stops when dropped.
#[derive(Debug)]
pub struct S3Server {
    addr: SocketAddr,
    root: PathBuf,
    task: JoinHandle<()>,
}

impl S3Server {
    /// Access key id the server accepts.
    pub const ACCESS_KEY: &'static str = "medray-test-access-key";
    /// Secret key the server accepts.
    pub const SECRET_KEY: &'static str = "medray-test-secret-key";
    /// Region to sign requests for.
    pub const REGION: &'static str = "us-east-1";

    /// Starts a server storing its buckets under `root` (created if needed), with the
    /// buckets `buckets` already created, on the current Tokio runtime.
    ///
    /// # Errors
    /// If `root` cannot be created or the listener cannot be bound.
    pub async fn start(root: &Path, buckets: &[&str]) -> std::io::Result<Self> {
        for bucket in buckets {
            std::fs::create_dir_all(root.join(bucket))?;
        }
        let fs = s3s_fs::FileSystem::new(root)
            .map_err(|e| std::io::Error::other(format!("s3s-fs at {}: {e:?}", root.display())))?;
        let service = {
            let mut builder = S3ServiceBuilder::new(fs);
            builder.set_auth(SimpleAuth::from_single(Self::ACCESS_KEY, Self::SECRET_KEY));
            builder.build()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let service = service.clone();
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service);
                    // A client hanging up early is not the server's problem.
                    let _ = conn.await;
                });
            }
        });
        Ok(Self {
            addr,
            root: root.to_path_buf(),
            task,
        })
    }

    /// The endpoint URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where the object `key` of `bucket` lives on disk (for tampering in tests).
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}
