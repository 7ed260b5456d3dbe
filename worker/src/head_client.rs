//! The worker's gRPC client to the head: the worker token on `Register`, then the session
//! credential it returned on every other call.

use std::path::{Path, PathBuf};

use medray_proto::auth::BearerToken;
use medray_proto::v1::worker_client::WorkerClient;
use medray_proto::v1::{FetchObjectRequest, PutObjectHeader, PutObjectRequest};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

use crate::config::WorkerConfig;
use crate::{Result, WorkerError};

/// The Worker service client with a credential attached.
pub type HeadClient = WorkerClient<InterceptedService<Channel, BearerToken>>;

/// Connects to the head named in `config`.
///
/// # Errors
/// [`WorkerError::Connect`] when it cannot be reached.
pub async fn channel(config: &WorkerConfig) -> Result<Channel> {
    medray_proto::transport::connect(
        &config.head_address,
        config.tls.as_ref(),
        config.connect_timeout,
    )
    .await
    .map_err(|source| WorkerError::Connect {
        address: config.head_address.clone(),
        source,
    })
}

/// The Worker service client over `channel` carrying `credential` (the worker token for
/// `Register`, the session credential afterwards); `field` names where it came from.
///
/// # Errors
/// [`WorkerError::Config`] for a malformed credential.
pub fn client(
    channel: Channel,
    credential: &str,
    field: &'static str,
    max_message_bytes: usize,
) -> Result<HeadClient> {
    let token = BearerToken::new(credential).map_err(|e| WorkerError::Config {
        field,
        reason: e.to_string(),
    })?;
    Ok(WorkerClient::with_interceptor(channel, token)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}

/// Fetches stage object `key` through the head into `cache_dir`, named by its sha256, and
/// returns the cached file. A file already cached under `expected_sha256` is not fetched
/// again; a transfer whose size or digest differs from what the head announced is refused.
///
/// # Errors
/// [`WorkerError::Rpc`] when the head refuses, [`WorkerError::Protocol`] for a corrupt
/// transfer, [`WorkerError::Io`] for the cache.
pub async fn fetch_object(
    client: &mut HeadClient,
    worker_id: &str,
    key: &str,
    expected_sha256: &str,
    cache_dir: &Path,
) -> Result<PathBuf> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| WorkerError::Io { path, source }
    };
    if let Some(cached) = cached(cache_dir, expected_sha256).await {
        return Ok(cached);
    }
    tokio::fs::create_dir_all(cache_dir)
        .await
        .map_err(io(cache_dir))?;
    let mut stream = client
        .fetch_object(FetchObjectRequest {
            worker_id: worker_id.to_string(),
            key: key.to_string(),
        })
        .await
        .map_err(WorkerError::rpc("FetchObject"))?
        .into_inner();
    let tmp = cache_dir.join(format!(".fetch-{}-{}", std::process::id(), unique()));
    let mut file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
    let mut hasher = Sha256::new();
    let (mut announced_size, mut announced_sha, mut received) = (None, String::new(), 0u64);
    let result = async {
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(WorkerError::rpc("FetchObject"))?
        {
            if announced_size.is_none() {
                announced_size = Some(chunk.size);
                announced_sha = chunk.sha256.clone();
            }
            received += chunk.data.len() as u64;
            if Some(received) > announced_size {
                return Err(protocol(format!(
                    "{key}: more bytes than the announced {}",
                    announced_size.unwrap_or(0)
                )));
            }
            hasher.update(&chunk.data);
            file.write_all(&chunk.data).await.map_err(io(&tmp))?;
        }
        file.flush().await.map_err(io(&tmp))?;
        let digest = hex::encode(hasher.finalize());
        if Some(received) != announced_size.or(Some(0)) {
            return Err(protocol(format!(
                "{key}: received {received} bytes of {}",
                announced_size.unwrap_or(0)
            )));
        }
        if digest != announced_sha {
            return Err(protocol(format!(
                "{key}: sha256 {digest} differs from the announced {announced_sha}"
            )));
        }
        if !expected_sha256.is_empty() && digest != expected_sha256 {
            return Err(WorkerError::ContentMismatch {
                key: key.to_string(),
                expected: expected_sha256.to_string(),
                got: digest,
            });
        }
        Ok(digest)
    }
    .await;
    match result {
        Ok(digest) => {
            let dest = cache_dir.join(&digest);
            tokio::fs::rename(&tmp, &dest).await.map_err(io(&dest))?;
            Ok(dest)
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

/// Reads stage object `key` directly from `stage` into `cache_dir` (named by its sha256),
/// refusing content whose sha256 differs from `expected_sha256`.
///
/// # Errors
/// [`WorkerError::Core`] when the stage refuses (missing, tampered), [`WorkerError::Protocol`]
/// for a digest mismatch, [`WorkerError::Io`] for the cache.
pub async fn read_object_direct(
    stage: &medray_core::stage::Stage,
    key: &str,
    expected_sha256: &str,
    cache_dir: &Path,
) -> Result<PathBuf> {
    if let Some(cached) = cached(cache_dir, expected_sha256).await {
        return Ok(cached);
    }
    tokio::fs::create_dir_all(cache_dir)
        .await
        .map_err(|source| WorkerError::Io {
            path: cache_dir.display().to_string(),
            source,
        })?;
    let object = medray_core::stage::ObjectKey::new(key.to_string())?;
    let data = stage.get(&object).await?;
    let digest = hex::encode(Sha256::digest(&data));
    if !expected_sha256.is_empty() && digest != expected_sha256 {
        return Err(WorkerError::ContentMismatch {
            key: key.to_string(),
            expected: expected_sha256.to_string(),
            got: digest,
        });
    }
    let dest = cache_dir.join(&digest);
    medray_core::atomic::write_bytes(&dest, &data)?;
    Ok(dest)
}

/// Bytes per `PutObject` message: the head accepts chunks of at least 1 MiB within its
/// message limit, so this always fits.
pub const UPLOAD_CHUNK_BYTES: usize = 1 << 20;

/// Which task attempt writes an object (the head accepts it only from the current one).
#[derive(Debug, Clone)]
pub struct Writer<'a> {
    /// This worker.
    pub worker_id: &'a str,
    /// The job.
    pub job_id: &'a str,
    /// The task.
    pub task_id: &'a str,
    /// The attempt.
    pub attempt: u32,
}

/// Writes `data` to the stage at `key` through the head, in chunks, with its size and
/// sha256 for the head to check; returns the bytes stored.
///
/// # Errors
/// [`WorkerError::Rpc`] when the head refuses (not the current attempt, a key outside
/// `results/`, a damaged upload).
pub async fn put_object(
    client: &mut HeadClient,
    writer: &Writer<'_>,
    key: &str,
    data: Vec<u8>,
) -> Result<u64> {
    let header = PutObjectHeader {
        worker_id: writer.worker_id.to_string(),
        job_id: writer.job_id.to_string(),
        task_id: writer.task_id.to_string(),
        attempt: writer.attempt,
        key: key.to_string(),
        size: data.len() as u64,
        sha256: hex::encode(Sha256::digest(&data)),
    };
    let mut messages: Vec<PutObjectRequest> = data
        .chunks(UPLOAD_CHUNK_BYTES)
        .map(|c| PutObjectRequest {
            header: None,
            data: c.to_vec(),
        })
        .collect();
    if messages.is_empty() {
        messages.push(PutObjectRequest::default());
    }
    messages[0].header = Some(header);
    let reply = client
        .put_object(futures::stream::iter(messages))
        .await
        .map_err(WorkerError::rpc("PutObject"))?
        .into_inner();
    Ok(reply.bytes)
}

/// The cached file of content `sha256` (hex), if it is in the cache.
async fn cached(cache_dir: &Path, sha256: &str) -> Option<PathBuf> {
    if sha256.is_empty() || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let path = cache_dir.join(sha256);
    tokio::fs::try_exists(&path)
        .await
        .unwrap_or(false)
        .then_some(path)
}

fn protocol(reason: String) -> WorkerError {
    WorkerError::Protocol {
        call: "FetchObject",
        reason,
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
