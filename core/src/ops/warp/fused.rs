//! The trilinear warp as one CPU custom op with a hand-written backward pass.
//!
//! The composed warp (`warp_composed` in `warp.rs`) keeps about twenty `(B, N)` tensors for
//! the backward pass: each axis's normalisation round trip, floors, masks, tap weights and
//! offsets, the partial corner weights and the eight gathered corner values; some 300 MiB in
//! a training step at 96x96x104. This op keeps nothing: the forward pass computes each
//! output voxel from the DDF and the image, and the backward pass recomputes the corner
//! weights from the same two inputs, which the graph holds anyway.
//!
//! Every step is the composed warp's arithmetic in the tensor's dtype, in the same order, so
//! the values are the same to the last bit (the round trip `q' = ((((i + u)·2)/(n-1) - 1 + 1)
//! · 0.5)·(n-1)`, the weights `(w_D·w_W)·w_H`, the corners summed in PyTorch's order).
//! The gradients are the same sums in another order.
//!
//! Work is parallel over chunks of output positions; the image gradient (needed only when
//! the image itself is tracked, never in training, where it is data) scatters, so it is
//! parallel over `(batch, channel)` planes.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Padding;
use crate::ops::kernel::{run_cpu, CpuKernel, Float};

/// Output positions per parallel task.
const CHUNK: usize = 4096;

/// Which computation a [`WarpKernel`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// Arguments `(image, ddf)`: the warped image.
    Forward,
    /// Arguments `(image, ddf)`: the image sampled at the nearest voxel (no gradient).
    Nearest,
    /// Arguments `(image, ddf, grad)`: the gradient w.r.t. the DDF.
    DdfGrad,
    /// Arguments `(image, ddf, grad)`: the gradient w.r.t. the image.
    ImageGrad,
}

/// The fused warp of `image` by `ddf` (shapes checked by the caller).
pub(super) fn warp(image: &Tensor, ddf: &Tensor, padding: Padding) -> candle_core::Result<Tensor> {
    image.contiguous()?.apply_op2(
        &ddf.contiguous()?,
        WarpKernel {
            padding,
            pass: Pass::Forward,
        },
    )
}

/// The nearest-voxel warp of `image` by `ddf` with border padding (shapes checked by the
/// caller); not differentiable.
pub(super) fn warp_nearest(image: &Tensor, ddf: &Tensor) -> candle_core::Result<Tensor> {
    image.detach().contiguous()?.apply_op2_no_bwd(
        &ddf.detach().contiguous()?,
        &WarpKernel {
            padding: Padding::Border,
            pass: Pass::Nearest,
        },
    )
}

#[derive(Clone, Copy, Debug)]
struct WarpKernel {
    padding: Padding,
    pass: Pass,
}

/// The two interpolation taps of one axis at one position.
#[derive(Clone, Copy)]
struct AxisTaps<T> {
    /// Flat offsets (index times stride) of the low and high tap.
    offset: [usize; 2],
    /// Their weights.
    weight: [T; 2],
    /// The weights' derivatives w.r.t. the source coordinate (0 where a mask holds them).
    slope: [T; 2],
    /// `d q' / d u` for the DDF gradient: the round trip's factor, 0 where the coordinate
    /// passes no gradient (border clamp, an axis of length 1).
    chain: T,
}

/// The sampling geometry shared by all three passes.
struct Geometry {
    spatial: [usize; 3],
    strides: [usize; 3],
    padding: Padding,
}

impl Geometry {
    /// The source coordinate along `axis` of voxel index `index` displaced by `u`, after
    /// MONAI's normalisation round trip and the padding's clamp, and `d q' / d u` (0 where
    /// the coordinate passes no gradient: border clamp, an axis of length 1).
    fn coordinate<T: Float>(&self, axis: usize, index: usize, u: T) -> (T, T) {
        let zero = T::default();
        let one = T::ONE;
        let n = self.spatial[axis];
        if n == 1 {
            return (zero, zero);
        }
        let last = T::from_f64((n - 1) as f64);
        let two = T::from_f64(2.0);
        let half = T::from_f64(0.5);
        // MONAI: grid * 2 / (n - 1) - 1; PyTorch: ((g + 1) / 2) * (n - 1); as candle's
        // affine ops compute them (`v * mul + add`).
        let grid = T::from_f64(index as f64) + u;
        let g = (grid * two + zero) / last;
        let g = g * one + T::from_f64(-1.0);
        let q = ((g * one + one) * half + zero) * last + zero;
        // The composed backward: affine (x last, x 0.5, x 1, x 1), then / (n - 1), x 2.
        let chain = ((one * last) * half) / last * two;
        match self.padding {
            Padding::Zeros => (q, chain),
            Padding::Border if q > zero && q < last => (q, chain),
            Padding::Border => (clamp(q, last), zero),
        }
    }

    /// The flat offset along `axis` of the voxel nearest to the border-clamped source
    /// coordinate, rounding halves to even (`warp_nearest`).
    fn nearest<T: Float>(&self, axis: usize, index: usize, u: T) -> usize {
        let (q, _) = self.coordinate(axis, index, u);
        let last = T::from_f64((self.spatial[axis] - 1) as f64);
        let zero = T::default();
        let one = T::ONE;
        let floor = q.floor();
        let frac = q - floor;
        let half = T::from_f64(0.5);
        let unit = |on: bool| if on { one } else { zero };
        let odd = floor - ((floor * half + zero).floor() * T::from_f64(2.0) + zero);
        let rounded = floor + unit(frac > half) + unit(frac == half) * odd;
        clamp(rounded, last).to_u32() as usize * self.strides[axis]
    }

    /// The taps of `axis` at voxel index `index` displaced by `u`.
    fn taps<T: Float>(&self, axis: usize, index: usize, u: T) -> AxisTaps<T> {
        let zero = T::default();
        let one = T::ONE;
        let stride = self.strides[axis];
        let last = T::from_f64((self.spatial[axis] - 1) as f64);
        let (q, chain) = self.coordinate(axis, index, u);
        let lo = q.floor();
        let hi = lo * one + one;
        let (w_lo, w_hi) = (hi - q, q - lo);
        let inside = |i: T| i >= zero && i <= last;
        let unit = |on: bool| if on { one } else { zero };
        let (weight, slope, lo_in, hi_in) = match self.padding {
            Padding::Border => {
                let m = unit(hi <= last);
                let hi_in = if hi < last { hi } else { last };
                ([w_lo, w_hi * m], [zero - one, m], lo, hi_in)
            }
            Padding::Zeros => {
                let (m_lo, m_hi) = (unit(inside(lo)), unit(inside(hi)));
                (
                    [w_lo * m_lo, w_hi * m_hi],
                    [zero - m_lo, m_hi],
                    clamp(lo, last),
                    clamp(hi, last),
                )
            }
        };
        AxisTaps {
            offset: [
                lo_in.to_u32() as usize * stride,
                hi_in.to_u32() as usize * stride,
            ],
            weight,
            slope,
            chain,
        }
    }

    /// The voxel index of flat position `p` along each axis.
    fn index(&self, p: usize) -> [usize; 3] {
        [
            p / self.strides[0],
            p / self.strides[1] % self.spatial[1],
            p % self.spatial[2],
        ]
    }

    /// The taps of the three axes at flat position `p`, whose DDF values are `u`.
    fn sample<T: Float>(&self, p: usize, u: [T; 3]) -> [AxisTaps<T>; 3] {
        let index = self.index(p);
        [0, 1, 2].map(|a| self.taps(a, index[a], u[a]))
    }
}

/// `v` clamped to `[0, last]` (candle's `clamp`: a maximum, then a minimum).
fn clamp<T: Float>(v: T, last: T) -> T {
    let zero = T::default();
    let v = if v > zero { v } else { zero };
    if v < last {
        v
    } else {
        last
    }
}

/// The corners in PyTorch's order (H slowest, D fastest): flat index, weight, and the
/// weight's derivatives w.r.t. the H, W and D coordinates.
fn corners<T: Float>(t: &[AxisTaps<T>; 3]) -> [(usize, T, [T; 3]); 8] {
    let [th, tw, td] = t;
    std::array::from_fn(|corner| {
        let (h, w, d) = (corner >> 2, (corner >> 1) & 1, corner & 1);
        let index = (th.offset[h] + tw.offset[w]) + td.offset[d];
        let dw = td.weight[d] * tw.weight[w];
        let weight = dw * th.weight[h];
        let slopes = [
            dw * th.slope[h],
            (td.weight[d] * tw.slope[w]) * th.weight[h],
            (td.slope[d] * tw.weight[w]) * th.weight[h],
        ];
        (index, weight, slopes)
    })
}

/// Runs `f(position, out_row)` for every position of a `(planes, n)` output in parallel
/// chunks of positions, where `out_row[c]` is the value of plane `c` at that position, and
/// returns the `(planes, n)` result.
fn per_position<T: Float>(n: usize, planes: usize, f: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let chunks: Vec<Vec<T>> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|chunk| {
            let range = chunk * CHUNK..((chunk + 1) * CHUNK).min(n);
            let mut local = vec![T::default(); range.len() * planes];
            let mut row = vec![T::default(); planes];
            for (i, p) in range.clone().enumerate() {
                f(p, &mut row);
                for (c, v) in row.iter().enumerate() {
                    local[c * range.len() + i] = *v;
                }
            }
            local
        })
        .collect();
    let mut out = vec![T::default(); planes * n];
    for (chunk, local) in chunks.iter().enumerate() {
        let start = chunk * CHUNK;
        let len = local.len() / planes.max(1);
        for c in 0..planes {
            out[c * n + start..][..len].copy_from_slice(&local[c * len..][..len]);
        }
    }
    out
}

impl CpuKernel for WarpKernel {
    fn kernel_name(&self) -> &'static str {
        "warp"
    }

    fn run<T: Float>(&self, args: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let (image, image_layout) = args[0];
        let (ddf, ddf_layout) = args[1];
        let [b, c, h, w, d] = *image_layout.shape().dims() else {
            bail!("warp: image must be (B, C, H, W, D)");
        };
        if ddf_layout.shape().dims() != [b, 3, h, w, d] {
            bail!(
                "warp: ddf shape {:?} for image {:?}",
                ddf_layout.shape(),
                [b, c, h, w, d]
            );
        }
        let n = h * w * d;
        let geometry = Geometry {
            spatial: [h, w, d],
            strides: [w * d, d, 1],
            padding: self.padding,
        };
        let displacement = |item: usize, p: usize| -> [T; 3] {
            std::array::from_fn(|a| ddf[(item * 3 + a) * n + p])
        };
        let grad = match self.pass {
            Pass::Forward | Pass::Nearest => None,
            Pass::DdfGrad | Pass::ImageGrad => {
                let (g, layout) = args[2];
                if layout.shape().dims() != [b, c, h, w, d] {
                    bail!("warp: gradient shape {:?}", layout.shape());
                }
                Some(g)
            }
        };
        let mut out = Vec::new();
        match self.pass {
            Pass::Forward => {
                for item in 0..b {
                    let values = &image[item * c * n..][..c * n];
                    out.extend(per_position(n, c, |p, row: &mut [T]| {
                        let corners = corners(&geometry.sample(p, displacement(item, p)));
                        for (ch, slot) in row.iter_mut().enumerate() {
                            let plane = &values[ch * n..][..n];
                            let mut acc = T::default();
                            for (k, &(index, weight, _)) in corners.iter().enumerate() {
                                let term = plane[index] * weight;
                                acc = if k == 0 { term } else { acc + term };
                            }
                            *slot = acc;
                        }
                    }));
                }
                Ok((out, image_layout.shape().clone()))
            }
            Pass::Nearest => {
                for item in 0..b {
                    let values = &image[item * c * n..][..c * n];
                    out.extend(per_position(n, c, |p, row: &mut [T]| {
                        let u = displacement(item, p);
                        let index = geometry.index(p);
                        let at = (geometry.nearest(0, index[0], u[0])
                            + geometry.nearest(1, index[1], u[1]))
                            + geometry.nearest(2, index[2], u[2]);
                        for (ch, slot) in row.iter_mut().enumerate() {
                            *slot = values[ch * n + at];
                        }
                    }));
                }
                Ok((out, image_layout.shape().clone()))
            }
            Pass::DdfGrad => {
                let grad = grad.unwrap_or_default();
                for item in 0..b {
                    let values = &image[item * c * n..][..c * n];
                    let g = &grad[item * c * n..][..c * n];
                    out.extend(per_position(n, 3, |p, row: &mut [T]| {
                        let taps = geometry.sample(p, displacement(item, p));
                        let corners = corners(&taps);
                        let mut dq = [T::default(); 3];
                        for ch in 0..c {
                            let plane = &values[ch * n..][..n];
                            let upstream = g[ch * n + p];
                            for &(index, _, slopes) in &corners {
                                let v = plane[index] * upstream;
                                for a in 0..3 {
                                    dq[a] += v * slopes[a];
                                }
                            }
                        }
                        for a in 0..3 {
                            row[a] = dq[a] * taps[a].chain;
                        }
                    }));
                }
                Ok((out, ddf_layout.shape().clone()))
            }
            Pass::ImageGrad => {
                let grad = grad.unwrap_or_default();
                out = vec![T::default(); b * c * n];
                out.par_chunks_mut(n).enumerate().for_each(|(plane, dst)| {
                    let item = plane / c;
                    let g = &grad[plane * n..][..n];
                    for (p, &upstream) in g.iter().enumerate() {
                        let corners = corners(&geometry.sample(p, displacement(item, p)));
                        for &(index, weight, _) in &corners {
                            dst[index] += upstream * weight;
                        }
                    }
                });
                Ok((out, image_layout.shape().clone()))
            }
        }
    }
}

impl CustomOp2 for WarpKernel {
    fn name(&self) -> &'static str {
        "warp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run_cpu(self, &[(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        image: &Tensor,
        ddf: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let with = |pass| WarpKernel {
            padding: self.padding,
            pass,
        };
        let dimage = image
            .track_op()
            .then(|| image.apply_op3_no_bwd(ddf, &grad, &with(Pass::ImageGrad)))
            .transpose()?;
        let dddf = ddf
            .track_op()
            .then(|| image.apply_op3_no_bwd(ddf, &grad, &with(Pass::DdfGrad)))
            .transpose()?;
        Ok((dimage, dddf))
    }
}

impl CustomOp3 for WarpKernel {
    fn name(&self) -> &'static str {
        "warp-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run_cpu(self, &[(s1, l1), (s2, l2), (s3, l3)])
    }
}
