//! `medray predict` end to end on the MONAI fixture in `core/tests/fixtures/predict/`
//! (produced by `tools/make_fixtures.py`: LocalNet seed preset, num_channel_initial 4, eval
//! mode, input cat(moving, fixed) without preprocessing, DDF and `Warp()` output from MONAI
//! 1.6.1), plus the errors users get for malformed inputs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use medray_core::nifti_io::{read_volume, write_volume};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/fixtures")
}

fn medray() -> Command {
    Command::new(env!("CARGO_BIN_EXE_medray"))
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Run {
    let out = medray().args(args).output().expect("medray runs");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()))
        / scale
}

/// Reads a DDF NIfTI written by medray back into (3, H, W, D) order, checking the header
/// fields nibabel and ITK rely on (NIfTI-1: dim at byte 40, intent_code at 68, datatype at 70,
/// vox_offset at 108).
fn read_ddf(path: &Path) -> (Vec<usize>, Vec<f32>) {
    use std::io::Read;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut bytes)
        .unwrap();
    let i16_at = |o: usize| i16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let dim: Vec<i16> = (0..8).map(|i| i16_at(40 + 2 * i)).collect();
    assert_eq!(dim[0], 5, "5-D");
    assert_eq!((dim[4], dim[5]), (1, 3), "(X, Y, Z, 1, 3)");
    assert_eq!(i16_at(68), 1007, "NIFTI_INTENT_VECTOR");
    assert_eq!(i16_at(70), 16, "float32");
    let offset = f32::from_le_bytes(bytes[108..112].try_into().unwrap()) as usize;
    let (x, y, z) = (dim[1] as usize, dim[2] as usize, dim[3] as usize);
    let value = |i: usize, j: usize, k: usize, c: usize| {
        let idx = i + x * (j + y * (k + z * c));
        let o = offset + 4 * idx;
        f32::from_le_bytes(bytes[o..o + 4].try_into().unwrap())
    };
    let mut out = Vec::with_capacity(3 * x * y * z);
    for c in 0..3 {
        for i in 0..x {
            for j in 0..y {
                for k in 0..z {
                    out.push(value(i, j, k, c));
                }
            }
        }
    }
    (vec![3, x, y, z], out)
}

#[test]
fn predict_reproduces_monai_ddf_and_warped_image() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let ddf_path = dir.path().join("ddf.nii.gz");
    let warped_path = dir.path().join("warped.nii.gz");
    let weights = fx.join("localnet_seed_weights.safetensors");
    let r = run(&[
        "predict",
        "--weights",
        s(&weights),
        "--fixed",
        s(&fx.join("predict/fixed.nii.gz")),
        "--moving",
        s(&fx.join("predict/moving.nii.gz")),
        "--fixed-mask",
        s(&fx.join("predict/fixed_mask.nii.gz")),
        "--moving-mask",
        s(&fx.join("predict/moving_mask.nii.gz")),
        "--out-ddf",
        s(&ddf_path),
        "--out-warped",
        s(&warped_path),
        "--json",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let report: HashMap<String, serde_json::Value> = serde_json::from_str(r.stdout.trim()).unwrap();
    for key in [
        "mi_loss",
        "bending_energy",
        "dice",
        "soft_dice",
        "ssim",
        "folding_pct",
        "ddf_magnitude",
        "tre_mm",
        "runtime_ms",
    ] {
        assert!(report.contains_key(key), "missing {key} in {report:?}");
    }
    assert!(report["tre_mm"].is_null(), "no keypoints given");
    assert!(report["dice"].as_f64().unwrap() > 0.0);

    let expected: HashMap<String, Tensor> = candle_core::safetensors::load(
        fx.join("predict/predict_expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let flat = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (shape, ddf) = read_ddf(&ddf_path);
    assert_eq!(shape, vec![3, 32, 32, 40]);
    let e = max_rel_err(&ddf, &flat(&expected["ddf"]));
    assert!(e < 1e-4, "DDF differs from MONAI: rel err {e}");

    let warped = read_volume(&warped_path).unwrap();
    let got: Vec<f32> = warped.data.iter().copied().collect();
    let e = max_rel_err(&got, &flat(&expected["warped"]));
    assert!(e < 1e-4, "warped image differs from MONAI: rel err {e}");
    // The network grid is the original grid here, so the original affine is kept.
    let fixed = read_volume(fx.join("predict/fixed.nii.gz")).unwrap();
    assert_eq!(warped.affine, fixed.affine);

    for (key, name) in [("mi_loss", "mi_loss"), ("bending_energy", "bending_energy")] {
        let want = expected[name]
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let got = report[key].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-4 * want.abs(),
            "{key}: {got} vs MONAI {want}"
        );
    }
}

/// A small valid pair (16^3) and bare weights for the error tests.
struct Inputs {
    dir: tempfile::TempDir,
    weights: PathBuf,
    fixed: PathBuf,
    moving: PathBuf,
}

fn inputs() -> Inputs {
    let dir = tempfile::tempdir().unwrap();
    let affine = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let img = ndarray::Array3::from_shape_fn((16, 16, 16), |(i, j, k)| {
        ((i + 2 * j + 3 * k) as f32 / 96.0).sin().abs()
    });
    let fixed = dir.path().join("fixed.nii.gz");
    let moving = dir.path().join("moving.nii.gz");
    write_volume(&fixed, &img, &affine).unwrap();
    write_volume(&moving, &img, &affine).unwrap();
    Inputs {
        weights: fixtures().join("localnet_seed_weights.safetensors"),
        fixed,
        moving,
        dir,
    }
}

fn predict_err(i: &Inputs, fixed: &Path, moving: &Path, weights: &Path) -> String {
    let out = i.dir.path().join("ddf.nii.gz");
    let r = run(&[
        "predict",
        "--weights",
        s(weights),
        "--fixed",
        s(fixed),
        "--moving",
        s(moving),
        "--out-ddf",
        s(&out),
    ]);
    assert!(!r.ok, "expected a failure, got: {}", r.stdout);
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    assert!(!out.exists(), "no output is written on failure");
    r.stderr
}

#[test]
fn truncated_and_foreign_files_are_refused_with_their_name() {
    let i = inputs();
    let bytes = std::fs::read(&i.fixed).unwrap();
    let truncated = i.dir.path().join("truncated.nii.gz");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = predict_err(&i, &truncated, &i.moving, &i.weights);
    assert!(err.contains("truncated.nii.gz"), "{err}");

    let text = i.dir.path().join("notes.nii");
    std::fs::write(&text, "this is not an image").unwrap();
    let err = predict_err(&i, &i.fixed, &text, &i.weights);
    assert!(err.contains("notes.nii"), "{err}");
}

#[test]
fn mismatched_shapes_two_d_images_and_nans_are_refused() {
    let i = inputs();
    let affine = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let other = i.dir.path().join("other.nii.gz");
    write_volume(&other, &ndarray::Array3::zeros((16, 16, 24)), &affine).unwrap();
    let err = predict_err(&i, &i.fixed, &other, &i.weights);
    assert!(
        err.contains("other.nii.gz") && err.contains("16, 16, 24"),
        "{err}"
    );

    // A 2-D image: a valid 16x16x1 file whose header says dim[0] = 2.
    let flat = i.dir.path().join("slice.nii");
    write_volume(&flat, &ndarray::Array3::zeros((16, 16, 1)), &affine).unwrap();
    let mut bytes = std::fs::read(&flat).unwrap();
    bytes[40..42].copy_from_slice(&2i16.to_le_bytes());
    std::fs::write(&flat, bytes).unwrap();
    let err = predict_err(&i, &flat, &i.moving, &i.weights);
    assert!(err.contains("slice.nii"), "{err}");

    let mut nan = ndarray::Array3::<f32>::zeros((16, 16, 16));
    nan[[3, 4, 5]] = f32::NAN;
    let nan_path = i.dir.path().join("nan.nii.gz");
    write_volume(&nan_path, &nan, &affine).unwrap();
    let err = predict_err(&i, &i.fixed, &nan_path, &i.weights);
    assert!(
        err.contains("nan.nii.gz") && err.to_lowercase().contains("nan"),
        "{err}"
    );

    // Not divisible by 8 and no model config to resize.
    let odd = i.dir.path().join("odd.nii.gz");
    write_volume(&odd, &ndarray::Array3::zeros((16, 16, 12)), &affine).unwrap();
    let err = predict_err(&i, &odd, &odd, &i.weights);
    assert!(err.contains("odd.nii.gz") && err.contains('8'), "{err}");
}

#[test]
fn wrong_weights_are_refused_with_the_tensor_named() {
    let i = inputs();
    let mut sd: HashMap<String, Tensor> =
        candle_core::safetensors::load(&i.weights, &Device::Cpu).unwrap();
    sd.insert(
        "bottom_block.conv.weight".into(),
        Tensor::zeros((3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let bad = i.dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&sd, &bad).unwrap();
    let err = predict_err(&i, &i.fixed, &i.moving, &bad);
    assert!(err.contains("bottom_block.conv.weight"), "{err}");

    let garbage = i.dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    let err = predict_err(&i, &i.fixed, &i.moving, &garbage);
    assert!(err.contains("garbage.safetensors"), "{err}");
}

/// A DICOM series folder is a scan like a NIfTI file: `--fixed` is the 16-slice POPI crop in
/// `core/tests/data/popi-crop/dicom` (see its README), `--moving` the same voxels as NIfTI.
/// The outputs carry the series' geometry (affine in RAS+), as they would a NIfTI input's.
#[test]
fn predict_reads_a_dicom_series_folder() {
    let popi = fixtures().join("../data/popi-crop");
    let dir = tempfile::tempdir().unwrap();
    let warped_path = dir.path().join("warped.nii.gz");
    let r = run(&[
        "predict",
        "--weights",
        s(&fixtures().join("localnet_seed_weights.safetensors")),
        "--fixed",
        s(&popi.join("dicom")),
        "--moving",
        s(&popi.join("popi_crop.nii.gz")),
        "--out-ddf",
        s(&dir.path().join("ddf.nii.gz")),
        "--out-warped",
        s(&warped_path),
        "--json",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let warped = read_volume(&warped_path).unwrap();
    let nifti = read_volume(popi.join("popi_crop.nii.gz")).unwrap();
    assert_eq!(warped.shape(), [64, 48, 16]);
    for (w, n) in warped
        .affine
        .iter()
        .flatten()
        .zip(nifti.affine.iter().flatten())
    {
        assert!(
            (w - n).abs() < 1e-3,
            "{:?} vs {:?}",
            warped.affine,
            nifti.affine
        );
    }

    // A folder that is not a series is refused, naming it.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let bad = run(&[
        "predict",
        "--weights",
        s(&fixtures().join("localnet_seed_weights.safetensors")),
        "--fixed",
        s(&empty),
        "--moving",
        s(&popi.join("popi_crop.nii.gz")),
        "--out-ddf",
        s(&dir.path().join("ddf2.nii.gz")),
    ]);
    assert!(!bad.ok);
    assert!(
        bad.stderr.contains(s(&empty)) && bad.stderr.contains("empty"),
        "{}",
        bad.stderr
    );
}
