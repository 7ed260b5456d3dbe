//! `medray worker`: run a worker in this process.

use std::path::PathBuf;

use anyhow::Context;
use medray_core::stage::{Stage, StageKey, StageLocation, STAGE_KEY_ENV};
use medray_worker::WorkerConfig;

/// Arguments of `medray worker`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Head address.
    #[arg(long, env = "MEDRAY_ADDRESS", default_value = "http://127.0.0.1:50051")]
    pub address: String,
    /// Worker token (not the client token, which the head refuses from a worker; `medray
    /// worker-token` prints it). Prefer MEDRAY_WORKER_TOKEN or --token-file: an argument is
    /// visible in `ps`.
    #[arg(
        long,
        env = "MEDRAY_WORKER_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file"
    )]
    pub token: Option<medray_proto::auth::Secret<String>>,
    /// File holding the worker token (first line).
    #[arg(long, env = "MEDRAY_WORKER_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Name shown in `medray status` (default: host-pid).
    #[arg(long, env = "MEDRAY_WORKER_NAME")]
    pub name: Option<String>,
    /// Object cache folder (default: a folder under the system temp dir).
    #[arg(long, env = "MEDRAY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Host this worker's cluster node announces.
    #[arg(long, env = "MEDRAY_NODE_HOST", default_value = "127.0.0.1")]
    pub node_host: String,
    /// CA certificate (PEM) of a head that serves TLS.
    #[arg(long, env = "MEDRAY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Seconds a draining worker waits for its running task before handing it back.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout_s: u64,
    /// Read stage objects directly from this stage (file:///dir, a path, or s3://bucket/prefix)
    /// instead of through the head; needs the stage key (MEDRAY_STAGE_KEY or --stage-key-file).
    #[arg(long, env = "MEDRAY_STAGE")]
    pub stage: Option<String>,
    /// File holding the stage key (hex or base64 of 32 bytes), for --stage.
    #[arg(long, env = "MEDRAY_STAGE_KEY_FILE", requires = "stage")]
    pub stage_key_file: Option<PathBuf>,
}

fn direct_stage(args: &Args) -> anyhow::Result<Option<std::sync::Arc<Stage>>> {
    let Some(url) = &args.stage else {
        return Ok(None);
    };
    let key = match (&args.stage_key_file, std::env::var(STAGE_KEY_ENV)) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--stage-key-file {}", path.display()))?;
            StageKey::parse(&text, &path.display().to_string())?
        }
        (None, Ok(text)) if !text.trim().is_empty() => StageKey::parse(&text, STAGE_KEY_ENV)?,
        _ => anyhow::bail!("--stage needs the stage key: set MEDRAY_STAGE_KEY or --stage-key-file"),
    };
    let stage = Stage::open(StageLocation::parse(url)?, Some(key))
        .with_context(|| format!("--stage {url}"))?;
    Ok(Some(std::sync::Arc::new(stage)))
}

/// Arguments of `medray worker-token`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(flatten)]
    client: crate::cluster::client::ClientArgs,
}

/// Prints the worker token of the cluster whose client token is given (or of the cluster
/// `medray up` started here): what to hand to workers instead of the client token.
pub fn print_worker_token(args: &TokenArgs) -> anyhow::Result<()> {
    let (_, token) = args.client.resolve()?;
    medray_proto::auth::validate_token(&token).context("--token")?;
    println!("{}", medray_proto::auth::worker_token(&token));
    Ok(())
}

/// Runs the worker until Ctrl-C or SIGTERM (then drains and exits 0).
pub fn run(args: Args, device: &str) -> anyhow::Result<()> {
    let stage = direct_stage(&args)?;
    let tls = crate::cluster::client::ClientArgs {
        address: None,
        token: None,
        token_file: None,
        tls_ca: args.tls_ca.clone(),
    }
    .tls()?;
    let token = match (args.token, &args.token_file) {
        (Some(t), _) => t.expose().clone(),
        (None, Some(p)) => crate::cluster::client::read_token_file(p, "--token-file")?,
        (None, None) => anyhow::bail!("no worker token: set MEDRAY_WORKER_TOKEN or --token-file"),
    };
    let mut config = WorkerConfig::default()
        .with_head_address(args.address)
        .with_token(token)
        .with_device(device)
        .with_tls(tls);
    if let Some(n) = args.name {
        config = config.with_name(n);
    }
    if let Some(d) = args.cache_dir {
        config = config.with_cache_dir(d);
    }
    config.node_host = args.node_host;
    config.drain_timeout = std::time::Duration::from_secs(args.drain_timeout_s);
    config.direct_stage = stage;

    let rt = crate::data_dir::runtime()?;
    rt.block_on(medray_worker::run(config, super::shutdown_signal()))?;
    Ok(())
}
