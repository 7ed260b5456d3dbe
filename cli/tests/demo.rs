//! `medray demo`, the README's main command, at the size CI can afford: phantoms, a local
//! cluster of a head and 2 workers, ingest, one epoch of training at 32^3, inference on
//! every case (12 that train or validate, 3 held out), the results table and the report; then nothing of the cluster is left
//! running.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_medray");

fn medray(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("MEDRAY_ADDRESS")
        .env_remove("MEDRAY_TOKEN")
        .output()
        .expect("medray runs")
}

fn pid_alive(pid: u64) -> bool {
    // A zombie (exited, not yet reaped by init) has state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
}

#[test]
fn the_demo_runs_the_whole_pipeline_and_leaves_nothing_running() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("demo");
    let d = dir.display().to_string();
    let out = medray(
        tmp.path(),
        &[
            "demo", "--epochs", "1", "--size", "32", "32", "32", "--dir", &d,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for step in 1..=7 {
        assert!(
            stdout.contains(&format!("== {step}/7")),
            "step {step} missing:\n{stdout}"
        );
    }
    // 12 cases train or validate, 3 more are held out; every one is registered and scored.
    assert!(stdout.contains("(15 rows)"), "no results table:\n{stdout}");
    assert!(
        stdout.contains("15 case(s) (0 failed), 15 picture(s)"),
        "{stdout}"
    );
    // The headline is the held-out figures, the others come apart and labelled.
    let headline = stdout
        .split("held-out cases (never trained on")
        .nth(1)
        .unwrap_or_else(|| panic!("no held-out headline:\n{stdout}"));
    assert!(headline.contains("held-out: 3 case(s)"), "{stdout}");
    assert!(headline.contains("training: 10 case(s)"), "{stdout}");

    let html = std::fs::read_to_string(dir.join("report/index.html")).expect("report");
    assert_eq!(html.matches("<img src=\"cases/").count(), 15);
    assert_eq!(
        std::fs::read_dir(dir.join("report/cases"))
            .expect("pictures")
            .count(),
        15
    );

    // The cluster is gone: every process it recorded has exited.
    let file: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(".medray/cluster.json")).unwrap_or_else(|_| b"{}".to_vec()),
    )
    .expect("cluster file");
    for pid in file["pids"].as_array().into_iter().flatten() {
        let pid = pid.as_u64().expect("pid");
        assert!(
            !pid_alive(pid),
            "process {pid} of the demo's cluster still runs"
        );
    }

    // The results stay queryable on the data directory, as the demo says.
    let q = medray(
        &dir,
        &[
            "sql",
            "SELECT case_id, model_version, dice_score, ssim_score FROM results ORDER BY dice_score DESC",
            "--data-dir",
            "cluster-data",
            "--format",
            "json",
        ],
    );
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&q.stdout).expect("json");
    let dice: Vec<f64> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["dice_score"].as_f64().expect("dice"))
        .collect();
    assert_eq!(dice.len(), 15);
    assert!(dice.windows(2).all(|w| w[0] >= w[1]), "{dice:?}");
}

#[test]
fn bad_demo_arguments_are_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("demo");
    let d = dir.display().to_string();
    for (args, expected) in [
        (vec!["--size", "8", "32", "32"], "--size: 8"),
        (
            vec!["--data", "/nonexistent/scans"],
            "--data /nonexistent/scans",
        ),
        (vec!["--workers", "0"], "--workers 0"),
        (vec!["--epochs", "0"], "--epochs"),
    ] {
        let mut all = vec!["demo", "--dir", &d];
        all.extend(args.iter().copied());
        let out = medray(tmp.path(), &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(
            !dir.exists(),
            "{args:?}: the demo created its folder before refusing"
        );
    }
}
