//! Makes the DICOM test fixture `core/tests/data/popi-crop/` from the POPI CT (see the
//! fixture's README), and checks medray's DICOM reader on the full series against its NIfTI
//! conversion:
//!
//! ```text
//! cargo run -p medray-core --example popi_crop -- <popi folder> [<out folder>]
//! ```
//!
//! `<popi folder>` holds `dicom/` (141 slices, 512 x 512) and `popi_phase00_ct.nii.gz`. The
//! full series is read with [`medray_core::dicom::read_series`] and compared with the NIfTI
//! (voxels, spacing, affine; the read time is printed). With `<out folder>`, the crop is
//! written there: [`SLICES`] consecutive slices from [`FIRST_SLICE`] (in position order),
//! columns [`X0`]`..+`[`COLUMNS`] and rows [`Y0`]`..+`[`ROWS`], as DICOM files rewritten with
//! dicom-object (`Rows`, `Columns`, `ImagePositionPatient` shifted to the first kept pixel,
//! `PixelData` cropped, `Smallest/LargestImagePixelValue` dropped, everything else kept) in
//! `dicom/`, and the same voxels cropped from the NIfTI, affine translated to the first kept
//! voxel, as `popi_crop.nii.gz`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use medray_core::nifti_io::{read_volume, write_volume_as, StoredType};
use ndarray::s;

/// First kept slice, counted along the slice normal (0 = lowest).
const FIRST_SLICE: usize = 62;
/// Kept slices (a multiple of 8, so that predict runs on the crop without resizing, and at
/// least the 11 of the SSIM window).
const SLICES: usize = 16;
/// First kept column.
const X0: usize = 120;
/// First kept row.
const Y0: usize = 210;
/// Kept columns (a multiple of 8; not equal to ROWS, so that a swap of the axes shows).
const COLUMNS: usize = 64;
/// Kept rows.
const ROWS: usize = 48;

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let Some(popi) = args.first() else {
        bail!("usage: popi_crop <popi folder> [<out folder>]");
    };
    let series = popi.join("dicom");
    let nifti = popi.join("popi_phase00_ct.nii.gz");

    let start = Instant::now();
    let dicom = medray_core::dicom::read_series(&series)?;
    let read_ms = start.elapsed().as_secs_f64() * 1e3;
    let reference = read_volume(&nifti)?;
    compare("full series", &dicom, &reference)?;
    println!(
        "full series {:?} read in {read_ms:.0} ms; spacing {:?}",
        dicom.shape(),
        dicom.spacing
    );

    if let Some(out) = args.get(1) {
        write_crop(&series, &reference, out)?;
    }
    Ok(())
}

/// Prints and checks the differences between the DICOM read and the NIfTI.
fn compare(
    what: &str,
    dicom: &medray_core::nifti_io::Volume,
    nifti: &medray_core::nifti_io::Volume,
) -> anyhow::Result<()> {
    ensure!(
        dicom.shape() == nifti.shape(),
        "{what}: shape {:?} vs NIfTI {:?}",
        dicom.shape(),
        nifti.shape()
    );
    let voxel = dicom
        .data
        .iter()
        .zip(nifti.data.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let affine = (0..3)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .fold(0f64, |m, (r, c)| {
            m.max((dicom.affine[r][c] - nifti.affine[r][c]).abs())
        });
    let spacing = (0..3).fold(0f64, |m, a| {
        m.max((dicom.spacing[a] - nifti.spacing[a]).abs())
    });
    println!(
        "{what}: max |voxel difference| {voxel}, max |affine difference| {affine:.2e} mm, \
         max |spacing difference| {spacing:.2e} mm"
    );
    println!(
        "  DICOM affine {:?}\n  NIfTI affine {:?}",
        dicom.affine, nifti.affine
    );
    ensure!(voxel == 0.0, "{what}: voxels differ");
    ensure!(affine < 1e-3, "{what}: affines differ");
    Ok(())
}

/// The series' files sorted along the slice normal.
fn files_in_position_order(series: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut slices = Vec::new();
    for entry in std::fs::read_dir(series)? {
        let path = entry?.path();
        let object =
            dicom_object::open_file(&path).with_context(|| format!("{}", path.display()))?;
        let floats =
            |tag| -> anyhow::Result<Vec<f64>> { Ok(object.element(tag)?.to_multi_float64()?) };
        let o = floats(tags::IMAGE_ORIENTATION_PATIENT)?;
        let p = floats(tags::IMAGE_POSITION_PATIENT)?;
        let normal = [
            o[1] * o[5] - o[2] * o[4],
            o[2] * o[3] - o[0] * o[5],
            o[0] * o[4] - o[1] * o[3],
        ];
        let along: f64 = (0..3).map(|a| p[a] * normal[a]).sum();
        slices.push((along, path));
    }
    slices.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(slices.into_iter().map(|(_, p)| p).collect())
}

/// A decimal string (VR DS, at most 16 characters).
fn ds(value: f64) -> String {
    let text = format!("{value:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.').to_string();
    text.chars().take(16).collect()
}

fn write_crop(
    series: &Path,
    nifti: &medray_core::nifti_io::Volume,
    out: &Path,
) -> anyhow::Result<()> {
    let dicom_out = out.join("dicom");
    std::fs::create_dir_all(&dicom_out)?;
    let files = files_in_position_order(series)?;
    for path in &files[FIRST_SLICE..FIRST_SLICE + SLICES] {
        let mut object = dicom_object::open_file(path)?;
        let rows = object.element(tags::ROWS)?.to_int::<usize>()?;
        let cols = object.element(tags::COLUMNS)?.to_int::<usize>()?;
        let bits = object.element(tags::BITS_ALLOCATED)?.to_int::<u16>()?;
        ensure!(bits == 16, "{}: BitsAllocated {bits}", path.display());
        let bytes = object.element(tags::PIXEL_DATA)?.to_bytes()?.into_owned();
        ensure!(
            bytes.len() >= rows * cols * 2,
            "{}: short PixelData",
            path.display()
        );
        let samples: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let cropped: Vec<u16> = (Y0..Y0 + ROWS)
            .flat_map(|r| samples[r * cols + X0..r * cols + X0 + COLUMNS].to_vec())
            .collect();
        let o = object
            .element(tags::IMAGE_ORIENTATION_PATIENT)?
            .to_multi_float64()?;
        let p = object
            .element(tags::IMAGE_POSITION_PATIENT)?
            .to_multi_float64()?;
        let ps = object.element(tags::PIXEL_SPACING)?.to_multi_float64()?;
        // Column index along the row direction (spacing ps[1]), row index along the column
        // direction (spacing ps[0]).
        let position: Vec<String> = (0..3)
            .map(|a| ds(p[a] + o[a] * ps[1] * X0 as f64 + o[a + 3] * ps[0] * Y0 as f64))
            .collect();
        object.put(DataElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(ROWS as u16),
        ));
        object.put(DataElement::new(
            tags::COLUMNS,
            VR::US,
            PrimitiveValue::from(COLUMNS as u16),
        ));
        object.put(DataElement::new(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            PrimitiveValue::Strs(position.into()),
        ));
        object.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(cropped.into()),
        ));
        object.remove_element(tags::SMALLEST_IMAGE_PIXEL_VALUE);
        object.remove_element(tags::LARGEST_IMAGE_PIXEL_VALUE);
        let name = path.file_name().context("file name")?;
        object.write_to_file(dicom_out.join(name))?;
    }

    let data = nifti
        .data
        .slice(s![
            X0..X0 + COLUMNS,
            Y0..Y0 + ROWS,
            FIRST_SLICE..FIRST_SLICE + SLICES
        ])
        .to_owned();
    let mut affine = nifti.affine;
    for (r, row) in affine.iter_mut().enumerate().take(3) {
        row[3] = (0..3)
            .map(|c| nifti.affine[r][c] * [X0, Y0, FIRST_SLICE][c] as f64)
            .sum::<f64>()
            + nifti.affine[r][3];
    }
    ensure!(
        nifti.header.datatype == 4,
        "the POPI NIfTI is expected to be int16"
    );
    let nifti_out = out.join("popi_crop.nii.gz");
    write_volume_as(&nifti_out, &data, &affine, StoredType::Int16)?;
    let (lo, hi) = data
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    println!(
        "crop written to {}: {COLUMNS} x {ROWS} x {SLICES}, HU {lo} .. {hi}",
        out.display()
    );

    let crop = medray_core::dicom::read_series(&dicom_out)?;
    compare("crop", &crop, &read_volume(&nifti_out)?)
}
