//! Parity with MONAI 1.6.1 / PyTorch 2.15 on fixtures produced by `tools/make_fixtures.py`
//! (`/tmp/monai-ref/bin/python tools/make_fixtures.py`, see its docstring): LocalNet forward in
//! eval and train mode for both presets, the gradient of MI + bending energy with respect to
//! every parameter, Adam after 3 steps, the warp with its gradients, and trilinear resizing.
//!
//! The tests run on the CPU; `MEDRAY_TEST_DEVICE=cuda:0` (with the `cuda` or `cudnn` feature)
//! runs the same comparisons with every tensor on that GPU, at the same tolerances
//! (`scripts/gpu-check.sh run` does so on a lent GPU).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use medray_core::localnet::LocalNet;
use medray_core::ops::{self, with_conv3d_algorithm, Conv3dAlgorithm, Padding};
use medray_core::optim::{Adam, AdamConfig};
use medray_core::registration::{LossPreset, PairBatch, RegistrationLoss};

/// A fixture file. The crate folder is `CARGO_MANIFEST_DIR` at run time when set (cargo sets
/// it; `scripts/gpu-check.sh` does for the test binary it carries to a GPU machine), else the
/// folder this binary was built from.
fn fixture(name: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("tests/fixtures")
        .join(name)
}

/// The device the comparisons run on: `MEDRAY_TEST_DEVICE` (`cpu`, `cuda:N`), default CPU.
fn device() -> Device {
    match std::env::var("MEDRAY_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok(spec) => {
            let ordinal = spec
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("MEDRAY_TEST_DEVICE={spec}: expected cpu or cuda:N"));
            Device::new_cuda(ordinal).unwrap_or_else(|e| {
                panic!("MEDRAY_TEST_DEVICE={spec}: {e} (built without the cuda feature?)")
            })
        }
    }
}

fn load(name: &str) -> HashMap<String, Tensor> {
    let device = device();
    candle_core::safetensors::load(fixture(name), &Device::Cpu)
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
        .into_iter()
        .map(|(k, v)| (k, v.to_device(&device).unwrap()))
        .collect()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |got - expected| / max(max |expected|, tiny): a relative error robust to zeros.
fn rel_err(got: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(got.dims(), expected.dims(), "shapes differ");
    let (g, e) = (to_f64(got), to_f64(expected));
    let scale = e.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    g.iter()
        .zip(&e)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn scalar(t: &Tensor) -> f64 {
    to_f64(t)[0]
}

fn net(preset: &str) -> LocalNet {
    net_in(preset, DType::F64)
}

fn net_in(preset: &str, dtype: DType) -> LocalNet {
    let path = fixture(&format!("localnet_{preset}_weights.safetensors"));
    LocalNet::load_safetensors(&path, None, dtype, &device()).unwrap()
}

/// The fixture's tensors in `dtype`.
fn load_as(name: &str, dtype: DType) -> HashMap<String, Tensor> {
    load(name)
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect()
}

fn check_forward(preset: &str) {
    let fx = load(&format!("localnet_{preset}_forward.safetensors"));
    let model = net(preset);
    let y = model.forward_t(&fx["input"], false).unwrap();
    let e = rel_err(&y, &fx["out_eval"]);
    assert!(e < 1e-6, "{preset} eval forward: rel err {e}");
    let y = model.forward_t(&fx["input"], true).unwrap();
    let e = rel_err(&y, &fx["out_train"]);
    assert!(e < 1e-6, "{preset} train forward: rel err {e}");
    let sd = model.state_dict().unwrap();
    let mut checked = 0;
    for (key, expected) in &fx {
        for stat in ["running_mean", "running_var", "num_batches_tracked"] {
            if let Some(prefix) = key.strip_prefix(&format!("{stat}.")) {
                let got = &sd[&format!("{prefix}.{stat}")];
                let e = rel_err(got, expected);
                assert!(e < 1e-6, "{preset} {prefix}.{stat}: rel err {e}");
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "the fixture has no running statistics");
}

#[test]
fn localnet_seed_forward_matches_monai() {
    check_forward("seed");
}

#[test]
fn localnet_full_forward_matches_monai() {
    check_forward("full");
}

fn pair(fx: &HashMap<String, Tensor>) -> PairBatch {
    PairBatch {
        fixed: fx["fixed"].clone(),
        moving: fx["moving"].clone(),
        fixed_mask: None,
        moving_mask: None,
        keypoints: None,
    }
}

fn check_gradients(preset: &str) {
    let fx = load(&format!("localnet_{preset}_grad.safetensors"));
    let model = net(preset);
    let batch = pair(&fx);
    let ddf = model
        .forward_t(&batch.network_input().unwrap(), true)
        .unwrap();
    assert!(rel_err(&ddf, &fx["ddf"]) < 1e-6, "{preset} ddf");
    let loss = RegistrationLoss::new(LossPreset::MiBe)
        .forward(&ddf, &batch)
        .unwrap();
    let (total, mi, be) = loss.values().unwrap();
    for (name, got) in [("loss", total), ("mi", mi), ("bending", be)] {
        let want = scalar(&fx[name]);
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1e-12),
            "{preset} {name}: {got} vs {want}"
        );
    }
    let grads = loss.total.backward().unwrap();
    let mut checked = 0;
    for (name, var) in model.parameters() {
        let expected = &fx[&format!("grad.{name}")];
        let got = grads
            .get(&var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let e = rel_err(got, expected);
        assert!(e < 1e-4, "{preset} grad.{name}: rel err {e}");
        checked += 1;
    }
    assert_eq!(
        checked,
        fx.keys().filter(|k| k.starts_with("grad.")).count()
    );
}

/// The f32 network on each CPU conv algorithm (the fixtures' 4-channel k7 convolutions
/// would run the direct loops under `Auto`; `Fft` forces the FFT tiles) against the same
/// MONAI outputs and gradients: f32 rounding bounds, not 1e-6.
fn check_f32(preset: &str) {
    for algorithm in [Conv3dAlgorithm::Direct, Conv3dAlgorithm::Fft] {
        with_conv3d_algorithm(algorithm, || check_f32_on(preset, algorithm));
    }
}

fn check_f32_on(preset: &str, algorithm: Conv3dAlgorithm) {
    let fx = load_as(
        &format!("localnet_{preset}_forward.safetensors"),
        DType::F32,
    );
    let model = net_in(preset, DType::F32);
    for (train, key) in [(false, "out_eval"), (true, "out_train")] {
        let y = model.forward_t(&fx["input"], train).unwrap();
        let e = rel_err(&y, &fx[key]);
        assert!(e < 1e-4, "{preset} f32 {algorithm:?} {key}: rel err {e}");
    }
    let fx = load_as(&format!("localnet_{preset}_grad.safetensors"), DType::F32);
    let model = net_in(preset, DType::F32);
    let batch = pair(&fx);
    let ddf = model
        .forward_t(&batch.network_input().unwrap(), true)
        .unwrap();
    let e = rel_err(&ddf, &fx["ddf"]);
    assert!(e < 1e-4, "{preset} f32 {algorithm:?} ddf: rel err {e}");
    let loss = RegistrationLoss::new(LossPreset::MiBe)
        .forward(&ddf, &batch)
        .unwrap();
    let grads = loss.total.backward().unwrap();
    let mut worst = 0f64;
    for (name, var) in model.parameters() {
        let e = rel_err(grads.get(&var).unwrap(), &fx[&format!("grad.{name}")]);
        assert!(
            e < 1e-3,
            "{preset} f32 {algorithm:?} grad.{name}: rel err {e}"
        );
        worst = worst.max(e);
    }
    println!("{preset} f32 {algorithm:?}: worst gradient rel err {worst:.2e}");
}

#[test]
fn localnet_seed_f32_matches_monai() {
    check_f32("seed");
}

#[test]
fn localnet_full_f32_matches_monai() {
    check_f32("full");
}

#[test]
fn localnet_seed_gradients_match_monai() {
    check_gradients("seed");
}

#[test]
fn localnet_full_gradients_match_monai() {
    check_gradients("full");
}

fn check_adam(preset: &str) {
    let fx = load(&format!("adam_{preset}.safetensors"));
    let grad_fx = load(&format!("localnet_{preset}_grad.safetensors"));
    let model = net(preset);
    let batch = pair(&grad_fx);
    let objective = RegistrationLoss::new(LossPreset::MiBe);
    let mut adam = Adam::new(model.parameters(), AdamConfig::with_lr(1e-3)).unwrap();
    for step in 0..3 {
        let ddf = model
            .forward_t(&batch.network_input().unwrap(), true)
            .unwrap();
        let loss = objective.forward(&ddf, &batch).unwrap();
        let want = scalar(&fx[&format!("loss.{step}")]);
        let got = loss.values().unwrap().0;
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "{preset} loss before step {step}: {got} vs {want}"
        );
        adam.step(&loss.total.backward().unwrap()).unwrap();
    }
    for (name, var) in model.parameters() {
        let e = rel_err(var.as_tensor(), &fx[&format!("param.{name}")]);
        assert!(
            e < 1e-4,
            "{preset} param.{name} after 3 Adam steps: rel err {e}"
        );
    }
}

#[test]
fn adam_seed_matches_pytorch_after_three_steps() {
    check_adam("seed");
}

#[test]
fn adam_full_matches_pytorch_after_three_steps() {
    check_adam("full");
}

#[test]
fn warp_and_its_gradients_match_monai() {
    let fx = load("warp.safetensors");
    let image = candle_core::Var::from_tensor(&fx["image"]).unwrap();
    let ddf = candle_core::Var::from_tensor(&fx["ddf"]).unwrap();
    let out = ops::warp(&image, &ddf, Padding::Border).unwrap();
    assert!(rel_err(&out, &fx["out_border"]) < 1e-6);
    let zeros = ops::warp(&image, &ddf, Padding::Zeros).unwrap();
    assert!(rel_err(&zeros, &fx["out_zeros"]) < 1e-6);
    let grads = (out * &fx["r"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let e = rel_err(grads.get(&image).unwrap(), &fx["grad_image"]);
    assert!(e < 1e-6, "grad_image {e}");
    let e = rel_err(grads.get(&ddf).unwrap(), &fx["grad_ddf"]);
    assert!(e < 1e-6, "grad_ddf {e}");
    let nearest = ops::warp_nearest(&fx["mask"], &fx["ddf"]).unwrap();
    assert!(rel_err(&nearest, &fx["out_nearest"]) < 1e-12);
}

#[test]
fn resizing_matches_pytorch_interpolate() {
    let fx = load("resize.safetensors");
    let x = &fx["input"];
    for (key, size) in [
        ("trilinear_up", [16, 16, 24]),
        ("trilinear_down", [6, 7, 8]),
    ] {
        let got = ops::resize_trilinear(x, size).unwrap();
        let e = rel_err(&got, &fx[key]);
        assert!(e < 1e-10, "{key}: rel err {e}");
    }
    for (key, size) in [("nearest_up", [16, 16, 24]), ("nearest_down", [6, 7, 8])] {
        let got = ops::upsample_nearest3d_to(x, size).unwrap();
        assert!(rel_err(&got, &fx[key]) < 1e-12, "{key}");
    }
}
