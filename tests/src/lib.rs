#![doc = include_str!("../README.md")]

pub mod rogue;
pub mod web;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A free TCP port on 127.0.0.1 (bound then released).
///
/// # Errors
/// If no port can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Settings of a test cluster's head.
#[derive(Debug, Clone)]
pub struct HeadOptions {
    /// Heartbeat interval, ms.
    pub heartbeat_interval_ms: u64,
    /// Worker timeout, ms.
    pub worker_timeout_ms: u64,
    /// TLS: the head's certificate and key and the CA clients and workers trust (PEM files).
    pub tls: Option<TlsFiles>,
    /// More `medray head` arguments.
    pub extra_args: Vec<String>,
    /// Environment of the head process (e.g. `FAILPOINTS` for fault injection), on every
    /// start.
    pub env: Vec<(String, String)>,
}

/// PEM files of a TLS test cluster.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The head's certificate chain.
    pub cert: PathBuf,
    /// The head's private key.
    pub key: PathBuf,
    /// The CA that signed the certificate.
    pub ca: PathBuf,
}

impl Default for HeadOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 300,
            worker_timeout_ms: 5000,
            tls: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// One child process with its log file.
#[derive(Debug)]
pub struct Proc {
    /// "head", "worker-1", ...
    pub name: String,
    /// The process.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// True while it runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A head and workers of real `medray` binaries on loopback.
#[derive(Debug)]
pub struct TestCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The cluster token.
    pub token: String,
    /// gRPC address, `http://127.0.0.1:PORT`.
    pub address: String,
    /// HTTP operations address.
    pub http: String,
    port: u16,
    http_port: u16,
    options: HeadOptions,
    /// The head, while it runs.
    pub head: Option<Proc>,
    /// Workers, in start order (stopped ones stay, not running).
    pub workers: Vec<Proc>,
    restarts: usize,
}

impl TestCluster {
    /// Starts a head (not yet any worker) using the binary `bin`.
    ///
    /// # Errors
    /// If the head does not become reachable within 60 s (with its log tail).
    pub fn start(bin: impl Into<PathBuf>, options: HeadOptions) -> anyhow::Result<Self> {
        let token = {
            use rand::RngCore;
            let mut b = [0u8; 16];
            rand::thread_rng().fill_bytes(&mut b);
            hex::encode(b)
        };
        let port = free_port()?;
        let http_port = free_port()?;
        let mut c = Self {
            bin: bin.into(),
            dir: tempfile::tempdir()?,
            token,
            address: format!(
                "{}://127.0.0.1:{port}",
                if options.tls.is_some() {
                    "https"
                } else {
                    "http"
                }
            ),
            http: format!("127.0.0.1:{http_port}"),
            port,
            http_port,
            options,
            head: None,
            workers: Vec::new(),
            restarts: 0,
        };
        c.start_head()?;
        Ok(c)
    }

    /// The head's options, for the next [`Self::start_head`] (e.g. to disarm a failpoint
    /// before a restart).
    pub fn head_options_mut(&mut self) -> &mut HeadOptions {
        &mut self.options
    }

    /// The cluster's temporary folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The worker token workers get (derived from the client token, as the head does).
    #[must_use]
    pub fn worker_token(&self) -> String {
        medray_proto::auth::worker_token(&self.token)
    }

    /// Starts `medray <args>`: the head gets the client token, a worker only the worker token.
    fn spawn(&self, name: &str, args: &[String], env: &[(String, String)]) -> anyhow::Result<Proc> {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let credential = if args.first().is_some_and(|a| a == "worker") {
            ("MEDRAY_WORKER_TOKEN", self.worker_token())
        } else {
            ("MEDRAY_TOKEN", self.token.clone())
        };
        let child = Command::new(&self.bin)
            .args(args)
            .env_remove("MEDRAY_TOKEN")
            .env_remove("MEDRAY_WORKER_TOKEN")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(credential.0, credential.1)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name} ({})", self.bin.display()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Starts (or restarts) the head on the same port and data directory, and waits until
    /// it answers.
    ///
    /// # Errors
    /// If it does not answer within 60 s.
    pub fn start_head(&mut self) -> anyhow::Result<()> {
        let name = if self.restarts == 0 {
            "head".to_string()
        } else {
            format!("head-restart-{}", self.restarts)
        };
        self.restarts += 1;
        let mut args: Vec<String> = [
            "head",
            "--listen",
            &format!("127.0.0.1:{}", self.port),
            "--data-dir",
            &self.dir.path().join("data").display().to_string(),
            "--http-listen",
            &format!("127.0.0.1:{}", self.http_port),
            "--heartbeat-interval-ms",
            &self.options.heartbeat_interval_ms.to_string(),
            "--worker-timeout-ms",
            &self.options.worker_timeout_ms.to_string(),
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        if let Some(tls) = &self.options.tls {
            args.extend([
                "--tls-cert".into(),
                tls.cert.display().to_string(),
                "--tls-key".into(),
                tls.key.display().to_string(),
            ]);
        }
        args.extend(self.options.extra_args.iter().cloned());
        let proc = self.spawn(&name, &args, &self.options.env)?;
        self.head = Some(proc);
        self.wait_until("the head answers", Duration::from_secs(60), |c| {
            Ok(c.cli(&["status"])?.status.success())
        })
    }

    /// Starts a worker; returns its index in [`Self::workers`].
    ///
    /// # Errors
    /// If it cannot be spawned.
    pub fn add_worker(&mut self) -> anyhow::Result<usize> {
        self.add_worker_with(&[])
    }

    /// Starts a worker with extra command-line arguments; returns its index.
    ///
    /// # Errors
    /// If it cannot be spawned.
    pub fn add_worker_with(&mut self, extra: &[String]) -> anyhow::Result<usize> {
        self.add_worker_with_env(extra, &[])
    }

    /// Starts a worker with extra command-line arguments and environment variables (e.g.
    /// `FAILPOINTS`); returns its index.
    ///
    /// # Errors
    /// If it cannot be spawned.
    pub fn add_worker_with_env(
        &mut self,
        extra: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<usize> {
        let i = self.workers.len() + 1;
        let name = format!("worker-{i}");
        let mut args: Vec<String> = vec![
            "worker".into(),
            "--address".into(),
            self.address.clone(),
            "--name".into(),
            name.clone(),
            "--cache-dir".into(),
            self.dir
                .path()
                .join("cache")
                .join(&name)
                .display()
                .to_string(),
            "--drain-timeout-s".into(),
            "10".into(),
        ];
        if let Some(tls) = &self.options.tls {
            args.extend(["--tls-ca".into(), tls.ca.display().to_string()]);
        }
        args.extend_from_slice(extra);
        let proc = self.spawn(&name, &args, env)?;
        self.workers.push(proc);
        Ok(i - 1)
    }

    /// Runs the `medray` CLI against this cluster.
    ///
    /// # Errors
    /// If the binary cannot be run.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("MEDRAY_ADDRESS", &self.address)
            .env("MEDRAY_TOKEN", &self.token)
            .current_dir(self.dir.path());
        if let Some(tls) = &self.options.tls {
            cmd.env("MEDRAY_TLS_CA", &tls.ca);
        }
        cmd.output().context("running medray")
    }

    /// Runs the CLI and returns stdout, failing with stderr and the log tails when it fails.
    ///
    /// # Errors
    /// If the command fails.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "medray {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tails()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `medray status --json`.
    ///
    /// # Errors
    /// If the call fails.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.cli_ok(&["status", "--json"])?)?)
    }

    /// `medray job status ID --json` (even for a failed job).
    ///
    /// # Errors
    /// If the call fails or prints no JSON.
    pub fn job(&self, id: &str) -> anyhow::Result<serde_json::Value> {
        let out = self.cli(&["job", "status", id, "--json"])?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "job status {id}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_tails()
            )
        })
    }

    /// Number of workers the head reports ALIVE.
    ///
    /// # Errors
    /// If the status call fails.
    pub fn alive_workers(&self) -> anyhow::Result<usize> {
        let s = self.status()?;
        Ok(s["workers"]
            .as_array()
            .map_or(0, |w| w.iter().filter(|w| w["state"] == "ALIVE").count()))
    }

    /// Polls `cond` every 100 ms until it holds or `timeout` passes.
    ///
    /// # Errors
    /// On timeout (naming `what`, with the log tails), or an error of `cond`.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Self) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            match cond(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(e),
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting until {what} (last error: {last_err:?})\n{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the head reports `n` live workers.
    ///
    /// # Errors
    /// On timeout.
    pub fn wait_for_workers(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(&format!("{n} worker(s) are alive"), timeout, |c| {
            Ok(c.alive_workers()? == n)
        })
    }

    /// Waits until job `id` has ended; returns its JSON.
    ///
    /// # Errors
    /// On timeout.
    pub fn wait_for_job_end(
        &self,
        id: &str,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let mut last = serde_json::Value::Null;
        self.wait_until(&format!("job {id} ends"), timeout, |c| {
            last = c.job(id)?;
            Ok(matches!(
                last["state"].as_str(),
                Some("SUCCEEDED" | "FAILED" | "CANCELLED")
            ))
        })?;
        Ok(last)
    }

    /// Trains a tiny model for inference tests: `medray train` of `model` version v1 on
    /// `dataset`, one epoch at 16^3 with 8 channels on one worker, no validation; waits
    /// for it and returns the job id.
    ///
    /// # Errors
    /// If the job cannot be submitted, times out or does not succeed.
    pub fn train_tiny_model(
        &self,
        dataset: &str,
        model: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let id = self
            .cli_ok(&[
                "train",
                "--no-wait",
                "--dataset",
                dataset,
                "--model",
                model,
                "--version",
                "v1",
                "--size",
                "16",
                "16",
                "16",
                "--channels",
                "8",
                "--epochs",
                "1",
                "--batch-size",
                "2",
                "--lr",
                "1e-3",
                "--val-fraction",
                "0",
                "--seed",
                "7",
                "--workers",
                "1",
            ])?
            .trim()
            .to_string();
        let job = self.wait_for_job_end(&id, timeout)?;
        if job["state"] != "SUCCEEDED" {
            bail!(
                "training job {id} did not succeed: {job}\n{}",
                self.log_tails()
            );
        }
        Ok(id)
    }

    /// The last 30 lines of every child's log.
    #[must_use]
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for p in self.head.iter().chain(&self.workers) {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} ({}) ---\n", p.name, p.log.display()));
            out.push_str(&lines[lines.len().saturating_sub(30)..].join("\n"));
            out.push('\n');
        }
        out
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for p in self.workers.iter_mut().chain(self.head.iter_mut()) {
            // A stopped process must be continued to die from SIGKILL promptly.
            p.signal(Signal::SIGCONT);
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}
