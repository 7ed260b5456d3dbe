//! `medray up` and `medray down`: a local cluster (one head, N workers) as child processes
//! of this machine, one log file per process, stopped cleanly on Ctrl-C or `medray down`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use medray_proto::v1::ClusterStatusRequest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::client::{cluster_file_path, read_cluster_file, ClientArgs, ClusterFile};

/// Arguments of `medray up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Number of worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Compute threads of each worker (its RAYON_NUM_THREADS). 0: RAYON_NUM_THREADS if
    /// set, else the machine's cores shared out among the workers (at least 1 each), so
    /// that workers on one machine do not oversubscribe its cores.
    #[arg(long, default_value_t = 0)]
    pub threads_per_worker: usize,
    /// Data directory of the head.
    #[arg(long, env = "MEDRAY_DATA_DIR", default_value = "./medray-data")]
    pub data_dir: PathBuf,
    /// Stage URL of the head (default <data-dir>/stage).
    #[arg(long, env = "MEDRAY_STAGE")]
    pub stage: Option<String>,
    /// gRPC listen address of the head.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// HTTP address of the head's /healthz, /readyz and /metrics (port 0: a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http_listen: SocketAddr,
    /// Seconds to wait for the head and every worker to be ready.
    #[arg(long, default_value_t = 120)]
    pub ready_timeout_s: u64,
    /// Start the cluster in the background and return (stop it with `medray down`).
    #[arg(long)]
    pub detach: bool,
}

/// Arguments of `medray down`.
#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// Seconds to wait for the processes to exit before killing them.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
}

/// True while process `pid` runs. A child of this process that has exited (a zombie until
/// reaped, e.g. after `medray demo` started the cluster in-process) is reaped here and
/// counts as gone.
pub(crate) fn alive(pid: u32) -> bool {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let pid = Pid::from_raw(pid as i32);
    if let Ok(status) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        if !matches!(status, WaitStatus::StillAlive) {
            return false;
        }
    }
    kill(pid, None).is_ok()
}

fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

fn spawn(
    name: &str,
    args: &[String],
    envs: &[(&str, String)],
    log_dir: &Path,
) -> anyhow::Result<Proc> {
    use std::os::unix::process::CommandExt;
    let log = log_dir.join(format!("{name}.log"));
    let file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let exe = std::env::current_exe().context("locating the medray binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        // Own process group: a Ctrl-C in this terminal reaches `up`, which stops the
        // children in order (workers drain first).
        .process_group(0);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    // Each process gets only the credential it is given here (a worker never inherits the
    // client token from this shell).
    for k in [
        "MEDRAY_TOKEN",
        "MEDRAY_TOKEN_FILE",
        "MEDRAY_WORKER_TOKEN",
        "MEDRAY_WORKER_TOKEN_FILE",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    Ok(Proc {
        name: name.to_string(),
        child,
        log,
    })
}

fn write_cluster_file(file: &ClusterFile) -> anyhow::Result<()> {
    let path = cluster_file_path(Path::new("."));
    let dir = path.parent().context("cluster file folder")?;
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_vec_pretty(file)?;
    medray_core::atomic::write_bytes(&path, &json)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn wait_or_kill(p: &mut Proc, deadline: Instant) {
    loop {
        match p.child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                eprintln!("{} did not stop in time; killing it", p.name);
                let _ = p.child.kill();
                let _ = p.child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Stops the workers first (they drain and deregister), then the head.
fn stop_all(procs: &mut [Proc], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let (heads, workers): (Vec<&mut Proc>, Vec<&mut Proc>) =
        procs.iter_mut().partition(|p| p.name == "head");
    for p in &workers {
        signal(p.child.id(), Signal::SIGTERM);
    }
    for p in workers {
        wait_or_kill(p, deadline);
    }
    for p in &heads {
        signal(p.child.id(), Signal::SIGTERM);
    }
    let head_deadline = Instant::now() + Duration::from_secs(15);
    for p in heads {
        wait_or_kill(p, head_deadline);
    }
}

/// Compute threads per worker: the flag, else RAYON_NUM_THREADS, else the cores shared
/// out among `workers`.
fn worker_threads(flag: usize, workers: u32) -> usize {
    if flag > 0 {
        return flag;
    }
    if let Some(n) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cores / workers.max(1) as usize).max(1)
}

/// Starts the cluster and (unless detached) keeps it up until Ctrl-C, SIGTERM or
/// `medray down`.
pub fn up(args: UpArgs, device: &str) -> anyhow::Result<()> {
    if !(1..=64).contains(&args.workers) {
        anyhow::bail!("--workers {}: expected 1..=64", args.workers);
    }
    if let Some(existing) = read_cluster_file()? {
        if existing.pids.iter().any(|p| alive(*p)) {
            anyhow::bail!(
                "a cluster started from this directory is running ({}); stop it with `medray down`",
                existing.address
            );
        }
        let _ = std::fs::remove_file(cluster_file_path(Path::new(".")));
    }
    let started = Instant::now();
    let token = {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        hex::encode(bytes)
    };
    let log_dir = PathBuf::from(".medray").join("logs");
    std::fs::create_dir_all(&log_dir)?;
    let address = format!("http://{}", args.listen);
    let http = {
        let l = std::net::TcpListener::bind(args.http_listen)
            .with_context(|| format!("--http-listen {}", args.http_listen))?;
        l.local_addr()?
    };
    let token_env = ("MEDRAY_TOKEN", token.clone());
    // Workers get only the worker token: with it they register, never act as a client.
    let worker_token_env = (
        "MEDRAY_WORKER_TOKEN",
        medray_proto::auth::worker_token(&token),
    );
    let mut head_args: Vec<String> = vec![
        "head".into(),
        "--listen".into(),
        args.listen.to_string(),
        "--data-dir".into(),
        args.data_dir.display().to_string(),
        "--http-listen".into(),
        http.to_string(),
        "--min-workers".into(),
        args.workers.to_string(),
    ];
    if let Some(s) = &args.stage {
        head_args.extend(["--stage".into(), s.clone()]);
    }
    let mut procs = vec![spawn(
        "head",
        &head_args,
        std::slice::from_ref(&token_env),
        &log_dir,
    )?];
    let deadline = started + Duration::from_secs(args.ready_timeout_s);
    let rt = crate::data_dir::runtime()?;
    let client_args = ClientArgs {
        address: Some(address.clone()),
        token: Some(medray_proto::auth::Secret::new(token.clone())),
        token_file: None,
        tls_ca: None,
    };
    let threads = worker_threads(args.threads_per_worker, args.workers);
    let result = (|| -> anyhow::Result<()> {
        for i in 1..=args.workers {
            let name = format!("worker-{i}");
            let cache = PathBuf::from(".medray").join("cache").join(&name);
            procs.push(spawn(
                &name,
                &[
                    "worker".into(),
                    "--address".into(),
                    address.clone(),
                    "--name".into(),
                    name.clone(),
                    "--cache-dir".into(),
                    cache.display().to_string(),
                ],
                &[
                    worker_token_env.clone(),
                    ("MEDRAY_DEVICE", device.to_string()),
                    ("RAYON_NUM_THREADS", threads.to_string()),
                ],
                &log_dir,
            )?);
        }
        write_cluster_file(&ClusterFile {
            address: address.clone(),
            token: token.clone(),
            http: Some(format!("http://{http}")),
            up_pid: if args.detach { 0 } else { std::process::id() },
            pids: procs.iter().map(|p| p.child.id()).collect(),
            log_dir: log_dir.clone(),
        })?;
        rt.block_on(async {
            loop {
                for p in &mut procs {
                    if let Ok(Some(status)) = p.child.try_wait() {
                        anyhow::bail!(
                            "{} exited ({status}) before the cluster was ready; last lines of {}:\n{}",
                            p.name,
                            p.log.display(),
                            tail(&p.log, 20)
                        );
                    }
                }
                if let Ok(mut c) = client_args.connect().await {
                    if let Ok(s) = c.cluster_status(ClusterStatusRequest {}).await {
                        let ready = s.get_ref().workers.iter().filter(|w| w.state == "ALIVE").count();
                        if ready >= args.workers as usize {
                            return Ok(());
                        }
                    }
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "the cluster was not ready within {} s; see the logs in {}",
                        args.ready_timeout_s,
                        log_dir.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    })();
    if let Err(e) = result {
        stop_all(&mut procs, Duration::from_secs(10));
        let _ = std::fs::remove_file(cluster_file_path(Path::new(".")));
        return Err(e);
    }
    println!(
        "medray cluster ready in {:.1} s: head {address}, {} worker(s) of {threads} compute thread(s), http http://{http}",
        started.elapsed().as_secs_f64(),
        args.workers
    );
    println!(
        "token and pids in .medray/cluster.json; logs in {}",
        log_dir.display()
    );
    if args.detach {
        println!("stop it with `medray down`");
        // The children run on in their own process groups.
        for p in procs {
            std::mem::forget(p.child);
        }
        return Ok(());
    }
    println!("press Ctrl-C (or run `medray down`) to stop it");
    rt.block_on(async {
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                () = super::shutdown_signal() => break,
                _ = ticker.tick() => {
                    for p in &mut procs {
                        if let Ok(Some(status)) = p.child.try_wait() {
                            eprintln!("{} exited ({status}); see {}", p.name, p.log.display());
                        }
                    }
                    procs.retain_mut(|p| !matches!(p.child.try_wait(), Ok(Some(_))));
                }
            }
        }
    });
    eprintln!("stopping the cluster...");
    stop_all(&mut procs, Duration::from_secs(75));
    let _ = std::fs::remove_file(cluster_file_path(Path::new(".")));
    eprintln!("stopped");
    Ok(())
}

/// Stops the cluster `medray up` started from this directory.
pub fn down(args: DownArgs) -> anyhow::Result<()> {
    let Some(file) = read_cluster_file()? else {
        anyhow::bail!("no cluster was started from this directory (no .medray/cluster.json)");
    };
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    if file.up_pid != 0 && alive(file.up_pid) {
        // `up` owns the children: it stops them in order and removes the file.
        signal(file.up_pid, Signal::SIGTERM);
    } else {
        for pid in file.pids.iter().rev() {
            signal(*pid, Signal::SIGTERM);
        }
    }
    let all: Vec<u32> = file
        .pids
        .iter()
        .copied()
        .chain([file.up_pid].into_iter().filter(|p| *p != 0))
        .collect();
    while all.iter().any(|p| alive(*p)) {
        if Instant::now() > deadline {
            for p in all.iter().filter(|p| alive(**p)) {
                eprintln!("pid {p} did not stop in {} s; killing it", args.timeout_s);
                signal(*p, Signal::SIGKILL);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(cluster_file_path(Path::new(".")));
    println!(
        "stopped the cluster at {} ({} process(es))",
        file.address,
        file.pids.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn worker_threads_share_the_cores_unless_told() {
        assert_eq!(worker_threads(3, 2), 3);
        // More workers than cores: one thread each, never zero.
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            assert_eq!(worker_threads(0, 100_000), 1);
        }
        assert!(worker_threads(0, 1) >= 1);
    }
}
