//! `medray synth` + `medray train-local` + `medray predict` end to end on small phantoms:
//! training lowers the loss and lifts the validation Dice above the unregistered value, a
//! resumed run ends with the same weights as an uninterrupted one, and the trained model
//! (weights + config JSON) registers a pair through `predict`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};

fn medray(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_medray"))
        .args(args)
        .output()
        .expect("medray runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "medray {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Eight 32^3 phantoms with three times the default breathing motion, so that the
/// unregistered lung Dice (~0.92) leaves room to improve within a few epochs.
fn synth(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    medray(&[
        "synth",
        "--out",
        s(&data),
        "--cases",
        "8",
        "--size",
        "32",
        "32",
        "32",
        "--seed",
        "1",
        "--motion-scale",
        "3",
    ]);
    data
}

fn train(data: &Path, out: &Path, epochs: &str, extra: &[&str]) -> String {
    train_with(data, out, epochs, "mse-dice-be", extra)
}

fn train_with(data: &Path, out: &Path, epochs: &str, loss: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "train-local",
        "--data",
        s(data),
        "--preset",
        "full",
        "--channels",
        "4",
        "--loss",
        loss,
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--size",
        "32",
        "32",
        "32",
        "--val-fraction",
        "0.25",
        "--epochs",
        epochs,
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    medray(&args)
}

#[derive(Debug, serde::Deserialize)]
struct Epoch {
    total_loss: f64,
    val_dice: Option<f64>,
    val_dice_before: Option<f64>,
}

#[derive(Debug, serde::Deserialize)]
struct State {
    history: Vec<Epoch>,
    step: u64,
}

fn state(out: &Path) -> State {
    serde_json::from_str(&std::fs::read_to_string(out.join("state.json")).unwrap()).unwrap()
}

#[test]
fn training_lowers_the_loss_and_beats_the_unregistered_dice() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let out = dir.path().join("run");
    let log = train(&data, &out, "8", &[]);
    assert!(log.contains("epoch   8"), "{log}");
    let st = state(&out);
    assert_eq!(st.history.len(), 8);
    assert_eq!(st.step, 8 * 3, "6 training cases in batches of 2");
    let first = st.history[0].total_loss;
    let last = st.history[7].total_loss;
    assert!(last < first - 0.3, "training loss {first} -> {last}");
    let before = st.history[0].val_dice_before.unwrap();
    let best = st
        .history
        .iter()
        .filter_map(|e| e.val_dice)
        .fold(f64::MIN, f64::max);
    assert!(
        best > before + 0.01,
        "validation Dice {best} does not beat the unregistered {before}"
    );
    for f in [
        "best.safetensors",
        "best.json",
        "last.safetensors",
        "history.csv",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // The trained model registers a validation case through predict, with its config JSON
    // (window and size) applied.
    let ddf = dir.path().join("ddf.nii.gz");
    let case = |sub: &str, name: &str| data.join(sub).join(name);
    let json = medray(&[
        "predict",
        "--weights",
        s(&out.join("best.safetensors")),
        "--fixed",
        s(&case("scans", "case_008_exp.nii.gz")),
        "--moving",
        s(&case("scans", "case_008_insp.nii.gz")),
        "--fixed-mask",
        s(&case("lungMasks", "case_008_exp.nii.gz")),
        "--moving-mask",
        s(&case("lungMasks", "case_008_insp.nii.gz")),
        "--keypoints",
        s(&case("keypoints", "case_008.csv")),
        "--out-ddf",
        s(&ddf),
        "--original-grid",
        "--json",
    ]);
    let report: HashMap<String, serde_json::Value> = serde_json::from_str(json.trim()).unwrap();
    let dice = report["dice"].as_f64().unwrap();
    let dice_before = report["dice_before"].as_f64().unwrap();
    assert!(dice > dice_before, "predict: Dice {dice_before} -> {dice}");
    let tre = report["tre_mm"].as_f64().unwrap();
    let tre_before = report["tre_before_mm"].as_f64().unwrap();
    assert!(tre.is_finite() && tre_before > 0.0, "{report:?}");
}

fn weights(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let straight = dir.path().join("straight");
    train(&data, &straight, "3", &[]);
    let resumed = dir.path().join("resumed");
    train(&data, &resumed, "1", &[]);
    let log = train(&data, &resumed, "3", &["--resume"]);
    assert!(log.contains("resuming at epoch 2, after step 3"), "{log}");
    // Training into a folder that holds a run, without --resume, is refused.
    let refused = Command::new(env!("CARGO_BIN_EXE_medray"))
        .args([
            "train-local",
            "--data",
            s(&data),
            "--size",
            "32",
            "32",
            "32",
        ])
        .args(["--out", s(&resumed)])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));

    let a = weights(&straight.join("last.safetensors"));
    let b = weights(&resumed.join("last.safetensors"));
    assert_eq!(a.len(), b.len());
    let max_abs = |t: &Tensor| -> f64 {
        t.to_dtype(DType::F64)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    for (name, ta) in &a {
        let diff = max_abs(
            &(ta.to_dtype(DType::F64).unwrap() - b[name].to_dtype(DType::F64).unwrap()).unwrap(),
        );
        let scale = max_abs(ta).max(1e-12);
        assert!(diff / scale <= 1e-5, "{name}: resumed differs by {diff}");
    }
    assert_eq!(
        state(&straight).history.len(),
        state(&resumed).history.len()
    );
}

/// `mse-dice-kp-be` reads each training case's keypoint pairs and lowers its objective; a
/// training case without keypoints is refused by name before anything trains.
#[test]
fn keypoint_supervision_trains_and_needs_every_training_case_keypoints() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let out = dir.path().join("kp");
    train_with(&data, &out, "4", "mse-dice-kp-be", &[]);
    let st = state(&out);
    assert_eq!(st.history.len(), 4);
    let (first, last) = (st.history[0].total_loss, st.history[3].total_loss);
    assert!(last < first, "training loss {first} -> {last}");
    let config = std::fs::read_to_string(out.join("best.json")).unwrap();
    assert!(config.contains("mse-dice-kp-be"), "{config}");

    std::fs::remove_file(data.join("keypoints").join("case_002.csv")).unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_medray"))
        .args([
            "train-local",
            "--data",
            s(&data),
            "--loss",
            "mse-dice-kp-be",
            "--size",
            "32",
            "32",
            "32",
            "--val-fraction",
            "0.25",
            "--epochs",
            "1",
            "--out",
            s(&dir.path().join("refused")),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("keypoint") && err.contains("case_002"),
        "{err}"
    );
    assert!(!dir.path().join("refused").join("best.safetensors").exists());
}

/// Without lung masks there is no validation Dice: the plateau scheduler is fed the training
/// loss, so lower must count as better (it was "max", halving the rate while the loss fell).
#[test]
fn without_masks_the_scheduler_treats_a_lower_loss_as_better() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    std::fs::remove_dir_all(data.join("lungMasks")).unwrap();
    let out = dir.path().join("nomask");
    train_with(&data, &out, "1", "mi-be", &[]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["scheduler"]["mode"], "min", "{}", state["scheduler"]);
    // With masks the validation Dice drives it, higher being better.
    let data = synth(&dir.path().join("masked"));
    let out = dir.path().join("masked-run");
    train_with(&data, &out, "1", "mi-be", &[]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["scheduler"]["mode"], "max", "{}", state["scheduler"]);
}
