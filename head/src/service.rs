//! The gRPC service adapters: decode, ask the actors or the store, encode. Every call is
//! authenticated by the token interceptor installed in [`crate::run`].

pub mod access;
pub mod client;
pub mod worker;

use std::pin::Pin;

use futures::Stream;
use medray_proto::v1::ObjectChunk;
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::context::HeadContext;

/// A server stream.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Reads a stage object (decrypted) and streams it in chunks; the first chunk carries the
/// size and sha256.
pub(crate) async fn object_stream(
    ctx: &HeadContext,
    key: &str,
    direction: &'static str,
) -> Result<BoxStream<ObjectChunk>, Status> {
    let key = medray_core::stage::ObjectKey::new(key.to_string())
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let data = ctx.stage.get(&key).await.map_err(|e| match &e {
        medray_core::Error::Stage { source, .. }
            if matches!(**source, object_store::Error::NotFound { .. }) =>
        {
            Status::not_found(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    })?;
    Ok(chunk_stream(ctx, data, direction))
}

/// Streams `data` in chunks of the configured size; the first chunk carries the size and
/// sha256.
pub(crate) fn chunk_stream(
    ctx: &HeadContext,
    data: Vec<u8>,
    direction: &'static str,
) -> BoxStream<ObjectChunk> {
    let sha256 = hex::encode(Sha256::digest(&data));
    let size = data.len() as u64;
    ctx.metrics.moved(direction, size);
    let chunk = ctx.config.chunk_bytes;
    let data = bytes_chunks(data, chunk);
    let mut first = true;
    let stream = futures::stream::iter(data.into_iter().map(move |piece| {
        let c = ObjectChunk {
            size: if first { size } else { 0 },
            sha256: if first { sha256.clone() } else { String::new() },
            data: piece,
        };
        first = false;
        Ok(c)
    }));
    Box::pin(stream)
}

fn bytes_chunks(data: Vec<u8>, chunk: usize) -> Vec<Vec<u8>> {
    if data.is_empty() {
        return vec![Vec::new()];
    }
    data.chunks(chunk).map(<[u8]>::to_vec).collect()
}
