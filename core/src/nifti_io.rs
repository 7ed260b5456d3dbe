//! Reading and writing NIfTI-1 volumes (`.nii`, `.nii.gz`).
//!
//! This replaces MONAI's `LoadImaged` with the `NibabelReader` (no reorientation, channel
//! first): a volume is read as it is stored, voxel `(i, j, k)` of the file becomes element
//! `[i, j, k]` of [`Volume::data`], and the tensor given to the network is `(1, 1, H, W, D)`
//! with `H, W, D = dim[1], dim[2], dim[3]`.
//!
//! The header is parsed by the `nifti` crate ([`nifti::NiftiHeader`]); the voxel bytes are
//! decoded here, so that every size and type is validated before anything is allocated and
//! no input can make the reader panic. NIfTI stores voxels with the first index fastest
//! (column-major, "Fortran" order); [`Volume::data`] is row-major (standard `ndarray` layout),
//! the conversion happens once in [`read_volume`] and once in the writers.
//!
//! Writers produce little-endian single-file NIfTI-1 (`vox_offset` 352, no extensions), gzip
//! compressed when the name ends in `.gz`, written to a temporary file in the destination
//! directory and renamed into place so that a crash never leaves a half-written volume.
//! Geometry follows the NIfTI-1 standard (`nifti1.h`): the affine is taken from the sform
//! when `sform_code > 0`, else from the qform quaternion when `qform_code > 0`, else it is
//! `diag(pixdim[1], pixdim[2], pixdim[3])` ("method 1" of the standard).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use ndarray::{Array3, Array4, ShapeBuilder};
use nifti::{Endianness, NiftiHeader, NiftiType};

use crate::{Error, Result};

/// Size of a NIfTI-1 header in bytes.
const HEADER_BYTES: usize = 348;
/// Offset of the voxel data in the files we write: header plus the 4-byte extension flag.
const WRITE_VOX_OFFSET: usize = 352;
/// Largest number of voxels accepted by the reader (8 GiB as f32); guards against garbage
/// headers that would make us reserve absurd amounts of memory.
const MAX_VOXELS: usize = 1 << 31;
/// Largest `vox_offset` accepted (extensions are skipped, never parsed).
const MAX_VOX_OFFSET: f32 = (1u32 << 30) as f32;
/// NIfTI intent code of a vector-valued image (`NIFTI_INTENT_VECTOR` in `nifti1.h`).
pub const NIFTI_INTENT_VECTOR: i16 = 1007;

/// A 3-D scalar volume read from a NIfTI file.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Voxel values after `scl_slope`/`scl_inter` scaling; `data[[i, j, k]]` is NIfTI voxel
    /// `(i, j, k)`. Always in standard (row-major) layout.
    pub data: Array3<f32>,
    /// Voxel-to-world (mm) affine, row-major: `world = affine * [i, j, k, 1]`.
    pub affine: [[f64; 4]; 4],
    /// Voxel size in mm along array axes 0, 1, 2 (`pixdim[1..4]`).
    pub spacing: [f64; 3],
    /// The header as stored in the file (units, description, codes).
    pub header: NiftiHeader,
}

impl Volume {
    /// Spatial size `[H, W, D]` of the volume.
    pub fn shape(&self) -> [usize; 3] {
        let (h, w, d) = self.data.dim();
        [h, w, d]
    }
}

/// How voxel values are stored by [`write_volume_as`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredType {
    /// Unsigned 8-bit integers (masks); values are rounded and clamped to `0..=255`.
    Uint8,
    /// Signed 16-bit integers (CT scans in Hounsfield units); rounded and clamped.
    Int16,
    /// 32-bit floats, stored exactly.
    Float32,
}

impl StoredType {
    fn datatype(self) -> i16 {
        match self {
            StoredType::Uint8 => NiftiType::Uint8 as i16,
            StoredType::Int16 => NiftiType::Int16 as i16,
            StoredType::Float32 => NiftiType::Float32 as i16,
        }
    }

    fn bytes(self) -> usize {
        match self {
            StoredType::Uint8 => 1,
            StoredType::Int16 => 2,
            StoredType::Float32 => 4,
        }
    }

    fn encode(self, value: f32, out: &mut Vec<u8>) {
        match self {
            StoredType::Uint8 => out.push(value.round().clamp(0.0, 255.0) as u8),
            StoredType::Int16 => out.extend_from_slice(
                &(value.round().clamp(i16::MIN as f32, i16::MAX as f32) as i16).to_le_bytes(),
            ),
            StoredType::Float32 => out.extend_from_slice(&value.to_le_bytes()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// Reads a 3-D NIfTI-1 volume (`.nii` or `.nii.gz`, detected from the gzip magic bytes), or,
/// when `path` is a directory, the DICOM series in it ([`crate::dicom::read_series`]: same
/// [`Volume`], affine in the same RAS+ world, errors as [`Error::Dicom`]).
///
/// Accepts every integer and float datatype (u8, i8, i16, u16, i32, u32, i64, u64, f32, f64),
/// either byte order, and 4-D to 7-D files whose extra dimensions are all 1 (squeezed).
/// Applies `value * scl_slope + scl_inter` unless `scl_slope` is 0 or not finite (identity,
/// as `nifti1.h` and nibabel specify).
///
/// # Errors
/// [`Error::Io`] if the file cannot be opened; [`Error::Nifti`] naming the file when it is not
/// NIfTI-1, is truncated, is not 3-D, has a non-positive or non-finite spacing, an unsupported
/// datatype, or contains NaN/Inf values.
pub fn read_volume(path: impl AsRef<Path>) -> Result<Volume> {
    let path = path.as_ref();
    if path.is_dir() {
        return crate::dicom::read_series(path);
    }
    let bad = |reason: String| Error::Nifti {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let is_gzip = reader
        .fill_buf()
        .map_err(|e| Error::io(path, e))?
        .starts_with(&[0x1f, 0x8b]);
    let mut stream: Box<dyn Read> = if is_gzip {
        Box::new(GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };

    let mut header_bytes = [0u8; HEADER_BYTES];
    read_fully(&mut stream, &mut header_bytes).map_err(|got| {
        bad(format!(
            "truncated or unreadable header: {got} of the {HEADER_BYTES} header bytes could be read"
        ))
    })?;
    let header = NiftiHeader::from_reader(&header_bytes[..])
        .map_err(|e| bad(format!("not a NIfTI-1 file ({e})")))?;
    if &header.magic != nifti::header::MAGIC_CODE_NIP1 {
        return Err(bad(
            "header-only NIfTI (.hdr/.img pair, magic \"ni1\") is not supported; \
             convert it to a single .nii file"
                .into(),
        ));
    }
    let shape = spatial_shape(&header).map_err(bad)?;
    let spacing = spacing_of(&header).map_err(bad)?;
    let (datatype, voxel_bytes) = supported_datatype(&header).map_err(bad)?;

    // Skip the extensions: the voxels start at vox_offset.
    let vox_offset = header.vox_offset;
    if !vox_offset.is_finite() || !(0.0..=MAX_VOX_OFFSET).contains(&vox_offset) {
        return Err(bad(format!("invalid vox_offset {vox_offset}")));
    }
    let skip = (vox_offset as usize).saturating_sub(HEADER_BYTES) as u64;
    let skipped = std::io::copy(&mut (&mut stream).take(skip), &mut std::io::sink())
        .map_err(|e| bad(format!("cannot read up to the voxel data: {e}")))?;
    if skipped != skip {
        return Err(bad(format!(
            "truncated: the file ends before the voxel data at offset {vox_offset}"
        )));
    }

    let voxels = shape[0] * shape[1] * shape[2];
    let nbytes = voxels * voxel_bytes;
    let mut raw = Vec::new();
    raw.try_reserve_exact(nbytes)
        .map_err(|_| bad(format!("cannot allocate {nbytes} bytes of voxel data")))?;
    (&mut stream)
        .take(nbytes as u64)
        .read_to_end(&mut raw)
        .map_err(|e| bad(format!("cannot read the voxel data: {e}")))?;
    if raw.len() != nbytes {
        return Err(bad(format!(
            "truncated: expected {nbytes} bytes of voxel data for {}x{}x{} {datatype:?}, found {}",
            shape[0],
            shape[1],
            shape[2],
            raw.len()
        )));
    }

    let values = decode_voxels(&raw, datatype, header.endianness, scaling(&header));
    let non_finite = values.iter().filter(|v| !v.is_finite()).count();
    if non_finite > 0 {
        return Err(bad(format!(
            "{non_finite} of {voxels} voxel values are NaN or infinite"
        )));
    }
    let data = Array3::from_shape_vec((shape[0], shape[1], shape[2]).f(), values)
        .expect("the value count equals the product of the validated shape")
        .as_standard_layout()
        .into_owned();
    let affine = affine_of(&header, spacing);
    Ok(Volume {
        data,
        affine,
        spacing,
        header,
    })
}

/// Reads into `buf` until it is full; on failure returns how many bytes were read.
fn read_fully(stream: &mut dyn Read, buf: &mut [u8]) -> std::result::Result<(), usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(filled),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(filled),
        }
    }
    Ok(())
}

/// The three spatial dimensions; extra dimensions must all be 1.
fn spatial_shape(header: &NiftiHeader) -> std::result::Result<[usize; 3], String> {
    let rank = header.dim[0] as usize;
    // `dim` is signed in the standard; the nifti crate reads it as u16.
    let dims: Vec<i64> = header.dim.iter().map(|&d| d as i16 as i64).collect();
    if !(1..=7).contains(&rank) {
        return Err(format!("invalid dim[0] = {} (must be 1..7)", dims[0]));
    }
    if rank < 3 {
        return Err(format!(
            "is {rank}-D (dim = {:?}); a 3-D volume is required",
            &dims[1..=rank]
        ));
    }
    if let Some(axis) = (4..=rank).find(|&a| dims[a] != 1) {
        return Err(format!(
            "is {rank}-D with dim[{axis}] = {} (dim = {:?}); only 3-D volumes \
             (or 4-D..7-D ones whose extra dimensions are 1) are supported",
            dims[axis],
            &dims[1..=rank]
        ));
    }
    if dims[1..=3].iter().any(|&d| d <= 0) {
        return Err(format!(
            "invalid spatial size {:?}: every dimension must be positive",
            &dims[1..=3]
        ));
    }
    let shape = [dims[1] as usize, dims[2] as usize, dims[3] as usize];
    if shape[0] * shape[1] * shape[2] > MAX_VOXELS {
        return Err(format!(
            "spatial size {shape:?} exceeds the limit of {MAX_VOXELS} voxels"
        ));
    }
    Ok(shape)
}

/// Voxel size from `pixdim[1..4]`, which must be finite and positive.
fn spacing_of(header: &NiftiHeader) -> std::result::Result<[f64; 3], String> {
    let spacing = [
        header.pixdim[1] as f64,
        header.pixdim[2] as f64,
        header.pixdim[3] as f64,
    ];
    if spacing.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(format!(
            "invalid voxel spacing {spacing:?} (pixdim[1..4]): must be finite and positive"
        ));
    }
    Ok(spacing)
}

/// The datatype, if it is a supported real scalar type, and its size in bytes.
fn supported_datatype(header: &NiftiHeader) -> std::result::Result<(NiftiType, usize), String> {
    let datatype = header
        .data_type()
        .map_err(|_| format!("unknown datatype code {}", header.datatype))?;
    let bytes = match datatype {
        NiftiType::Uint8 | NiftiType::Int8 => 1,
        NiftiType::Int16 | NiftiType::Uint16 => 2,
        NiftiType::Int32 | NiftiType::Uint32 | NiftiType::Float32 => 4,
        NiftiType::Int64 | NiftiType::Uint64 | NiftiType::Float64 => 8,
        other => {
            return Err(format!(
                "unsupported datatype {other:?} (code {}); only real integer and float \
                 scalars are supported",
                header.datatype
            ))
        }
    };
    Ok((datatype, bytes))
}

/// `(slope, intercept)` to apply, `(1, 0)` when the header asks for no scaling.
fn scaling(header: &NiftiHeader) -> (f64, f64) {
    let slope = header.scl_slope as f64;
    if slope == 0.0 || !slope.is_finite() {
        return (1.0, 0.0);
    }
    let inter = header.scl_inter as f64;
    (slope, if inter.is_finite() { inter } else { 0.0 })
}

/// Decodes raw voxel bytes (file order) into scaled f32 values.
fn decode_voxels(
    raw: &[u8],
    datatype: NiftiType,
    endianness: Endianness,
    (slope, inter): (f64, f64),
) -> Vec<f32> {
    let little = endianness == Endianness::Little;
    macro_rules! decode {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            raw.chunks_exact(N)
                .map(|c| {
                    let bytes: [u8; N] = c.try_into().expect("chunks_exact yields N bytes");
                    let v = if little {
                        <$t>::from_le_bytes(bytes)
                    } else {
                        <$t>::from_be_bytes(bytes)
                    };
                    (v as f64 * slope + inter) as f32
                })
                .collect()
        }};
    }
    match datatype {
        NiftiType::Uint8 => decode!(u8),
        NiftiType::Int8 => decode!(i8),
        NiftiType::Int16 => decode!(i16),
        NiftiType::Uint16 => decode!(u16),
        NiftiType::Int32 => decode!(i32),
        NiftiType::Uint32 => decode!(u32),
        NiftiType::Int64 => decode!(i64),
        NiftiType::Uint64 => decode!(u64),
        NiftiType::Float32 => decode!(f32),
        NiftiType::Float64 => decode!(f64),
        _ => unreachable!("supported_datatype admits only the types above"),
    }
}

/// The voxel-to-world affine chosen as `nifti1.h` prescribes (sform, qform, pixdim).
fn affine_of(header: &NiftiHeader, spacing: [f64; 3]) -> [[f64; 4]; 4] {
    let rows = [header.srow_x, header.srow_y, header.srow_z];
    let sform_ok = rows.iter().flatten().all(|v| v.is_finite());
    if header.sform_code > 0 && sform_ok {
        let mut affine = identity4();
        for (r, row) in rows.iter().enumerate() {
            for c in 0..4 {
                affine[r][c] = row[c] as f64;
            }
        }
        return affine;
    }
    if header.qform_code > 0 {
        if let Some(affine) = qform_affine(header, spacing) {
            return affine;
        }
    }
    let mut affine = identity4();
    for (axis, s) in spacing.iter().enumerate() {
        affine[axis][axis] = *s;
    }
    affine
}

/// The qform affine: rotation from the quaternion `(b, c, d)`, `qfac = pixdim[0]`, offsets
/// `qoffset_*` (`nifti1.h`, "method 2"). `None` if a field is not finite.
pub(crate) fn qform_affine(header: &NiftiHeader, spacing: [f64; 3]) -> Option<[[f64; 4]; 4]> {
    let [b, c, d] = [header.quatern_b, header.quatern_c, header.quatern_d].map(f64::from);
    let offset = [header.quatern_x, header.quatern_y, header.quatern_z].map(f64::from);
    if ![b, c, d].iter().chain(offset.iter()).all(|v| v.is_finite()) {
        return None;
    }
    let rest = 1.0 - (b * b + c * c + d * d);
    let (a, b, c, d) = if rest > 1e-7 {
        (rest.sqrt(), b, c, d)
    } else {
        // 180-degree rotation: a = 0, renormalise (b, c, d) as nifti1_io does.
        let n = (b * b + c * c + d * d).sqrt();
        if n == 0.0 {
            return None;
        }
        (0.0, b / n, c / n, d / n)
    };
    let rotation = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - b * b - c * c,
        ],
    ];
    let qfac = if header.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let zoom = [spacing[0], spacing[1], spacing[2] * qfac];
    let mut affine = identity4();
    for r in 0..3 {
        for col in 0..3 {
            affine[r][col] = rotation[r][col] * zoom[col];
        }
        affine[r][3] = offset[r];
    }
    Some(affine)
}

fn identity4() -> [[f64; 4]; 4] {
    let mut m = [[0.0; 4]; 4];
    for (i, row) in m.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------

/// The volume as an f32 tensor of shape `(1, 1, H, W, D)` on `device`.
pub fn to_tensor(volume: &Volume, device: &Device) -> Result<Tensor> {
    array3_to_tensor(&volume.data, device)
}

/// An array `[H, W, D]` as an f32 tensor of shape `(1, 1, H, W, D)` on `device`.
pub fn array3_to_tensor(data: &Array3<f32>, device: &Device) -> Result<Tensor> {
    let (h, w, d) = data.dim();
    let standard = data.as_standard_layout();
    let values = standard
        .as_slice()
        .expect("as_standard_layout gives a contiguous array");
    Ok(Tensor::from_slice(values, (1, 1, h, w, d), device)?)
}

/// A tensor of shape `(H, W, D)`, `(1, H, W, D)` or `(1, 1, H, W, D)` (any float dtype, any
/// device) as an `[H, W, D]` f32 array.
///
/// # Errors
/// [`Error::ShapeMismatch`] for any other shape.
pub fn tensor_to_array3(tensor: &Tensor) -> Result<Array3<f32>> {
    let dims = tensor.dims();
    let rank = dims.len();
    if !(3..=5).contains(&rank) || dims[..rank - 3].iter().any(|&d| d != 1) {
        return Err(Error::ShapeMismatch {
            op: "tensor_to_array3",
            expected: "(H, W, D), (1, H, W, D) or (1, 1, H, W, D)".into(),
            got: format!("{dims:?}"),
        });
    }
    let shape = (dims[rank - 3], dims[rank - 2], dims[rank - 1]);
    let values = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(Array3::from_shape_vec(shape, values).expect("element count matches the tensor shape"))
}

/// A DDF tensor of shape `(3, H, W, D)` or `(1, 3, H, W, D)` as a `[3, H, W, D]` f32 array.
///
/// # Errors
/// [`Error::ShapeMismatch`] for any other shape.
pub fn tensor_to_ddf_array(tensor: &Tensor) -> Result<Array4<f32>> {
    let dims = tensor.dims();
    let ok = match dims.len() {
        4 => dims[0] == 3,
        5 => dims[0] == 1 && dims[1] == 3,
        _ => false,
    };
    if !ok {
        return Err(Error::ShapeMismatch {
            op: "tensor_to_ddf_array",
            expected: "(3, H, W, D) or (1, 3, H, W, D)".into(),
            got: format!("{dims:?}"),
        });
    }
    let r = dims.len();
    let shape = (3, dims[r - 3], dims[r - 2], dims[r - 1]);
    let values = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(Array4::from_shape_vec(shape, values).expect("element count matches the tensor shape"))
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// Writes `data` as a float32 NIfTI volume with the given voxel-to-world `affine`.
///
/// Equivalent to [`write_volume_as`] with [`StoredType::Float32`].
pub fn write_volume(
    path: impl AsRef<Path>,
    data: &Array3<f32>,
    affine: &[[f64; 4]; 4],
) -> Result<()> {
    write_volume_as(path, data, affine, StoredType::Float32)
}

/// Writes `data` as a 3-D NIfTI volume stored as `stored`, gzip-compressed if the name ends
/// in `.gz`, atomically (temporary file in the same directory, then rename).
///
/// The affine is written both as the sform (exactly, `sform_code` 1 = scanner) and as the
/// qform (`qform_code` 1; exact for rotation+zoom affines, the nearest rigid one otherwise).
/// The spacing `pixdim[1..4]` is the length of the affine's first three columns, as nibabel
/// sets it for a new image.
///
/// # Errors
/// [`Error::InvalidArgument`] if the affine is not finite or has a zero column;
/// [`Error::Io`] naming the file if writing fails.
pub fn write_volume_as(
    path: impl AsRef<Path>,
    data: &Array3<f32>,
    affine: &[[f64; 4]; 4],
    stored: StoredType,
) -> Result<()> {
    let (h, w, d) = data.dim();
    let mut header = HeaderFields::new([h, w, d], affine, stored.datatype(), stored.bytes())?;
    header.dim = [3, h, w, d, 1, 1, 1, 1];
    let mut payload = Vec::with_capacity(WRITE_VOX_OFFSET + data.len() * stored.bytes());
    header.encode(&mut payload);
    // NIfTI order: first index fastest, i.e. iterate the transposed (reversed-axes) view.
    for &v in data.t().iter() {
        stored.encode(v, &mut payload);
    }
    write_atomically(path.as_ref(), &payload)
}

/// Writes a dense displacement field `ddf` of shape `[3, H, W, D]` as a NIfTI vector image:
/// 5-D `(H, W, D, 1, 3)`, intent `NIFTI_INTENT_VECTOR` (1007), float32, the layout nibabel,
/// ITK-SNAP and ANTs expect. Component `c` is the displacement along array axis `c` in voxels
/// (MONAI's DDF convention), not in mm.
///
/// # Errors
/// As [`write_volume_as`]; [`Error::ShapeMismatch`] if the first axis is not 3.
pub fn write_ddf(path: impl AsRef<Path>, ddf: &Array4<f32>, affine: &[[f64; 4]; 4]) -> Result<()> {
    write_vector_field(path, ddf, affine, VectorLayout::Nifti5d)
}

/// How [`write_vector_field`] lays out a `[3, H, W, D]` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorLayout {
    /// 5-D `(H, W, D, 1, 3)`, intent `NIFTI_INTENT_VECTOR` (1007): the NIfTI standard's
    /// vector image, read as a displacement field by ITK, ANTs and Slicer.
    Nifti5d,
    /// 4-D `(H, W, D, 3)`, no intent: what `nibabel.save(Nifti1Image(array_xyz3, affine))`
    /// writes, the Learn2Reg submission layout.
    Plain4d,
}

/// Writes a `[3, H, W, D]` float32 vector field in `layout`, with the given affine (sform
/// and qform), atomically. The components are stored as given: the caller decides their
/// units and frame ([`write_ddf`]: voxels; [`crate::interop`]: mm LPS).
///
/// # Errors
/// As [`write_volume_as`]; [`Error::ShapeMismatch`] if the first axis is not 3.
pub fn write_vector_field(
    path: impl AsRef<Path>,
    ddf: &Array4<f32>,
    affine: &[[f64; 4]; 4],
    layout: VectorLayout,
) -> Result<()> {
    let (c, h, w, d) = ddf.dim();
    if c != 3 {
        return Err(Error::ShapeMismatch {
            op: "write_vector_field",
            expected: "[3, H, W, D]".into(),
            got: format!("{:?}", ddf.shape()),
        });
    }
    let mut header = HeaderFields::new([h, w, d], affine, NiftiType::Float32 as i16, 4)?;
    match layout {
        VectorLayout::Nifti5d => {
            header.dim = [5, h, w, d, 1, 3, 1, 1];
            header.intent_code = NIFTI_INTENT_VECTOR;
        }
        VectorLayout::Plain4d => header.dim = [4, h, w, d, 3, 1, 1, 1],
    }
    let mut payload = Vec::with_capacity(WRITE_VOX_OFFSET + ddf.len() * 4);
    header.encode(&mut payload);
    // Fortran order over (x, y, z, [t=1,] c): component-major, x fastest (both layouts).
    for &v in ddf.view().permuted_axes([0, 3, 2, 1]).iter() {
        payload.extend_from_slice(&v.to_le_bytes());
    }
    write_atomically(path.as_ref(), &payload)
}

/// Reads a DDF as [`write_ddf`] writes it (5-D `(H, W, D, 1, 3)` float32, gzipped or not)
/// from its bytes: the `[3, H, W, D]` field and its affine. `name` names the file in errors.
///
/// # Errors
/// [`Error::Nifti`] naming `name` for anything else (another layout or type, short data).
pub fn read_ddf_bytes(bytes: &[u8], name: &Path) -> Result<(Array4<f32>, [[f64; 4]; 4])> {
    let bad = |reason: String| Error::Nifti {
        path: name.to_path_buf(),
        reason,
    };
    let mut raw = Vec::new();
    let data: &[u8] = if bytes.starts_with(&[0x1f, 0x8b]) {
        GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .map_err(|e| bad(format!("not gzip: {e}")))?;
        &raw
    } else {
        bytes
    };
    if data.len() < HEADER_BYTES {
        return Err(bad("shorter than a NIfTI-1 header".into()));
    }
    let header = NiftiHeader::from_reader(&data[..HEADER_BYTES])
        .map_err(|e| bad(format!("not a NIfTI-1 header: {e}")))?;
    let dim = header.dim;
    if dim[0] != 5 || dim[4] != 1 || dim[5] != 3 || header.datatype != NiftiType::Float32 as i16 {
        return Err(bad(format!(
            "not a medray DDF: dim {dim:?}, datatype {} (want [5, H, W, D, 1, 3], float32)",
            header.datatype
        )));
    }
    let [h, w, d] = [1, 2, 3].map(|a| usize::from(dim[a]));
    let offset = header.vox_offset as usize;
    let voxels = h * w * d;
    let end = offset + 4 * 3 * voxels;
    if h == 0
        || w == 0
        || d == 0
        || !(HEADER_BYTES..=MAX_VOX_OFFSET as usize).contains(&offset)
        || data.len() < end
    {
        return Err(bad(format!(
            "{} bytes of voxel data for {voxels} vectors at offset {offset}",
            data.len().saturating_sub(offset)
        )));
    }
    let values = &data[offset..end];
    let value =
        |n: usize| f32::from_le_bytes(values[4 * n..4 * n + 4].try_into().expect("4 bytes"));
    let field = Array4::from_shape_fn((3, h, w, d), |(c, i, j, k)| {
        value(i + h * (j + w * (k + d * c)))
    });
    let spacing = [1, 2, 3].map(|a| f64::from(header.pixdim[a]));
    Ok((field, affine_of(&header, spacing)))
}

/// Writes `bytes` (a full uncompressed NIfTI file) to `path`, gzip-compressed if the name
/// ends in `.gz`, through a temporary file renamed into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let gz = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().to_ascii_lowercase().ends_with(".gz"));
    crate::atomic::write_with(path, |tmp| {
        let io_err = |e: std::io::Error| Error::io(path, e);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(tmp)
            .map_err(io_err)?;
        let mut out = BufWriter::new(file);
        if gz {
            // Level 1: noisy float volumes barely compress further at higher levels.
            let mut enc = GzEncoder::new(&mut out, Compression::fast());
            enc.write_all(bytes).map_err(io_err)?;
            enc.finish().map_err(io_err)?;
        } else {
            out.write_all(bytes).map_err(io_err)?;
        }
        out.flush().map_err(io_err)
    })
}

/// The header [`write_volume_as`] would write for `shape`, `affine` and `stored`, parsed back
/// (describes volumes that were not read from a NIfTI file, such as DICOM series).
///
/// # Errors
/// As [`write_volume_as`] for an invalid shape or affine.
pub(crate) fn header_for(
    shape: [usize; 3],
    affine: &[[f64; 4]; 4],
    stored: StoredType,
) -> Result<NiftiHeader> {
    let mut bytes = Vec::with_capacity(WRITE_VOX_OFFSET);
    HeaderFields::new(shape, affine, stored.datatype(), stored.bytes())?.encode(&mut bytes);
    NiftiHeader::from_reader(&bytes[..HEADER_BYTES])
        .map_err(|e| Error::invalid("header", format!("cannot encode a NIfTI header: {e}")))
}

/// The header fields medray writes; everything else is zero.
struct HeaderFields {
    dim: [usize; 8],
    datatype: i16,
    bitpix: i16,
    intent_code: i16,
    pixdim: [f32; 8],
    quatern: [f32; 6],
    srow: [[f32; 4]; 3],
}

impl HeaderFields {
    fn new(shape: [usize; 3], affine: &[[f64; 4]; 4], datatype: i16, bytes: usize) -> Result<Self> {
        if shape.iter().any(|&n| n == 0 || n > i16::MAX as usize) {
            return Err(Error::invalid(
                "volume shape",
                format!("{shape:?}: every size must be in 1..=32767 for NIfTI-1"),
            ));
        }
        if affine.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "affine",
                format!("{affine:?} is not finite"),
            ));
        }
        let (quatern, spacing, qfac) = affine_to_qform(affine)?;
        let mut pixdim = [1.0f32; 8];
        pixdim[0] = qfac as f32;
        for a in 0..3 {
            pixdim[a + 1] = spacing[a] as f32;
        }
        let srow = [0, 1, 2].map(|r| affine[r].map(|v| v as f32));
        Ok(HeaderFields {
            dim: [3, shape[0], shape[1], shape[2], 1, 1, 1, 1],
            datatype,
            bitpix: (bytes * 8) as i16,
            intent_code: 0,
            pixdim,
            quatern: quatern.map(|v| v as f32),
            srow,
        })
    }

    /// Appends the 348-byte little-endian NIfTI-1 header and the 4-byte empty extension flag.
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + WRITE_VOX_OFFSET, 0);
        let buf = &mut out[start..];
        let mut put = |offset: usize, bytes: &[u8]| {
            buf[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &(HEADER_BYTES as i32).to_le_bytes());
        put(38, b"r");
        for (i, &d) in self.dim.iter().enumerate() {
            put(40 + 2 * i, &(d as i16).to_le_bytes());
        }
        put(68, &self.intent_code.to_le_bytes());
        put(70, &self.datatype.to_le_bytes());
        put(72, &self.bitpix.to_le_bytes());
        for (i, &p) in self.pixdim.iter().enumerate() {
            put(76 + 4 * i, &p.to_le_bytes());
        }
        put(108, &(WRITE_VOX_OFFSET as f32).to_le_bytes());
        put(112, &1.0f32.to_le_bytes()); // scl_slope
        put(116, &0.0f32.to_le_bytes()); // scl_inter
        put(123, &[2 | 8]); // xyzt_units: mm, s
        put(148, b"medray");
        put(252, &1i16.to_le_bytes()); // qform_code: scanner
        put(254, &1i16.to_le_bytes()); // sform_code: scanner
        for (i, &q) in self.quatern.iter().enumerate() {
            put(256 + 4 * i, &q.to_le_bytes());
        }
        for (r, row) in self.srow.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                put(280 + 16 * r + 4 * c, &v.to_le_bytes());
            }
        }
        put(344, b"n+1\0");
    }
}

/// Splits an affine into the qform parameters `[b, c, d, qx, qy, qz]`, the spacing (column
/// lengths) and `qfac` (-1 for a left-handed affine), after `nifti1_io.c`'s
/// `nifti_mat44_to_quatern` (without its polar orthogonalisation: the rotation is read from
/// the normalised columns).
fn affine_to_qform(affine: &[[f64; 4]; 4]) -> Result<([f64; 6], [f64; 3], f64)> {
    let mut r = [[0.0; 3]; 3];
    let mut spacing = [0.0; 3];
    for c in 0..3 {
        let norm = (0..3).map(|row| affine[row][c].powi(2)).sum::<f64>().sqrt();
        if norm == 0.0 {
            return Err(Error::invalid(
                "affine",
                format!("column {c} is zero; the voxel size along axis {c} would be 0"),
            ));
        }
        spacing[c] = norm;
        for row in 0..3 {
            r[row][c] = affine[row][c] / norm;
        }
    }
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det < 0.0 { -1.0 } else { 1.0 };
    if qfac < 0.0 {
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
    }
    let trace = r[0][0] + r[1][1] + r[2][2] + 1.0;
    let (a, b, c, d) = if trace > 0.5 {
        let a = 0.5 * trace.sqrt();
        (
            a,
            0.25 * (r[2][1] - r[1][2]) / a,
            0.25 * (r[0][2] - r[2][0]) / a,
            0.25 * (r[1][0] - r[0][1]) / a,
        )
    } else {
        let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
        let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
        let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
        if xd > 1.0 {
            let b = 0.5 * xd.sqrt();
            (
                0.25 * (r[2][1] - r[1][2]) / b,
                b,
                0.25 * (r[0][1] + r[1][0]) / b,
                0.25 * (r[0][2] + r[2][0]) / b,
            )
        } else if yd > 1.0 {
            let c = 0.5 * yd.sqrt();
            (
                0.25 * (r[0][2] - r[2][0]) / c,
                0.25 * (r[0][1] + r[1][0]) / c,
                c,
                0.25 * (r[1][2] + r[2][1]) / c,
            )
        } else {
            let d = 0.5 * zd.sqrt();
            (
                0.25 * (r[1][0] - r[0][1]) / d,
                0.25 * (r[0][2] + r[2][0]) / d,
                0.25 * (r[1][2] + r[2][1]) / d,
                d,
            )
        }
    };
    // The quaternion and its negation are the same rotation; NIfTI stores the one with a >= 0.
    let sign = if a < 0.0 { -1.0 } else { 1.0 };
    let (b, c, d) = (sign * b, sign * c, sign * d);
    Ok((
        [b, c, d, affine[0][3], affine[1][3], affine[2][3]],
        spacing,
        qfac,
    ))
}

#[cfg(test)]
mod tests;
