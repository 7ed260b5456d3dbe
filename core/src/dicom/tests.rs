//! Tests of the DICOM series reader on `core/tests/data/popi-crop/` (16 real CT slices,
//! 64 x 48, and the same voxels cut from an independent NIfTI conversion; see its README).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

use super::*;
use crate::nifti_io::read_volume;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/popi-crop")
}

/// The fixture's slice files, in name order (which is the reverse of position order).
fn slice_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixture().join("dicom"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 16);
    files
}

/// A copy of the fixture series in `root/name`.
fn copy_series(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in slice_files() {
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    dir
}

/// Rewrites the DICOM file `path` after `edit`.
fn rewrite(path: &Path, edit: impl FnOnce(&mut dicom_object::DefaultDicomObject)) {
    let mut object = dicom_object::open_file(path).unwrap();
    edit(&mut object);
    object.write_to_file(path).unwrap();
}

fn dicom_reason(result: Result<Volume>, expected_path: &Path) -> String {
    match result {
        Err(Error::Dicom { path, reason }) => {
            assert_eq!(
                path, expected_path,
                "the error names the wrong path: {reason}"
            );
            reason
        }
        other => panic!("expected a DICOM error naming {expected_path:?}, got {other:?}"),
    }
}

#[test]
fn series_matches_its_nifti_conversion() {
    // Through `read_volume`: a folder is read as a DICOM series.
    let dicom = read_volume(fixture().join("dicom")).unwrap();
    let nifti = read_volume(fixture().join("popi_crop.nii.gz")).unwrap();
    assert_eq!(dicom.shape(), [64, 48, 16], "columns, rows, slices");
    assert_eq!(dicom.shape(), nifti.shape());
    assert!(
        dicom.data == nifti.data,
        "voxels differ from the NIfTI conversion"
    );
    for a in 0..3 {
        assert!(
            (dicom.spacing[a] - nifti.spacing[a]).abs() < 1e-3,
            "{:?}",
            dicom.spacing
        );
    }
    for r in 0..4 {
        for c in 0..4 {
            let (d, n) = (dicom.affine[r][c], nifti.affine[r][c]);
            assert!((d - n).abs() < 1e-3, "affine[{r}][{c}]: {d} vs {n}");
        }
    }
    // HU from int16 with intercept -1024: stored exactly as int16.
    assert_eq!(stored_type(&dicom), StoredType::Int16);
    assert_eq!(dicom.header.dim[..4], [3, 64, 48, 16]);
    assert_eq!(dicom.header.sform_code, 1);
}

#[test]
fn file_names_and_folder_noise_do_not_matter() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("series");
    std::fs::create_dir_all(dir.join("subfolder")).unwrap();
    // Names that sort neither with nor against the slice positions.
    for (i, f) in slice_files().iter().enumerate() {
        let name = format!("IM{}", (i * 5) % 16);
        std::fs::copy(f, dir.join(name)).unwrap();
    }
    std::fs::write(dir.join("notes.txt"), "exported by a PACS").unwrap();
    std::fs::write(dir.join("DICOMDIR"), "not parsed").unwrap();
    std::fs::write(dir.join(".DS_Store"), [0u8; 300]).unwrap();
    std::fs::copy(&slice_files()[0], dir.join("subfolder/extra.dcm")).unwrap();
    let got = read_series(&dir).unwrap();
    let want = read_series(fixture().join("dicom")).unwrap();
    assert!(got.data == want.data);
    assert_eq!(got.affine, want.affine);
}

#[test]
fn bad_series_are_refused_with_the_folder_or_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Position order of the fixture's files: name order reversed.
    let file = |dir: &Path, i: usize| dir.join(slice_files()[i].file_name().unwrap());

    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let reason = dicom_reason(read_series(&empty), &empty);
    assert!(reason.contains("empty"), "{reason}");

    let text = root.join("text");
    std::fs::create_dir_all(&text).unwrap();
    std::fs::write(text.join("scan.dcm"), "not DICOM at all").unwrap();
    let reason = dicom_reason(read_series(&text), &text);
    assert!(reason.contains("no DICOM file"), "{reason}");

    let two = copy_series(root, "two-series");
    for i in [0, 1] {
        rewrite(&file(&two, i), |o| {
            o.put(DataElement::new(
                tags::SERIES_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.4.5"),
            ));
        });
    }
    let reason = dicom_reason(read_series(&two), &two);
    assert!(
        reason.contains("2 DICOM series") && reason.contains("1.2.3.4.5"),
        "{reason}"
    );

    let missing = copy_series(root, "missing");
    std::fs::remove_file(file(&missing, 4)).unwrap();
    let reason = dicom_reason(read_series(&missing), &missing);
    assert!(
        reason.contains("uneven slice spacing") && reason.contains("4.000"),
        "{reason}"
    );

    let duplicate = copy_series(root, "duplicate");
    std::fs::copy(file(&duplicate, 3), duplicate.join("copy.dcm")).unwrap();
    let reason = dicom_reason(read_series(&duplicate), &duplicate);
    assert!(reason.contains("duplicate slice position"), "{reason}");

    let compressed = copy_series(root, "compressed");
    let jpeg = file(&compressed, 2);
    rewrite(&jpeg, |o| {
        let ts = TransferSyntaxRegistry
            .get("1.2.840.10008.1.2.4.70")
            .unwrap();
        o.meta_mut().set_transfer_syntax(ts);
    });
    let reason = dicom_reason(read_series(&compressed), &jpeg);
    assert!(
        reason.contains("1.2.840.10008.1.2.4.70") && reason.contains("not supported"),
        "{reason}"
    );

    let no_pixels = copy_series(root, "no-pixels");
    let report = file(&no_pixels, 5);
    rewrite(&report, |o| {
        o.remove_element(tags::PIXEL_DATA);
    });
    let reason = dicom_reason(read_series(&no_pixels), &report);
    assert!(reason.contains("no PixelData"), "{reason}");

    let rows = copy_series(root, "rows");
    let short = file(&rows, 6);
    rewrite(&short, |o| {
        let bytes = o.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        let kept: Vec<u16> = bytes[..47 * 64 * 2]
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        o.put(DataElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(47u16),
        ));
        o.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(kept.into()),
        ));
    });
    let reason = dicom_reason(read_series(&rows), &short);
    assert!(reason.contains("Rows x Columns is 47 x 64"), "{reason}");

    let truncated = copy_series(root, "truncated");
    let cut = file(&truncated, 1);
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let reason = dicom_reason(read_series(&truncated), &cut);
    assert!(reason.contains("not readable as DICOM"), "{reason}");
}

#[test]
fn orientation_and_pixel_spacing_follow_the_standard() {
    // Rows along patient +y (posterior) and columns along -x (right), PixelSpacing
    // "row spacing \ column spacing" = 0.8 \ 0.6 mm: voxel axis 0 (the column index) steps
    // 0.6 mm along +y, axis 1 (the row index) 0.8 mm along -x, axis 2 along r x c = +z.
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_series(tmp.path(), "rotated");
    for f in std::fs::read_dir(&dir).unwrap() {
        rewrite(&f.unwrap().path(), |o| {
            o.put(DataElement::new(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                PrimitiveValue::Strs(
                    ["0", "1", "0", "-1", "0", "0"]
                        .map(String::from)
                        .into_iter()
                        .collect(),
                ),
            ));
            o.put(DataElement::new(
                tags::PIXEL_SPACING,
                VR::DS,
                PrimitiveValue::Strs(["0.8", "0.6"].map(String::from).into_iter().collect()),
            ));
        });
    }
    let v = read_series(&dir).unwrap();
    let fixture = read_series(fixture().join("dicom")).unwrap();
    assert!(
        v.data == fixture.data,
        "the voxels do not depend on the geometry"
    );
    assert_eq!(v.spacing, [0.6, 0.8, 2.0]);
    // LPS columns (0, 0.6, 0), (-0.8, 0, 0), (0, 0, 2); RAS negates x and y. The lowest slice
    // is at LPS (-132.8125, 41.078125, -40.5) (see the fixture).
    let want = [
        [0.0, 0.8, 0.0, 132.8125],
        [-0.6, 0.0, 0.0, -41.078125],
        [0.0, 0.0, 2.0, -40.5],
        [0.0, 0.0, 0.0, 1.0],
    ];
    for (g, w) in v.affine.iter().flatten().zip(want.iter().flatten()) {
        assert!((g - w).abs() < 1e-9, "{:?}", v.affine);
    }
}
