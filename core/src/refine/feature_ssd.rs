//! The similarity of the instance optimisation, fused: a displacement on a coarse control
//! grid, upsampled trilinearly (aligned corners) to the level's image grid, warps the
//! moving descriptors (trilinear, border padding), and the weighted SSD against the fixed
//! descriptors is summed over channels and averaged over voxels:
//! `L(θ) = Σ_x w(x) Σ_c (M_c(x + up(θ)(x)) - F_c(x))² / Σ_x w(x)`.
//!
//! On CPU tensors one pass over the level's voxels computes `L` and `dL/dθ` together
//! (channels-last descriptors, both cores through rayon); the gradient is kept for the
//! backward pass. Elsewhere (CUDA) the same cost is composed of candle ops
//! ([`crate::ops::resize_trilinear`], [`crate::ops::warp`]) with autograd. Border rule as
//! [`crate::ops::warp`]: a source coordinate outside `[0, n - 1]` is clamped and passes no
//! gradient.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::{self, Padding};
use crate::{Error, Result};

/// Descriptors of one pyramid level and the voxel weights of the cost.
#[derive(Debug)]
pub struct FeatureSsd {
    /// Level grid `[n0, n1, n2]`.
    size: [usize; 3],
    channels: usize,
    /// Moving descriptors (1, C, n0, n1, n2) for the generic path.
    moving: Tensor,
    /// Fixed descriptors (1, C, n0, n1, n2).
    fixed: Tensor,
    /// Voxel weights (1, 1, n0, n1, n2), if any.
    weight: Option<Tensor>,
    /// Channels-last copies for the CPU kernel.
    cpu: Option<Arc<CpuData>>,
}

#[derive(Debug)]
struct CpuData {
    moving: Vec<f32>,
    fixed: Vec<f32>,
    weight: Option<Vec<f32>>,
    weight_sum: f64,
}

fn channels_last(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.squeeze(0)?
        .permute((1, 2, 3, 0))?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

impl FeatureSsd {
    /// The cost between `moving` and `fixed` descriptors (1, C, n0, n1, n2), each voxel
    /// weighted by `weight` (1, 1, n0, n1, n2, non-negative, not all 0) if given.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for shapes that differ; [`Error::InvalidArgument`] for
    /// weights that sum to 0.
    pub fn new(moving: &Tensor, fixed: &Tensor, weight: Option<&Tensor>) -> Result<Self> {
        let [b, channels, n0, n1, n2] = crate::losses::same_dims5("FeatureSsd", moving, fixed)?;
        let size = [n0, n1, n2];
        if b != 1 {
            return Err(Error::ShapeMismatch {
                op: "FeatureSsd",
                expected: "one pair (batch 1)".to_string(),
                got: format!("{:?}", moving.dims()),
            });
        }
        if let Some(w) = weight {
            if w.dims() != [1, 1, n0, n1, n2] {
                return Err(Error::ShapeMismatch {
                    op: "FeatureSsd",
                    expected: format!("weights of (1, 1, {n0}, {n1}, {n2})"),
                    got: format!("{:?}", w.dims()),
                });
            }
        }
        let cpu = if moving.device().is_cpu() {
            let weight_values = weight
                .map(|w| -> Result<Vec<f32>> {
                    Ok(w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
                })
                .transpose()?;
            let weight_sum = weight_values.as_ref().map_or((n0 * n1 * n2) as f64, |w| {
                w.iter().map(|&v| f64::from(v)).sum()
            });
            if weight_sum <= 0.0 {
                return Err(Error::invalid("refine mask", "the voxel weights sum to 0"));
            }
            Some(Arc::new(CpuData {
                moving: channels_last(moving)?,
                fixed: channels_last(fixed)?,
                weight: weight_values,
                weight_sum,
            }))
        } else {
            None
        };
        Ok(Self {
            size,
            channels,
            moving: moving.detach(),
            fixed: fixed.detach(),
            weight: weight.map(Tensor::detach),
            cpu,
        })
    }

    /// The level grid.
    pub fn size(&self) -> [usize; 3] {
        self.size
    }

    /// `L(θ)` for a control-grid displacement `control` (1, 3, g0, g1, g2) in voxels of the
    /// level grid, differentiable w.r.t. `control`; a 0-d tensor of its dtype.
    ///
    /// # Errors
    /// A candle error for a malformed `control`.
    pub fn forward(&self, control: &Tensor) -> Result<Tensor> {
        match (&self.cpu, control.device()) {
            (Some(data), Device::Cpu) => {
                let op = FusedOp {
                    size: self.size,
                    channels: self.channels,
                    data: data.clone(),
                    grad: crate::ops::stashed::StashedGradient::new("feature-ssd"),
                };
                Ok(control.contiguous()?.apply_op1(op)?)
            }
            _ => self.forward_generic(control),
        }
    }

    /// The same cost from candle ops (any device).
    ///
    /// # Errors
    /// A candle error.
    pub fn forward_generic(&self, control: &Tensor) -> Result<Tensor> {
        let dense = ops::resize_trilinear(control, self.size)?;
        let moving = self.moving.to_dtype(control.dtype())?;
        let fixed = self.fixed.to_dtype(control.dtype())?;
        let warped = ops::warp(&moving, &dense, Padding::Border)?;
        let sq = (warped - fixed)?.sqr()?.sum_keepdim(1)?;
        Ok(match &self.weight {
            None => sq.mean_all()?,
            Some(w) => {
                let w = w.to_dtype(control.dtype())?;
                (sq.broadcast_mul(&w)?.sum_all()? / w.sum_all()?.to_scalar_f64()?)?
            }
        })
    }
}

trait ScalarF64 {
    fn to_scalar_f64(&self) -> candle_core::Result<f64>;
}

impl ScalarF64 for Tensor {
    fn to_scalar_f64(&self) -> candle_core::Result<f64> {
        self.to_dtype(DType::F64)?.to_scalar::<f64>()
    }
}

/// Per axis: for each level index, the lower control index, the upper one and the weight
/// of the upper (PyTorch's aligned-corners linear rule, as [`crate::ops::resize_trilinear`]).
fn axis_taps(n: usize, g: usize) -> Vec<(usize, usize, f32)> {
    let scale = if n > 1 {
        (g as f32 - 1.0) / (n as f32 - 1.0)
    } else {
        0.0
    };
    (0..n)
        .map(|o| {
            let src = scale * o as f32;
            let lo = (src.floor() as usize).min(g - 1);
            let hi = (lo + 1).min(g - 1);
            let t = (src - lo as f32).clamp(0.0, 1.0);
            (lo, hi, t)
        })
        .collect()
}

/// Source coordinate along one axis: clamped value, floor, fraction, whether it passes a
/// gradient.
#[inline]
fn source(q: f32, n: usize) -> (usize, usize, f32, bool) {
    let top = (n - 1) as f32;
    if n == 1 {
        return (0, 0, 0.0, false);
    }
    let inside = q > 0.0 && q < top;
    let q = q.clamp(0.0, top);
    let lo = (q.floor() as usize).min(n - 1);
    let hi = (lo + 1).min(n - 1);
    (lo, hi, q - lo as f32, inside)
}

struct FusedOp {
    size: [usize; 3],
    channels: usize,
    data: Arc<CpuData>,
    grad: crate::ops::stashed::StashedGradient,
}

impl FusedOp {
    /// Loss and gradient w.r.t. the control grid (3 g0 g1 g2, f32).
    fn run(&self, control: &[f32], g: [usize; 3]) -> (f64, Vec<f32>) {
        let [n0, n1, n2] = self.size;
        let c = self.channels;
        let gn = g[0] * g[1] * g[2];
        let taps = [
            axis_taps(n0, g[0]),
            axis_taps(n1, g[1]),
            axis_taps(n2, g[2]),
        ];
        let data = &self.data;
        let threads = rayon::current_num_threads().max(1);
        let slab = n0.div_ceil(threads).max(1);
        let parts: Vec<(f64, Vec<f32>)> = (0..n0.div_ceil(slab))
            .into_par_iter()
            .map(|s| {
                let mut grad = vec![0f32; 3 * gn];
                let mut loss = 0f64;
                for i in s * slab..((s + 1) * slab).min(n0) {
                    let (a0, a1, ta) = taps[0][i];
                    for (j, &(b0, b1, tb)) in taps[1].iter().enumerate() {
                        for (k, &(c0, c1, tc)) in taps[2].iter().enumerate() {
                            let x = (i * n1 + j) * n2 + k;
                            let w = data.weight.as_ref().map_or(1.0, |w| w[x]);
                            if w == 0.0 {
                                continue;
                            }
                            // The 8 control corners and their weights.
                            let corners = [
                                (
                                    (a0 * g[1] + b0) * g[2] + c0,
                                    (1.0 - ta) * (1.0 - tb) * (1.0 - tc),
                                ),
                                ((a0 * g[1] + b0) * g[2] + c1, (1.0 - ta) * (1.0 - tb) * tc),
                                ((a0 * g[1] + b1) * g[2] + c0, (1.0 - ta) * tb * (1.0 - tc)),
                                ((a0 * g[1] + b1) * g[2] + c1, (1.0 - ta) * tb * tc),
                                ((a1 * g[1] + b0) * g[2] + c0, ta * (1.0 - tb) * (1.0 - tc)),
                                ((a1 * g[1] + b0) * g[2] + c1, ta * (1.0 - tb) * tc),
                                ((a1 * g[1] + b1) * g[2] + c0, ta * tb * (1.0 - tc)),
                                ((a1 * g[1] + b1) * g[2] + c1, ta * tb * tc),
                            ];
                            let mut u = [0f32; 3];
                            for (comp, uc) in u.iter_mut().enumerate() {
                                let base = &control[comp * gn..(comp + 1) * gn];
                                *uc = corners.iter().map(|&(idx, cw)| cw * base[idx]).sum();
                            }
                            let (h0, h1, th, gh) = source(i as f32 + u[0], n0);
                            let (w0, w1, tw, gw) = source(j as f32 + u[1], n1);
                            let (d0, d1, td, gd) = source(k as f32 + u[2], n2);
                            let at = |h: usize, ww: usize, d: usize| ((h * n1 + ww) * n2 + d) * c;
                            let m = &data.moving;
                            let (p000, p001, p010, p011) = (
                                at(h0, w0, d0),
                                at(h0, w0, d1),
                                at(h0, w1, d0),
                                at(h0, w1, d1),
                            );
                            let (p100, p101, p110, p111) = (
                                at(h1, w0, d0),
                                at(h1, w0, d1),
                                at(h1, w1, d0),
                                at(h1, w1, d1),
                            );
                            let f = &data.fixed[x * c..(x + 1) * c];
                            let mut dq = [0f32; 3];
                            let mut sq = 0f32;
                            for ch in 0..c {
                                let (v000, v001) = (m[p000 + ch], m[p001 + ch]);
                                let (v010, v011) = (m[p010 + ch], m[p011 + ch]);
                                let (v100, v101) = (m[p100 + ch], m[p101 + ch]);
                                let (v110, v111) = (m[p110 + ch], m[p111 + ch]);
                                let e00 = v000 + td * (v001 - v000);
                                let e01 = v010 + td * (v011 - v010);
                                let e10 = v100 + td * (v101 - v100);
                                let e11 = v110 + td * (v111 - v110);
                                let l0 = e00 + tw * (e01 - e00);
                                let l1 = e10 + tw * (e11 - e10);
                                let value = l0 + th * (l1 - l0);
                                let res = value - f[ch];
                                sq += res * res;
                                dq[0] += res * (l1 - l0);
                                dq[1] += res * ((e01 - e00) + th * ((e11 - e10) - (e01 - e00)));
                                let dd0 = (v001 - v000) + tw * ((v011 - v010) - (v001 - v000));
                                let dd1 = (v101 - v100) + tw * ((v111 - v110) - (v101 - v100));
                                dq[2] += res * (dd0 + th * (dd1 - dd0));
                            }
                            loss += f64::from(w * sq);
                            let scale = 2.0 * w;
                            let dq = [
                                if gh { dq[0] * scale } else { 0.0 },
                                if gw { dq[1] * scale } else { 0.0 },
                                if gd { dq[2] * scale } else { 0.0 },
                            ];
                            for (comp, &dqc) in dq.iter().enumerate() {
                                if dqc != 0.0 {
                                    let base = &mut grad[comp * gn..(comp + 1) * gn];
                                    for &(idx, cw) in &corners {
                                        base[idx] += cw * dqc;
                                    }
                                }
                            }
                        }
                    }
                }
                (loss, grad)
            })
            .collect();
        let mut loss = 0f64;
        let mut grad = vec![0f32; 3 * gn];
        for (l, g) in parts {
            loss += l;
            for (a, b) in grad.iter_mut().zip(g) {
                *a += b;
            }
        }
        let inv = 1.0 / data.weight_sum;
        for v in &mut grad {
            *v = (f64::from(*v) * inv) as f32;
        }
        (loss * inv, grad)
    }
}

impl CustomOp1 for FusedOp {
    fn name(&self) -> &'static str {
        "feature-ssd"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let [1, 3, g0, g1, g2] = *dims else {
            candle_core::bail!("feature-ssd: control grid must be (1, 3, g0, g1, g2), got {dims:?}")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("feature-ssd: control grid must be contiguous")
        };
        let control: Vec<f32> = match storage {
            CpuStorage::F32(v) => v[start..end].to_vec(),
            CpuStorage::F64(v) => v[start..end].iter().map(|&x| x as f32).collect(),
            _ => candle_core::bail!("feature-ssd: f32 or f64 control grid"),
        };
        let (loss, grad) = self.run(&control, [g0, g1, g2]);
        self.grad
            .forward(loss, grad, &Shape::from(dims), storage.dtype())
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.grad.backward(grad_res)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::losses::test_support::{grid, scalar};
    use candle_core::Var;

    #[test]
    fn fused_cost_and_gradient_match_the_composed_ops() {
        let moving = grid([1, 4, 9, 10, 11], |_, c, i, j, k| {
            (0.5 * i + 0.3 * j * (c as f64 + 1.0)).sin() * (0.4 * k).cos()
        })
        .to_dtype(DType::F32)
        .unwrap();
        let fixed = grid([1, 4, 9, 10, 11], |_, c, i, j, k| {
            (0.45 * i + 0.31 * j * (c as f64 + 1.0) + 0.2).sin() * (0.4 * k - 0.1).cos()
        })
        .to_dtype(DType::F32)
        .unwrap();
        let weight = grid(
            [1, 1, 9, 10, 11],
            |_, _, i, _, _| if i > 2.0 { 1.0 } else { 0.0 },
        )
        .to_dtype(DType::F32)
        .unwrap();
        // Displacements large enough to reach the border on some voxels.
        let control = grid([1, 3, 4, 5, 3], |_, c, i, j, k| {
            1.5 * (0.9 * i + 0.7 * j + 1.3 * k + c as f64).sin()
        })
        .to_dtype(DType::F32)
        .unwrap();
        for w in [None, Some(&weight)] {
            let cost = FeatureSsd::new(&moving, &fixed, w).unwrap();
            let var = Var::from_tensor(&control).unwrap();
            let fused = cost.forward(var.as_tensor()).unwrap();
            let g_fused = fused
                .backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap()
                .clone();
            let generic = cost.forward_generic(var.as_tensor()).unwrap();
            let g_generic = generic
                .backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap()
                .clone();
            let (a, b) = (scalar(&fused), scalar(&generic));
            assert!((a - b).abs() < 1e-4 * b.abs(), "{a} vs {b}");
            let err = scalar(
                &(&g_fused - &g_generic)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap(),
            );
            let size = scalar(&g_generic.abs().unwrap().max_all().unwrap());
            assert!(size > 0.0 && err < 1e-3 * size, "{err} vs {size}");
        }
    }
}
