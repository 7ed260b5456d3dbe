//! 3D max pooling with kernel = stride, as `torch.nn.MaxPool3d(kernel_size=k)` used by
//! MONAI's `RegistrationDownSampleBlock` (`monai/networks/blocks/regunet_block.py`).
//!
//! The gradient of each output goes to ONE input: the first maximum of its window in
//! PyTorch's scan order (row-major over H, W, D within the window; PyTorch's CPU kernel
//! `cpu_max_pool` replaces the running max only on a strictly greater value). Ties are
//! common after a ReLU (many zeros), so this matters for parity.
//!
//! On the CPU the op is a [`CustomOp1`] with plain slice loops; on other devices it is a
//! composition of candle ops (windows as a last axis, first-argmax, `gather`) with the same
//! semantics.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// Max-pools the spatial dims of `x` (B, C, H, W, D) with kernel = stride = `k`, no padding.
///
/// Fails when `k` is 0 or a spatial dim is not divisible by `k` (MONAI raises a
/// `ValueError` there too).
pub fn max_pool3d(x: &Tensor, k: usize) -> Result<Tensor> {
    let (_, _, h, w, d) = x.dims5()?;
    if k == 0 || h % k != 0 || w % k != 0 || d % k != 0 {
        bail!("max_pool3d: spatial size ({h}, {w}, {d}) is not divisible by the kernel size {k}")
    }
    if k == 1 {
        return Ok(x.clone());
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?.apply_op1(MaxPool3d { k })
    } else {
        max_pool3d_generic(x, k)
    }
}

/// The device-independent version: the k³ window becomes a last axis, the first maximum's
/// position is found with `where_cond` + `min`, and `gather` picks it (so the gradient
/// flows through `gather`'s backward to that single element).
fn max_pool3d_generic(x: &Tensor, k: usize) -> Result<Tensor> {
    let (b, c, h, w, d) = x.dims5()?;
    let (ho, wo, d_out) = (h / k, w / k, d / k);
    let window = k * k * k;
    let windows = x
        .reshape(&[b, c, ho, k, wo, k, d_out, k][..])?
        .permute(&[0, 1, 2, 4, 6, 3, 5, 7][..])?
        .reshape((b, c, ho, wo, d_out, window))?;
    let max = windows.max_keepdim(5)?;
    let is_max = windows.broadcast_eq(&max)?;
    let positions = Tensor::arange(0u32, window as u32, x.device())?
        .to_dtype(DType::F32)?
        .broadcast_as(windows.shape())?;
    let beyond = Tensor::full(window as f32, windows.shape(), x.device())?;
    let first = is_max
        .where_cond(&positions, &beyond)?
        .min_keepdim(5)?
        .to_dtype(DType::U32)?;
    windows.gather(&first, 5)?.squeeze(5)
}

/// Forward of the CPU max pool; its backward routes each output gradient to the first
/// maximum of the window.
struct MaxPool3d {
    k: usize,
}

/// The flat index, into a contiguous (B, C, H, W, D) volume `src`, of the first maximum of
/// the window of output element `out_index` (flat over (B, C, H/k, W/k, D/k)), scanning the
/// window row-major as PyTorch does.
fn first_max_index<T: WithDType>(src: &[T], dims: [usize; 3], k: usize, out_index: usize) -> usize {
    let [h, w, d] = dims;
    let (ho, wo, d_out) = (h / k, w / k, d / k);
    let od = out_index % d_out;
    let ow = (out_index / d_out) % wo;
    let oh = (out_index / (d_out * wo)) % ho;
    let plane = out_index / (d_out * wo * ho);
    let base = plane * h * w * d;
    let mut best = base + (oh * k) * w * d + (ow * k) * d + od * k;
    let mut best_value = src[best];
    for ih in oh * k..oh * k + k {
        for iw in ow * k..ow * k + k {
            let row = base + ih * w * d + iw * d;
            for id in od * k..od * k + k {
                let value = src[row + id];
                // PyTorch: `if ((val > maxval) || std::isnan(val))`.
                if value > best_value || value.to_f64().is_nan() {
                    best = row + id;
                    best_value = value;
                }
            }
        }
    }
    best
}

fn max_pool_fwd<T: WithDType>(src: &[T], shape: &Shape, k: usize) -> Result<(Vec<T>, Shape)> {
    let (b, c, h, w, d) = shape.dims5()?;
    let out_shape = Shape::from((b, c, h / k, w / k, d / k));
    let per_plane = out_shape.elem_count() / (b * c).max(1);
    let mut out = vec![T::zero(); out_shape.elem_count()];
    out.par_chunks_mut(per_plane.max(1))
        .enumerate()
        .for_each(|(plane, chunk)| {
            for (i, o) in chunk.iter_mut().enumerate() {
                *o = src[first_max_index(src, [h, w, d], k, plane * per_plane + i)];
            }
        });
    Ok((out, out_shape))
}

impl CustomOp1 for MaxPool3d {
    fn name(&self) -> &'static str {
        "max_pool3d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("max_pool3d: the input must be contiguous")
        };
        match storage {
            CpuStorage::F32(v) => {
                let (out, shape) = max_pool_fwd(&v[start..end], layout.shape(), self.k)?;
                Ok((CpuStorage::F32(out), shape))
            }
            CpuStorage::F64(v) => {
                let (out, shape) = max_pool_fwd(&v[start..end], layout.shape(), self.k)?;
                Ok((CpuStorage::F64(out), shape))
            }
            _ => bail!("max_pool3d: only f32 and f64 run on the CPU kernel"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg
            .contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPool3dGrad { k: self.k })?;
        Ok(Some(grad))
    }
}

/// Backward of [`MaxPool3d`]: arguments are the pooled input and the output gradient; the
/// result has the input's shape, zero except at each window's first maximum.
struct MaxPool3dGrad {
    k: usize,
}

fn max_pool_bwd<T: WithDType>(src: &[T], shape: &Shape, grad: &[T], k: usize) -> Result<Vec<T>> {
    let (_, _, h, w, d) = shape.dims5()?;
    let mut out = vec![T::zero(); src.len()];
    let plane_in = h * w * d;
    let plane_out = (h / k) * (w / k) * (d / k);
    if plane_in == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(plane_in)
        .enumerate()
        .for_each(|(plane, chunk)| {
            let first = plane * plane_out;
            for (o, g) in grad[first..first + plane_out].iter().enumerate() {
                let i = first_max_index(src, [h, w, d], k, first + o);
                chunk[i - plane * plane_in] += *g;
            }
        });
    Ok(out)
}

impl CustomOp2 for MaxPool3dGrad {
    fn name(&self) -> &'static str {
        "max_pool3d_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("max_pool3d_grad: inputs must be contiguous")
        };
        let shape = l1.shape().clone();
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => Ok((
                CpuStorage::F32(max_pool_bwd(&x[a1..b1], &shape, &g[a2..b2], self.k)?),
                shape,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => Ok((
                CpuStorage::F64(max_pool_bwd(&x[a1..b1], &shape, &g[a2..b2], self.k)?),
                shape,
            )),
            _ => bail!("max_pool3d_grad: unsupported dtypes"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
mod tests {
    use super::*;
    use crate::ops::grad_check::{check_grad, smooth_tensor};
    use candle_core::{Device, Var};

    #[test]
    fn pools_window_maxima() {
        // Reference by hand: a 2x2x4 volume with k = 2 has two windows.
        let x = Tensor::arange(0f32, 16., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 2, 4))
            .unwrap();
        let y = max_pool3d(&x, 2).unwrap();
        assert_eq!(y.dims(), &[1, 1, 1, 1, 2]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [13., 15.]
        );
    }

    #[test]
    fn rejects_indivisible_sizes() {
        let x = Tensor::zeros((1, 1, 4, 4, 6), DType::F32, &Device::Cpu).unwrap();
        assert!(max_pool3d(&x, 4).is_err());
        assert!(max_pool3d(&x, 0).is_err());
    }

    #[test]
    fn cpu_and_generic_paths_agree() {
        let x = smooth_tensor(&[2, 3, 4, 6, 8], 0.1)
            .to_dtype(DType::F32)
            .unwrap();
        let relu = x.relu().unwrap(); // many ties at zero
        for input in [&x, &relu] {
            let a = max_pool3d(input, 2).unwrap();
            let b = max_pool3d_generic(input, 2).unwrap();
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    /// Gradients with ties: every window of zeros sends its gradient to its first element.
    #[test]
    fn gradient_goes_to_first_maximum_on_ties() {
        let mut values = vec![0f64; 64];
        values[5] = -1.0; // window 0 (first corner at flat 0) still has max 0 at index 0
        let base = Tensor::from_vec(values, (1, 1, 4, 4, 4), &Device::Cpu).unwrap();
        for generic in [false, true] {
            let var = Var::from_tensor(&base).unwrap();
            let y = if generic {
                max_pool3d_generic(var.as_tensor(), 2).unwrap()
            } else {
                max_pool3d(var.as_tensor(), 2).unwrap()
            };
            let grads = y.sum_all().unwrap().backward().unwrap();
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // First element of each 2x2x2 window: (h, w, d) all even.
            for (t, v) in g.iter().enumerate() {
                let (h, w, d) = (t / 16, (t / 4) % 4, t % 4);
                let expected = if h % 2 == 0 && w % 2 == 0 && d % 2 == 0 {
                    1.0
                } else {
                    0.0
                };
                assert_eq!(*v, expected, "generic={generic} at flat {t}");
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let x = smooth_tensor(&[1, 2, 4, 4, 6], 0.7);
        check_grad(
            &|a| max_pool3d(&a[0], 2),
            std::slice::from_ref(&x),
            0,
            1e-6,
            1e-6,
        );
        check_grad(&|a| max_pool3d_generic(&a[0], 2), &[x], 0, 1e-6, 1e-6);
    }
}
