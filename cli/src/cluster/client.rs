//! How the CLI finds and calls a head: `--address`/`MEDRAY_ADDRESS`, else the cluster that
//! `medray up` started from this directory (`.medray/cluster.json`), else
//! `http://127.0.0.1:50051`; the token from `--token`/`MEDRAY_TOKEN` or that same file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use medray_proto::auth::{BearerToken, Secret};
use medray_proto::transport::ClientTls;
use medray_proto::v1::client_client::ClientClient;
use serde::{Deserialize, Serialize};
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

/// Default head address.
pub const DEFAULT_ADDRESS: &str = "http://127.0.0.1:50051";

/// The Client service with the token attached.
pub type HeadClient = ClientClient<InterceptedService<Channel, BearerToken>>;

/// What `medray up` records for the other commands (and `medray down`).
#[derive(Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    /// gRPC address of the head.
    pub address: String,
    /// The cluster token.
    pub token: String,
    /// HTTP operations address of the head.
    pub http: Option<String>,
    /// pid of the `medray up` process (0 when detached).
    pub up_pid: u32,
    /// pids of the head and the workers.
    pub pids: Vec<u32>,
    /// Folder of the log files.
    pub log_dir: PathBuf,
}

impl std::fmt::Debug for ClusterFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterFile")
            .field("address", &self.address)
            .field("token", &"<redacted>")
            .field("http", &self.http)
            .field("up_pid", &self.up_pid)
            .field("pids", &self.pids)
            .field("log_dir", &self.log_dir)
            .finish()
    }
}

/// The file `medray up` writes in `dir`.
#[must_use]
pub fn cluster_file_path(dir: &Path) -> PathBuf {
    dir.join(".medray").join("cluster.json")
}

/// Reads the cluster file of the current directory, if any.
pub fn read_cluster_file() -> anyhow::Result<Option<ClusterFile>> {
    let path = cluster_file_path(Path::new("."));
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Reads a token from the first line of `path` (`flag` names it in errors).
///
/// # Errors
/// The file does not read or holds no token.
pub fn read_token_file(path: &std::path::Path, flag: &str) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    anyhow::ensure!(
        !token.is_empty(),
        "{flag} {}: the first line is empty",
        path.display()
    );
    Ok(token)
}

/// `--address`, `--token`, `--tls-ca`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Head address (default: the cluster `medray up` started here, else
    /// http://127.0.0.1:50051).
    #[arg(long, global = true, env = "MEDRAY_ADDRESS")]
    pub address: Option<String>,
    /// Client token (default: the one `medray up` wrote here). Prefer MEDRAY_TOKEN or
    /// --token-file: an argument is visible to every user of the machine in `ps`.
    #[arg(long, global = true, env = "MEDRAY_TOKEN", hide_env_values = true)]
    pub token: Option<Secret<String>>,
    /// File holding the client token (first line).
    #[arg(
        long,
        global = true,
        env = "MEDRAY_TOKEN_FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) of a head that serves TLS (https:// addresses).
    #[arg(long, global = true, env = "MEDRAY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl ClientArgs {
    /// The address and token to use.
    pub fn resolve(&self) -> anyhow::Result<(String, String)> {
        let file = read_cluster_file()?;
        let address = self
            .address
            .clone()
            .or_else(|| file.as_ref().map(|f| f.address.clone()))
            .unwrap_or_else(|| DEFAULT_ADDRESS.to_string());
        let from_file = self
            .token_file
            .as_deref()
            .map(|p| read_token_file(p, "--token-file"))
            .transpose()?;
        let token = self
            .token
            .as_ref()
            .map(|t| t.expose().clone())
            .or(from_file)
            .or_else(|| file.as_ref().map(|f| f.token.clone()))
            .context("no cluster token: pass --token or set MEDRAY_TOKEN (medray up writes one to .medray/cluster.json)")?;
        Ok((address, token))
    }

    /// TLS settings from `--tls-ca`.
    pub fn tls(&self) -> anyhow::Result<Option<ClientTls>> {
        self.tls_ca
            .as_ref()
            .map(|p| {
                Ok(ClientTls {
                    ca_pem: std::fs::read(p)
                        .with_context(|| format!("--tls-ca {}", p.display()))?,
                    domain: None,
                })
            })
            .transpose()
    }

    /// True when these commands should go to a head: an address was given, or `medray up`
    /// started a cluster from this directory.
    pub fn head_configured(&self) -> anyhow::Result<bool> {
        Ok(self.address.is_some() || read_cluster_file()?.is_some())
    }

    /// Connects to the head.
    pub async fn connect(&self) -> anyhow::Result<HeadClient> {
        let (address, token) = self.resolve()?;
        let bearer = BearerToken::new(&token).context("--token")?;
        let channel = medray_proto::transport::connect(
            &address,
            self.tls()?.as_ref(),
            Duration::from_secs(5),
        )
        .await
        .with_context(|| {
            format!("cannot reach the head at {address} (is it running? see `medray up`)")
        })?;
        Ok(ClientClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(medray_proto::DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(medray_proto::DEFAULT_MAX_MESSAGE_BYTES))
    }
}

/// Turns a gRPC status into an error that says what the head said.
pub fn status_error(call: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{call}: {} ({:?})", s.message(), s.code())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// Issue 18: the parsed arguments (clap structs derive `Debug`) and `.medray/cluster.json`'s
    /// struct printed the tokens.
    #[test]
    fn parsed_arguments_and_the_cluster_file_print_no_token() {
        let secret = "tok-0123456789abcdef-secret";
        for args in [
            vec!["medray", "status", "--token", secret],
            vec![
                "medray",
                "head",
                "--token",
                secret,
                "--worker-token",
                "wtok-0123456789-secret",
            ],
            vec!["medray", "worker", "--token", secret],
            vec!["medray", "worker-token", "--token", secret],
        ] {
            let cli = crate::Cli::try_parse_from(&args).expect("parses");
            let text = format!("{cli:?}");
            assert!(!text.contains("secret"), "{args:?}: {text}");
        }
        let file = ClusterFile {
            address: "http://127.0.0.1:1".into(),
            token: secret.into(),
            http: None,
            up_pid: 0,
            pids: vec![],
            log_dir: PathBuf::from(".medray/logs"),
        };
        assert!(!format!("{file:?}").contains("secret"));
    }
}
