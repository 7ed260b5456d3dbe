#![allow(clippy::unwrap_used)]

use super::*;
use crate::localnet::{LocalNetConfig, OutputInit, Preset};
use crate::preprocess::{PreprocessConfig, Window};
use crate::stage::{StageKey, StageLocation};

/// A tiny seed-preset config (4 initial channels) with the quickstart's preprocessing.
fn tiny_config() -> ModelConfig {
    ModelConfig {
        network: LocalNetConfig::preset(Preset::Seed).with_num_channel_initial(4),
        preprocess: PreprocessConfig::default()
            .with_window(Some(Window::QUICKSTART))
            .with_size(Some([16, 16, 24])),
        loss: None,
    }
}

/// Safetensors bytes of a LocalNet built from `config` with initialisation seed `seed`
/// (random output layers too, so that its DDF is not zero).
fn weights_of(config: &ModelConfig, seed: u64) -> Vec<u8> {
    let network = config
        .network
        .clone()
        .with_output_init(OutputInit::KaimingNormal);
    let net = LocalNet::new(&network, seed, DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    net.save_safetensors(&path).unwrap();
    std::fs::read(path).unwrap()
}

fn new_version(name: &str, version: Option<&str>, seed: u64) -> NewModelVersion {
    let config = tiny_config();
    NewModelVersion {
        name: ModelName::new(name).unwrap(),
        version: version.map(str::to_string),
        weights: weights_of(&config, seed),
        model_config: config,
        train_config_json: r#"{"epochs":2,"lr":0.0001}"#.into(),
        dataset: "synth".into(),
        train_cases: vec!["case_001".into(), "case_002".into()],
        val_cases: vec!["case_003".into()],
        job_id: Some("job-000007".into()),
        epochs: 2,
        best_val_dice: Some(0.5),
        final_losses_json: r#"{"total":0.1}"#.into(),
        source: ModelSource::Trained,
        training_data: Some(training_data()),
    }
}

/// What `new_version` was trained on: case_001 and case_002, validated on case_003.
fn training_data() -> TrainingData {
    let case = |id: &str| provenance::TrainedCase {
        case_id: id.into(),
        fixed_sha256: sha256_hex(format!("{id}/exp").as_bytes()),
        moving_sha256: sha256_hex(format!("{id}/insp").as_bytes()),
    };
    TrainingData {
        dataset: "synth".into(),
        dataset_sha256: Some(sha256_hex(b"synth")),
        train: vec![case("case_001"), case("case_002")],
        validation: vec![case("case_003")],
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    stage: Stage,
    catalog: Catalog,
}

fn fixture(encrypted: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key = encrypted.then(|| StageKey::from_bytes([9; 32]));
    let stage = Stage::open(StageLocation::Local(dir.path().join("stage")), key).unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
    Fixture {
        dir,
        stage,
        catalog,
    }
}

/// Every file under the stage folder with its bytes (staging files included).
fn stage_files(f: &Fixture) -> Vec<(String, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&f.dir.path().join("stage"), &mut out);
    out.sort();
    out
}

fn versions(c: &Catalog) -> Vec<(String, String)> {
    list_models(c)
        .unwrap()
        .into_iter()
        .map(|v| (v.name.to_string(), v.version))
        .collect()
}

#[tokio::test]
async fn versions_auto_increment_and_explicit_ones_are_kept() {
    let mut f = fixture(true);
    let v1 = register_model(&f.stage, &mut f.catalog, new_version("lung", None, 1))
        .await
        .unwrap();
    assert_eq!(v1.version, "v1");
    assert_eq!(v1.preset, "seed");
    assert_eq!(v1.source, ModelSource::Trained);
    assert_eq!(v1.medray_version, MEDRAY_VERSION);
    assert_eq!(
        v1.artifact_key.as_str(),
        "models/lung/v1/weights.safetensors"
    );
    assert_eq!(v1.config_key.as_str(), "models/lung/v1/weights.json");
    assert_eq!(v1.model_config, tiny_config());
    assert_eq!(v1.train_cases, ["case_001", "case_002"]);
    assert_eq!(v1.training_data, Some(training_data()));
    assert_eq!(v1.job_id.as_deref(), Some("job-000007"));
    assert!(v1.created_at.ends_with('Z'), "{}", v1.created_at);
    let v2 = register_model(&f.stage, &mut f.catalog, new_version("lung", None, 2))
        .await
        .unwrap();
    assert_eq!(v2.version, "v2");
    let best = register_model(
        &f.stage,
        &mut f.catalog,
        new_version("lung", Some("best-0.5"), 3),
    )
    .await
    .unwrap();
    assert_eq!(best.version, "best-0.5");
    let v3 = register_model(&f.stage, &mut f.catalog, new_version("lung", None, 4))
        .await
        .unwrap();
    assert_eq!(v3.version, "v3");
    // An explicit vN moves the counter past it; another name counts on its own.
    register_model(&f.stage, &mut f.catalog, new_version("lung", Some("v7"), 5))
        .await
        .unwrap();
    let v8 = register_model(&f.stage, &mut f.catalog, new_version("lung", None, 6))
        .await
        .unwrap();
    assert_eq!(v8.version, "v8");
    let other = register_model(&f.stage, &mut f.catalog, new_version("brain", None, 7))
        .await
        .unwrap();
    assert_eq!(other.version, "v1");
    // Imported weights record no training data: their results' split stays unknown.
    let trained = new_version("monai", None, 8);
    let imported = NewModelVersion::imported(
        ModelName::new("monai").unwrap(),
        None,
        trained.model_config,
        trained.weights,
        "{}".into(),
    );
    let imported = register_model(&f.stage, &mut f.catalog, imported)
        .await
        .unwrap();
    assert_eq!(imported.training_data, None);

    let name = ModelName::new("lung").unwrap();
    let latest = model_version(&f.catalog, &name, &VersionRef::Latest).unwrap();
    assert_eq!(latest, v8);
    let by_name = model_version(&f.catalog, &name, &VersionRef::Version("v2".into())).unwrap();
    assert_eq!(by_name, v2);
    assert_eq!(
        versions(&f.catalog),
        [
            ("brain", "v1"),
            ("lung", "v1"),
            ("lung", "v2"),
            ("lung", "best-0.5"),
            ("lung", "v3"),
            ("lung", "v7"),
            ("lung", "v8"),
            ("monai", "v1"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    // The config beside the weights is the ModelConfig, readable by `model::load_model`.
    let config: ModelConfig =
        serde_json::from_slice(&f.stage.get(&v1.config_key).await.unwrap()).unwrap();
    assert_eq!(config, tiny_config());
}

#[tokio::test]
async fn a_registered_version_is_immutable_and_a_duplicate_changes_nothing() {
    let mut f = fixture(true);
    let v1 = register_model(&f.stage, &mut f.catalog, new_version("lung", Some("v1"), 1))
        .await
        .unwrap();
    let files = stage_files(&f);
    assert_eq!(files.len(), 2);
    let err = register_model(&f.stage, &mut f.catalog, new_version("lung", Some("v1"), 2))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::ModelVersionExists { version, .. } if version == "v1"),
        "{err}"
    );
    assert!(err.to_string().contains("immutable"), "{err}");
    assert_eq!(stage_files(&f), files);
    assert_eq!(versions(&f.catalog), [("lung".into(), "v1".into())]);
    let weights = load_weights(&f.stage, &v1).await.unwrap();
    assert_eq!(weights, new_version("lung", None, 1).weights);
    // The failed attempt left the connection usable.
    let v2 = register_model(&f.stage, &mut f.catalog, new_version("lung", None, 2))
        .await
        .unwrap();
    assert_eq!(v2.version, "v2");
}

#[tokio::test]
async fn aliases_resolve_and_move() {
    let mut f = fixture(true);
    for seed in 1..=2 {
        register_model(&f.stage, &mut f.catalog, new_version("lung", None, seed))
            .await
            .unwrap();
    }
    let name = ModelName::new("lung").unwrap();
    assert_eq!(
        set_alias(&mut f.catalog, &name, "production", "v1").unwrap(),
        None
    );
    set_alias(&mut f.catalog, &name, "candidate", "v1").unwrap();
    let prod = VersionRef::Alias("production".into());
    let v = model_version(&f.catalog, &name, &prod).unwrap();
    assert_eq!(v.version, "v1");
    assert_eq!(v.aliases, ["candidate", "production"]);
    assert_eq!(
        set_alias(&mut f.catalog, &name, "production", "v2").unwrap(),
        Some("v1".to_string())
    );
    assert_eq!(
        model_version(&f.catalog, &name, &prod).unwrap().version,
        "v2"
    );
    let all = list_models(&f.catalog).unwrap();
    assert_eq!(all[0].aliases, ["candidate"]);
    assert_eq!(all[1].aliases, ["production"]);

    let err = set_alias(&mut f.catalog, &name, "production", "v9").unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err}");
    assert!(err.to_string().contains("v9"), "{err}");
    let err = model_version(&f.catalog, &name, &VersionRef::Alias("nope".into())).unwrap_err();
    assert!(err.to_string().contains("alias `nope`"), "{err}");
    let err = set_alias(&mut f.catalog, &name, "bad/alias", "v1").unwrap_err();
    assert!(err.to_string().contains("model alias"), "{err}");
}

#[tokio::test]
async fn delete_refuses_an_aliased_version_unless_forced_and_numbers_are_not_reused() {
    let mut f = fixture(true);
    for seed in 1..=2 {
        register_model(&f.stage, &mut f.catalog, new_version("lung", None, seed))
            .await
            .unwrap();
    }
    let name = ModelName::new("lung").unwrap();
    set_alias(&mut f.catalog, &name, "production", "v2").unwrap();
    let err = delete_version(&f.stage, &mut f.catalog, &name, "v2", false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::ModelVersionAliased { aliases, .. } if aliases == &["production"]),
        "{err}"
    );
    assert_eq!(versions(&f.catalog).len(), 2);
    assert_eq!(stage_files(&f).len(), 4);

    let gone = delete_version(&f.stage, &mut f.catalog, &name, "v1", false)
        .await
        .unwrap();
    assert_eq!(gone.version, "v1");
    assert!(!f.stage.exists(&gone.artifact_key).await.unwrap());
    assert!(!f.stage.exists(&gone.config_key).await.unwrap());
    let forced = delete_version(&f.stage, &mut f.catalog, &name, "v2", true)
        .await
        .unwrap();
    assert_eq!(forced.aliases, ["production"]);
    assert!(versions(&f.catalog).is_empty());
    assert!(stage_files(&f).is_empty());
    let err = model_version(&f.catalog, &name, &VersionRef::Alias("production".into()));
    assert!(err.is_err());
    let err = delete_version(&f.stage, &mut f.catalog, &name, "v2", true)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err}");
    // A deleted number is never handed out again.
    let v3 = register_model(&f.stage, &mut f.catalog, new_version("lung", None, 3))
        .await
        .unwrap();
    assert_eq!(v3.version, "v3");
}

#[tokio::test]
async fn a_failing_insert_leaves_no_artifact_and_no_row() {
    let mut f = fixture(true);
    register_model(&f.stage, &mut f.catalog, new_version("keep", None, 1))
        .await
        .unwrap();
    let before = stage_files(&f);
    f.catalog
        .conn()
        .execute_batch(
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON model_versions
             WHEN NEW.name = 'lung' BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END",
        )
        .unwrap();
    let err = register_model(&f.stage, &mut f.catalog, new_version("lung", None, 2))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disk full (test)"), "{err}");
    assert_eq!(
        stage_files(&f),
        before,
        "the artifact was written and not removed"
    );
    assert_eq!(versions(&f.catalog), [("keep".into(), "v1".into())]);
    // Nothing of the attempt is in the catalog, and the connection is usable.
    let models: i64 = f
        .catalog
        .conn()
        .query_row("SELECT COUNT(*) FROM models WHERE name = 'lung'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(models, 0);
    f.catalog
        .conn()
        .execute_batch("DROP TRIGGER refuse")
        .unwrap();
    let v1 = register_model(&f.stage, &mut f.catalog, new_version("lung", None, 2))
        .await
        .unwrap();
    assert_eq!(v1.version, "v1");
}

#[tokio::test]
async fn wrong_weights_are_refused_naming_the_tensor() {
    let mut f = fixture(true);
    // Weights of an 8-channel network under a 4-channel config.
    let mut wide = new_version("lung", None, 1);
    let mut config8 = tiny_config();
    config8.network.num_channel_initial = 8;
    wide.weights = weights_of(&config8, 1);
    let err = register_model(&f.stage, &mut f.catalog, wide)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Weights { .. }), "{err}");
    assert!(
        err.to_string().contains("encode_convs.0.0.conv.weight"),
        "{err}"
    );

    // A missing tensor is named.
    let mut partial = new_version("lung", None, 1);
    let mut tensors =
        candle_core::safetensors::load_buffer(&partial.weights, &Device::Cpu).unwrap();
    // Some tensor deep in the network (the last by name).
    let dropped = tensors.keys().max().unwrap().clone();
    assert!(tensors.remove(&dropped).is_some());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    partial.weights = std::fs::read(&path).unwrap();
    let err = register_model(&f.stage, &mut f.catalog, partial)
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&dropped), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");

    let mut garbage = new_version("lung", None, 1);
    garbage.weights = b"not a safetensors file".to_vec();
    let err = register_model(&f.stage, &mut f.catalog, garbage)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("safetensors"), "{err}");

    assert!(stage_files(&f).is_empty());
    assert!(versions(&f.catalog).is_empty());
}

#[tokio::test]
async fn invalid_fields_are_refused_naming_the_field() {
    let mut f = fixture(true);
    type Change = Box<dyn Fn(&mut NewModelVersion)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "model version",
            Box::new(|n| n.version = Some("a/b".into())),
        ),
        (
            "model version",
            Box::new(|n| n.version = Some("x".repeat(65))),
        ),
        (
            "train_config_json",
            Box::new(|n| n.train_config_json = "{".into()),
        ),
        (
            "final_losses_json",
            Box::new(|n| n.final_losses_json = String::new()),
        ),
        ("best_val_dice", Box::new(|n| n.best_val_dice = Some(1.5))),
        ("dataset name", Box::new(|n| n.dataset = "../x".into())),
        ("case id", Box::new(|n| n.val_cases = vec!["a b".into()])),
        ("job id", Box::new(|n| n.job_id = Some(String::new()))),
        (
            "training_data",
            Box::new(|n| n.train_cases = vec!["case_001".into()]),
        ),
        (
            "training_data",
            Box::new(|n| {
                if let Some(t) = n.training_data.as_mut() {
                    t.validation[0].moving_sha256 = "nope".into();
                }
            }),
        ),
        (
            "preprocess size",
            Box::new(|n| n.model_config.preprocess.size = Some([16, 16, 20])),
        ),
    ];
    for (field, change) in cases {
        let mut new = new_version("lung", None, 1);
        change(&mut new);
        let err = register_model(&f.stage, &mut f.catalog, new)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    assert!(ModelName::new("a/b").is_err());
    assert!(stage_files(&f).is_empty());
}

#[tokio::test]
async fn a_flipped_artifact_byte_is_detected() {
    // In clear, so that the flip reaches the sha256 check rather than the AES-GCM tag.
    let mut f = fixture(false);
    let v1 = register_model(&f.stage, &mut f.catalog, new_version("lung", None, 1))
        .await
        .unwrap();
    let path = f.dir.path().join("stage").join(v1.artifact_key.as_str());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let err = load_weights(&f.stage, &v1).await.unwrap_err();
    assert!(matches!(err, Error::ArtifactMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&v1.artifact_sha256), "{err}");

    // Encrypted, the same flip is refused by the envelope: no data either way.
    let mut g = fixture(true);
    let v1 = register_model(&g.stage, &mut g.catalog, new_version("lung", None, 1))
        .await
        .unwrap();
    let path = g.dir.path().join("stage").join(v1.artifact_key.as_str());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[last / 2] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    assert!(load_weights(&g.stage, &v1).await.is_err());
}

#[tokio::test]
async fn loaded_weights_give_the_same_ddf_as_the_registered_network() {
    let mut f = fixture(true);
    let new = new_version("lung", None, 11);
    let config = new.model_config.clone();
    let original = net_from_bytes(&new.weights, &config.network);
    let v1 = register_model(&f.stage, &mut f.catalog, new).await.unwrap();
    let weights = load_weights(&f.stage, &v1).await.unwrap();
    let loaded = net_from_bytes(&weights, &v1.model_config.network);
    let x = candle_core::Tensor::rand(0f32, 1.0, (1, 2, 16, 16, 16), &Device::Cpu).unwrap();
    let a = original.forward_t(&x, false).unwrap();
    let b = loaded.forward_t(&x, false).unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // Not trivially: the DDF is not zero.
    let norm = a_abs_max(&original, &x);
    assert!(norm > 0.0, "{norm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_get_distinct_versions() {
    let f = fixture(true);
    let path = f.dir.path().join("catalog.db");
    let mut a = Catalog::open(&path).unwrap();
    let mut b = Catalog::open(&path).unwrap();
    let stage = f.stage.clone();
    let stage2 = f.stage.clone();
    let ta =
        tokio::spawn(
            async move { register_model(&stage, &mut a, new_version("lung", None, 1)).await },
        );
    let tb =
        tokio::spawn(
            async move { register_model(&stage2, &mut b, new_version("lung", None, 2)).await },
        );
    let (ra, rb) = (ta.await.unwrap().unwrap(), tb.await.unwrap().unwrap());
    let mut got = vec![ra.version.clone(), rb.version.clone()];
    got.sort();
    assert_eq!(got, ["v1", "v2"]);
    for v in [ra, rb] {
        load_weights(&f.stage, &v).await.unwrap();
    }
}

/// A network from safetensors bytes under `config`.
fn net_from_bytes(bytes: &[u8], config: &LocalNetConfig) -> LocalNet {
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).unwrap();
    let net = LocalNet::new(config, 0, DType::F32, &Device::Cpu).unwrap();
    net.load_tensors(&tensors, Path::new("test")).unwrap();
    net
}

fn a_abs_max(net: &LocalNet, x: &candle_core::Tensor) -> f32 {
    net.forward_t(x, false)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
