//! CPU kernels of [`super::conv_transpose3d`] (kernel 3, stride 2, padding 1, output
//! padding 1) by sub-pixel (phase) decomposition, so that no inserted zero is multiplied.
//!
//! Per axis, `out[2u - 1 + a] += x[u] * w[a]`, so an output `t = 2m + p` of parity `p`
//! reads
//!
//! ```text
//! p = 0:  out[2m]     = x[m] * w[1]
//! p = 1:  out[2m + 1] = x[m] * w[2] + x[m + 1] * w[0]      (x[H] = 0)
//! ```
//!
//! Each of the 8 parity classes `(p0, p1, p2)` of the output is thus a correlation of `x`
//! (padded with one zero voxel at the high end of each axis) with 1 or 2 taps per axis, run
//! with the GEMM kernels of `cpu.rs` and scattered to voxels `2m + p`. The input gradient is
//! the adjoint: each parity class `g_p` of the output gradient, padded with one zero voxel
//! at the low end, is correlated with the same taps mirrored (`p = 0`: `g_p[u] * w[1]`;
//! `p = 1`: `g_p[u - 1] * w[0] + g_p[u] * w[2]`) and the 8 results are summed. The weight
//! gradient correlates `x` with each `g_p` over the taps of class `p`.

use candle_core::{Layout, Shape};

use super::cpu::{self, PaddedVolume, TapGroup};
use crate::ops::kernel::Float;

/// The taps of one axis for output parity `p`, as `(offset, a)`: the class reads voxel
/// `m + offset` of the high-padded input with kernel index `a`.
fn forward_taps(p: usize) -> &'static [(usize, usize)] {
    if p == 0 {
        &[(0, 1)]
    } else {
        &[(0, 2), (1, 0)]
    }
}

/// The taps of one axis for the input gradient from parity class `p`, as `(offset, a)`:
/// input voxel `u` reads voxel `u + offset` of the low-padded class `g_p` with kernel
/// index `a`.
fn adjoint_taps(p: usize) -> &'static [(usize, usize)] {
    if p == 0 {
        &[(1, 1)]
    } else {
        &[(0, 0), (1, 2)]
    }
}

/// The parity class `(p0, p1, p2)` of number `n < 8`.
fn phase(n: usize) -> [usize; 3] {
    [n >> 2 & 1, n >> 1 & 1, n & 1]
}

/// Sizes of one transposed-convolution call; `size` is the input's (the output is twice).
#[derive(Debug, Clone, Copy)]
pub(super) struct TransposedDims {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub size: [usize; 3],
}

impl TransposedDims {
    fn voxels(&self) -> usize {
        self.size.iter().product()
    }

    /// Voxel strides `(Wp*Dp, Dp)` of a volume padded by one voxel per axis.
    fn padded_strides(&self) -> [usize; 2] {
        [(self.size[1] + 1) * (self.size[2] + 1), self.size[2] + 1]
    }

    /// The tap groups of parity class `p`: one per pair of taps along the first two axes,
    /// with the taps of the last axis as consecutive voxels. `rows` x `cols` weights per
    /// tap, where `weight(r, s, a, b, c)` reads `w`.
    fn groups<T: Float>(
        &self,
        p: [usize; 3],
        taps: fn(usize) -> &'static [(usize, usize)],
        rows: usize,
        cols: usize,
        weight: impl Fn(usize, usize, usize, usize, usize) -> T,
    ) -> Vec<TapGroup<T>> {
        let [s0, s1] = self.padded_strides();
        let last = taps(p[2]);
        let mut groups = Vec::with_capacity(4);
        for &(oa, a) in taps(p[0]) {
            for &(ob, b) in taps(p[1]) {
                let mut weights = Vec::with_capacity(rows * last.len() * cols);
                for r in 0..rows {
                    for &(_, c) in last {
                        for s in 0..cols {
                            weights.push(weight(r, s, a, b, c));
                        }
                    }
                }
                groups.push(TapGroup {
                    offset: oa * s0 + ob * s1 + last[0].0,
                    taps: last.len(),
                    weights,
                });
            }
        }
        groups
    }
}

/// `w[i, o, a, b, c]` of a row-major `(Ci, Co, 3, 3, 3)` kernel.
fn kernel_at<T: Float>(w: &[T], co: usize) -> impl Fn(usize, usize, usize, usize, usize) -> T + '_ {
    move |i, o, a, b, c| w[(((i * co + o) * 3 + a) * 3 + b) * 3 + c]
}

/// The forward pass: `x` is `(B, Ci, H, W, D)`, `w` is `(Ci, Co, 3, 3, 3)`; returns
/// `(B, Co, 2H, 2W, 2D)`.
pub(super) fn forward<T: Float>(x: &[T], w: &[T], dims: &TransposedDims) -> Vec<T> {
    let (ci, co) = (dims.in_channels, dims.out_channels);
    let n = dims.voxels();
    let strides = dims.padded_strides();
    let span = cpu::span(dims.size, strides);
    let at = kernel_at(w, co);
    let classes: Vec<Vec<TapGroup<T>>> = (0..8)
        .map(|k| {
            dims.groups(phase(k), forward_taps, co, ci, |o, i, a, b, c| {
                at(i, o, a, b, c)
            })
        })
        .collect();
    let mut out = vec![T::default(); dims.batch * co * 8 * n];
    for (xb, ob) in x.chunks_exact(ci * n).zip(out.chunks_exact_mut(co * 8 * n)) {
        let padded = PaddedVolume::new(xb, ci, dims.size, [0; 3], [1; 3]);
        for (k, groups) in classes.iter().enumerate() {
            let result = cpu::correlate(&padded, groups, co, span);
            cpu::crop_to_subgrid(&result, co, dims.size, strides, 2, phase(k), ob);
        }
    }
    out
}

/// The input gradient `(B, Ci, H, W, D)` from the output gradient `g` `(B, Co, 2H, 2W, 2D)`.
pub(super) fn input_grad<T: Float>(g: &[T], w: &[T], dims: &TransposedDims) -> Vec<T> {
    let (ci, co) = (dims.in_channels, dims.out_channels);
    let n = dims.voxels();
    let strides = dims.padded_strides();
    let span = cpu::span(dims.size, strides);
    let at = kernel_at(w, co);
    let mut dx = vec![T::default(); dims.batch * ci * n];
    let mut class_dx = vec![T::default(); ci * n];
    for (gb, db) in g.chunks_exact(co * 8 * n).zip(dx.chunks_exact_mut(ci * n)) {
        for k in 0..8 {
            let p = phase(k);
            let groups = dims.groups(p, adjoint_taps, ci, co, &at);
            let padded = PaddedVolume::subgrid(gb, co, dims.size, 2, p, [1; 3], [0; 3]);
            let result = cpu::correlate(&padded, &groups, ci, span);
            cpu::crop(&result, ci, dims.size, strides, &mut class_dx);
            for (d, v) in db.iter_mut().zip(&class_dx) {
                *d += *v;
            }
        }
    }
    dx
}

/// The weight gradient `(Ci, Co, 3, 3, 3)` from the input `x` and output gradient `g`.
pub(super) fn weight_grad<T: Float>(x: &[T], g: &[T], dims: &TransposedDims) -> Vec<T> {
    let (ci, co) = (dims.in_channels, dims.out_channels);
    let n = dims.voxels();
    let strides = dims.padded_strides();
    let [s0, s1] = strides;
    let span = cpu::span(dims.size, strides);
    let mut dw = vec![T::default(); ci * co * 27];
    for (xb, gb) in x.chunks_exact(ci * n).zip(g.chunks_exact(co * 8 * n)) {
        let xp = PaddedVolume::new(xb, ci, dims.size, [0; 3], [1; 3]);
        for k in 0..8 {
            let p = phase(k);
            // The class gradient at output voxel m sits at padded position m (zeros beyond).
            let gp = PaddedVolume::subgrid(gb, co, dims.size, 2, p, [0; 3], [1; 3]);
            let last = forward_taps(p[2]);
            let mut pairs = Vec::with_capacity(4);
            let mut groups = Vec::with_capacity(4);
            for &(oa, a) in forward_taps(p[0]) {
                for &(ob, b) in forward_taps(p[1]) {
                    groups.push((oa * s0 + ob * s1 + last[0].0, last.len()));
                    pairs.push((a, b));
                }
            }
            let per_group = cpu::correlate_weight_grad(&xp, &gp, 0, &groups, span);
            for (gw, &(a, b)) in per_group.iter().zip(&pairs) {
                for o in 0..co {
                    for (t, &(_, c)) in last.iter().enumerate() {
                        for i in 0..ci {
                            dw[(((i * co + o) * 3 + a) * 3 + b) * 3 + c] +=
                                gw[(o * last.len() + t) * ci + i];
                        }
                    }
                }
            }
        }
    }
    dw
}

/// Which computation a [`TransposedKernel`](super::TransposedKernel) runs, with the shapes
/// its result takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TransposedPass {
    /// Arguments `(x, w)`.
    Forward,
    /// Arguments `(grad_out, w)`.
    InputGrad,
    /// Arguments `(grad_out, x)`.
    WeightGrad,
}

impl TransposedPass {
    /// Runs the pass on contiguous slices `a` and `b` with layouts `la` and `lb`.
    pub(super) fn run<T: Float>(
        self,
        a: &[T],
        la: &Layout,
        b: &[T],
        lb: &Layout,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        match self {
            TransposedPass::Forward => {
                let (batch, ci, h, w, d) = la.shape().dims5()?;
                let co = lb.shape().dims5()?.1;
                let dims = TransposedDims {
                    batch,
                    in_channels: ci,
                    out_channels: co,
                    size: [h, w, d],
                };
                let out = forward(a, b, &dims);
                Ok((out, Shape::from((batch, co, 2 * h, 2 * w, 2 * d))))
            }
            TransposedPass::InputGrad => {
                let (batch, co, h2, w2, d2) = la.shape().dims5()?;
                let ci = lb.shape().dims5()?.0;
                let dims = TransposedDims {
                    batch,
                    in_channels: ci,
                    out_channels: co,
                    size: [h2 / 2, w2 / 2, d2 / 2],
                };
                let out = input_grad(a, b, &dims);
                Ok((out, Shape::from((batch, ci, h2 / 2, w2 / 2, d2 / 2))))
            }
            TransposedPass::WeightGrad => {
                let (batch, co, ..) = la.shape().dims5()?;
                let (_, ci, h, w, d) = lb.shape().dims5()?;
                let dims = TransposedDims {
                    batch,
                    in_channels: ci,
                    out_channels: co,
                    size: [h, w, d],
                };
                let out = weight_grad(b, a, &dims);
                Ok((out, Shape::from((ci, co, 3, 3, 3))))
            }
        }
    }
}
