//! Tests of NIfTI reading and writing. Files are produced either by our writers or by the
//! small independent header writer below (`RawNifti`), which follows the byte offsets of
//! `nifti1.h`; headers we write are checked with the `nifti` crate's parser.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::Device;
use ndarray::{Array3, Array4};
use rand::{Rng, SeedableRng};

use super::*;

/// A NIfTI-1 file assembled field by field, independently of the writer under test.
struct RawNifti {
    dim: [i16; 8],
    datatype: i16,
    bitpix: i16,
    pixdim: [f32; 8],
    vox_offset: f32,
    scl_slope: f32,
    scl_inter: f32,
    qform_code: i16,
    sform_code: i16,
    quatern: [f32; 6],
    srow: [[f32; 4]; 3],
    big_endian: bool,
    payload: Vec<u8>,
}

impl RawNifti {
    fn new(shape: [i16; 3], datatype: i16, bitpix: i16, payload: Vec<u8>) -> Self {
        RawNifti {
            dim: [3, shape[0], shape[1], shape[2], 1, 1, 1, 1],
            datatype,
            bitpix,
            pixdim: [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            vox_offset: 352.0,
            scl_slope: 0.0,
            scl_inter: 0.0,
            qform_code: 0,
            sform_code: 0,
            quatern: [0.0; 6],
            srow: [
                [1.0, 0.0, 0.0, 0.0],
                [0.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 1.0, 0.0],
            ],
            big_endian: false,
            payload,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 352];
        let be = self.big_endian;
        let i16b = |v: i16| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let i32b = |v: i32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let f32b = |v: f32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        b[0..4].copy_from_slice(&i32b(348));
        for i in 0..8 {
            b[40 + 2 * i..42 + 2 * i].copy_from_slice(&i16b(self.dim[i]));
        }
        b[70..72].copy_from_slice(&i16b(self.datatype));
        b[72..74].copy_from_slice(&i16b(self.bitpix));
        for i in 0..8 {
            b[76 + 4 * i..80 + 4 * i].copy_from_slice(&f32b(self.pixdim[i]));
        }
        b[108..112].copy_from_slice(&f32b(self.vox_offset));
        b[112..116].copy_from_slice(&f32b(self.scl_slope));
        b[116..120].copy_from_slice(&f32b(self.scl_inter));
        b[252..254].copy_from_slice(&i16b(self.qform_code));
        b[254..256].copy_from_slice(&i16b(self.sform_code));
        for i in 0..6 {
            b[256 + 4 * i..260 + 4 * i].copy_from_slice(&f32b(self.quatern[i]));
        }
        for r in 0..3 {
            for c in 0..4 {
                let o = 280 + 16 * r + 4 * c;
                b[o..o + 4].copy_from_slice(&f32b(self.srow[r][c]));
            }
        }
        b[344..348].copy_from_slice(b"n+1\0");
        b.extend_from_slice(&self.payload);
        b
    }

    fn write(&self, path: &Path) {
        write_file(path, &self.bytes());
    }
}

/// Writes raw bytes, gzip-compressed when the name ends in `.gz`.
fn write_file(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    if path.to_string_lossy().ends_with(".gz") {
        let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap();
    } else {
        f.write_all(bytes).unwrap();
    }
}

/// Reads a file, gunzipping it when it starts with the gzip magic bytes.
fn read_file_bytes(path: &Path) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap();
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        raw
    }
}

/// The value stored at voxel (i, j, k) of the test volumes: distinct, small integers that
/// every datatype can hold exactly.
fn stored_value(i: usize, j: usize, k: usize) -> i64 {
    (i + 3 * j + 7 * k) as i64 % 100
}

/// Payload of a `shape` volume in NIfTI (first index fastest) order.
fn payload<T, F: Fn(i64) -> T, B: Fn(T) -> Vec<u8>>(
    shape: [usize; 3],
    cast: F,
    to_bytes: B,
) -> Vec<u8> {
    let mut out = Vec::new();
    for k in 0..shape[2] {
        for j in 0..shape[1] {
            for i in 0..shape[0] {
                out.extend(to_bytes(cast(stored_value(i, j, k))));
            }
        }
    }
    out
}

fn err_string(path: &Path) -> String {
    let err = read_volume(path).expect_err("the file must be refused");
    assert!(
        matches!(err, Error::Nifti { .. }),
        "expected a Nifti error, got {err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&path.file_name().unwrap().to_string_lossy().to_string()),
        "the message must name the file: {msg}"
    );
    msg
}

#[test]
fn reads_every_datatype_with_scaling_and_byte_order() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [4usize, 3, 5];
    let le = false;
    let be = true;
    // (datatype code from nifti1.h, bitpix, payload, big endian)
    let cases: Vec<(&str, i16, i16, Vec<u8>, bool)> = vec![
        ("u8", 2, 8, payload(shape, |v| v as u8, |v| vec![v]), le),
        (
            "i8",
            256,
            8,
            payload(shape, |v| (v - 50) as i8, |v| v.to_le_bytes().to_vec()),
            le,
        ),
        (
            "i16",
            4,
            16,
            payload(shape, |v| (v - 50) as i16, |v| v.to_le_bytes().to_vec()),
            le,
        ),
        (
            "i16be",
            4,
            16,
            payload(shape, |v| (v - 50) as i16, |v| v.to_be_bytes().to_vec()),
            be,
        ),
        (
            "u16",
            512,
            16,
            payload(shape, |v| v as u16, |v| v.to_le_bytes().to_vec()),
            le,
        ),
        (
            "i32",
            8,
            32,
            payload(shape, |v| (v - 50) as i32, |v| v.to_le_bytes().to_vec()),
            le,
        ),
        (
            "u32",
            768,
            32,
            payload(shape, |v| v as u32, |v| v.to_le_bytes().to_vec()),
            le,
        ),
        (
            "i64",
            1024,
            64,
            payload(shape, |v| v - 50, |v| v.to_le_bytes().to_vec()),
            le,
        ),
        (
            "u64",
            1280,
            64,
            payload(shape, |v| v as u64, |v| v.to_le_bytes().to_vec()),
            le,
        ),
        (
            "f32",
            16,
            32,
            payload(shape, |v| v as f32 - 50.0, |v| v.to_le_bytes().to_vec()),
            le,
        ),
        (
            "f32be",
            16,
            32,
            payload(shape, |v| v as f32 - 50.0, |v| v.to_be_bytes().to_vec()),
            be,
        ),
        (
            "f64",
            64,
            64,
            payload(shape, |v| v as f64 - 50.0, |v| v.to_le_bytes().to_vec()),
            le,
        ),
    ];
    for (name, datatype, bitpix, bytes, big_endian) in cases {
        let signed_offset = if name.starts_with('u') { 0.0 } else { -50.0 };
        for (slope, inter) in [(0.0f32, 7.0f32), (2.0, -1000.0)] {
            for gz in [false, true] {
                let file = format!("{name}_{slope}{}", if gz { ".nii.gz" } else { ".nii" });
                let path = dir.path().join(file);
                let mut raw = RawNifti::new([4, 3, 5], datatype, bitpix, bytes.clone());
                raw.big_endian = big_endian;
                raw.scl_slope = slope;
                raw.scl_inter = inter;
                raw.pixdim[1..4].copy_from_slice(&[0.5, 0.75, 2.0]);
                raw.write(&path);
                let vol = read_volume(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(vol.shape(), shape, "{name}");
                assert_eq!(vol.spacing, [0.5, 0.75, 2.0], "{name}");
                // slope 0 means "no scaling" (nifti1.h), the intercept is then ignored too.
                let (s, b) = if slope == 0.0 {
                    (1.0, 0.0)
                } else {
                    (slope, inter)
                };
                for ((i, j, k), &got) in vol.data.indexed_iter() {
                    let want = (stored_value(i, j, k) as f32 + signed_offset) * s + b;
                    assert_eq!(got, want, "{name} slope {slope} at ({i},{j},{k})");
                }
            }
        }
    }
}

/// An oblique, anisotropic affine with an offset (right-handed), and a left-handed one.
fn test_affines() -> [[[f64; 4]; 4]; 2] {
    let (s, c) = (0.3f64.sin(), 0.3f64.cos());
    let oblique = [
        [0.7 * c, -0.8 * s, 0.0, -90.5],
        [0.7 * s, 0.8 * c, 0.0, 12.25],
        [0.0, 0.0, 2.5, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let flipped = [
        [-1.5, 0.0, 0.0, 100.0],
        [0.0, 1.25, 0.0, -20.0],
        [0.0, 0.0, 2.0, 5.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    [oblique, flipped]
}

fn assert_affine_close(got: &[[f64; 4]; 4], want: &[[f64; 4]; 4], what: &str) {
    for r in 0..4 {
        for c in 0..4 {
            assert!(
                (got[r][c] - want[r][c]).abs() < 1e-4,
                "{what}: affine[{r}][{c}] = {} instead of {}",
                got[r][c],
                want[r][c]
            );
        }
    }
}

#[test]
fn write_volume_round_trips_data_affine_and_spacing() {
    let dir = tempfile::tempdir().unwrap();
    let data = Array3::from_shape_fn((5, 4, 3), |(i, j, k)| {
        (i as f32 * 1.5 - j as f32 * 0.25 + k as f32 * 10.0).sin() * 1000.0
    });
    for (n, affine) in test_affines().iter().enumerate() {
        for name in [format!("v{n}.nii"), format!("v{n}.nii.gz")] {
            let path = dir.path().join(&name);
            write_volume(&path, &data, affine).unwrap();
            let vol = read_volume(&path).unwrap();
            assert_eq!(vol.data, data, "{name}: float32 must round-trip exactly");
            assert_affine_close(&vol.affine, affine, &name);
            let want_spacing =
                [0usize, 1, 2].map(|c| (0..3).map(|r| affine[r][c].powi(2)).sum::<f64>().sqrt());
            for (got, want) in vol.spacing.iter().zip(want_spacing) {
                assert!((got - want).abs() < 1e-6, "{name}: spacing {got} vs {want}");
            }

            // The qform alone must give the same affine: clear sform_code and read again.
            let mut bytes = read_file_bytes(&path);
            bytes[254..256].copy_from_slice(&0i16.to_le_bytes());
            let qpath = dir.path().join(format!("q{n}.nii"));
            write_file(&qpath, &bytes);
            let qvol = read_volume(&qpath).unwrap();
            assert_affine_close(&qvol.affine, affine, &format!("{name} (qform)"));
        }
    }
    // No temporary file is left behind by the atomic writes.
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn typed_writer_rounds_and_clamps() {
    let dir = tempfile::tempdir().unwrap();
    let data = Array3::from_shape_vec((2, 2, 1), vec![-3.4f32, 0.6, 300.0, 1.0]).unwrap();
    let identity = identity4();
    let p8 = dir.path().join("m.nii.gz");
    write_volume_as(&p8, &data, &identity, StoredType::Uint8).unwrap();
    assert_eq!(
        read_volume(&p8)
            .unwrap()
            .data
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![0.0, 1.0, 255.0, 1.0]
    );
    let p16 = dir.path().join("s.nii");
    write_volume_as(&p16, &data, &identity, StoredType::Int16).unwrap();
    let header = NiftiHeader::from_reader(&read_file_bytes(&p16)[..]).unwrap();
    assert_eq!(header.datatype, 4);
    assert_eq!(header.bitpix, 16);
    assert_eq!(
        read_volume(&p16)
            .unwrap()
            .data
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![-3.0, 1.0, 300.0, 1.0]
    );
}

#[test]
fn ddf_header_is_a_nibabel_vector_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ddf.nii.gz");
    let (h, w, d) = (4usize, 3usize, 2usize);
    let ddf = Array4::from_shape_fn((3, h, w, d), |(c, i, j, k)| {
        (c * 1000 + i * 100 + j * 10 + k) as f32
    });
    let affine = test_affines()[0];
    write_ddf(&path, &ddf, &affine).unwrap();
    let bytes = read_file_bytes(&path);
    let header = NiftiHeader::from_reader(&bytes[..]).unwrap();
    // Fields nibabel needs to load a (X, Y, Z, 1, 3) vector image.
    assert_eq!(header.dim, [5, 4, 3, 2, 1, 3, 1, 1]);
    assert_eq!(header.intent_code, 1007);
    assert_eq!(header.datatype, 16);
    assert_eq!(header.bitpix, 32);
    assert_eq!(header.vox_offset, 352.0);
    assert_eq!(&header.magic, b"n+1\0");
    assert_eq!(header.sform_code, 1);
    assert_eq!(header.srow_x[3], affine[0][3] as f32);
    assert_eq!(bytes.len(), 352 + 4 * 3 * h * w * d);
    // Fortran order over (x, y, z, t, c): x fastest, component slowest.
    for c in 0..3 {
        for k in 0..d {
            for j in 0..w {
                for i in 0..h {
                    let idx = i + h * (j + w * (k + d * c));
                    let o = 352 + 4 * idx;
                    let v = f32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
                    assert_eq!(v, ddf[[c, i, j, k]]);
                }
            }
        }
    }
    let wrong = Array4::<f32>::zeros((2, h, w, d));
    assert!(matches!(
        write_ddf(dir.path().join("bad.nii"), &wrong, &affine),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn squeezes_4d_with_one_frame_and_refuses_more() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = payload([2, 2, 2], |v| v as u8, |v| vec![v]);
    let mut raw = RawNifti::new([2, 2, 2], 2, 8, bytes.clone());
    raw.dim = [4, 2, 2, 2, 1, 1, 1, 1];
    let ok = dir.path().join("t1.nii");
    raw.write(&ok);
    assert_eq!(read_volume(&ok).unwrap().shape(), [2, 2, 2]);

    let mut raw = RawNifti::new([2, 2, 1], 2, 8, [bytes.clone(), bytes].concat());
    raw.dim = [4, 2, 2, 2, 2, 1, 1, 1];
    let bad = dir.path().join("t2.nii");
    raw.write(&bad);
    assert!(err_string(&bad).contains("dim[4] = 2"));
}

#[test]
fn refuses_broken_files_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let good = || {
        RawNifti::new(
            [3, 3, 3],
            16,
            32,
            payload([3, 3, 3], |v| v as f32, |v| v.to_le_bytes().to_vec()),
        )
    };
    let path = |name: &str| dir.path().join(name);

    std::fs::write(path("empty.nii"), b"").unwrap();
    assert!(err_string(&path("empty.nii")).contains("truncated"));

    std::fs::write(path("garbage.nii"), vec![0xAB; 1000]).unwrap();
    err_string(&path("garbage.nii"));

    // A gzip file that is cut in the middle.
    let full = dir.path().join("full.nii.gz");
    good().write(&full);
    let gz = std::fs::read(&full).unwrap();
    std::fs::write(path("cut.nii.gz"), &gz[..gz.len() / 2]).unwrap();
    err_string(&path("cut.nii.gz"));

    let mut truncated = good().bytes();
    truncated.truncate(352 + 10);
    std::fs::write(path("short.nii"), &truncated).unwrap();
    assert!(err_string(&path("short.nii")).contains("truncated"));

    let mut two_d = RawNifti::new([3, 3, 1], 16, 32, vec![0; 36]);
    two_d.dim = [2, 3, 3, 1, 1, 1, 1, 1];
    two_d.write(&path("flat.nii"));
    assert!(err_string(&path("flat.nii")).contains("2-D"));

    for (name, spacing) in [
        ("zero.nii", 0.0f32),
        ("neg.nii", -1.0),
        ("nan.nii", f32::NAN),
    ] {
        let mut raw = good();
        raw.pixdim[2] = spacing;
        raw.write(&path(name));
        assert!(err_string(&path(name)).contains("spacing"), "{name}");
    }

    let mut values: Vec<f32> = (0..27).map(|v| v as f32).collect();
    values[3] = f32::NAN;
    values[10] = f32::INFINITY;
    values[11] = f32::NEG_INFINITY;
    let raw = RawNifti::new(
        [3, 3, 3],
        16,
        32,
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    );
    raw.write(&path("nonfinite.nii"));
    assert!(err_string(&path("nonfinite.nii")).contains("3 of 27"));

    let mut complex = good();
    complex.datatype = 32;
    complex.bitpix = 64;
    complex.write(&path("complex.nii"));
    assert!(err_string(&path("complex.nii")).contains("unsupported datatype"));

    let mut huge = good();
    huge.dim = [3, 32767, 32767, 32767, 1, 1, 1, 1];
    huge.write(&path("huge.nii"));
    err_string(&path("huge.nii"));

    let mut negative = good();
    negative.dim = [3, 3, -3, 3, 1, 1, 1, 1];
    negative.write(&path("negative.nii"));
    err_string(&path("negative.nii"));

    assert!(matches!(
        read_volume(path("missing.nii")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn corrupted_headers_never_panic() {
    // Random byte flips in the header of a valid file: every outcome is Ok or Err, never a
    // panic (a panic fails the test).
    let dir = tempfile::tempdir().unwrap();
    let base = RawNifti::new(
        [3, 3, 3],
        4,
        16,
        payload([3, 3, 3], |v| v as i16, |v| v.to_le_bytes().to_vec()),
    )
    .bytes();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let path = dir.path().join("fuzz.nii");
    let mut refused = 0;
    for _ in 0..300 {
        let mut bytes = base.clone();
        for _ in 0..rng.gen_range(1..6) {
            let at = rng.gen_range(0..352);
            bytes[at] = rng.gen();
        }
        std::fs::write(&path, &bytes).unwrap();
        if read_volume(&path).is_err() {
            refused += 1;
        }
    }
    assert!(refused > 0, "some corruptions must be detected");
}

#[test]
fn tensors_are_channel_first_and_convert_back() {
    let data = Array3::from_shape_fn((3, 4, 5), |(i, j, k)| (i * 100 + j * 10 + k) as f32);
    let vol = Volume {
        data: data.clone(),
        affine: identity4(),
        spacing: [1.0; 3],
        header: NiftiHeader::default(),
    };
    let t = to_tensor(&vol, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 1, 3, 4, 5]);
    let v: f32 = t
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .get(2)
        .unwrap()
        .get(1)
        .unwrap()
        .get(3)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(v, 213.0);
    assert_eq!(tensor_to_array3(&t).unwrap(), data);
    assert!(tensor_to_array3(&t.reshape((1, 3, 4, 5, 1)).unwrap()).is_err());

    let ddf = Tensor::arange(0f32, 3.0 * 60.0, &Device::Cpu)
        .unwrap()
        .reshape((1, 3, 3, 4, 5))
        .unwrap();
    let arr = tensor_to_ddf_array(&ddf).unwrap();
    assert_eq!(arr[[2, 1, 2, 3]], (2 * 60 + 20 + 2 * 5 + 3) as f32);
}
