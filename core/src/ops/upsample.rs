//! Nearest-neighbour upsampling of (B, C, H, W, D) volumes, as PyTorch's legacy
//! `F.interpolate(x, size=..., mode="nearest")`, which MONAI's `AdditiveUpSampleBlock` and
//! `RegistrationExtractionBlock` call (`monai/networks/blocks/regunet_block.py`).
//!
//! Both functions are differentiable: each input voxel receives the sum of the gradients of
//! the outputs that copy it.

use candle_core::{bail, DType, Device, Result, Tensor};

/// Repeats every voxel `factor` times along each spatial axis: (B, C, H, W, D) ->
/// (B, C, fH, fW, fD). This is `F.interpolate(x, scale_factor=f, mode="nearest")`, where
/// the source of output index `o` is `o / f`.
pub fn upsample_nearest3d(x: &Tensor, factor: usize) -> Result<Tensor> {
    let (b, c, h, w, d) = x.dims5()?;
    if factor == 0 {
        bail!("upsample_nearest3d: the factor must be at least 1")
    }
    if factor == 1 {
        return Ok(x.clone());
    }
    let f = factor;
    x.reshape(&[b, c, h, 1, w, 1, d, 1][..])?
        .broadcast_as(&[b, c, h, f, w, f, d, f][..])?
        .reshape((b, c, h * f, w * f, d * f))
}

/// Resizes the spatial dims of `x` to `size` with PyTorch's legacy "nearest" rule: the
/// source of output index `o` along an axis of input length `n` and output length `m` is
/// `min(floor(o * s), n - 1)` with `s = n / m` computed in f32, as PyTorch's
/// `nearest_neighbor_compute_source_index` does (so rounding matches PyTorch).
pub fn upsample_nearest3d_to(x: &Tensor, size: [usize; 3]) -> Result<Tensor> {
    let dims = x.dims5()?;
    let input = [dims.2, dims.3, dims.4];
    let mut out = x.clone();
    for axis in 0..3 {
        if size[axis] == input[axis] {
            continue;
        }
        if size[axis] == 0 || input[axis] == 0 {
            bail!("upsample_nearest3d_to: cannot resize {input:?} to {size:?}")
        }
        let sources = nearest_sources(input[axis], size[axis], x.device())?;
        out = out.index_select(&sources, 2 + axis)?;
    }
    Ok(out)
}

/// Source indices (u32) of PyTorch's legacy nearest rule for one axis.
fn nearest_sources(input: usize, output: usize, device: &Device) -> Result<Tensor> {
    // PyTorch `compute_scales_value<float>`: `static_cast<float>(input_size) / output_size`.
    let scale = input as f32 / output as f32;
    let sources: Vec<u32> = (0..output)
        .map(|o| ((o as f32 * scale).floor() as usize).min(input - 1) as u32)
        .collect();
    Tensor::from_vec(sources, output, device)?.to_dtype(DType::U32)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
mod tests {
    use super::*;
    use crate::ops::grad_check::{check_grad, smooth_tensor, value_at};

    #[test]
    fn repeats_each_voxel() {
        let x = smooth_tensor(&[1, 2, 2, 3, 2], 0.0);
        let y = upsample_nearest3d(&x, 2).unwrap();
        assert_eq!(y.dims(), &[1, 2, 4, 6, 4]);
        for (c, i, j, k) in [(0, 3, 5, 3), (1, 0, 1, 2), (1, 2, 4, 1)] {
            let got = value_at(&y, [0, c, i, j, k]);
            assert_eq!(got, value_at(&x, [0, c, i / 2, j / 2, k / 2]));
        }
    }

    #[test]
    fn factor_and_size_versions_agree() {
        let x = smooth_tensor(&[2, 3, 3, 2, 4], 0.4);
        let a = upsample_nearest3d(&x, 3).unwrap();
        let b = upsample_nearest3d_to(&x, [9, 6, 12]).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
    }

    #[test]
    fn legacy_nearest_indices_match_pytorch() {
        // PyTorch 2.x: F.interpolate(torch.arange(5.).view(1,1,5), size=7, mode="nearest")
        // -> [0, 0, 1, 2, 2, 3, 4] (src = floor(o * 5/7)); size=3 -> [0, 1, 3].
        let up: Vec<u32> = nearest_sources(5, 7, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(up, [0, 0, 1, 2, 2, 3, 4]);
        let down: Vec<u32> = nearest_sources(5, 3, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(down, [0, 1, 3]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = smooth_tensor(&[1, 2, 2, 3, 2], 0.2);
        check_grad(
            &|a| upsample_nearest3d(&a[0], 2),
            std::slice::from_ref(&x),
            0,
            1e-6,
            1e-7,
        );
        check_grad(
            &|a| upsample_nearest3d_to(&a[0], [5, 2, 3]),
            &[x],
            0,
            1e-6,
            1e-7,
        );
    }
}
