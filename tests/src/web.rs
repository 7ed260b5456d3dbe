//! Web checks for tests: a plain HTTP/1.0 GET, and pages rendered by headless Chromium
//! (Debian's `chromium`; `.ci/run` installs it) with a screenshot and the page's console.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

/// An HTTP answer: status code, headers (lower-case names) and body.
#[derive(Debug)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Header lines as (lower-case name, value).
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl HttpAnswer {
    /// The value of header `name` (lower-case).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` on `addr` (`127.0.0.1:PORT`) with HTTP/1.0, so the server closes the
/// connection after the answer.
///
/// # Errors
/// If the connection fails or the answer is not HTTP.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<HttpAnswer> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers in the answer")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP status line: {head}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpAnswer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

/// Headless Chromium.
#[derive(Debug)]
pub struct Chromium {
    path: PathBuf,
}

/// What rendering a page gave.
#[derive(Debug)]
pub struct Rendered {
    /// Messages the page wrote to its console, uncaught exceptions included, as Chromium
    /// logs them (`"text", source: URL (line)`).
    pub console: Vec<String>,
    /// Chromium's whole log, for failure messages.
    pub log: String,
}

impl Chromium {
    /// Finds Chromium: `$MEDRAY_CHROMIUM`, else `chromium` or `chromium-browser` on the PATH.
    ///
    /// # Errors
    /// When there is none, saying how to install it.
    pub fn find() -> anyhow::Result<Self> {
        if let Ok(p) = std::env::var("MEDRAY_CHROMIUM") {
            return Ok(Self { path: p.into() });
        }
        for name in ["chromium", "chromium-browser"] {
            if let Some(dir) = std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .find(|d| d.join(name).is_file())
            {
                return Ok(Self {
                    path: dir.join(name),
                });
            }
        }
        bail!(
            "headless Chromium is needed for the report tests and was not found: install \
             it (`apt-get install chromium`, as .ci/run does) or set MEDRAY_CHROMIUM"
        )
    }

    /// Loads `url`, waits for it to settle, and saves a `width` x `height` screenshot to
    /// `screenshot`. Runs with a fresh profile and without network services (the machine
    /// may have no internet).
    ///
    /// # Errors
    /// If Chromium fails or writes no screenshot.
    pub fn render(
        &self,
        url: &str,
        screenshot: &Path,
        (width, height): (u32, u32),
    ) -> anyhow::Result<Rendered> {
        let profile = tempfile::tempdir()?;
        let out = Command::new(&self.path)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--log-level=0",
                "--virtual-time-budget=5000",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--window-size={width},{height}"))
            .arg(format!("--screenshot={}", screenshot.display()))
            .arg(url)
            .output()
            .with_context(|| format!("running {}", self.path.display()))?;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || !screenshot.is_file() {
            bail!(
                "{} did not render {url} ({}):\n{log}",
                self.path.display(),
                out.status
            );
        }
        let console = log
            .lines()
            .filter_map(|l| l.split_once(":CONSOLE").map(|(_, m)| m.to_string()))
            .collect();
        Ok(Rendered { console, log })
    }
}
