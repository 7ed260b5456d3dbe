//! Preprocessing of lung CT pairs before LocalNet, and resampling of predicted DDFs back to
//! the original grid.
//!
//! Ports the MONAI lung-CT transforms (`monai/transforms/intensity/array.py`
//! `ScaleIntensityRange`, `monai/transforms/spatial/array.py` `Resize`) as the quickstart uses
//! them: images are windowed `[a_min, a_max] -> [0, 1]` with clipping (b_min 0, b_max 1,
//! clip=True), then resized with trilinear interpolation (align_corners=True); masks are
//! resized with PyTorch's legacy nearest rule and never windowed. The window is a dataset
//! setting ([`Window::QUICKSTART`], [`Window::MONAI_TUTORIAL`]), never a hidden constant.
//!
//! LocalNet halves the grid three times, so every network input size must be divisible by
//! [`SIZE_MULTIPLE`]; without a resize the original size must already be.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::nifti_io::{read_volume, to_tensor, Volume};
use crate::{ops, Error, Result};

/// Every spatial size fed to LocalNet must be a multiple of this (2^3: three poolings).
pub const SIZE_MULTIPLE: usize = 8;

/// An intensity window: `(x - a_min) / (a_max - a_min)`, clipped to `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Intensity mapped to 0 (and everything below it).
    pub a_min: f32,
    /// Intensity mapped to 1 (and everything above it).
    pub a_max: f32,
}

impl Window {
    /// The quickstart's window, `[-1000, 500]` HU.
    pub const QUICKSTART: Window = Window {
        a_min: -1000.0,
        a_max: 500.0,
    };
    /// The MONAI lung-CT tutorial's window, `[-285, 3770]`.
    pub const MONAI_TUTORIAL: Window = Window {
        a_min: -285.0,
        a_max: 3770.0,
    };

    /// Checks that both bounds are finite and `a_min < a_max`.
    pub fn validate(&self) -> Result<()> {
        if !(self.a_min.is_finite() && self.a_max.is_finite() && self.a_min < self.a_max) {
            return Err(Error::invalid(
                "window",
                format!(
                    "[{}, {}]: bounds must be finite with a_min < a_max",
                    self.a_min, self.a_max
                ),
            ));
        }
        Ok(())
    }

    /// Applies the window to a tensor of any shape and float dtype.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let scale = 1.0 / (self.a_max as f64 - self.a_min as f64);
        x.affine(scale, -(self.a_min as f64) * scale)?
            .clamp(0.0, 1.0)
    }
}

/// What happens to a volume between the file and the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PreprocessConfig {
    /// Intensity window for images (masks are never windowed); `None` keeps raw values.
    #[serde(default)]
    pub window: Option<Window>,
    /// Network grid `[H, W, D]`; `None` keeps the original size (which must then be
    /// divisible by [`SIZE_MULTIPLE`]).
    #[serde(default)]
    pub size: Option<[usize; 3]>,
}

impl PreprocessConfig {
    /// The quickstart preset: window `[-1000, 500]`, resize to `96 x 96 x 104`.
    pub fn quickstart() -> Self {
        PreprocessConfig {
            window: Some(Window::QUICKSTART),
            size: Some([96, 96, 104]),
        }
    }

    /// Sets the intensity window.
    pub fn with_window(mut self, window: Option<Window>) -> Self {
        self.window = window;
        self
    }

    /// Sets the network grid.
    pub fn with_size(mut self, size: Option<[usize; 3]>) -> Self {
        self.size = size;
        self
    }

    /// Checks the window and that the target size is positive and divisible by
    /// [`SIZE_MULTIPLE`].
    pub fn validate(&self) -> Result<()> {
        if let Some(window) = &self.window {
            window.validate()?;
        }
        if let Some(size) = self.size {
            if size.iter().any(|&n| n == 0 || n % SIZE_MULTIPLE != 0) {
                return Err(Error::invalid(
                    "preprocess size",
                    format!(
                        "{}: every size must be a positive multiple of {SIZE_MULTIPLE}",
                        fmt_size(size)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// An image as the network sees it: `(1, 1, H, W, D)` f32, windowed then resized
/// (trilinear, align_corners=True).
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid configuration or, without a resize, an original
/// size not divisible by [`SIZE_MULTIPLE`].
pub fn preprocess_image(
    volume: &Volume,
    config: &PreprocessConfig,
    device: &Device,
) -> Result<Tensor> {
    config.validate()?;
    let mut x = to_tensor(volume, device)?;
    if let Some(window) = &config.window {
        x = window.apply(&x)?;
    }
    resize_or_check(x, volume.shape(), config, false)
}

/// A mask as the network sees it: `(1, 1, H, W, D)` f32, values kept, resized with
/// PyTorch's legacy nearest rule.
///
/// # Errors
/// As [`preprocess_image`].
pub fn preprocess_mask(
    volume: &Volume,
    config: &PreprocessConfig,
    device: &Device,
) -> Result<Tensor> {
    config.validate()?;
    let x = to_tensor(volume, device)?;
    resize_or_check(x, volume.shape(), config, true)
}

/// Reads an image file and preprocesses it; errors name the file.
pub fn load_image(
    path: impl AsRef<Path>,
    config: &PreprocessConfig,
    device: &Device,
) -> Result<Tensor> {
    load_image_with_volume(path, config, device).map(|(_, t)| t)
}

/// [`load_image`], also returning the volume as read (its original grid and spacing), so
/// a caller that needs both reads the file once.
pub fn load_image_with_volume(
    path: impl AsRef<Path>,
    config: &PreprocessConfig,
    device: &Device,
) -> Result<(Volume, Tensor)> {
    let path = path.as_ref();
    let volume = read_volume(path)?;
    let tensor = preprocess_image(&volume, config, device).map_err(|e| name_file(path, e))?;
    Ok((volume, tensor))
}

/// Reads a mask file and preprocesses it; errors name the file.
pub fn load_mask(
    path: impl AsRef<Path>,
    config: &PreprocessConfig,
    device: &Device,
) -> Result<Tensor> {
    let path = path.as_ref();
    let volume = read_volume(path)?;
    preprocess_mask(&volume, config, device).map_err(|e| name_file(path, e))
}

/// Resamples a DDF predicted on the network grid `(B, 3, h, w, d)` to the original grid
/// `[H, W, D]`, in original voxel units.
///
/// Each component is resized trilinearly with aligned corners, then component `c` is
/// multiplied by `(N_c - 1) / (n_c - 1)`: with align_corners the network-grid index `q` sits
/// at original index `q (N_c - 1) / (n_c - 1)`, so one network voxel of displacement spans
/// that many original voxels. Warping the original moving image with the result then
/// matches warping the resized image with the network DDF (up to interpolation error).
///
/// # Errors
/// A candle error if `ddf` is not `(B, 3, h, w, d)` or an axis has fewer than 2 voxels
/// (the scaling is undefined).
pub fn resample_ddf_to(ddf: &Tensor, original: [usize; 3]) -> candle_core::Result<Tensor> {
    let (_, channels, h, w, d) = ddf.dims5()?;
    let small = [h, w, d];
    if channels != 3 {
        candle_core::bail!(
            "resample_ddf_to: expected a (B, 3, h, w, d) DDF, got {:?}",
            ddf.dims()
        )
    }
    if small.iter().chain(original.iter()).any(|&n| n < 2) {
        candle_core::bail!(
            "resample_ddf_to: every axis needs at least 2 voxels (DDF grid {small:?}, original {original:?})"
        )
    }
    let scales: Vec<f32> = (0..3)
        .map(|c| (original[c] - 1) as f32 / (small[c] - 1) as f32)
        .collect();
    let scales = Tensor::new(scales.as_slice(), ddf.device())?
        .to_dtype(ddf.dtype())?
        .reshape((1, 3, 1, 1, 1))?;
    ops::resize_trilinear(ddf, original)?.broadcast_mul(&scales)
}

/// Resizes to the configured grid, or checks that the original size fits LocalNet.
fn resize_or_check(
    x: Tensor,
    original: [usize; 3],
    config: &PreprocessConfig,
    nearest: bool,
) -> Result<Tensor> {
    match config.size {
        Some(size) if size == original => Ok(x),
        Some(size) if nearest => Ok(ops::upsample_nearest3d_to(&x, size)?),
        Some(size) => Ok(ops::resize_trilinear(&x, size)?),
        None if original.iter().all(|&n| n % SIZE_MULTIPLE == 0) => Ok(x),
        None => Err(Error::invalid(
            "volume size",
            format!(
                "{} is not divisible by {SIZE_MULTIPLE} and no resize is configured; \
                 set a preprocess size such as 96x96x104",
                fmt_size(original)
            ),
        )),
    }
}

/// Wraps an error from preprocessing a file so that its message names the file.
fn name_file(path: &Path, error: Error) -> Error {
    match error {
        Error::InvalidArgument { field, reason } => Error::Nifti {
            path: path.to_path_buf(),
            reason: format!("{field}: {reason}"),
        },
        other => other,
    }
}

fn fmt_size(size: [usize; 3]) -> String {
    format!("{}x{}x{}", size[0], size[1], size[2])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nifti_io::write_volume;
    use ndarray::Array3;

    fn identity() -> [[f64; 4]; 4] {
        let mut m = [[0.0; 4]; 4];
        for (i, row) in m.iter_mut().enumerate() {
            row[i] = 1.0;
        }
        m
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn window_matches_scale_intensity_range_with_clip() {
        // MONAI ScaleIntensityRange(a_min=-1000, a_max=500, b_min=0, b_max=1, clip=True):
        // (x + 1000) / 1500, clipped.
        let x = Tensor::new(&[-2000f32, -1000.0, -250.0, 500.0, 1000.0], &Device::Cpu).unwrap();
        let y = values(&Window::QUICKSTART.apply(&x).unwrap());
        assert_eq!(y, vec![0.0, 0.0, 0.5, 1.0, 1.0]);
        assert!(Window {
            a_min: 1.0,
            a_max: 1.0
        }
        .validate()
        .is_err());
    }

    #[test]
    fn config_round_trips_through_json_and_validates_sizes() {
        let cfg = PreprocessConfig::quickstart();
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(
            serde_json::from_str::<PreprocessConfig>(&json).unwrap(),
            cfg
        );
        assert_eq!(
            serde_json::from_str::<PreprocessConfig>("{}").unwrap(),
            PreprocessConfig::default()
        );
        assert!(cfg.validate().is_ok());
        let err = cfg.with_size(Some([96, 96, 100])).validate().unwrap_err();
        assert!(err.to_string().contains("96x96x100"), "{err}");
    }

    #[test]
    fn images_are_windowed_and_resized_masks_stay_binary() {
        let dir = tempfile::tempdir().unwrap();
        let image =
            Array3::from_shape_fn((12, 10, 9), |(i, j, _)| -1000.0 + 100.0 * (i + j) as f32);
        let mask =
            Array3::from_shape_fn((12, 10, 9), |(i, j, k)| ((i + j + k) % 3 == 0) as u8 as f32);
        let ipath = dir.path().join("case_001_exp.nii.gz");
        let mpath = dir.path().join("mask_001_exp.nii.gz");
        write_volume(&ipath, &image, &identity()).unwrap();
        write_volume(&mpath, &mask, &identity()).unwrap();

        let cfg = PreprocessConfig::quickstart().with_size(Some([8, 8, 16]));
        let img = load_image(&ipath, &cfg, &Device::Cpu).unwrap();
        assert_eq!(img.dims(), &[1, 1, 8, 8, 16]);
        let v = values(&img);
        assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
        // Corners are kept by align_corners: voxel (0,0,0) is -1000 HU -> 0, the last one
        // (11, 9, 8) is 1000 HU -> clipped to 1.
        assert_eq!(v[0], 0.0);
        assert_eq!(*v.last().unwrap(), 1.0);

        let m = load_mask(&mpath, &cfg, &Device::Cpu).unwrap();
        assert_eq!(m.dims(), &[1, 1, 8, 8, 16]);
        let mv = values(&m);
        assert!(mv.iter().all(|&x| x == 0.0 || x == 1.0));
        assert!(mv.contains(&1.0));

        // Without a resize, 12x10x9 cannot enter LocalNet: the error names file and size.
        let err = load_image(&ipath, &PreprocessConfig::default(), &Device::Cpu).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("case_001_exp.nii.gz") && msg.contains("12x10x9"),
            "{msg}"
        );
    }

    /// A DDF whose components are affine in the position is reproduced exactly by trilinear
    /// resizing, so the resampled field is known in closed form.
    #[test]
    fn resampled_ddf_is_rescaled_to_original_voxels() {
        let small = [5usize, 4, 3];
        let original = [9usize, 10, 7];
        let (alpha, beta) = ([0.5f32, -1.0, 2.0], [0.25f32, 0.5, -0.75]);
        let ddf = Tensor::from_vec(
            (0..3)
                .flat_map(|c| {
                    (0..small[0]).flat_map(move |i| {
                        (0..small[1] * small[2]).map(move |_| alpha[c] + beta[c] * i as f32)
                    })
                })
                .collect::<Vec<f32>>(),
            (1, 3, small[0], small[1], small[2]),
            &Device::Cpu,
        )
        .unwrap();
        let out = resample_ddf_to(&ddf, original).unwrap();
        assert_eq!(out.dims(), &[1, 3, 9, 10, 7]);
        let v = values(&out);
        let per_channel = original[0] * original[1] * original[2];
        for c in 0..3 {
            let scale = (original[c] - 1) as f32 / (small[c] - 1) as f32;
            for p0 in 0..original[0] {
                let q0 = p0 as f32 * (small[0] - 1) as f32 / (original[0] - 1) as f32;
                let want = (alpha[c] + beta[c] * q0) * scale;
                let got = v[c * per_channel + p0 * original[1] * original[2] + 5];
                assert!((got - want).abs() < 1e-5, "c {c} p0 {p0}: {got} vs {want}");
            }
        }
    }

    /// Warping the original image with the resampled DDF equals resizing the warp of the
    /// resized image, for a linear image and a constant DDF (both exact under trilinear
    /// interpolation), away from the border.
    #[test]
    fn warping_with_resampled_ddf_matches_warping_the_resized_image() {
        let original = [17usize, 13, 9];
        let small = [9usize, 7, 5];
        let image = Tensor::from_vec(
            (0..original[0] * original[1] * original[2])
                .map(|n| {
                    let (i, j, k) = (n / (13 * 9), (n / 9) % 13, n % 9);
                    0.5 * i as f32 - 0.25 * j as f32 + 1.5 * k as f32
                })
                .collect::<Vec<f32>>(),
            (1, 1, 17, 13, 9),
            &Device::Cpu,
        )
        .unwrap();
        let shift = [0.5f32, -0.25, 0.5];
        let ddf = Tensor::new(&shift, &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 1, 1))
            .unwrap()
            .broadcast_as((1, 3, small[0], small[1], small[2]))
            .unwrap()
            .contiguous()
            .unwrap();
        let small_image = ops::resize_trilinear(&image, small).unwrap();
        let small_warped = ops::warp(&small_image, &ddf, ops::Padding::Border).unwrap();
        let via_small = ops::resize_trilinear(&small_warped, original).unwrap();
        let big_ddf = resample_ddf_to(&ddf, original).unwrap();
        let direct = ops::warp(&image, &big_ddf, ops::Padding::Border).unwrap();
        // Compare the interior (border padding clamps differently on the two grids).
        let interior = |t: &Tensor| {
            t.narrow(2, 2, 12)
                .unwrap()
                .narrow(3, 2, 8)
                .unwrap()
                .narrow(4, 2, 4)
                .unwrap()
        };
        let max_diff = |a: &Tensor, b: &Tensor| {
            (interior(a) - interior(b))
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let diff = max_diff(&via_small, &direct);
        assert!(diff < 1e-4, "max difference {diff}");
        // Without the rescaling the two would differ by about one original voxel's worth.
        let unscaled = ops::resize_trilinear(&ddf, original).unwrap();
        let wrong = ops::warp(&image, &unscaled, ops::Padding::Border).unwrap();
        let wrong_diff = max_diff(&wrong, &direct);
        assert!(wrong_diff > 0.2, "{wrong_diff}");
    }
}
