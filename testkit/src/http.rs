//! A tiny HTTP/1.1 file server for download tests: one path, one body, one request per
//! connection (`Connection: close`).
//!
//! It answers `GET` with `200` (the whole body), or `206` for `Range: bytes=N-` /
//! `bytes=N-M` (with `Content-Range`), `416` for a range past the end, and honours `If-Range`
//! (a stale validator gets the whole body). Every response carries an `ETag` derived from
//! the body. A test can make the next response stop after N body bytes and drop the
//! connection ([`RangeServer::cut_next_after`]), answer the next request with an error
//! status ([`RangeServer::fail_next`]) or ignore `Range` altogether
//! ([`RangeServer::set_ignore_range`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the server saw of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The request target, e.g. `/training.zip`.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The `If-Range` header, if any.
    pub if_range: Option<String>,
    /// The status the server answered with.
    pub status: u16,
}

#[derive(Debug)]
struct State {
    path: String,
    body: Arc<Vec<u8>>,
    etag: String,
    cuts: VecDeque<u64>,
    failures: VecDeque<u16>,
    ignore_range: bool,
    requests: Vec<RecordedRequest>,
}

/// The server; it stops when dropped.
#[derive(Debug)]
pub struct RangeServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

fn etag_of(body: &[u8]) -> String {
    // FNV-1a over the body and its length: distinct bodies in a test get distinct tags.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}-{}\"", body.len())
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread poisons nothing we rely on: keep serving.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RangeServer {
    /// Starts serving `body` at `path` (e.g. `/training.zip`) on `127.0.0.1:0`, on the
    /// current Tokio runtime.
    ///
    /// # Errors
    /// If the listener cannot be bound.
    pub async fn start(path: &str, body: Vec<u8>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            path: path.to_string(),
            etag: etag_of(&body),
            body: Arc::new(body),
            cuts: VecDeque::new(),
            failures: VecDeque::new(),
            ignore_range: false,
            requests: Vec::new(),
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    // A client that goes away mid-response is not the server's problem.
                    let _ = serve(socket, &state).await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The URL of the served body.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, lock(&self.state).path)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next successful response sends only `bytes` body bytes, then closes the
    /// connection. Calls queue up: one cut per later response.
    pub fn cut_next_after(&self, bytes: u64) {
        lock(&self.state).cuts.push_back(bytes);
    }

    /// The next request is answered with `status` and an empty body. Calls queue up.
    pub fn fail_next(&self, status: u16) {
        lock(&self.state).failures.push_back(status);
    }

    /// Whether to ignore `Range` headers (answer `200` with the whole body), like a server
    /// without range support.
    pub fn set_ignore_range(&self, ignore: bool) {
        lock(&self.state).ignore_range = ignore;
    }

    /// Replaces the body (and so the `ETag`).
    pub fn set_body(&self, body: Vec<u8>) {
        let mut s = lock(&self.state);
        s.etag = etag_of(&body);
        s.body = Arc::new(body);
    }

    /// The requests seen so far, in order of arrival.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state).requests.clone()
    }
}

impl Drop for RangeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads the request head (up to the blank line); `None` if the client closed first.
async fn read_head(socket: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("request head over 64 KiB"));
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Parses `bytes=N-` or `bytes=N-M` into an inclusive range within `len` bytes.
fn parse_range(range: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = range.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = match end.trim() {
        "" => len.saturating_sub(1),
        e => e.parse::<u64>().ok()?.min(len.saturating_sub(1)),
    };
    if start >= len || end < start {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

async fn serve(mut socket: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let Some(head) = read_head(&mut socket).await? else {
        return Ok(());
    };
    let target = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string();
    let range = header(&head, "range").map(str::to_string);
    let if_range = header(&head, "if-range").map(str::to_string);

    // Decide the response under the lock, write it without.
    let (status, headers, body, start, end, cut) = {
        let mut s = lock(state);
        let len = s.body.len() as u64;
        let failure = s.failures.pop_front();
        let mut status = 200u16;
        let mut headers = format!("ETag: {}\r\nAccept-Ranges: bytes\r\n", s.etag);
        let (mut start, mut end) = (0u64, len);
        if let Some(code) = failure {
            status = code;
            end = 0;
        } else if target != s.path {
            status = 404;
            end = 0;
        } else if let Some(r) = range.as_deref().filter(|_| !s.ignore_range) {
            let fresh = if_range.as_deref().is_none_or(|v| v == s.etag);
            match parse_range(r, len) {
                Some(Ok((a, b))) if fresh => {
                    status = 206;
                    start = a;
                    end = b + 1;
                    headers.push_str(&format!("Content-Range: bytes {a}-{b}/{len}\r\n"));
                }
                Some(Err(())) if fresh => {
                    status = 416;
                    end = 0;
                    headers.push_str(&format!("Content-Range: bytes */{len}\r\n"));
                }
                _ => {}
            }
        }
        let cut = if (200..300).contains(&status) {
            s.cuts.pop_front()
        } else {
            None
        };
        s.requests.push(RecordedRequest {
            path: target.clone(),
            range: range.clone(),
            if_range: if_range.clone(),
            status,
        });
        (status, headers, s.body.clone(), start, end, cut)
    };
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Error",
    };
    let response_head = format!(
        "HTTP/1.1 {status} {reason}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        end - start
    );
    socket.write_all(response_head.as_bytes()).await?;
    let send_end = match cut {
        Some(n) => end.min(start + n),
        None => end,
    };
    let (a, b) = (start as usize, send_end as usize);
    if let Some(slice) = body.get(a..b) {
        socket.write_all(slice).await?;
    }
    socket.flush().await?;
    // A cut closes the connection after exactly the bytes sent (FIN, not RST, so none of
    // them is lost in flight): the client sees the body end before its Content-Length.
    socket.shutdown().await?;
    Ok(())
}
