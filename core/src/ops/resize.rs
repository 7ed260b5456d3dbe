//! Trilinear resizing with `align_corners=True`, as
//! `F.interpolate(x, size, mode="trilinear", align_corners=True)`, which MONAI's
//! `Resized(mode="trilinear", align_corners=True)` calls in the lung-CT preprocessing
//! (`monai/transforms/spatial/array.py`, `Resize`). Also used to resample DDFs.
//!
//! Trilinear interpolation is separable, so the volume is resized one axis at a time: two
//! `index_select`s and a weighted sum per axis. The result is differentiable w.r.t. `x`
//! through `index_select`'s backward.
//!
//! Per axis, following PyTorch's `area_pixel_compute_scale` / `guard_index_and_lambda`
//! (`aten/src/ATen/native/UpSample.h`): `scale = (n_in - 1) / (n_out - 1)` (0 when
//! `n_out == 1`), `src = scale * o`, `i0 = min(floor(src), n_in - 1)`,
//! `i1 = min(i0 + 1, n_in - 1)`, `t = clamp(src - i0, 0, 1)`,
//! `out = (1 - t) x[i0] + t x[i1]`. The scalars are computed in f32 for f32 tensors (PyTorch's
//! opmath type on CPU) and in f64 otherwise. Nesting order differs from PyTorch's kernel, so
//! results agree to rounding, not bit for bit.

use candle_core::{bail, DType, Device, Result, Tensor};

/// Resizes the spatial dims of `x` (B, C, H, W, D) to `size` by trilinear interpolation
/// with aligned corners (the first and last voxels of each axis map onto each other).
pub fn resize_trilinear(x: &Tensor, size: [usize; 3]) -> Result<Tensor> {
    let dims = x.dims5()?;
    let input = [dims.2, dims.3, dims.4];
    if size.contains(&0) || input.contains(&0) {
        bail!("resize_trilinear: cannot resize {input:?} to {size:?}")
    }
    let mut out = x.clone();
    for axis in 0..3 {
        if size[axis] != input[axis] {
            out = resize_axis(&out, 2 + axis, input[axis], size[axis])?;
        }
    }
    Ok(out)
}

/// Linear interpolation along tensor dim `dim` from length `n_in` to `n_out`.
fn resize_axis(x: &Tensor, dim: usize, n_in: usize, n_out: usize) -> Result<Tensor> {
    let (lo, hi, t) = if x.dtype() == DType::F32 {
        let (lo, hi, t) = linear_taps::<f32>(n_in, n_out);
        (lo, hi, t.into_iter().map(f64::from).collect())
    } else {
        linear_taps::<f64>(n_in, n_out)
    };
    let device = x.device();
    let mut weight_shape = [1usize; 5];
    weight_shape[dim] = n_out;
    let t = Tensor::from_vec(t, n_out, device)?
        .to_dtype(x.dtype())?
        .reshape(&weight_shape[..])?;
    let one_minus_t = t.affine(-1.0, 1.0)?;
    let lo = x.index_select(&index_tensor(lo, device)?, dim)?;
    let hi = x.index_select(&index_tensor(hi, device)?, dim)?;
    lo.broadcast_mul(&one_minus_t)?.add(&hi.broadcast_mul(&t)?)
}

fn index_tensor(indices: Vec<u32>, device: &Device) -> Result<Tensor> {
    let n = indices.len();
    Tensor::from_vec(indices, n, device)
}

/// Float type in which the interpolation coordinates are computed.
trait Coordinate: Copy {
    fn from_usize(v: usize) -> Self;
    fn floor_index(self) -> usize;
    fn lambda(self, index: usize) -> Self;
}

impl Coordinate for f32 {
    fn from_usize(v: usize) -> Self {
        v as f32
    }
    fn floor_index(self) -> usize {
        self.floor().max(0.0) as usize
    }
    fn lambda(self, index: usize) -> Self {
        (self - index as f32).clamp(0.0, 1.0)
    }
}

impl Coordinate for f64 {
    fn from_usize(v: usize) -> Self {
        v as f64
    }
    fn floor_index(self) -> usize {
        self.floor().max(0.0) as usize
    }
    fn lambda(self, index: usize) -> Self {
        (self - index as f64).clamp(0.0, 1.0)
    }
}

/// For each output index: (low source index, high source index, weight of the high one).
fn linear_taps<F>(n_in: usize, n_out: usize) -> (Vec<u32>, Vec<u32>, Vec<F>)
where
    F: Coordinate + std::ops::Div<Output = F> + std::ops::Mul<Output = F>,
{
    let scale = if n_out > 1 {
        F::from_usize(n_in - 1) / F::from_usize(n_out - 1)
    } else {
        F::from_usize(0)
    };
    let mut lo = Vec::with_capacity(n_out);
    let mut hi = Vec::with_capacity(n_out);
    let mut t = Vec::with_capacity(n_out);
    for o in 0..n_out {
        let src = scale * F::from_usize(o);
        let i0 = src.floor_index().min(n_in - 1);
        lo.push(i0 as u32);
        hi.push((i0 + 1).min(n_in - 1) as u32);
        t.push(src.lambda(i0));
    }
    (lo, hi, t)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
mod tests {
    use super::*;
    use crate::ops::grad_check::{check_grad, smooth_tensor, value_at};

    /// A function linear in each coordinate is reproduced exactly by trilinear resizing:
    /// f(i, j, k) = 1 + 2i + 3j - k + 0.5 i j k on the input grid, evaluated at the
    /// aligned-corner positions i_out * (n_in - 1) / (n_out - 1) (reference in closed form).
    #[test]
    fn reproduces_trilinear_functions() {
        let (n_in, n_out) = ([3usize, 4, 5], [5usize, 7, 3]);
        let f = |i: f64, j: f64, k: f64| 1.0 + 2.0 * i + 3.0 * j - k + 0.5 * i * j * k;
        let mut values = Vec::new();
        for i in 0..n_in[0] {
            for j in 0..n_in[1] {
                for k in 0..n_in[2] {
                    values.push(f(i as f64, j as f64, k as f64));
                }
            }
        }
        let x = Tensor::from_vec(values, (1, 1, 3, 4, 5), &Device::Cpu).unwrap();
        let y = resize_trilinear(&x, n_out).unwrap();
        assert_eq!(y.dims(), &[1, 1, 5, 7, 3]);
        let scale = |a: usize| (n_in[a] - 1) as f64 / (n_out[a] - 1) as f64;
        for i in 0..n_out[0] {
            for j in 0..n_out[1] {
                for k in 0..n_out[2] {
                    let want = f(
                        i as f64 * scale(0),
                        j as f64 * scale(1),
                        k as f64 * scale(2),
                    );
                    let got = value_at(&y, [0, 0, i, j, k]);
                    assert!((got - want).abs() < 1e-12, "({i},{j},{k}): {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn same_size_is_identity_and_size_one_takes_first() {
        let x = smooth_tensor(&[1, 2, 3, 4, 2], 0.0);
        let same = resize_trilinear(&x, [3, 4, 2]).unwrap();
        let diff = (same - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
        // PyTorch with align_corners=True and an output of 1 samples index 0.
        let one = resize_trilinear(&x, [1, 4, 2]).unwrap();
        assert_eq!(
            value_at(&one, [0, 1, 0, 2, 1]),
            value_at(&x, [0, 1, 0, 2, 1])
        );
    }

    #[test]
    fn f32_weights_match_pytorch_rounding() {
        // PyTorch computes scale = 95/191 in f32 and src = scale * o in f32.
        let (lo, _, t) = linear_taps::<f32>(96, 192);
        let src = (95f32 / 191f32) * 101f32;
        assert_eq!(lo[101], src.floor() as u32);
        assert_eq!(t[101], src - src.floor());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let x = smooth_tensor(&[1, 2, 3, 2, 4], 0.9);
        check_grad(&|a| resize_trilinear(&a[0], [5, 3, 3]), &[x], 0, 1e-6, 1e-7);
    }
}
