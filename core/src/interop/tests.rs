//! Convention tests of the exports: a synthetic shift of known size on anisotropic,
//! flipped and rotated grids; stretches of known determinant.

#![allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)

use std::io::Read;

use candle_core::{Device, Tensor};
use ndarray::Array4;
use nifti::NiftiHeader;

use super::*;
use crate::ops::{self, Padding};

/// A file's bytes, gunzipped.
fn gunzip(path: &Path) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Float32 voxel `n` (NIfTI order) of a file written with `vox_offset` 352.
fn voxel(bytes: &[u8], n: usize) -> f32 {
    let o = 352 + 4 * n;
    f32::from_le_bytes(bytes[o..o + 4].try_into().unwrap())
}

/// (16, 18, 20) grids: anisotropic spacing with the first axis flipped; and the same with
/// the first two axes swapped (a 90-degree rotation) and the second flipped.
fn affines() -> [[[f64; 4]; 4]; 2] {
    [
        [
            [-0.8, 0.0, 0.0, 12.0],
            [0.0, 1.5, 0.0, -20.0],
            [0.0, 0.0, 2.5, 5.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        [
            [0.0, -1.5, 0.0, 30.0],
            [0.8, 0.0, 0.0, -7.0],
            [0.0, 0.0, 2.5, 1.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    ]
}

const SHAPE: (usize, usize, usize) = (16, 18, 20);

/// A pure shift of 2 voxels along array axis 0 (MONAI DDF, `[3, H, W, D]`).
fn shift() -> Array4<f32> {
    let (h, w, d) = SHAPE;
    Array4::from_shape_fn((3, h, w, d), |(c, ..)| if c == 0 { 2.0 } else { 0.0 })
}

fn inverse3(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let mut inv = [[0.0; 3]; 3];
    for (r, row) in inv.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            let (r1, r2) = ((c + 1) % 3, (c + 2) % 3);
            let (c1, c2) = ((r + 1) % 3, (r + 2) % 3);
            *v = (m[r1][c1] * m[r2][c2] - m[r1][c2] * m[r2][c1]) / det;
        }
    }
    inv
}

#[test]
fn an_exported_shift_is_a_fixed_to_moving_transform_in_mm_lps_on_the_fixed_grid() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w, d) = SHAPE;
    let ddf = shift();
    for (n, affine) in affines().iter().enumerate() {
        let path = dir.path().join(format!("t{n}_transform_lps_mm.nii.gz"));
        write_itk_transform(&path, &ddf, affine).unwrap();
        let bytes = gunzip(&path);
        let header = NiftiHeader::from_reader(&bytes[..]).unwrap();
        assert_eq!(header.dim, [5, 16, 18, 20, 1, 3, 1, 1]);
        assert_eq!(header.intent_code, 1007, "NIFTI_INTENT_VECTOR");
        assert_eq!((header.datatype, header.bitpix), (16, 32), "float32");
        assert_eq!(header.xyzt_units & 7, 2, "mm");
        // sform and qform are the fixed affine.
        assert_eq!((header.sform_code, header.qform_code), (1, 1));
        let srow = [header.srow_x, header.srow_y, header.srow_z];
        let spacing = [1, 2, 3].map(|a| f64::from(header.pixdim[a]));
        let qform = crate::nifti_io::qform_affine(&header, spacing).unwrap();
        for r in 0..3 {
            for c in 0..4 {
                assert_eq!(srow[r][c], affine[r][c] as f32, "sform [{r}][{c}]");
                assert!(
                    (qform[r][c] - affine[r][c]).abs() < 1e-5,
                    "qform [{r}][{c}]"
                );
            }
        }
        // Units and signs: 2 voxels along i is 2 * column 0 of the affine in RAS mm, with
        // x and y negated for LPS. Affine 0: i runs towards -x (R->L flipped), 0.8 mm: LPS
        // +1.6 mm on x. Affine 1: i runs along +y, 0.8 mm: LPS -1.6 mm on y.
        let want = [[1.6f32, 0.0, 0.0], [0.0, -1.6, 0.0]][n];
        let voxels = h * w * d;
        assert_eq!(bytes.len(), 352 + 4 * 3 * voxels);
        for (c, want_c) in want.iter().enumerate() {
            for idx in 0..voxels {
                let v = voxel(&bytes, idx + c * voxels);
                assert!((v - want_c).abs() < 1e-6, "affine {n} component {c}: {v}");
            }
        }
        // Direction: the fixed point p, moved by the stored vector in LPS and taken back to
        // voxels of the fixed grid, lands on x + u: the point `ops::warp` samples the moving
        // image at (ITK's resampling reads the moving image at T(p) = p + v(p)).
        let a3 = [0, 1, 2].map(|r| [affine[r][0], affine[r][1], affine[r][2]]);
        let inv = inverse3(a3);
        let x = [5.0, 7.0, 9.0];
        let ras = |x: [f64; 3]| {
            [0, 1, 2].map(|r| (0..3).map(|c| a3[r][c] * x[c]).sum::<f64>() + affine[r][3])
        };
        let p = ras(x);
        let p_lps = [-p[0], -p[1], p[2]];
        let q_lps = [0, 1, 2].map(|c| p_lps[c] + f64::from(want[c]));
        let q = [-q_lps[0], -q_lps[1], q_lps[2]];
        let back = [0, 1, 2].map(|r| {
            (0..3)
                .map(|c| inv[r][c] * (q[c] - affine[c][3]))
                .sum::<f64>()
        });
        for a in 0..3 {
            let want_x = x[a] + f64::from(ddf[[a, 5, 7, 9]]);
            assert!((back[a] - want_x).abs() < 1e-5, "axis {a}: {back:?}");
        }
    }
    // And `ops::warp` does read moving(x + u): a ramp along i, shifted by 2 voxels.
    let moving = Tensor::from_vec(
        (0..h * w * d)
            .map(|n| (n / (w * d)) as f32)
            .collect::<Vec<_>>(),
        (1, 1, h, w, d),
        &Device::Cpu,
    )
    .unwrap();
    let ddf_t = Tensor::from_vec(
        ddf.iter().copied().collect::<Vec<_>>(),
        (1, 3, h, w, d),
        &Device::Cpu,
    )
    .unwrap();
    let warped = ops::warp(&moving, &ddf_t, Padding::Border).unwrap();
    let at = warped.flatten_all().unwrap().to_vec1::<f32>().unwrap()[(5 * w + 7) * d + 9];
    assert!(
        (at - 7.0).abs() < 1e-4,
        "warped(5, 7, 9) = {at}, moving(7, 7, 9) = 7"
    );
}

/// A `(1, 3, H, W, D)` tensor of the DDF `u_c = f_c(i, j, k)`.
fn field(f: impl Fn(usize, [usize; 3]) -> f32) -> Tensor {
    let (h, w, d) = SHAPE;
    let a = Array4::from_shape_fn((3, h, w, d), |(c, i, j, k)| f(c, [i, j, k]));
    Tensor::from_vec(
        a.iter().copied().collect::<Vec<_>>(),
        (1, 3, h, w, d),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn jacobian_map_is_one_for_a_shift_and_the_stretch_for_a_linear_stretch() {
    let (map, dets) = jacobian_map(&field(|c, _| if c == 0 { 2.0 } else { 0.0 })).unwrap();
    assert_eq!(map.dim(), SHAPE);
    assert!(map.iter().all(|&v| v == 1.0));
    assert_eq!(log_jac_std(&dets, None).unwrap(), Some(0.0));
    // u = (0.1 i, -0.2 j, 0.05 k): J = diag(1.1, 0.8, 1.05), det 0.924 everywhere (the
    // one-sided border differences are exact for a linear field).
    let scale = [0.1f32, -0.2, 0.05];
    let (map, dets) = jacobian_map(&field(|c, x| scale[c] * x[c] as f32)).unwrap();
    for &v in &map {
        assert!((v - 0.924).abs() < 1e-5, "{v}");
    }
    assert!(log_jac_std(&dets, None).unwrap().unwrap() < 1e-6);
    // A shear adds nothing to the determinant: u_0 = 0.3 j.
    let (map, _) =
        jacobian_map(&field(|c, x| if c == 0 { 0.3 * x[1] as f32 } else { 0.0 })).unwrap();
    assert!(map.iter().all(|&v| (v - 1.0).abs() < 1e-6));
}

#[test]
fn log_jac_std_clamps_like_learn2reg_and_follows_the_mask() {
    let e = std::f64::consts::E;
    // log: 1 and -1, std 1.
    let sd = log_jac_std(&[e, 1.0 / e], None).unwrap().unwrap();
    assert!((sd - 1.0).abs() < 1e-12, "{sd}");
    // A folded voxel counts as log(1e-9): std of {0, ln 1e-9} is |ln 1e-9| / 2.
    let sd = log_jac_std(&[1.0, -5.0], None).unwrap().unwrap();
    assert!((sd - 1e-9f64.ln().abs() / 2.0).abs() < 1e-9, "{sd}");
    // Only the masked voxels count; an empty mask has none.
    assert_eq!(
        log_jac_std(&[1.0, -5.0, e], Some(&[true, false, false])).unwrap(),
        Some(0.0)
    );
    assert_eq!(log_jac_std(&[1.0], Some(&[false])).unwrap(), None);
    assert!(log_jac_std(&[1.0, 2.0], Some(&[true])).is_err());
}

#[test]
fn learn2reg_files_are_4d_voxel_fields_named_by_the_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w, d) = SHAPE;
    let ddf = Array4::from_shape_fn((3, h, w, d), |(c, i, j, k)| {
        (c * 1000 + i * 100 + j * 10 + k) as f32 / 7.0
    });
    let affine = affines()[0];
    let path = dir.path().join("disp_0001_0001.nii.gz");
    write_learn2reg_disp(&path, &ddf, &affine).unwrap();
    let bytes = gunzip(&path);
    let header = NiftiHeader::from_reader(&bytes[..]).unwrap();
    // nibabel's get_fdata() shape: (X, Y, Z, 3), the evaluation's expected_shape.
    assert_eq!(header.dim, [4, 16, 18, 20, 3, 1, 1, 1]);
    assert_eq!((header.datatype, header.intent_code), (16, 0));
    for (c, i, j, k) in [(0, 0, 0, 0), (1, 15, 2, 19), (2, 3, 17, 4)] {
        let n = i + h * (j + w * (k + d * c));
        assert_eq!(voxel(&bytes, n), ddf[[c, i, j, k]], "voxels, unchanged");
    }
    assert_eq!(
        learn2reg_name("NLST_0101"),
        ("disp_0101_0101.nii.gz".into(), true)
    );
    assert_eq!(
        learn2reg_name("NLST_0101_0000_NLST_0102_0000"),
        ("disp_0101_0102.nii.gz".into(), true)
    );
    assert_eq!(
        learn2reg_name("LungCT_0003_0001_LungCT_0003_0000"),
        ("disp_0003_0001_0003_0000.nii.gz".into(), true)
    );
    assert_eq!(
        learn2reg_name("case_001"),
        ("disp_case_001.nii.gz".into(), false)
    );
}
