//! Resumable HTTP(S) download of one file, streamed to disk (never held in memory).
//!
//! The bytes go to `<dest>.part`, next to a small `<dest>.part.json` that records the URL,
//! the server's validator (a strong `ETag`, else `Last-Modified`) and the total size. After
//! a cut the partial file is kept; the next attempt (in this run, or a later run with the
//! same URL and destination) asks for the rest with `Range: bytes=N-` and `If-Range`:
//!
//! * `206` must carry `Content-Range: bytes N-.../TOTAL` starting exactly at `N`, with the
//!   total seen before; anything else discards the partial file and the retry starts over;
//! * `200` means the server sent the whole file (no range support, or the file changed):
//!   the partial file is truncated and the download restarts cleanly from byte 0;
//! * `416` with the partial file already complete finishes the download.
//!
//! Failed attempts are retried with exponential backoff ([`DownloadConfig::retries`],
//! starting at [`DownloadConfig::initial_backoff_ms`], doubling up to
//! [`DownloadConfig::max_backoff_ms`]); answers that retrying cannot change (`404`, `403`,
//! ...) fail at once. The final error names the URL, the number of attempts and the last
//! cause. A complete file is renamed to `dest` and its sha256 and md5 computed; an expected
//! checksum that differs is refused with both values, and the file deleted.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::Md5;
use reqwest::header::{
    HeaderMap, ACCEPT_ENCODING, CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE,
};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::{Error, Result};

/// How to download a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadConfig {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Attempts after the first one before giving up.
    pub retries: u32,
    /// Wait before the first retry; each further retry waits twice as long.
    pub initial_backoff_ms: u64,
    /// Longest wait between two attempts.
    pub max_backoff_ms: u64,
    /// Limit for establishing a connection.
    pub connect_timeout_ms: u64,
    /// Longest silence while reading the response before the attempt counts as failed.
    pub read_timeout_ms: u64,
    /// Expected sha256 of the file, hex (checked when set).
    pub expected_sha256: Option<String>,
    /// Expected md5 of the file, hex (checked when set).
    pub expected_md5: Option<String>,
}

impl DownloadConfig {
    /// Defaults for `url`: 8 retries, backoff 1 s doubling to 60 s, connect timeout 30 s,
    /// read timeout 120 s, no expected checksum.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            retries: 8,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
            connect_timeout_ms: 30_000,
            read_timeout_ms: 120_000,
            expected_sha256: None,
            expected_md5: None,
        }
    }

    /// Sets the number of retries.
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Sets the first and the longest wait between attempts.
    pub fn with_backoff_ms(mut self, initial_ms: u64, max_ms: u64) -> Self {
        self.initial_backoff_ms = initial_ms;
        self.max_backoff_ms = max_ms;
        self
    }

    /// Sets the connect and read timeouts.
    pub fn with_timeouts_ms(mut self, connect_ms: u64, read_ms: u64) -> Self {
        self.connect_timeout_ms = connect_ms;
        self.read_timeout_ms = read_ms;
        self
    }

    /// Sets the expected sha256 (hex; case is ignored).
    pub fn with_sha256(mut self, hex: impl Into<String>) -> Self {
        self.expected_sha256 = Some(hex.into().trim().to_ascii_lowercase());
        self
    }

    /// Sets the expected md5 (hex; case is ignored).
    pub fn with_md5(mut self, hex: impl Into<String>) -> Self {
        self.expected_md5 = Some(hex.into().trim().to_ascii_lowercase());
        self
    }

    /// Checks the URL scheme, the checksums' form and the timings.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| Error::invalid("url", format!("`{}`: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::invalid(
                "url",
                format!("`{}`: only http:// and https:// are supported", self.url),
            ));
        }
        let hex_of = |field: &str, value: &Option<String>, digits: usize| -> Result<()> {
            match value {
                Some(v) if v.len() != digits || !v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Err(Error::invalid(
                        field,
                        format!("`{v}`: expected {digits} hexadecimal digits"),
                    ))
                }
                _ => Ok(()),
            }
        };
        hex_of("sha256", &self.expected_sha256, 64)?;
        hex_of("md5", &self.expected_md5, 32)?;
        if self.connect_timeout_ms == 0 || self.read_timeout_ms == 0 {
            return Err(Error::invalid("timeout", "timeouts must be positive"));
        }
        if self.initial_backoff_ms > self.max_backoff_ms {
            return Err(Error::invalid(
                "backoff",
                format!(
                    "initial backoff {} ms exceeds the maximum {} ms",
                    self.initial_backoff_ms, self.max_backoff_ms
                ),
            ));
        }
        Ok(())
    }

    /// The wait before retry number `retry` (1-based).
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u64 << retry.saturating_sub(1).min(30);
        Duration::from_millis(
            self.initial_backoff_ms
                .saturating_mul(factor)
                .min(self.max_backoff_ms),
        )
    }
}

/// A completed download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downloaded {
    /// Where the file is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its sha256, hex.
    pub sha256: String,
    /// Its md5, hex.
    pub md5: String,
    /// Attempts it took (1 without failures).
    pub attempts: u32,
    /// The byte offset each attempt that received data started from: `[0]` for a download
    /// in one go, `[0, N]` after a cut at byte `N` and a resumed second attempt.
    pub attempt_starts: Vec<u64>,
}

/// What `<dest>.part.json` records about a partial download.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct PartMeta {
    url: String,
    /// Strong `ETag` or `Last-Modified` of the response the bytes came from.
    validator: Option<String>,
    /// Total size announced by the server.
    total: Option<u64>,
}

/// Why one attempt failed.
#[derive(Debug)]
struct Failure {
    retryable: bool,
    reason: String,
}

impl Failure {
    fn retry(reason: impl Into<String>) -> Self {
        Self {
            retryable: true,
            reason: reason.into(),
        }
    }

    fn fatal(reason: impl Into<String>) -> Self {
        Self {
            retryable: false,
            reason: reason.into(),
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The partial file of a download to `dest`.
pub fn part_path(dest: &Path) -> PathBuf {
    with_suffix(dest, ".part")
}

fn meta_path(dest: &Path) -> PathBuf {
    with_suffix(dest, ".part.json")
}

/// An error and its causes on one line (reqwest's own message omits the cause).
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// Parses `bytes START-END/TOTAL`.
fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let spec = value.trim().strip_prefix("bytes ")?;
    let (range, total) = spec.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (start <= end && end < total).then_some((start, end, total))
}

/// A validator usable in `If-Range`: a strong `ETag`, else `Last-Modified`.
fn validator(headers: &HeaderMap) -> Option<String> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    match text(ETAG) {
        Some(tag) if !tag.starts_with("W/") => Some(tag.to_string()),
        _ => text(LAST_MODIFIED).map(str::to_string),
    }
}

/// Loads the state of a partial download; anything inconsistent discards it.
async fn load_partial(dest: &Path, url: &str) -> PartMeta {
    let fresh = PartMeta {
        url: url.to_string(),
        ..PartMeta::default()
    };
    let part = part_path(dest);
    let meta = tokio::fs::read(meta_path(dest))
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<PartMeta>(&b).ok());
    match meta {
        Some(m) if m.url == url && part.is_file() => m,
        _ => {
            // Leftovers from another URL, or bytes whose origin is unknown.
            let _ = tokio::fs::remove_file(&part).await;
            let _ = tokio::fs::remove_file(meta_path(dest)).await;
            fresh
        }
    }
}

fn save_meta(dest: &Path, meta: &PartMeta) -> std::result::Result<(), Failure> {
    let path = meta_path(dest);
    let json =
        serde_json::to_vec(meta).map_err(|e| Failure::fatal(format!("{}: {e}", path.display())))?;
    crate::atomic::write_bytes(&path, &json).map_err(|e| Failure::fatal(e.to_string()))
}

async fn partial_len(dest: &Path) -> u64 {
    tokio::fs::metadata(part_path(dest))
        .await
        .map(|m| m.len())
        .unwrap_or(0)
}

async fn discard_partial(dest: &Path, meta: &mut PartMeta) {
    let _ = tokio::fs::remove_file(part_path(dest)).await;
    meta.validator = None;
    meta.total = None;
}

/// One attempt: asks for what is missing and appends it to the partial file.
async fn attempt(
    client: &reqwest::Client,
    dest: &Path,
    meta: &mut PartMeta,
    attempt_starts: &mut Vec<u64>,
    progress: &mut impl FnMut(u64, Option<u64>),
) -> std::result::Result<(), Failure> {
    let offset = partial_len(dest).await;
    if offset > 0 && meta.total == Some(offset) {
        return Ok(());
    }
    let mut request = client.get(&meta.url).header(ACCEPT_ENCODING, "identity");
    if offset > 0 {
        request = request.header(RANGE, format!("bytes={offset}-"));
        if let Some(v) = &meta.validator {
            request = request.header(IF_RANGE, v.as_str());
        }
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| Failure::retry(describe(&e)))?;
    let status = response.status();
    let (start, total) = match status {
        StatusCode::OK => {
            if offset > 0 {
                tracing::info!(
                    url = %meta.url, offset,
                    "the server sent the whole file instead of the rest: restarting from 0"
                );
            }
            (0, response.content_length())
        }
        StatusCode::PARTIAL_CONTENT => {
            let header = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let checked = match parse_content_range(header) {
                None => Err(format!("206 with an invalid Content-Range `{header}`")),
                Some((a, _, _)) if a != offset => Err(format!(
                    "206 with Content-Range `{header}` for a request from byte {offset}"
                )),
                Some((_, _, t)) if meta.total.is_some_and(|known| known != t) => Err(format!(
                    "the file changed size on the server (Content-Range `{header}`, {} bytes before)",
                    meta.total.unwrap_or_default()
                )),
                Some((_, end, t)) if end + 1 != t => Err(format!(
                    "206 with Content-Range `{header}` does not run to the end of the file"
                )),
                Some((_, _, t)) => Ok(t),
            };
            match checked {
                Ok(t) => (offset, Some(t)),
                Err(reason) => {
                    discard_partial(dest, meta).await;
                    return Err(Failure::retry(format!("{reason}; restarting from 0")));
                }
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
            discard_partial(dest, meta).await;
            return Err(Failure::retry(format!(
                "the server refused the range from byte {offset} (416); restarting from 0"
            )));
        }
        s if s == StatusCode::REQUEST_TIMEOUT
            || s == StatusCode::TOO_MANY_REQUESTS
            || s.is_server_error() =>
        {
            return Err(Failure::retry(format!("HTTP {s}")));
        }
        s => return Err(Failure::fatal(format!("HTTP {s}"))),
    };
    attempt_starts.push(start);
    meta.validator = validator(response.headers());
    meta.total = total;
    save_meta(dest, meta)?;

    let part = part_path(dest);
    let io_err = |e: std::io::Error| Failure::fatal(format!("{}: {e}", part.display()));
    let file = if start == 0 {
        tokio::fs::File::create(&part).await.map_err(io_err)?
    } else {
        tokio::fs::OpenOptions::new()
            .append(true)
            .open(&part)
            .await
            .map_err(io_err)?
    };
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut done = start;
    progress(done, total);
    let mut overrun = false;
    let outcome = loop {
        match response.chunk().await {
            Ok(Some(bytes)) => {
                out.write_all(&bytes).await.map_err(io_err)?;
                done += bytes.len() as u64;
                if let Some(t) = total.filter(|t| done > *t) {
                    overrun = true;
                    break Err(Failure::retry(format!(
                        "the server sent more than the {t} bytes it announced"
                    )));
                }
                progress(done, total);
            }
            Ok(None) => break Ok(()),
            Err(e) => {
                let of = total.map(|t| format!(" of {t}")).unwrap_or_default();
                break Err(Failure::retry(format!(
                    "connection lost after {done}{of} bytes: {}",
                    describe(&e)
                )));
            }
        }
    };
    // Keep what arrived, whatever happened: the next attempt resumes from it.
    out.flush().await.map_err(io_err)?;
    out.get_ref().sync_all().await.map_err(io_err)?;
    if overrun {
        discard_partial(dest, meta).await;
    }
    outcome?;
    match total {
        Some(t) if done != t => Err(Failure::retry(format!(
            "connection closed after {done} of {t} bytes"
        ))),
        _ => {
            meta.total = Some(done);
            Ok(())
        }
    }
}

/// Hashes a file with sha256 and md5 in one pass.
fn digest_file(path: &Path) -> Result<(String, String, u64)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut sha = Sha256::new();
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        md5.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((
        hex::encode(sha.finalize()),
        hex::encode(md5.finalize()),
        bytes,
    ))
}

/// Downloads `config.url` to `dest` (see the module docs), reporting `(bytes done, total if
/// known)` to `progress`.
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid configuration; [`Error::Download`] when the
/// retries are spent or the server's answer cannot change; [`Error::ChecksumMismatch`] when
/// an expected checksum differs (the file is deleted); [`Error::Io`] for local files.
#[tracing::instrument(skip(config, progress), fields(url = %config.url))]
pub async fn download(
    config: &DownloadConfig,
    dest: &Path,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<Downloaded> {
    config.validate()?;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| Error::io(dir, e))?;
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
        .read_timeout(Duration::from_millis(config.read_timeout_ms))
        .user_agent(concat!("medray/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Download {
            url: config.url.clone(),
            attempts: 0,
            reason: format!("cannot set up the HTTP client: {}", describe(&e)),
        })?;
    let mut meta = load_partial(dest, &config.url).await;
    let mut attempt_starts = Vec::new();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match attempt(&client, dest, &mut meta, &mut attempt_starts, &mut progress).await {
            Ok(()) => break,
            Err(f) if !f.retryable || attempts > config.retries => {
                return Err(Error::Download {
                    url: config.url.clone(),
                    attempts,
                    reason: f.reason,
                });
            }
            Err(f) => {
                let wait = config.backoff(attempts);
                tracing::warn!(
                    url = %config.url, attempt = attempts, reason = %f.reason,
                    wait_ms = wait.as_millis() as u64, "download attempt failed; retrying"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
    let part = part_path(dest);
    tokio::fs::rename(&part, dest)
        .await
        .map_err(|e| Error::io(dest, e))?;
    let _ = tokio::fs::remove_file(meta_path(dest)).await;
    let path = dest.to_path_buf();
    let (sha256, md5, bytes) = tokio::task::spawn_blocking(move || digest_file(&path))
        .await
        .map_err(|e| Error::invalid("download", format!("hashing task failed: {e}")))??;
    for (algorithm, expected, got) in [
        ("sha256", &config.expected_sha256, &sha256),
        ("md5", &config.expected_md5, &md5),
    ] {
        if let Some(expected) = expected.as_ref().filter(|e| *e != got) {
            let _ = tokio::fs::remove_file(dest).await;
            return Err(Error::ChecksumMismatch {
                url: config.url.clone(),
                algorithm,
                expected: expected.clone(),
                got: got.clone(),
            });
        }
    }
    Ok(Downloaded {
        path: dest.to_path_buf(),
        bytes,
        sha256,
        md5,
        attempts,
        attempt_starts,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn content_range_is_parsed_strictly() {
        assert_eq!(parse_content_range("bytes 10-99/100"), Some((10, 99, 100)));
        for bad in [
            "",
            "bytes */100",
            "bytes 5-4/100",
            "bytes 0-100/100",
            "items 0-1/2",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn config_checks_url_and_checksum_form() {
        assert!(DownloadConfig::new("https://example.org/a.zip")
            .validate()
            .is_ok());
        for bad in ["ftp://x/y", "not a url"] {
            let err = DownloadConfig::new(bad).validate().unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
        let c = DownloadConfig::new("http://h/a").with_sha256("abc");
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("64 hexadecimal"));
        let c = DownloadConfig::new("http://h/a").with_md5("Z".repeat(32));
        assert!(c.validate().is_err());
        let c = DownloadConfig::new("http://h/a").with_md5("AB".repeat(16));
        assert_eq!(c.expected_md5.as_deref(), Some("ab".repeat(16).as_str()));
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let c = DownloadConfig::new("http://h/a").with_backoff_ms(100, 1_000);
        let waits: Vec<u64> = (1..=6).map(|r| c.backoff(r).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1_000, 1_000]);
    }
}
