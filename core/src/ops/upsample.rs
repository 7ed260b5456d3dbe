//! Nearest-neighbour upsampling of (B, C, H, W, D) volumes, as PyTorch's legacy
//! `F.interpolate(x, size=..., mode="nearest")`, which MONAI's `AdditiveUpSampleBlock` and
//! `RegistrationExtractionBlock` call (`monai/networks/blocks/regunet_block.py`).
//!
//! Both functions are differentiable: each input voxel receives the sum of the gradients of
//! the outputs that copy it.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::kernel::{has_fast_path, run_cpu, CpuKernel, Float};

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

/// `a + upsample_nearest3d(low, 2) + skip`, with `a` and `skip` (B, C, 2H, 2W, 2D) and
/// `low` (B, C, H, W, D): LocalNet's decoder step (MONAI's `AdditiveUpSampleBlock` output
/// plus the skip connection). On the CPU (f32/f64) one pass that keeps no intermediate; the
/// gradient of `low` is the sum of the output gradient over each 2x2x2 block.
pub fn add_upsampled2x(a: &Tensor, low: &Tensor, skip: &Tensor) -> Result<Tensor> {
    let (b, c, h, w, d) = low.dims5()?;
    let want = [b, c, 2 * h, 2 * w, 2 * d];
    if a.dims() != want || skip.dims() != want {
        bail!(
            "add_upsampled2x: a {:?} and skip {:?} must be {want:?} for low {:?}",
            a.dims(),
            skip.dims(),
            low.dims()
        );
    }
    if !has_fast_path(&[a, low, skip]) {
        return (a + upsample_nearest3d(low, 2)?)? + skip;
    }
    a.contiguous()?.apply_op3(
        &low.contiguous()?,
        &skip.contiguous()?,
        AddUpsampled(UpsamplePass::Forward),
    )
}

/// Which computation an [`AddUpsampled`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpsamplePass {
    /// Arguments `(a, low, skip)`: `a + up2(low) + skip`.
    Forward,
    /// Arguments `(grad, low, grad)`: the gradient of `low`, block sums of `grad`.
    LowGrad,
}

/// The CPU op of [`add_upsampled2x`].
#[derive(Debug, Clone, Copy)]
struct AddUpsampled(UpsamplePass);

impl CpuKernel for AddUpsampled {
    fn kernel_name(&self) -> &'static str {
        match self.0 {
            UpsamplePass::Forward => "add_upsampled2x",
            UpsamplePass::LowGrad => "add_upsampled2x-low-grad",
        }
    }

    fn run<T: Float>(&self, args: &[(&[T], &Layout)]) -> Result<(Vec<T>, Shape)> {
        let [(a, _), (low, ll), (skip, _)] = args else {
            bail!("{}: expected 3 arguments", self.kernel_name());
        };
        let (_, _, h, w, d) = ll.shape().dims5()?;
        let (w2, d2) = (2 * w, 2 * d);
        // One task per (b, c, output plane z): plane z reads low plane z / 2.
        let out_plane = 4 * w * d;
        let low_plane = w * d;
        match self.0 {
            UpsamplePass::Forward => {
                let mut out = vec![T::default(); a.len()];
                out.par_chunks_mut(out_plane)
                    .enumerate()
                    .for_each(|(i, dst)| {
                        let (bc, z) = (i / (2 * h), i % (2 * h));
                        let src = &low[(bc * h + z / 2) * low_plane..][..low_plane];
                        let base = i * out_plane;
                        for y in 0..w2 {
                            for x in 0..d2 {
                                let o = y * d2 + x;
                                dst[o] = a[base + o] + src[(y / 2) * d + x / 2] + skip[base + o];
                            }
                        }
                    });
                Ok((out, args[0].1.shape().clone()))
            }
            UpsamplePass::LowGrad => {
                // a = grad (B, C, 2H, 2W, 2D).
                let mut out = vec![T::default(); low.len()];
                out.par_chunks_mut(low_plane)
                    .enumerate()
                    .for_each(|(i, dst)| {
                        let (bc, z) = (i / h, i % h);
                        for dz in 0..2 {
                            let g = &a[(bc * 2 * h + 2 * z + dz) * out_plane..][..out_plane];
                            for y in 0..w2 {
                                for x in 0..d2 {
                                    dst[(y / 2) * d + x / 2] += g[y * d2 + x];
                                }
                            }
                        }
                    });
                Ok((out, ll.shape().clone()))
            }
        }
    }
}

impl CustomOp3 for AddUpsampled {
    fn name(&self) -> &'static str {
        self.kernel_name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        run_cpu(self, &[(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        low: &Tensor,
        skip: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.0 != UpsamplePass::Forward {
            bail!("{}: no second-order gradient", self.kernel_name());
        }
        let grad = grad.contiguous()?;
        let dlow = low
            .track_op()
            .then(|| grad.apply_op3_no_bwd(low, &grad, &AddUpsampled(UpsamplePass::LowGrad)))
            .transpose()?;
        Ok((
            a.track_op().then(|| grad.clone()),
            dlow,
            skip.track_op().then(|| grad.clone()),
        ))
    }
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

    /// The fused decoder step against `a + upsample_nearest3d(low, 2) + skip` in candle
    /// ops (batch 2, uneven sizes), and its three gradients against finite differences.
    #[test]
    fn add_upsampled_matches_composition_and_finite_differences() {
        let low = smooth_tensor(&[2, 3, 2, 3, 1], 0.1);
        let a = smooth_tensor(&[2, 3, 4, 6, 2], 0.6);
        let skip = smooth_tensor(&[2, 3, 4, 6, 2], 1.9);
        let fused = add_upsampled2x(&a, &low, &skip).unwrap();
        let composed = ((&a + upsample_nearest3d(&low, 2).unwrap()).unwrap() + &skip).unwrap();
        let diff = (fused - composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-14);
        let f = |t: &[Tensor]| add_upsampled2x(&t[0], &t[1], &t[2]);
        let inputs = [a.clone(), low.clone(), skip.clone()];
        for wrt in 0..3 {
            check_grad(&f, &inputs, wrt, 1e-6, 1e-6);
        }
        let err = add_upsampled2x(&a, &low, &low).unwrap_err().to_string();
        assert!(err.contains("add_upsampled2x"), "{err}");
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
