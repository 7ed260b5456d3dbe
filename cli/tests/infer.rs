//! Distributed inference on a real cluster (head and 2 workers as processes on loopback):
//! one results row per case, outputs on the original grid with the original affine, the
//! same metrics as `medray predict`, a corrupt case failing alone, a worker killed
//! mid-job, instance optimisation, and the read-only `medray sql`. Volumes are tiny
//! (24x20x16 stored, 16^3 for the network) so that CPU inference takes a fraction of a
//! second per case.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use medray_tests::{HeadOptions, TestCluster};
use nix::sys::signal::Signal;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_medray");
const LONG: Duration = Duration::from_secs(300);

fn cluster(workers: usize) -> TestCluster {
    let mut c = TestCluster::start(BIN, HeadOptions::default()).expect("head starts");
    for _ in 0..workers {
        c.add_worker().expect("worker starts");
    }
    c.wait_for_workers(workers, LONG).expect("workers register");
    c
}

fn ingest(c: &TestCluster, name: &str, cases: usize, size: [usize; 3]) {
    ingest_seeded(c, name, cases, size, "5");
}

fn ingest_seeded(c: &TestCluster, name: &str, cases: usize, size: [usize; 3], seed: &str) {
    let size: Vec<String> = size.iter().map(ToString::to_string).collect();
    let cases = cases.to_string();
    let mut args = vec!["ingest", "synthetic", "--name", name, "--cases", &cases];
    args.push("--size");
    args.extend(size.iter().map(String::as_str));
    args.extend(["--seed", seed]);
    c.cli_ok(&args).expect("ingest");
}

/// Trains model `name` version v1 for one epoch at 16^3 on `dataset`.
fn train(c: &TestCluster, dataset: &str, name: &str) {
    c.train_tiny_model(dataset, name, LONG).expect("train");
}

/// Submits `medray infer --no-wait ARGS` and waits for the job; returns (id, job JSON).
fn infer(c: &TestCluster, args: &[&str]) -> (String, Value) {
    let mut all = vec!["infer", "--no-wait"];
    all.extend_from_slice(args);
    let id = c.cli_ok(&all).expect("submit").trim().to_string();
    let job = c.wait_for_job_end(&id, LONG).expect("job ends");
    (id, job)
}

fn logs(c: &TestCluster, job: &str) -> String {
    c.cli_ok(&["job", "logs", job]).unwrap_or_default()
}

fn json_rows(c: &TestCluster, args: &[&str]) -> Vec<Value> {
    let out = c.cli_ok(args).expect("query");
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{out}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn get(c: &TestCluster, key: &str) -> PathBuf {
    let name = key.replace('/', "_");
    let out = c.dir().join("got").join(name);
    std::fs::create_dir_all(out.parent().expect("parent")).expect("dir");
    c.cli_ok(&["stage", "get", key, &out.display().to_string()])
        .expect("stage get");
    out
}

/// A NIfTI-1 file's dimensions, its sform rows and its float32 payload.
fn nifti(path: &Path) -> (Vec<usize>, [[f32; 4]; 3], Vec<f32>) {
    let raw = std::fs::read(path).expect("read");
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .read_to_end(&mut bytes)
        .expect("gzip");
    let i16_at = |o: usize| i16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let f32_at = |o: usize| f32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let ndim = i16_at(40) as usize;
    let dims: Vec<usize> = (1..=ndim).map(|i| i16_at(40 + 2 * i) as usize).collect();
    let mut srow = [[0f32; 4]; 3];
    for (r, row) in srow.iter_mut().enumerate() {
        for (k, v) in row.iter_mut().enumerate() {
            *v = f32_at(280 + 16 * r + 4 * k);
        }
    }
    assert_eq!(i16_at(70), 16, "{}: float32 expected", path.display());
    let offset = f32_at(108) as usize;
    let data = bytes[offset..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    (dims, srow, data)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The stage keys of a case's files, through `medray sql`.
fn case_keys(c: &TestCluster, dataset: &str, case: &str) -> Value {
    let rows = json_rows(
        c,
        &[
            "sql",
            &format!(
                "SELECT fixed_key, moving_key, fixed_mask_key, moving_mask_key, keypoints_key
                 FROM cases WHERE dataset = '{dataset}' AND case_id = '{case}'"
            ),
            "--format",
            "json",
        ],
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows[0].clone()
}

fn close(a: &Value, b: f64, what: &str) {
    let a = a
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: {a} is not a number"));
    assert!((a - b).abs() <= 1e-5, "{what}: infer {a} vs predict {b}");
}

#[test]
fn inference_registers_every_case_like_predict_and_a_corrupt_case_fails_alone() {
    let c = cluster(2);
    ingest(&c, "lungs", 4, [24, 20, 16]);
    train(&c, "lungs", "m");

    // A missing model version is refused at submit, naming it.
    let out = c
        .cli(&[
            "infer",
            "--dataset",
            "lungs",
            "--model",
            "m",
            "--version",
            "v9",
        ])
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("v9") && err.contains('m'), "{err}");
    let out = c
        .cli(&[
            "infer",
            "--dataset",
            "lungs",
            "--model",
            "m",
            "--cases",
            "case_001,nope",
        ])
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lungs/nope"));

    let (job, j) = infer(&c, &["--dataset", "lungs", "--model", "m"]);
    assert_eq!(
        j["state"],
        "SUCCEEDED",
        "{j}\n{}\n{}",
        logs(&c, &job),
        c.log_tails()
    );
    assert_eq!(j["result"]["succeeded"], 4, "{j}");
    assert_eq!(j["result"]["failed"], 0, "{j}");
    let log = logs(&c, &job);
    // Each worker loads the model once and keeps it.
    let loads = log.matches("loading model m:v1").count();
    assert!((1..=2).contains(&loads), "{loads} loads:\n{log}");
    assert_eq!(log.matches("(model cached)").count(), 4 - loads, "{log}");

    let rows = json_rows(&c, &["results", "--job", &job, "--format", "json"]);
    let cases: Vec<&str> = rows
        .iter()
        .map(|r| r["case_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        cases,
        ["case_001", "case_002", "case_003", "case_004"],
        "{rows:#?}"
    );
    for r in &rows {
        assert_eq!(r["status"], "SUCCEEDED", "{r}");
        assert_eq!(r["model_version"], "v1");
        // The model trained on every case of `lungs` (no validation): each row says so.
        assert_eq!(r["split"], "train", "{r}");
        assert_eq!(r["device"], "cpu");
        assert_eq!(r["refine_steps"], 0);
        assert!(
            r["worker"]
                .as_str()
                .is_some_and(|w| w.starts_with("worker-")),
            "{r}"
        );
        let case = r["case_id"].as_str().unwrap_or("");
        assert_eq!(
            r["output_image"],
            format!("results/lungs/m/v1/{case}_registered_img.nii.gz")
        );
        assert_eq!(
            r["output_label"],
            format!("results/lungs/m/v1/{case}_registered_label.nii.gz")
        );
        assert_eq!(
            r["output_ddf"],
            format!("results/lungs/m/v1/{case}_ddf.nii.gz")
        );
        // Issue 19: the ITK/ANTs transform, the Jacobian map and SD log J.
        assert_eq!(
            r["output_transform"],
            format!("results/lungs/m/v1/{case}_transform_lps_mm.nii.gz")
        );
        assert_eq!(
            r["output_jacobian"],
            format!("results/lungs/m/v1/{case}_jacobian.nii.gz")
        );
        assert!(r["log_jac_std"].as_f64().is_some_and(|v| v >= 0.0), "{r}");
    }

    // The outputs of case_002 lie on the fixed image's grid with its affine.
    let row = rows[1].clone();
    let keys = case_keys(&c, "lungs", "case_002");
    let path = |k: &str| get(&c, keys[k].as_str().expect("key"));
    let (fixed, moving) = (path("fixed_key"), path("moving_key"));
    let (fixed_mask, moving_mask) = (path("fixed_mask_key"), path("moving_mask_key"));
    let keypoints = path("keypoints_key");
    let fixed_vol = medray_core::nifti_io::read_volume(&fixed).expect("fixed");
    let image = get(&c, row["output_image"].as_str().expect("key"));
    let image_vol = medray_core::nifti_io::read_volume(&image).expect("registered image");
    assert_eq!(image_vol.shape(), [24, 20, 16]);
    assert_eq!(image_vol.affine, fixed_vol.affine);
    let label = get(&c, row["output_label"].as_str().expect("key"));
    let label_vol = medray_core::nifti_io::read_volume(&label).expect("registered label");
    assert_eq!(label_vol.shape(), [24, 20, 16]);
    assert_eq!(label_vol.affine, fixed_vol.affine);
    assert!(label_vol.data.iter().all(|v| *v == 0.0 || *v == 1.0));
    let ddf_path = get(&c, row["output_ddf"].as_str().expect("key"));
    let (dims, srow, ddf) = nifti(&ddf_path);
    assert_eq!(dims, [24, 20, 16, 1, 3]);
    for r in 0..3 {
        for k in 0..4 {
            assert!(
                (f64::from(srow[r][k]) - fixed_vol.affine[r][k]).abs() < 1e-5,
                "DDF affine {srow:?} vs {:?}",
                fixed_vol.affine
            );
        }
    }
    assert!(
        ddf.iter().any(|v| *v != 0.0),
        "a trained network moves something"
    );

    // `medray predict` on the same case, with the exported version, reports the same
    // metrics and writes the same DDF and registered image.
    let weights = c.dir().join("m-v1.safetensors");
    c.cli_ok(&[
        "models",
        "export",
        "m",
        "--version",
        "v1",
        "--out",
        &weights.display().to_string(),
    ])
    .expect("export");
    let out_ddf = c.dir().join("predict_ddf.nii.gz");
    let out_warped = c.dir().join("predict_warped.nii.gz");
    let s = |p: &Path| p.display().to_string();
    let report: Value = serde_json::from_str(
        &c.cli_ok(&[
            "predict",
            "--weights",
            &s(&weights),
            "--fixed",
            &s(&fixed),
            "--moving",
            &s(&moving),
            "--fixed-mask",
            &s(&fixed_mask),
            "--moving-mask",
            &s(&moving_mask),
            "--keypoints",
            &s(&keypoints),
            "--out-ddf",
            &s(&out_ddf),
            "--out-warped",
            &s(&out_warped),
            "--original-grid",
            "--json",
        ])
        .expect("predict"),
    )
    .expect("predict JSON");
    let num = |k: &str| {
        report[k]
            .as_f64()
            .unwrap_or_else(|| panic!("predict {k}: {report}"))
    };
    close(&row["dice_score"], num("dice"), "dice");
    close(&row["dice_before"], num("dice_before"), "dice_before");
    close(&row["soft_dice"], num("soft_dice"), "soft_dice");
    close(&row["ssim_score"], num("ssim"), "ssim");
    close(&row["mi"], -num("mi_loss"), "mi");
    close(&row["tre_mm"], num("tre_mm"), "tre_mm");
    close(&row["tre_before_mm"], num("tre_before_mm"), "tre_before_mm");
    close(&row["folding_pct"], num("folding_pct"), "folding_pct");
    close(&row["ddf_magnitude"], num("ddf_magnitude"), "ddf_magnitude");
    close(&row["log_jac_std"], num("log_jac_std"), "log_jac_std");
    let (_, _, predicted_ddf) = nifti(&out_ddf);
    assert!(max_abs_diff(&ddf, &predicted_ddf) <= 1e-5);

    // The transform is the DDF in mm, LPS (x, y negated), on the fixed grid and affine; the
    // Jacobian map is a volume on the same grid; both are in the stage under their keys.
    let (dims, srow, transform) = nifti(&get(&c, row["output_transform"].as_str().expect("key")));
    assert_eq!(dims, [24, 20, 16, 1, 3]);
    assert_eq!(
        srow,
        [0, 1, 2].map(|r| fixed_vol.affine[r].map(|v| v as f32))
    );
    let voxels = 24 * 20 * 16;
    let a = fixed_vol.affine;
    let mut worst = 0f64;
    for n in 0..voxels {
        let u = [0, 1, 2].map(|c| f64::from(ddf[n + c * voxels]));
        for r in 0..3 {
            let ras: f64 = (0..3).map(|c| a[r][c] * u[c]).sum();
            let want = if r < 2 { -ras } else { ras };
            worst = worst.max((f64::from(transform[n + r * voxels]) - want).abs());
        }
    }
    assert!(worst < 1e-4, "transform vs DDF: {worst} mm");
    let jacobian = get(&c, row["output_jacobian"].as_str().expect("key"));
    let jac_vol = medray_core::nifti_io::read_volume(&jacobian).expect("Jacobian map");
    assert_eq!(jac_vol.shape(), [24, 20, 16]);
    assert_eq!(jac_vol.affine, fixed_vol.affine);
    assert!(jac_vol.data.iter().all(|v| v.is_finite()));

    // The Learn2Reg export: one (X, Y, Z, 3) voxel file per case, named after the case
    // (synthetic ids are no Learn2Reg pair ids, and the command says so).
    let l2r = c.dir().join("l2r");
    let said = c
        .cli_ok(&[
            "results",
            "export",
            "--format",
            "learn2reg",
            "--job",
            &job,
            "--out",
            &s(&l2r),
        ])
        .expect("export");
    assert!(
        said.contains("exported 4 ") && said.contains("not Learn2Reg pair ids"),
        "{said}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&l2r)
        .expect("export folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        (1..=4)
            .map(|i| format!("disp_case_00{i}.nii.gz"))
            .collect::<Vec<_>>()
    );
    let (dims, _, disp) = nifti(&l2r.join("disp_case_002.nii.gz"));
    assert_eq!(dims, [24, 20, 16, 3]);
    assert!(max_abs_diff(&disp, &ddf) == 0.0, "the voxel DDF, unchanged");
    // The same from the data directory, without the head.
    let l2r_local = c.dir().join("l2r-local");
    let head_dir = c.dir().join("data");
    c.cli_ok(&[
        "results",
        "export",
        "--format",
        "learn2reg",
        "--job",
        &job,
        "--out",
        &s(&l2r_local),
        "--data-dir",
        &s(&head_dir),
    ])
    .expect("local export");
    assert_eq!(nifti(&l2r_local.join("disp_case_002.nii.gz")).2, disp);
    // A job that is not an inference job is refused.
    let out = c
        .cli(&[
            "results",
            "export",
            "--format",
            "learn2reg",
            "--job",
            "job-000001",
            "--out",
            &s(&l2r),
        ])
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inference"), "{err}");
    let warped = medray_core::nifti_io::read_volume(&out_warped).expect("warped");
    let (a, b): (Vec<f32>, Vec<f32>) = (
        image_vol.data.iter().copied().collect(),
        warped.data.iter().copied().collect(),
    );
    assert!(max_abs_diff(&a, &b) <= 1e-3);

    // The quickstart's query (and the split), through the head and on the data directory,
    // in order.
    let quickstart = "SELECT case_id, model_version, dice_score, ssim_score, split FROM results \
                      ORDER BY dice_score DESC";
    let out = c
        .cli_ok(&["sql", quickstart, "--format", "csv"])
        .expect("sql");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "case_id,model_version,dice_score,ssim_score,split"
    );
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines[1..].iter().all(|l| l.ends_with(",train")), "{out}");
    let dice: Vec<f64> = lines[1..]
        .iter()
        .map(|l| {
            l.split(',')
                .nth(2)
                .and_then(|d| d.parse().ok())
                .expect("dice")
        })
        .collect();
    assert!(dice.windows(2).all(|w| w[0] >= w[1]), "{dice:?}");
    let mut expected: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["dice_score"].as_f64())
        .collect();
    expected.sort_by(|a, b| b.total_cmp(a));
    assert_eq!(dice, expected);
    let data_dir = c.dir().join("data").display().to_string();
    let local = c
        .cli_ok(&[
            "sql",
            quickstart,
            "--format",
            "csv",
            "--data-dir",
            &data_dir,
        ])
        .expect("local sql");
    assert_eq!(local, out);
    let table = c.cli_ok(&["sql", quickstart]).expect("table");
    assert!(table.starts_with("case_id"), "{table}");
    assert!(table.contains("(4 rows)"), "{table}");

    // Writes are refused, through the head and locally; nothing changed.
    let attach = format!("ATTACH DATABASE '{}' AS x", c.dir().join("x.db").display());
    for sql in [
        "INSERT INTO results (case_id) VALUES ('x')",
        "UPDATE results SET dice_score = 1",
        "DELETE FROM results",
        attach.as_str(),
        "PRAGMA journal_mode = DELETE",
        "SELECT 1; DELETE FROM results",
    ] {
        for local in [false, true] {
            let mut args = vec!["sql", sql];
            if local {
                args.extend(["--data-dir", &data_dir]);
            }
            let out = c.cli(&args).expect("run");
            assert!(!out.status.success(), "{sql} was accepted");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("sql"), "{sql}: {err}");
        }
    }
    assert!(!c.dir().join("x.db").exists());
    assert_eq!(json_rows(&c, &["results", "--format", "json"]).len(), 4);

    // A bad refinement option is refused before anything is submitted, naming the option.
    let out = c
        .cli(&[
            "infer",
            "--dataset",
            "lungs",
            "--model",
            "m",
            "--refine",
            "5",
            "--refine-sim",
            "ssd",
        ])
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refine-sim") && err.contains("ssd"), "{err}");
    // --refine 5 with LNCC on one level on one case changes its DDF and replaces its row; the
    // options travel to the worker (its log names the similarity).
    let (refined_job, j) = infer(
        &c,
        &[
            "--dataset",
            "lungs",
            "--model",
            "m",
            "--cases",
            "case_002",
            "--refine",
            "5",
            "--refine-sim",
            "lncc",
            "--refine-levels",
            "1",
        ],
    );
    assert_eq!(j["state"], "SUCCEEDED", "{j}\n{}", logs(&c, &refined_job));
    let all = json_rows(
        &c,
        &[
            "results",
            "--model",
            "m",
            "--version",
            "v1",
            "--format",
            "json",
        ],
    );
    assert_eq!(all.len(), 4, "a re-run replaces the case's row: {all:#?}");
    let refined = all
        .iter()
        .find(|r| r["case_id"] == "case_002")
        .expect("case_002");
    assert_eq!(refined["refine_steps"], 5);
    assert_eq!(refined["job_id"], refined_job);
    let (_, _, refined_ddf) = nifti(&get(&c, "results/lungs/m/v1/case_002_ddf.nii.gz"));
    assert!(
        max_abs_diff(&ddf, &refined_ddf) > 1e-4,
        "refinement changed nothing"
    );
    let job_log = logs(&c, &refined_job);
    assert!(job_log.contains("refine 5 steps"), "{job_log}");
    assert!(job_log.contains("(lncc, 1 level(s)"), "{job_log}");
    // The worker's own line: "refine 5 steps N ms (lncc before -> after)".
    assert!(job_log.contains(" ms (lncc "), "{job_log}");
    // --workers 1: never two of the job's cases running at once.
    let capped = c
        .cli_ok(&[
            "infer",
            "--no-wait",
            "--dataset",
            "lungs",
            "--model",
            "m",
            "--workers",
            "1",
            "--cases",
            "case_001,case_003,case_004",
            "--hold-ms",
            "600",
        ])
        .expect("submit")
        .trim()
        .to_string();
    let mut peak = 0;
    c.wait_until("the capped job ends", LONG, |c| {
        let s = c.status()?;
        let running = s["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| {
                w["current_task"]
                    .as_str()
                    .is_some_and(|t| t.starts_with(&capped))
            })
            .count();
        peak = peak.max(running);
        Ok(c.job(&capped)?["state"] == "SUCCEEDED")
    })
    .expect("capped job");
    assert_eq!(peak, 1, "{}", logs(&c, &capped));
    assert!(logs(&c, &capped).contains("on at most 1 worker(s) at once"));

    // Ordered by Dice, descending, as a table.
    let ordered = json_rows(
        &c,
        &[
            "results",
            "--order-by",
            "dice_score",
            "--desc",
            "--format",
            "json",
        ],
    );
    let d: Vec<f64> = ordered
        .iter()
        .filter_map(|r| r["dice_score"].as_f64())
        .collect();
    assert!(d.windows(2).all(|w| w[0] >= w[1]), "{d:?}");
    let out = c.cli(&["results", "--order-by", "nope"]).expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a column"));

    // A case whose moving image was replaced in the stage fails, naming the file; the
    // others succeed and the job goes on.
    ingest(&c, "bad", 3, [16, 16, 16]);
    let keys = case_keys(&c, "bad", "case_002");
    let moving_key = keys["moving_key"].as_str().expect("key").to_string();
    let garbage = c.dir().join("garbage.nii.gz");
    std::fs::write(&garbage, b"not a NIfTI file at all").expect("write");
    c.cli_ok(&["stage", "put", &garbage.display().to_string(), &moving_key])
        .expect("stage put");
    let (bad_job, j) = infer(&c, &["--dataset", "bad", "--model", "m"]);
    assert_eq!(j["state"], "SUCCEEDED", "{j}\n{}", logs(&c, &bad_job));
    assert_eq!(j["result"]["succeeded"], 2, "{j}");
    assert_eq!(j["result"]["failed"], 1, "{j}");
    let rows = json_rows(&c, &["results", "--dataset", "bad", "--format", "json"]);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    // Same case ids as the training dataset `lungs`, other images: held-out, failed or not.
    for r in &rows {
        assert_eq!(r["split"], "held-out", "{r}");
    }
    let table = c
        .cli_ok(&["results", "--model", "m", "--version", "v1"])
        .expect("results table");
    let summary = table
        .split("by split:")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary:\n{table}"));
    let at = |s: &str| {
        summary
            .find(s)
            .unwrap_or_else(|| panic!("no `{s}` in\n{table}"))
    };
    assert!(at("held-out: 3 case(s) (1 failed)") < at("training: 4 case(s)"));
    for r in &rows {
        if r["case_id"] == "case_002" {
            assert_eq!(r["status"], "FAILED", "{r}");
            let error = r["error"].as_str().unwrap_or("");
            assert!(error.contains(&moving_key), "{error}");
            assert_eq!(r["dice_score"], Value::Null);
        } else {
            assert_eq!(r["status"], "SUCCEEDED", "{r}");
        }
    }
}

#[test]
fn a_worker_killed_mid_job_leaves_every_case_exactly_once() {
    let c = cluster(2);
    ingest(&c, "six", 6, [16, 16, 16]);
    // An untrained network imported into the registry is enough here.
    let weights = c.dir().join("init.safetensors");
    let network = medray_core::localnet::LocalNetConfig {
        num_channel_initial: 8,
        ..medray_core::localnet::LocalNetConfig::seed()
    };
    medray_core::localnet::LocalNet::new(
        &network,
        1,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .expect("network")
    .save_safetensors(&weights)
    .expect("save");
    c.cli_ok(&[
        "models",
        "import",
        "k",
        "--weights",
        &weights.display().to_string(),
        "--preset",
        "seed",
        "--num-channel-initial",
        "8",
        "--size",
        "16",
        "16",
        "16",
    ])
    .expect("import");

    // Each case holds its worker for 2 s, so the kill lands while worker-2 runs one.
    let id = c
        .cli_ok(&[
            "infer",
            "--no-wait",
            "--dataset",
            "six",
            "--model",
            "k",
            "--hold-ms",
            "2000",
        ])
        .expect("submit")
        .trim()
        .to_string();
    let mut victim = String::new();
    c.wait_until("worker-2 runs a case", LONG, |c| {
        let s = c.status()?;
        let w = s["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["name"] == "worker-2" && w["state"] == "ALIVE")
            .cloned();
        Ok(match w {
            Some(w)
                if w["current_task"]
                    .as_str()
                    .is_some_and(|t| t.starts_with(&id)) =>
            {
                victim = w["worker_id"].as_str().unwrap_or("").to_string();
                true
            }
            _ => false,
        })
    })
    .expect("a case runs on worker-2");
    c.workers[1].signal(Signal::SIGKILL);
    let j = c.wait_for_job_end(&id, LONG).expect("job ends");
    let log = logs(&c, &id);
    assert_eq!(j["state"], "SUCCEEDED", "{j}\n{log}");
    assert_eq!(j["result"]["succeeded"], 6, "{j}");
    assert!(log.contains("will run again"), "{log}");
    assert!(
        log.contains(&format!("worker {victim} lost")),
        "{victim}:\n{log}"
    );
    let rows = json_rows(&c, &["results", "--job", &id, "--format", "json"]);
    let cases: Vec<&str> = rows
        .iter()
        .map(|r| r["case_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(cases.len(), 6, "{rows:#?}");
    assert_eq!(cases.iter().collect::<HashSet<_>>().len(), 6, "{cases:?}");
    assert!(rows.iter().all(|r| r["status"] == "SUCCEEDED"), "{rows:#?}");
    // Every case was reported once, by a worker that was alive at the end for the cases
    // that ran after the kill.
    let done_lines = log.lines().filter(|l| l.contains(" done on ")).count();
    assert_eq!(done_lines, 6, "{log}");
}

/// Issue 18 item 3: outputs were keyed `results/<model>/<version>/<case>_...`, so two
/// datasets with the same case ids inferred with one model version wrote the same objects
/// and the first dataset's rows (and report) showed the second's images. Now each dataset
/// has its own folder and each job's report its own pictures.
#[test]
fn two_datasets_with_the_same_case_ids_keep_separate_outputs_and_reports() {
    let c = cluster(1);
    ingest(&c, "lungs", 2, [16, 16, 16]);
    // Same case ids, other images.
    ingest_seeded(&c, "other", 2, [16, 16, 16], "9");
    train(&c, "lungs", "m");
    let mut pictures = Vec::new();
    for dataset in ["lungs", "other"] {
        let (id, job) = infer(
            &c,
            &["--dataset", dataset, "--model", "m", "--version", "v1"],
        );
        assert_eq!(job["state"], "SUCCEEDED", "{job}\n{}", logs(&c, &id));
        let out = c.dir().join(format!("report-{dataset}"));
        c.cli_ok(&["report", "--job", &id, "--out", &out.display().to_string()])
            .expect("report");
        pictures.push(std::fs::read(out.join("cases").join("case_001.png")).expect("picture"));
    }
    let rows = json_rows(&c, &["results", "--model", "m", "--format", "json"]);
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in &rows {
        let dataset = r["dataset"].as_str().expect("dataset");
        let image = r["output_image"].as_str().expect("output_image");
        assert!(
            image.starts_with(&format!("results/{dataset}/m/v1/")),
            "{image} is not in {dataset}'s folder"
        );
    }
    let image_of = |dataset: &str| {
        rows.iter()
            .find(|r| r["dataset"] == dataset && r["case_id"] == "case_001")
            .and_then(|r| r["output_image"].as_str())
            .expect("row")
            .to_string()
    };
    let (a, b) = (get(&c, &image_of("lungs")), get(&c, &image_of("other")));
    assert_ne!(std::fs::read(a).expect("a"), std::fs::read(b).expect("b"));
    assert_ne!(
        pictures[0], pictures[1],
        "both reports show the same picture"
    );
}

/// Issue 18 item 1: a worker's `worker_id` was whatever it claimed, `FetchObject` served any
/// stage object and `PutObject` took any key under `results/`. Now every call must carry the
/// named worker's own session, a worker reads only the objects of the attempt it holds and
/// writes only that attempt's outputs. The worker here is a rogue one
/// (`medray_tests::rogue`): it joins like `medray worker`, takes a real inference task and
/// then tries what a compromised worker would.
#[test]
fn a_worker_reads_only_its_tasks_objects_writes_only_its_outputs_and_acts_only_as_itself() {
    use medray_proto::v1::task_assignment::Kind;
    use medray_proto::v1::*;
    use medray_tests::rogue::{register, RogueWorker};
    use sha2::Digest;

    let c = cluster(1);
    ingest(&c, "lungs", 2, [16, 16, 16]);
    train(&c, "lungs", "m");
    // The real worker leaves; the rogue one will be the only worker.
    c.workers[0].signal(Signal::SIGTERM);
    c.wait_until("the worker left", LONG, |c| Ok(c.alive_workers()? == 0))
        .expect("drained");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut rogue = RogueWorker::join(&c.address, &c.worker_token(), "rogue")
            .await
            .expect("joins");
        c.wait_for_workers(1, LONG)
            .expect("the rogue worker is alive");
        let job = c
            .cli_ok(&[
                "infer",
                "--no-wait",
                "--dataset",
                "lungs",
                "--model",
                "m",
                "--version",
                "v1",
            ])
            .expect("submit")
            .trim()
            .to_string();
        let a = rogue
            .next_assignment(LONG)
            .await
            .expect("an inference task");
        assert_eq!(a.job_id, job);
        let Some(Kind::Infer(t)) = &a.kind else {
            panic!("not an inference task: {a:?}")
        };
        let other = if t.case_id == "case_001" {
            "case_002"
        } else {
            "case_001"
        };
        let other_fixed = case_keys(&c, "lungs", other)["fixed_key"]
            .as_str()
            .expect("fixed_key")
            .to_string();
        let id = rogue.worker_id.clone();
        let mut client = rogue.client.clone();

        let fetch = |client: &mut medray_tests::rogue::Client, worker: &str, key: &str| {
            let (mut client, worker, key) = (client.clone(), worker.to_string(), key.to_string());
            async move {
                let mut stream = client
                    .fetch_object(FetchObjectRequest {
                        worker_id: worker,
                        key,
                    })
                    .await?
                    .into_inner();
                let mut n = 0;
                while let Some(chunk) = stream.message().await? {
                    n += chunk.data.len();
                }
                Ok::<usize, tonic::Status>(n)
            }
        };
        // Its own case and model: served.
        for key in [
            &t.fixed.as_ref().unwrap().key,
            &t.weights.as_ref().unwrap().key,
        ] {
            assert!(fetch(&mut client, &id, key).await.expect(key) > 0);
        }
        // Another case of the same dataset, and another job's objects: refused.
        for key in [other_fixed.as_str(), "jobs/job-000001/state.json"] {
            let e = fetch(&mut client, &id, key).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{key}: {e}");
        }

        let put = |client: &mut medray_tests::rogue::Client, worker: &str, key: String| {
            let data = b"not a volume".to_vec();
            let header = PutObjectHeader {
                worker_id: worker.to_string(),
                job_id: a.job_id.clone(),
                task_id: a.task_id.clone(),
                attempt: a.attempt,
                key,
                size: data.len() as u64,
                sha256: hex::encode(sha2::Sha256::digest(&data)),
            };
            let mut client = client.clone();
            async move {
                client
                    .put_object(futures::stream::iter(vec![PutObjectRequest {
                        header: Some(header),
                        data,
                    }]))
                    .await
                    .map(|r| r.into_inner().bytes)
            }
        };
        let prefix = &t.output_prefix;
        // Its own output: stored.
        put(
            &mut client,
            &id,
            format!("{prefix}{}_ddf.nii.gz", t.case_id),
        )
        .await
        .expect("its own output");
        // Another case's output, another dataset's folder, a job's state: refused.
        for key in [
            format!("{prefix}{other}_ddf.nii.gz"),
            format!("results/other/m/v1/{}_ddf.nii.gz", t.case_id),
            "jobs/job-000001/state.json".to_string(),
        ] {
            let e = put(&mut client, &id, key.clone()).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{key}: {e}");
        }

        // A second worker, and the worker token itself, cannot act as the first one.
        let b = register(&c.address, &c.worker_token(), "other")
            .await
            .expect("registers");
        let as_b = medray_tests::rogue::client(&c.address, &b.session_token)
            .await
            .unwrap();
        let with_join = medray_tests::rogue::client(&c.address, &c.worker_token())
            .await
            .unwrap();
        for (who, mut impostor) in [("another worker", as_b), ("the worker token", with_join)] {
            let denied = |r: Result<(), tonic::Status>, call: &str| {
                let e = r.expect_err(call);
                assert_eq!(
                    e.code(),
                    tonic::Code::PermissionDenied,
                    "{who}, {call}: {e}"
                );
            };
            denied(
                impostor
                    .heartbeat(HeartbeatRequest {
                        worker_id: id.clone(),
                        current_task: String::new(),
                    })
                    .await
                    .map(drop),
                "Heartbeat",
            );
            denied(
                impostor
                    .append_task_logs(AppendTaskLogsRequest {
                        worker_id: id.clone(),
                        job_id: a.job_id.clone(),
                        task_id: a.task_id.clone(),
                        attempt: a.attempt,
                        lines: vec!["forged".into()],
                    })
                    .await
                    .map(drop),
                "AppendTaskLogs",
            );
            denied(
                impostor
                    .finish_task(FinishTaskRequest {
                        worker_id: id.clone(),
                        job_id: a.job_id.clone(),
                        task_id: a.task_id.clone(),
                        attempt: a.attempt,
                        outcome: Some(finish_task_request::Outcome::Failure(TaskFailure {
                            reason: "forged".into(),
                            retryable: false,
                        })),
                    })
                    .await
                    .map(drop),
                "FinishTask",
            );
            denied(
                fetch(&mut impostor, &id, &t.fixed.as_ref().unwrap().key)
                    .await
                    .map(drop),
                "FetchObject",
            );
            denied(
                put(
                    &mut impostor,
                    &id,
                    format!("{prefix}{}_ddf.nii.gz", t.case_id),
                )
                .await
                .map(drop),
                "PutObject",
            );
            denied(
                impostor
                    .deregister(DeregisterRequest {
                        worker_id: id.clone(),
                        reason: "forged".into(),
                    })
                    .await
                    .map(drop),
                "Deregister",
            );
        }
        // The first worker is still there, and still holds its attempt.
        let status = c.status().expect("status");
        let listed = status["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["worker_id"] == id.as_str())
            .cloned();
        assert_eq!(
            listed.as_ref().map(|w| w["state"].clone()),
            Some(Value::from("ALIVE")),
            "{status}"
        );
        assert!(!logs(&c, &job).contains("forged"), "{}", logs(&c, &job));
        let accepted = client
            .finish_task(FinishTaskRequest {
                worker_id: id.clone(),
                job_id: a.job_id.clone(),
                task_id: a.task_id.clone(),
                attempt: a.attempt,
                outcome: Some(finish_task_request::Outcome::Failure(TaskFailure {
                    reason: "the rogue worker gives up".into(),
                    retryable: false,
                })),
            })
            .await
            .expect("its own finish")
            .into_inner()
            .accepted;
        assert!(accepted, "the attempt was still its own");
    });
}
