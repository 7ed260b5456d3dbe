//! `medray models` end to end with the real binary: import, list, show, alias, export,
//! delete on a local data directory, and the same through a head (`TestCluster`). Networks
//! are tiny (LocalNet seed preset with 4 initial channels).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};
use medray_core::localnet::{read_safetensors, LocalNet, LocalNetConfig, OutputInit};
use medray_core::model::ModelConfig;
use medray_tests::{HeadOptions, TestCluster};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_medray");

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(data_dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(BIN)
        .args(args)
        .env("MEDRAY_DATA_DIR", data_dir)
        .env_remove("MEDRAY_STAGE")
        .env_remove("MEDRAY_STAGE_KEY")
        .env_remove("MEDRAY_ADDRESS")
        .output()
        .expect("medray runs");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(data_dir: &Path, args: &[&str]) -> Run {
    let r = run(data_dir, args);
    assert!(r.ok, "medray {args:?} failed:\n{}\n{}", r.stdout, r.stderr);
    r
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Writes the weights of a tiny seed-preset LocalNet (4 channels, random output layer) to
/// `path`; returns their sha256.
fn write_weights(path: &Path, seed: u64) -> String {
    let config = LocalNetConfig::seed()
        .with_num_channel_initial(4)
        .with_output_init(OutputInit::KaimingNormal);
    let net = LocalNet::new(&config, seed, DType::F32, &Device::Cpu).unwrap();
    net.save_safetensors(path).unwrap();
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// The tensors of two safetensors files are the same, bit for bit.
fn assert_same_tensors(a: &Path, b: &Path) {
    let ta = read_safetensors(a, &Device::Cpu).unwrap();
    let tb = read_safetensors(b, &Device::Cpu).unwrap();
    assert_eq!(ta.len(), tb.len());
    assert!(!ta.is_empty());
    for (name, x) in &ta {
        let y = &tb[name];
        assert_eq!(x.dims(), y.dims(), "{name}");
        assert_eq!(x.dtype(), y.dtype(), "{name}");
        let bits = |t: &candle_core::Tensor| -> Vec<u64> {
            let flat = t.flatten_all().unwrap();
            match t.dtype() {
                DType::F32 => flat
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| u64::from(v.to_bits()))
                    .collect(),
                DType::I64 => flat
                    .to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .map(|v| *v as u64)
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            }
        };
        assert_eq!(bits(x), bits(y), "{name}");
    }
}

const IMPORT: &[&str] = &[
    "--preset",
    "seed",
    "--num-channel-initial",
    "4",
    "--size",
    "16",
    "16",
    "24",
    "--window",
    "-1000",
    "500",
];

fn import_args<'a>(name: &'a str, weights: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["models", "import", name, "--weights", weights];
    args.extend_from_slice(IMPORT);
    args.extend_from_slice(extra);
    args
}

#[test]
fn import_list_alias_export_delete_locally() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let w1 = tmp.path().join("w1.safetensors");
    let w2 = tmp.path().join("w2.safetensors");
    let sha1 = write_weights(&w1, 1);
    let sha2 = write_weights(&w2, 2);
    assert_ne!(sha1, sha2);

    let r = ok(&data, &import_args("lung", s(&w1), &[]));
    assert!(r.stdout.contains("registered lung v1"), "{}", r.stdout);
    assert!(r.stdout.contains(&sha1), "{}", r.stdout);
    ok(&data, &import_args("lung", s(&w2), &[]));
    // A version is immutable.
    let dup = run(&data, &import_args("lung", s(&w2), &["--version", "v1"]));
    assert!(!dup.ok);
    assert!(dup.stderr.contains("already exists"), "{}", dup.stderr);
    // Weights that do not fit the config are refused, naming the file and the tensor.
    let mut wide = import_args("lung", s(&w1), &[]);
    let channels = wide.iter().position(|a| *a == "4").unwrap();
    wide[channels] = "8";
    let bad = run(&data, &wide);
    assert!(!bad.ok);
    assert!(bad.stderr.contains("w1.safetensors"), "{}", bad.stderr);
    assert!(
        bad.stderr.contains("encode_convs.0.0.conv.weight"),
        "{}",
        bad.stderr
    );

    let list = ok(&data, &["models", "list"]).stdout;
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(lines[0].starts_with("NAME"), "{list}");
    assert!(
        lines[1].starts_with("lung") && lines[1].contains("v1"),
        "{list}"
    );
    assert!(
        lines[2].contains("v2") && lines[2].contains("seed"),
        "{list}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&data, &["models", "list", "--format", "json"]).stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2, "{json}");
    assert_eq!(json[0]["source"], "imported", "{json}");
    assert_eq!(json[0]["artifact_sha256"], sha1.as_str(), "{json}");
    assert_eq!(
        json[0]["train_config"]["imported_from"], "w1.safetensors",
        "{json}"
    );

    let r = ok(
        &data,
        &["models", "alias", "lung", "production", "--version", "v1"],
    );
    assert!(r.stdout.contains("production"), "{}", r.stdout);
    let show = ok(&data, &["models", "show", "lung", "--alias", "production"]).stdout;
    assert!(show.contains("version:         v1"), "{show}");
    assert!(show.contains("[-1000, 500]"), "{show}");
    let latest: serde_json::Value =
        serde_json::from_str(&ok(&data, &["models", "show", "lung", "--format", "json"]).stdout)
            .unwrap();
    assert_eq!(latest["version"], "v2");

    // Export the aliased version: the same bytes and tensors, the config beside them.
    let out = tmp.path().join("export/e.safetensors");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let r = ok(
        &data,
        &[
            "models",
            "export",
            "lung",
            "--alias",
            "production",
            "--out",
            s(&out),
        ],
    );
    assert!(r.stdout.contains(&sha1), "{}", r.stdout);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&w1).unwrap());
    assert_same_tensors(&out, &w1);
    let loaded = medray_core::model::load_model(&out, None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.config.preprocess.size, Some([16, 16, 24]));
    assert_eq!(loaded.config.network.num_channel_initial, 4);
    let beside = ModelConfig::read(&ModelConfig::path_for(&out)).unwrap();
    assert_eq!(beside, loaded.config);
    // Only the two files: the temporary file was renamed.
    assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 2);

    // Delete: refused while aliased, then forced.
    let refused = run(&data, &["models", "delete", "lung", "--version", "v1"]);
    assert!(!refused.ok);
    assert!(refused.stderr.contains("--force"), "{}", refused.stderr);
    ok(
        &data,
        &["models", "delete", "lung", "--version", "v1", "--force"],
    );
    let list = ok(&data, &["models", "list"]).stdout;
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(!data
        .join("stage/models/lung/v1")
        .join("weights.safetensors")
        .exists());
    assert!(data
        .join("stage/models/lung/v2/weights.safetensors")
        .exists());
    let missing = run(&data, &["models", "show", "lung", "--version", "v1"]);
    assert!(!missing.ok);
    assert!(
        missing.stderr.contains("version `v1`"),
        "{}",
        missing.stderr
    );
}

#[test]
fn models_go_through_the_head() {
    let c = TestCluster::start(BIN, HeadOptions::default()).expect("head starts");
    let w = c.dir().join("w.safetensors");
    let sha = write_weights(&w, 3);
    let mut args = vec!["models", "import", "lung", "--weights", "w.safetensors"];
    args.extend_from_slice(IMPORT);
    let r = c.cli_ok(&args).unwrap();
    assert!(r.contains("registered lung v1"), "{r}");
    // The head's stage holds it (encrypted), and no local data directory was made.
    let stored = c
        .dir()
        .join("data/stage/models/lung/v1/weights.safetensors");
    assert!(stored.is_file(), "{}", c.log_tails());
    assert_ne!(std::fs::read(&stored).unwrap(), std::fs::read(&w).unwrap());
    assert!(!c.dir().join("medray-data").exists());

    let list = c.cli_ok(&["models", "list"]).unwrap();
    assert!(
        list.lines()
            .any(|l| l.starts_with("lung") && l.contains("v1")),
        "{list}"
    );
    c.cli_ok(&["models", "alias", "lung", "production", "--version", "v1"])
        .unwrap();
    let show = c
        .cli_ok(&[
            "models",
            "show",
            "lung",
            "--alias",
            "production",
            "--format",
            "json",
        ])
        .unwrap();
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["aliases"][0], "production", "{show}");
    assert_eq!(show["artifact_sha256"], sha.as_str(), "{show}");

    let r = c
        .cli_ok(&[
            "models",
            "export",
            "lung",
            "--version",
            "v1",
            "--out",
            "e.safetensors",
        ])
        .unwrap();
    assert!(r.contains(&sha), "{r}");
    let out = c.dir().join("e.safetensors");
    assert_same_tensors(&out, &w);
    assert!(c.dir().join("e.json").is_file());

    let r = c.cli_ok(&args).unwrap();
    assert!(r.contains("registered lung v2"), "{r}");
    let mut dup_v1 = args.clone();
    dup_v1.extend(["--version", "v1"]);
    let err = String::from_utf8_lossy(&c.cli(&dup_v1).unwrap().stderr).into_owned();
    assert!(
        err.contains("already exists") && err.contains("AlreadyExists"),
        "{err}"
    );

    let refused = c
        .cli(&["models", "delete", "lung", "--version", "v1"])
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("FailedPrecondition"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    c.cli_ok(&["models", "delete", "lung", "--version", "v1", "--force"])
        .unwrap();
    assert!(!stored.exists());
    let list = c.cli_ok(&["models", "list"]).unwrap();
    assert!(list.lines().any(|l| l.contains("v2")), "{list}");
    assert!(!list.lines().any(|l| l.contains("v1 ")), "{list}");
}
