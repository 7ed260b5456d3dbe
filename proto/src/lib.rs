#![doc = include_str!("../README.md")]
#![allow(missing_docs, clippy::doc_markdown)]

pub mod auth;
pub mod control;
pub mod convert;
pub mod tls;
pub mod transport;

/// Generated types and services of the `medray.v1` package.
// The .proto comments name placeholders (`<case>`) the way protobuf documentation does.
#[allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]
pub mod v1 {
    tonic::include_proto!("medray.v1");
}

/// Version of the worker <-> head protocol. A worker with another version is refused at
/// registration with `FailedPrecondition`, naming both versions. Bump it on any change to
/// `worker.proto` or `control.proto` that an older peer would misread.
/// 3: `InferTask.refine` (an older worker would ignore the options), `TrainCase.keypoints`,
/// the GPU in `RegisterRequest`, and fp16 gradient chunks that start with their scale.
/// 4: exactly-once training steps: `StepCommit`/`StepAbort` name their step, replicas report
/// the step they hold, their whole-state checksum and their micro-batches' BatchNorm
/// statistics (no more averaged `bn_stats`); fp32 gradient uploads are f64 sums.
/// 5: worker roles: `Register` takes the worker token and returns a session credential that
/// every later call carries (an older worker would keep sending the join token).
pub const PROTOCOL_VERSION: u32 = 5;

/// Metadata key of the cluster token on every gRPC call (`authorization: Bearer <token>`).
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// Default largest gRPC message, bytes (each side refuses larger ones).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Most rows one `ListResults` or `QueryCatalog` call returns.
pub const MAX_ROWS: u32 = 100_000;

/// Default object transfer chunk, bytes (the brief's 1-4 MiB range).
pub const DEFAULT_CHUNK_BYTES: usize = 2 * 1024 * 1024;

/// HTTP/2 flow-control windows of every medray connection, bytes: a stream may have this
/// much in flight before the receiver acknowledges it. The 64 KiB default of HTTP/2 caps a
/// gradient or object stream at one window per round trip; these let several chunks fly.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// See [`HTTP2_STREAM_WINDOW_BYTES`]; shared by every stream of a connection.
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;

impl v1::JobState {
    /// True for SUCCEEDED, FAILED and CANCELLED.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The state's name as users see it ("PENDING", ...).
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Unspecified => "UNSPECIFIED",
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }
}
