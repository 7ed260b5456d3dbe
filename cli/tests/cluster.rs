//! Multi-process cluster tests: real `medray` binaries on loopback (see
//! `medray_tests::TestCluster`). Each test starts its own head and workers.

use std::time::Duration;

use medray_proto::auth::BearerToken;
use medray_proto::v1::worker_client::WorkerClient;
use medray_proto::v1::RegisterRequest;
use medray_tests::{HeadOptions, TestCluster, TlsFiles};
use nix::sys::signal::Signal;

const BIN: &str = env!("CARGO_BIN_EXE_medray");
const LONG: Duration = Duration::from_secs(120);

fn cluster(workers: usize) -> TestCluster {
    let mut c = TestCluster::start(BIN, HeadOptions::default()).expect("head starts");
    for _ in 0..workers {
        c.add_worker().expect("worker starts");
    }
    c.wait_for_workers(workers, LONG).expect("workers register");
    c
}

fn submit_selftest(c: &TestCluster, extra: &[&str]) -> String {
    let mut args = vec!["selftest", "--no-wait"];
    args.extend_from_slice(extra);
    c.cli_ok(&args).expect("submit").trim().to_string()
}

/// Waits until some worker runs a task of `job`; returns that worker's index in
/// `c.workers` (names are `worker-<index+1>`).
fn worker_running(c: &TestCluster, job: &str) -> usize {
    let mut found = None;
    c.wait_until(&format!("a worker runs {job}"), LONG, |c| {
        let s = c.status()?;
        for w in s["workers"].as_array().into_iter().flatten() {
            if w["current_task"]
                .as_str()
                .is_some_and(|t| t.starts_with(job))
            {
                let name = w["name"].as_str().unwrap_or_default();
                found = name
                    .strip_prefix("worker-")
                    .and_then(|i| i.parse::<usize>().ok());
                return Ok(found.is_some());
            }
        }
        Ok(false)
    })
    .expect("task starts");
    found.expect("worker index") - 1
}

fn succeeded_lines(logs: &str, task: &str) -> usize {
    logs.lines()
        .filter(|l| l.contains(&format!("task {task} succeeded")))
        .count()
}

#[test]
fn three_workers_register_and_pass_the_selftest() {
    let c = cluster(3);
    let out = c.cli_ok(&["selftest"]).expect("selftest succeeds");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("t0")).count(),
        3,
        "{out}"
    );
    let status = c.cli_ok(&["status"]).unwrap();
    for name in ["worker-1", "worker-2", "worker-3"] {
        assert!(status.contains(name), "{status}");
    }
    let job = c.status().unwrap()["jobs"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let j = c.job(&job).unwrap();
    assert_eq!(j["state"], "SUCCEEDED", "{j}");
    let results = j["result"].as_array().unwrap();
    let mut workers: Vec<&str> = results
        .iter()
        .map(|r| r["worker"].as_str().unwrap())
        .collect();
    workers.sort_unstable();
    workers.dedup();
    assert_eq!(workers.len(), 3, "each task on its own worker: {j}");
    for r in results {
        assert_eq!(r["result"]["device"], "cpu", "{j}");
        assert!(r["result"]["forward_ms"].as_f64().unwrap() > 0.0, "{j}");
    }
}

#[test]
fn a_killed_worker_has_its_task_run_elsewhere() {
    let c = cluster(2);
    let job = submit_selftest(&c, &["--workers", "1", "--hold-ms", "6000"]);
    let victim = worker_running(&c, &job);
    c.workers[victim].signal(Signal::SIGKILL);
    let j = c.wait_for_job_end(&job, LONG).unwrap();
    assert_eq!(j["state"], "SUCCEEDED", "{j}\n{}", c.log_tails());
    let ran_on = j["result"][0]["worker"].as_str().unwrap().to_string();
    let logs = c.cli_ok(&["job", "logs", &job]).unwrap();
    assert!(logs.contains("will run again"), "{logs}");
    assert_eq!(succeeded_lines(&logs, "t0001"), 1, "{logs}");
    // The head marked the killed worker dead: one worker left (the killed one is listed
    // LOST for a while).
    c.wait_for_workers(1, LONG).unwrap();
    let status = c.status().unwrap();
    let survivor = status["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["state"] == "ALIVE")
        .and_then(|w| w["worker_id"].as_str())
        .unwrap_or_else(|| panic!("no ALIVE worker: {status}"))
        .to_string();
    assert_eq!(ran_on, survivor);
}

#[test]
fn a_killed_worker_is_listed_lost_with_the_reason_within_15_s() {
    // The head's default heartbeat interval and worker timeout, as a user runs it.
    let options = HeadOptions {
        heartbeat_interval_ms: 1000,
        worker_timeout_ms: 6000,
        ..HeadOptions::default()
    };
    let mut c = TestCluster::start(BIN, options).expect("head starts");
    for _ in 0..2 {
        c.add_worker().expect("worker starts");
    }
    c.wait_for_workers(2, LONG).expect("workers register");
    let worker_id = |c: &TestCluster, name: &str| -> String {
        let s = c.status().unwrap();
        s["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["name"] == name)
            .and_then(|w| w["worker_id"].as_str())
            .unwrap_or_else(|| panic!("{name} not listed: {s}"))
            .to_string()
    };
    let victim = worker_id(&c, "worker-2");
    c.workers[1].signal(Signal::SIGKILL);
    let mut lost = serde_json::Value::Null;
    c.wait_until(
        "the killed worker is listed LOST",
        Duration::from_secs(15),
        |c| {
            let s = c.status()?;
            if let Some(w) = s["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|w| w["worker_id"] == victim.as_str() && w["state"] == "LOST")
            {
                lost = w.clone();
                return Ok(true);
            }
            Ok(false)
        },
    )
    .unwrap();
    let reason = lost["lost_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("connection closed") || reason.contains("no heartbeat"),
        "{lost}"
    );
    assert!(
        lost["lost_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{lost}"
    );
    assert_eq!(lost["current_task"], "", "{lost}");
    // The survivor is unaffected; the table shows the lost one, with why.
    assert_eq!(c.alive_workers().unwrap(), 1);
    let table = c.cli_ok(&["status"]).unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with(&victim))
        .unwrap_or_else(|| panic!("{victim} not in the table:\n{table}"));
    assert!(row.contains("LOST"), "{table}");
    assert!(table.contains(reason), "{table}");
    assert!(table.contains("1 worker(s), 1 lost recently"), "{table}");
}

#[test]
fn a_hung_worker_is_evicted_and_its_result_not_counted_twice() {
    let c = cluster(2);
    let job = submit_selftest(&c, &["--workers", "1", "--hold-ms", "4000"]);
    let victim = worker_running(&c, &job);
    c.workers[victim].signal(Signal::SIGSTOP);
    let j = c.wait_for_job_end(&job, LONG).unwrap();
    assert_eq!(j["state"], "SUCCEEDED", "{j}\n{}", c.log_tails());
    let logs = c.cli_ok(&["job", "logs", &job]).unwrap();
    assert!(
        logs.contains("no heartbeat"),
        "evicted by the timeout: {logs}"
    );
    // Let the hung worker resume: its stale attempt must not be counted.
    c.workers[victim].signal(Signal::SIGCONT);
    c.wait_for_workers(2, LONG).unwrap();
    let j = c.job(&job).unwrap();
    assert_eq!(j["tasks_succeeded"], 1, "{j}");
    assert_eq!(j["tasks_total"], 1, "{j}");
    let logs = c.cli_ok(&["job", "logs", &job]).unwrap();
    assert_eq!(succeeded_lines(&logs, "t0001"), 1, "{logs}");
}

#[test]
fn a_restarted_head_resumes_the_running_job() {
    let mut c = cluster(1);
    let job = submit_selftest(&c, &["--workers", "1", "--hold-ms", "3000"]);
    worker_running(&c, &job);
    let head = c.head.as_mut().unwrap();
    head.signal(Signal::SIGKILL);
    let _ = head.child.wait();
    c.start_head().unwrap();
    let j = c.wait_for_job_end(&job, LONG).unwrap();
    assert_eq!(j["state"], "SUCCEEDED", "{j}\n{}", c.log_tails());
    let logs = c.cli_ok(&["job", "logs", &job]).unwrap();
    assert!(logs.contains("head restarted"), "{logs}");
    // `job status` is truthful afterwards, and exits 0 for a succeeded job.
    let out = c.cli_ok(&["job", "status", &job]).unwrap();
    assert!(out.contains("SUCCEEDED"), "{out}");
}

#[test]
fn bad_tokens_and_protocol_versions_are_refused() {
    let c = cluster(0);
    // Wrong token through the CLI.
    let out = std::process::Command::new(BIN)
        .args([
            "status",
            "--address",
            &c.address,
            "--token",
            "0123456789abcdef-wrong",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Unauthenticated"), "{err}");
    assert!(!err.contains(&c.token), "the token is never printed");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(c.address.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let register = |version| RegisterRequest {
            protocol_version: version,
            name: "probe".into(),
            device: "cpu".into(),
            ..RegisterRequest::default()
        };
        // Missing token.
        let e = WorkerClient::new(channel.clone())
            .register(register(medray_proto::PROTOCOL_VERSION))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        // The client token cannot register a worker, and says which token can.
        let e =
            WorkerClient::with_interceptor(channel.clone(), BearerToken::new(&c.token).unwrap())
                .register(register(medray_proto::PROTOCOL_VERSION))
                .await
                .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        assert!(e.message().contains("MEDRAY_WORKER_TOKEN"), "{e}");
        // Right token, wrong protocol version: both versions named.
        let e =
            WorkerClient::with_interceptor(channel, BearerToken::new(&c.worker_token()).unwrap())
                .register(register(999))
                .await
                .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("999"), "{e}");
        assert!(
            e.message()
                .contains(&medray_proto::PROTOCOL_VERSION.to_string()),
            "{e}"
        );
    });
}

/// Issue 18 item 1: workers and clients shared one token, so a worker could call every
/// client API (read every decrypted object, delete models, overwrite any stage key). Now a
/// worker holds the worker token and its session credential, and the client service
/// refuses both on every call.
#[test]
fn a_worker_credential_is_refused_by_every_client_api() {
    use medray_proto::v1::client_client::ClientClient;
    use medray_proto::v1::*;
    let c = cluster(0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let worker_token = c.worker_token();
        let session = medray_tests::rogue::register(&c.address, &worker_token, "probe")
            .await
            .expect("the worker token registers a worker")
            .session_token;
        assert_eq!(session.len(), 64);
        let channel = tonic::transport::Endpoint::from_shared(c.address.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        for (what, credential) in [("worker token", &worker_token), ("session", &session)] {
            let mut client = ClientClient::with_interceptor(
                channel.clone(),
                BearerToken::new(credential).unwrap(),
            );
            let mut refused = Vec::new();
            macro_rules! check {
                ($name:literal, $call:expr) => {{
                    let e = $call
                        .await
                        .err()
                        .unwrap_or_else(|| panic!("{} accepted the {what}", $name));
                    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{}: {e}", $name);
                    refused.push($name);
                }};
            }
            check!("SubmitJob", client.submit_job(SubmitJobRequest::default()));
            check!("GetJob", client.get_job(GetJobRequest::default()));
            check!("ListJobs", client.list_jobs(ListJobsRequest::default()));
            check!("CancelJob", client.cancel_job(CancelJobRequest::default()));
            check!(
                "StreamJobLogs",
                client.stream_job_logs(StreamJobLogsRequest::default())
            );
            check!(
                "ClusterStatus",
                client.cluster_status(ClusterStatusRequest::default())
            );
            check!(
                "ListDatasets",
                client.list_datasets(ListDatasetsRequest::default())
            );
            check!(
                "GetDataset",
                client.get_dataset(GetDatasetRequest::default())
            );
            check!("StageList", client.stage_list(StageListRequest::default()));
            check!("StageGet", client.stage_get(StageGetRequest::default()));
            check!(
                "StagePut",
                client.stage_put(futures::stream::iter(vec![StagePutRequest {
                    key: "jobs/job-000001/state.json".into(),
                    data: b"{}".to_vec(),
                }]))
            );
            check!(
                "ListModels",
                client.list_models(ListModelsRequest::default())
            );
            check!("GetModel", client.get_model(GetModelRequest::default()));
            check!(
                "ExportModel",
                client.export_model(ExportModelRequest::default())
            );
            check!(
                "ImportModel",
                client.import_model(futures::stream::iter(vec![ImportModelRequest::default()]))
            );
            check!(
                "SetModelAlias",
                client.set_model_alias(SetModelAliasRequest::default())
            );
            check!(
                "DeleteModel",
                client.delete_model(DeleteModelRequest::default())
            );
            check!(
                "ListResults",
                client.list_results(ListResultsRequest::default())
            );
            check!(
                "QueryCatalog",
                client.query_catalog(QueryCatalogRequest::default())
            );
            assert_eq!(
                refused.len(),
                19,
                "every Client rpc of client.proto: {refused:?}"
            );
        }
        // The client token still works, and the session is no client credential.
        let mut client =
            ClientClient::with_interceptor(channel, BearerToken::new(&c.token).unwrap());
        client
            .cluster_status(ClusterStatusRequest::default())
            .await
            .expect("the client token is accepted");
    });
}

#[test]
fn logs_follow_delivers_every_line_in_order() {
    let c = cluster(1);
    let job = submit_selftest(&c, &["--workers", "1", "--log-lines", "10000"]);
    let out = c.cli_ok(&["job", "logs", &job, "--follow"]).unwrap();
    let numbers: Vec<usize> = out
        .lines()
        .filter_map(|l| l.split("selftest line ").nth(1))
        .map(|n| n.trim().parse().unwrap())
        .collect();
    assert_eq!(numbers.len(), 10_000);
    assert!(numbers.iter().enumerate().all(|(i, n)| i == *n));
    assert!(
        out.contains("job SUCCEEDED"),
        "the stream ends after the job: {out:.2000}"
    );
}

#[test]
fn a_job_waiting_for_workers_says_why() {
    let mut c = cluster(1);
    let job = submit_selftest(&c, &["--workers", "2"]);
    c.wait_until("the job says why it waits", LONG, |c| {
        let j = c.job(&job)?;
        Ok(j["state"] == "PENDING" && j["reason"] == "needs 2 worker(s), 1 registered")
    })
    .unwrap();
    c.add_worker().unwrap();
    let j = c.wait_for_job_end(&job, LONG).unwrap();
    assert_eq!(j["state"], "SUCCEEDED", "{j}");
}

#[test]
fn operations_endpoints_answer() {
    let c = cluster(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let get = |path: &str| -> (u16, String) {
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(&c.http).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut buf = String::new();
            s.read_to_string(&mut buf).await.unwrap();
            let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
            (code, buf)
        })
    };
    assert_eq!(get("/healthz").0, 200);
    assert_eq!(get("/readyz").0, 200);
    let (code, body) = get("/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("medray_workers 1"), "{body}");
    assert!(body.contains("medray_jobs{state=\"RUNNING\"} 0"), "{body}");
    assert!(
        body.contains("medray_task_latency_seconds_count 0"),
        "{body}"
    );
}

#[test]
fn up_then_down_leaves_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let port = medray_tests::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let out = std::process::Command::new(BIN)
        .args(["up", "--workers", "2", "--detach", "--listen", &listen])
        .args(["--data-dir", "data"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(".medray/cluster.json")).unwrap())
            .unwrap();
    let pids: Vec<i32> = file["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 3);
    // The CLI finds the cluster and its token from this directory.
    let status = std::process::Command::new(BIN)
        .arg("status")
        .current_dir(dir.path())
        .env_remove("MEDRAY_ADDRESS")
        .env_remove("MEDRAY_TOKEN")
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&status.stdout)
            .matches("ALIVE")
            .count(),
        2
    );
    let down = std::process::Command::new(BIN)
        .arg("down")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    for pid in pids {
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"));
        assert!(gone, "pid {pid} still runs after medray down");
    }
    assert!(!dir.path().join(".medray/cluster.json").exists());
}

/// A CA and a certificate for 127.0.0.1 and localhost signed by it, as PEM files in `dir`.
fn make_tls_files(dir: &std::path::Path) -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("test certificate");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("test certificate");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("test certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("test certificate");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("test certificate")
        .signed_by(&key, &issuer)
        .expect("test certificate");
    let files = TlsFiles {
        cert: dir.join("head.pem"),
        key: dir.join("head.key"),
        ca: dir.join("ca.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).expect("test certificate");
    std::fs::write(&files.key, key.serialize_pem()).expect("test certificate");
    std::fs::write(&files.ca, ca_cert.pem()).expect("test certificate");
    files
}

#[test]
fn a_tls_cluster_works_and_refuses_clients_without_the_ca() {
    let pems = tempfile::tempdir().unwrap();
    let tls = make_tls_files(pems.path());
    let options = HeadOptions {
        tls: Some(tls),
        ..HeadOptions::default()
    };
    let mut c = TestCluster::start(BIN, options).expect("TLS head starts");
    c.add_worker().unwrap();
    c.wait_for_workers(1, LONG).unwrap();
    let out = c.cli_ok(&["selftest"]).expect("selftest over TLS");
    assert!(out.contains("t0001"), "{out}");
    // Without the CA, the client cannot verify the head and gives up.
    let plain = std::process::Command::new(BIN)
        .args(["status", "--address", &c.address, "--token", &c.token])
        .env_remove("MEDRAY_TLS_CA")
        .output()
        .unwrap();
    assert!(!plain.status.success());
}

#[test]
fn ingest_datasets_and_stage_go_through_the_head() {
    let c = cluster(0);
    let out = c
        .cli_ok(&[
            "ingest",
            "synthetic",
            "--cases",
            "2",
            "--size",
            "16",
            "16",
            "16",
            "--name",
            "tiny",
        ])
        .unwrap();
    assert!(out.contains("\"cases\":2"), "{out}");
    let list = c.cli_ok(&["datasets", "list"]).unwrap();
    assert!(list.contains("tiny\t2\t"), "{list}");
    let show = c.cli_ok(&["datasets", "show", "tiny"]).unwrap();
    assert!(show.contains("case_002"), "{show}");
    // The data went to the head's data directory, not to a local ./medray-data.
    assert!(c.dir().join("data").join("catalog.db").exists());
    assert!(!c.dir().join("medray-data").exists());

    let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(c.dir().join("in.bin"), &payload).unwrap();
    c.cli_ok(&["stage", "put", "in.bin", "misc/in.bin"])
        .unwrap();
    let ls = c.cli_ok(&["stage", "ls", "misc"]).unwrap();
    assert!(ls.contains("misc/in.bin"), "{ls}");
    c.cli_ok(&["stage", "get", "misc/in.bin", "out.bin"])
        .unwrap();
    assert_eq!(std::fs::read(c.dir().join("out.bin")).unwrap(), payload);

    // A failing ingest job makes the command fail with the reason.
    let bad = c
        .cli(&["ingest", "dir", "/", "--name", "not-a-dataset"])
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("FAILED"), "{err}");
    let list = c.cli_ok(&["datasets", "list"]).unwrap();
    assert!(!list.contains("not-a-dataset"), "{list}");
}

/// The benchmark sources run as ingest jobs on the head: a tiny COPDGene case (with a table
/// file for its grid) and an NLST folder whose JSON names an image the folder lacks.
#[test]
fn benchmark_ingests_go_through_the_head() {
    let c = cluster(0);
    let copd = c.dir().join("bench/copd2");
    std::fs::create_dir_all(&copd).unwrap();
    let raw: Vec<u8> = (0..60i16).flat_map(|v| v.to_le_bytes()).collect();
    let landmarks: String = (0..300)
        .map(|n| format!("{}\t{}\t{}\r\n", 1 + n % 5, 1 + n % 4, 1 + n % 3))
        .collect();
    for phase in ["i", "e"] {
        std::fs::write(copd.join(format!("copd2_{phase}BHCT.img")), &raw).unwrap();
        std::fs::write(
            copd.join(format!("copd2_300_{phase}BH_xyz_r1.txt")),
            &landmarks,
        )
        .unwrap();
    }
    let table = c.dir().join("bench/table.csv");
    std::fs::write(
        &table,
        "case,size_x,size_y,size_z,spacing_x_mm,spacing_y_mm,spacing_z_mm\ncopd2,5,4,3,0.645,0.645,2.5\n",
    )
    .unwrap();
    let root = c.dir().join("bench").display().to_string();
    let table = table.display().to_string();
    let out = c
        .cli_ok(&[
            "ingest", "dirlab", &root, "--table", &table, "--name", "copd",
        ])
        .unwrap();
    assert!(out.contains("\"cases\":1"), "{out}");
    let show = c.cli_ok(&["datasets", "show", "copd"]).unwrap();
    assert!(show.contains("copd2"), "{show}");

    let nlst = c.dir().join("nlst");
    std::fs::create_dir_all(nlst.join("imagesTr")).unwrap();
    std::fs::write(
        nlst.join("NLST_dataset.json"),
        r#"{"training_paired_images": [{"fixed": "./imagesTr/NLST_0001_0000.nii.gz", "moving": "./imagesTr/NLST_0001_0001.nii.gz"}]}"#,
    )
    .unwrap();
    let bad = c
        .cli(&["ingest", "nlst", &nlst.display().to_string()])
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("imagesTr/NLST_0001_0000.nii.gz"), "{err}");
    let list = c.cli_ok(&["datasets", "list"]).unwrap();
    assert!(!list.contains("nlst"), "{list}");
}

#[test]
fn a_worker_drains_on_sigterm_and_exits_zero() {
    let mut c = cluster(1);
    let job = submit_selftest(&c, &["--workers", "1", "--hold-ms", "3000"]);
    let w = worker_running(&c, &job);
    c.workers[w].signal(Signal::SIGTERM);
    let status = c.workers[w].child.wait().unwrap();
    assert!(
        status.success(),
        "drained worker exits 0: {status}\n{}",
        c.log_tails()
    );
    // It finished its task before leaving, and told the head it left.
    let j = c.wait_for_job_end(&job, LONG).unwrap();
    assert_eq!(j["state"], "SUCCEEDED", "{j}");
    c.wait_for_workers(0, LONG).unwrap();
    let log = std::fs::read_to_string(&c.workers[w].log).unwrap();
    assert!(log.contains("left the cluster"), "{log}");
}

#[test]
fn a_cancelled_job_stops_its_task() {
    let c = cluster(1);
    let job = submit_selftest(&c, &["--workers", "1", "--hold-ms", "600000"]);
    worker_running(&c, &job);
    let out = c.cli_ok(&["job", "cancel", &job]).unwrap();
    assert!(out.contains("CANCELLED"), "{out}");
    // The worker stops the task and becomes idle again.
    c.wait_until("the worker is idle", LONG, |c| {
        Ok(c.status()?["workers"][0]["current_task"] == "")
    })
    .unwrap();
    let j = c.job(&job).unwrap();
    assert_eq!(j["state"], "CANCELLED", "{j}");
    // `job status` of a cancelled job exits non-zero.
    assert!(!c.cli(&["job", "status", &job]).unwrap().status.success());
}

#[test]
fn a_worker_configured_with_the_stage_reads_it_directly() {
    let mut c = cluster(0);
    let data = c.dir().join("data");
    c.add_worker_with(&[
        "--stage".into(),
        data.join("stage").display().to_string(),
        "--stage-key-file".into(),
        data.join("stage.key").display().to_string(),
    ])
    .unwrap();
    c.wait_for_workers(1, LONG).unwrap();
    let job = submit_selftest(&c, &[]);
    let j = c.wait_for_job_end(&job, LONG).unwrap();
    assert_eq!(j["state"], "SUCCEEDED", "{j}\n{}", c.log_tails());
    let logs = c.cli_ok(&["job", "logs", &job]).unwrap();
    assert!(logs.contains("directly from the stage"), "{logs}");
    // Nothing went through the head's object stream.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&c.http).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf
    });
    assert!(!body.contains("direction=\"to_worker\""), "{body}");
}

/// Issue 18 item 4: `medray sql` capped rows, not bytes; `zeroblob` answers could make the
/// head allocate gigabytes (and then fail to send them). Now one huge value and many
/// moderate ones are refused with an error naming the cap, and the head answers the next
/// query.
#[test]
fn a_huge_sql_answer_is_refused_by_the_byte_cap_and_the_head_serves_on() {
    let c = cluster(0);
    for sql in [
        "SELECT zeroblob(500000000)",
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) \
         SELECT i, zeroblob(1000000) FROM n",
    ] {
        let out = c.cli(&["sql", sql]).expect("run");
        assert!(!out.status.success(), "{sql} was answered");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--max-query-bytes"), "{sql}: {err}");
    }
    let one = c
        .cli_ok(&["sql", "SELECT 1 AS one", "--format", "csv"])
        .expect("sql");
    assert_eq!(one, "one\n1\n");
}

/// A non-loopback IPv4 address of this machine (the one a route out would use; no packet
/// is sent), if it has one.
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("10.255.255.255:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Issue 18 item 5: the cluster node listened on every interface whatever `--node-host`
/// said. Told the loopback host (the default), it is reachable there and not on the
/// machine's other address; the cluster works as before.
#[test]
fn the_cluster_node_listens_only_on_the_host_it_is_given() {
    let node_port = medray_tests::free_port().expect("port");
    let options = HeadOptions {
        extra_args: vec!["--node-port".into(), node_port.to_string()],
        ..HeadOptions::default()
    };
    let mut c = TestCluster::start(BIN, options).expect("head starts");
    c.add_worker().expect("worker starts");
    c.wait_for_workers(1, LONG)
        .expect("the worker registers through the node");
    let connect = |ip: std::net::IpAddr| {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::new(ip, node_port),
            Duration::from_secs(2),
        )
    };
    assert!(connect([127, 0, 0, 1].into()).is_ok(), "not on loopback");
    match non_loopback_ip() {
        Some(ip) => assert!(
            connect(ip).is_err(),
            "the node port {node_port} answers on {ip}"
        ),
        None => eprintln!("this machine has no non-loopback address: only loopback checked"),
    }
}

/// Issue 18 item 4: an upload past the head's `--max-upload-bytes` is refused as soon as it
/// passes it, with an error naming the flag, and nothing is stored; one under it is.
#[test]
fn an_upload_past_the_cap_is_refused_naming_it_and_nothing_is_stored() {
    let options = HeadOptions {
        extra_args: vec!["--max-upload-bytes".into(), (2u64 << 20).to_string()],
        ..HeadOptions::default()
    };
    let c = TestCluster::start(BIN, options).expect("head starts");
    let big = c.dir().join("big.bin");
    std::fs::write(&big, vec![7u8; 5 << 20]).expect("write");
    let out = c
        .cli(&["stage", "put", &big.display().to_string(), "misc/big.bin"])
        .expect("run");
    assert!(!out.status.success(), "a 5 MiB upload passed a 2 MiB cap");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-upload-bytes"), "{err}");
    let small = c.dir().join("small.bin");
    std::fs::write(&small, vec![7u8; 1 << 20]).expect("write");
    c.cli_ok(&[
        "stage",
        "put",
        &small.display().to_string(),
        "misc/small.bin",
    ])
    .expect("a 1 MiB upload");
    let listing = c.cli_ok(&["stage", "ls", "misc"]).expect("ls");
    assert!(
        listing.contains("misc/small.bin") && !listing.contains("misc/big.bin"),
        "{listing}"
    );
}
