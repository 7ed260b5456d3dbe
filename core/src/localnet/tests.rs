//! LocalNet tests: state_dict names and shapes against MONAI's listings, parameter counts,
//! the golden forward values of monai-spec.md §8, and weight loading errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};

use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// (name, shape) rows of a state_dict listing produced by MONAI 1.6.1 (shared/docs).
fn listing(name: &str) -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(fixture(name)).expect("listing fixture");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut cols = l.split('\t');
            let key = cols.next().expect("name column").to_string();
            let shape = cols
                .next()
                .expect("shape column")
                .trim_matches(|c| c == '(' || c == ')')
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().expect("dimension"))
                .collect();
            (key, shape)
        })
        .collect()
}

fn state_dict_rows(net: &LocalNet) -> Vec<(String, Vec<usize>)> {
    let sd = net.state_dict().unwrap();
    let mut rows: Vec<(String, Vec<usize>)> = sd
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    rows.sort();
    rows
}

#[test]
fn state_dict_names_and_shapes_match_monai() {
    for (config, file, params) in [
        (
            LocalNetConfig::seed(),
            "localnet_extract3_state_dict.tsv",
            3_014_144,
        ),
        (
            LocalNetConfig::full(),
            "localnet_extract0123_state_dict.tsv",
            5_937_120,
        ),
    ] {
        let net = LocalNet::new(&config, 0, DType::F32, &Device::Cpu).unwrap();
        let mut expected = listing(file);
        expected.sort();
        assert_eq!(state_dict_rows(&net), expected, "{file}");
        assert_eq!(net.num_parameters(), params, "{file}");
    }
}

#[test]
fn named_vars_follow_the_state_dict_order() {
    let net = LocalNet::new(&LocalNetConfig::full(), 0, DType::F32, &Device::Cpu).unwrap();
    let order: Vec<String> = listing("localnet_extract0123_state_dict.tsv")
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .collect();
    let ours: Vec<String> = net.named_vars().into_iter().map(|v| v.name).collect();
    assert_eq!(ours, order);
}

#[test]
fn initialisation_follows_monai() {
    let net = LocalNet::new(&LocalNetConfig::seed(), 3, DType::F32, &Device::Cpu).unwrap();
    let sd = net.state_dict().unwrap();
    let std = |name: &str| -> f64 {
        let t = sd[name]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let n = t.elem_count() as f64;
        let mean = (t.sum_all().unwrap().to_scalar::<f64>().unwrap()) / n;
        let sq = t
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            / n;
        (sq - mean * mean).sqrt()
    };
    // kaiming_normal_: std = sqrt(2 / fan_in), fan_in = 2 * 343 (monai-spec §1.4: 0.05399).
    let s = std("encode_convs.0.0.conv.weight");
    assert!((s - (2.0f64 / 686.0).sqrt()).abs() < 0.002, "{s}");
    // PyTorch default U(+-1/sqrt(fan_in)): std = 1/sqrt(3 fan_in), fan_in = 32 * 343.
    let s = std("encode_convs.0.1.layers.0.conv.weight");
    assert!(
        (s - 1.0 / (3.0f64 * 32.0 * 343.0).sqrt()).abs() < 0.0005,
        "{s}"
    );
    // Zero output layer: the initial DDF is exactly zero.
    let out = sd["output_block.layers.0.conv.weight"]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(out, 0.0);
}

/// Sets the deterministic weights of monai-spec.md §8 (`v10_golden.py`): for the k-th
/// state_dict entry and flat index t, s = sin(1.3 + 0.7k + 0.37t).
fn golden_weights(net: &LocalNet, listing_file: &str) -> HashMap<String, Tensor> {
    let shapes: HashMap<String, Vec<usize>> = state_dict_rows(net).into_iter().collect();
    let mut out = HashMap::new();
    for (k, (name, _)) in listing(listing_file).into_iter().enumerate() {
        let shape = shapes[&name].clone();
        if name.ends_with("num_batches_tracked") {
            out.insert(name, Tensor::new(0i64, &Device::Cpu).unwrap());
            continue;
        }
        let n: usize = shape.iter().product();
        let s = |t: usize| (1.3 + 0.7 * k as f64 + 0.37 * t as f64).sin();
        let values: Vec<f64> = if name.ends_with("conv.weight") {
            let fan_in = (shape[1] * shape[2] * shape[3] * shape[4]) as f64;
            (0..n).map(|t| s(t) / fan_in.sqrt()).collect()
        } else if name.ends_with("running_var") {
            (0..n).map(|t| 1.0 + 0.5 * s(t) * s(t)).collect()
        } else if name.ends_with("running_mean") {
            (0..n).map(|t| 0.05 * s(t)).collect()
        } else if name.ends_with(".weight") {
            (0..n).map(|t| 1.0 + 0.1 * s(t)).collect()
        } else {
            (0..n).map(|t| 0.1 * s(t)).collect()
        };
        out.insert(
            name,
            Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap(),
        );
    }
    out
}

fn golden_input() -> Tensor {
    let (b, c, h, w, d) = (2, 2, 16, 16, 24);
    let mut v = Vec::with_capacity(b * c * h * w * d);
    for bi in 0..b {
        for ci in 0..c {
            for i in 0..h {
                for j in 0..w {
                    for k in 0..d {
                        let (bi, ci, i, j, k) =
                            (bi as f64, ci as f64, i as f64, j as f64, k as f64);
                        v.push((0.3 * i + 0.5 * ci + 0.7 * bi).sin() * (0.2 * j - 0.1 * k).cos());
                    }
                }
            }
        }
    }
    Tensor::from_vec(v, (b, c, h, w, d), &Device::Cpu).unwrap()
}

fn check_golden(levels: Vec<usize>, file: &str, train: bool, sum: f64, probe: [f64; 3]) {
    let config = LocalNetConfig {
        extract_levels: levels,
        ..LocalNetConfig::seed().with_num_channel_initial(4)
    };
    let net = LocalNet::new(&config, 0, DType::F64, &Device::Cpu).unwrap();
    net.load_tensors(&golden_weights(&net, file), Path::new("golden"))
        .unwrap();
    let y = net.forward_t(&golden_input(), train).unwrap();
    assert_eq!(y.dims(), &[2, 3, 16, 16, 24]);
    let got = y.sum_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(
        (got - sum).abs() <= 1e-7 * sum.abs(),
        "sum {got} vs MONAI {sum} (train={train})"
    );
    let p = y.i((0, .., 1, 2, 3)).unwrap().to_vec1::<f64>().unwrap();
    for (g, e) in p.iter().zip(probe) {
        assert!((g - e).abs() < 1e-7, "y[0,:,1,2,3] = {p:?} vs {probe:?}");
    }
}

// Golden values: monai-spec.md §8, MONAI 1.6.1, float64.
#[test]
fn golden_forward_seed_eval() {
    check_golden(
        vec![3],
        "localnet_extract3_state_dict.tsv",
        false,
        56.31779545,
        [0.02126367, 0.02266159, 0.01151158],
    );
}

#[test]
fn golden_forward_seed_train() {
    check_golden(
        vec![3],
        "localnet_extract3_state_dict.tsv",
        true,
        437.5208257,
        [0.13191642, -0.0183231, -0.15841695],
    );
}

#[test]
fn golden_forward_full_eval() {
    check_golden(
        vec![0, 1, 2, 3],
        "localnet_extract0123_state_dict.tsv",
        false,
        236.2732802,
        [-0.34608927, 0.21122608, 0.15676771],
    );
}

#[test]
fn golden_forward_full_train() {
    check_golden(
        vec![0, 1, 2, 3],
        "localnet_extract0123_state_dict.tsv",
        true,
        209.1278427,
        [1.12276197, -0.97111141, 0.45468465],
    );
}

#[test]
fn train_mode_updates_running_statistics_and_counters() {
    let config = LocalNetConfig::seed().with_num_channel_initial(2);
    let net = LocalNet::new(&config, 1, DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::rand(0f32, 1f32, (1, 2, 16, 16, 16), &Device::Cpu).unwrap();
    let before = net.state_dict().unwrap()["bottom_block.adn.N.running_mean"]
        .to_vec1::<f32>()
        .unwrap();
    net.forward_t(&x, true).unwrap();
    let sd = net.state_dict().unwrap();
    let after = sd["bottom_block.adn.N.running_mean"]
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(before, after);
    let counter = sd["bottom_block.adn.N.num_batches_tracked"]
        .to_scalar::<i64>()
        .unwrap();
    assert_eq!(counter, 1);
    // Eval mode leaves them alone.
    net.forward_t(&x, false).unwrap();
    let again = net.state_dict().unwrap()["bottom_block.adn.N.running_mean"]
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(after, again);
}

#[test]
fn save_load_round_trip_infers_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let config = LocalNetConfig::full()
        .with_num_channel_initial(2)
        .with_output_init(OutputInit::KaimingNormal);
    let net = LocalNet::new(&config, 7, DType::F32, &Device::Cpu).unwrap();
    net.save_safetensors(&path).unwrap();
    let loaded = LocalNet::load_safetensors(&path, None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.config().num_channel_initial, 2);
    assert_eq!(loaded.config().extract_levels, vec![0, 1, 2, 3]);
    let x = Tensor::rand(0f32, 1f32, (1, 2, 8, 8, 16), &Device::Cpu).unwrap();
    let a = net.forward_t(&x, false).unwrap();
    let b = loaded.forward_t(&x, false).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn bad_weights_are_refused_with_the_tensor_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = LocalNetConfig::seed().with_num_channel_initial(2);
    let net = LocalNet::new(&config, 0, DType::F32, &Device::Cpu).unwrap();
    let good = net.state_dict().unwrap();

    // A wrong shape.
    let mut sd = good.clone();
    sd.insert(
        "bottom_block.conv.weight".into(),
        Tensor::zeros((16, 4, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.path().join("shape.safetensors");
    candle_core::safetensors::save(&sd, &path).unwrap();
    let err = LocalNet::load_safetensors(&path, Some(&config), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bottom_block.conv.weight") && err.contains("shape"),
        "{err}"
    );

    // A missing tensor.
    let mut sd = good.clone();
    sd.remove("encode_convs.1.1.norms.0.bias");
    let path = dir.path().join("missing.safetensors");
    candle_core::safetensors::save(&sd, &path).unwrap();
    let err = LocalNet::load_safetensors(&path, None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encode_convs.1.1.norms.0.bias") && err.contains("missing"),
        "{err}"
    );

    // An unexpected tensor.
    let mut sd = good.clone();
    sd.insert(
        "head.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.path().join("extra.safetensors");
    candle_core::safetensors::save(&sd, &path).unwrap();
    let err = LocalNet::load_safetensors(&path, None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("head.weight"), "{err}");

    // Not a safetensors file at all.
    let path = dir.path().join("garbage.safetensors");
    std::fs::write(&path, b"this is not a tensor file").unwrap();
    let err = LocalNet::load_safetensors(&path, None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("garbage.safetensors"), "{err}");
}

#[test]
fn inputs_not_divisible_by_eight_are_refused() {
    let net = LocalNet::new(
        &LocalNetConfig::seed().with_num_channel_initial(2),
        0,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let x = Tensor::zeros((1, 2, 16, 12, 16), DType::F32, &Device::Cpu).unwrap();
    let err = net.forward_t(&x, false).unwrap_err().to_string();
    assert!(err.contains("divisible by 8"), "{err}");
}
