//! CPU kernels of the 3D convolution: one GEMM per group of kernel taps on a zero-padded,
//! channels-last copy of the input, without an im2col buffer.
//!
//! Let `Xp` be the input padded to `(Hp, Wp, Dp)` and stored channels-last, so voxel `q`
//! of channel `i` sits at `Xp[q * Ci + i]`. Index the outputs by their padded-stride
//! position `f = h*Wp*Dp + w*Dp + d`; the input that kernel tap `(a, b, c)` reads for `f`
//! is then voxel `f + a*Wp*Dp + b*Dp + c`. For a fixed `(a, b)` the `k` taps along the
//! last axis read consecutive voxels, so their `k * Ci` input rows are one matrix with row
//! stride 1 and column stride `Ci`, and
//! `out[f, :] += W_ab[Co, k*Ci] x Xp[(f + a*Wp*Dp + b*Dp)*Ci ..]`
//! is a single GEMM with an inner dimension of `k * Ci`.
//!
//! [`correlate_rows`] (the forward pass and the input gradient of `conv3d`) runs these
//! products one `(h, w)` row of `D` valid outputs at a time, with the AVX2 register tile of
//! `avx2.rs` where it applies, and writes channels-first directly. [`correlate`] (used by
//! the transposed convolution) runs them over long blocks of consecutive positions `f`
//! instead: positions with `w >= W` or `d >= D` are computed too (they read the padding of
//! the next row) and dropped by [`crop`]; the waste is about `Wp*Dp / (W*D)`.

use gemm::{gemm, Parallelism};

use crate::ops::kernel::Float;
use rayon::prelude::*;

/// Output voxels per GEMM in the forward sweep: small enough that a block of outputs stays
/// in the L2 cache while all tap groups accumulate into it.
const VOXELS_PER_BLOCK: usize = 1024;

/// A zero-padded, channels-last copy of one volume.
#[derive(Debug)]
pub(super) struct PaddedVolume<T> {
    /// `data[((h * wp) + w) * dp + d) * channels + c]`.
    pub data: Vec<T>,
    /// Number of channels (the fastest axis).
    pub channels: usize,
}

impl<T: Float> PaddedVolume<T> {
    /// Copies a channels-first `(C, H, W, D)` volume, with `lo[i]` zero voxels before and
    /// `hi[i]` after it along spatial axis `i`.
    pub fn new(
        src: &[T],
        channels: usize,
        size: [usize; 3],
        lo: [usize; 3],
        hi: [usize; 3],
    ) -> Self {
        Self::subgrid(src, channels, size, 1, [0; 3], lo, hi)
    }

    /// Copies one stride-`step` sub-grid of a channels-first `(C, step*H, step*W, step*D)`
    /// volume, voxel `m` of the copy being voxel `step*m + phase` of `src`, with `lo[i]`
    /// zero voxels before and `hi[i]` after it along spatial axis `i`. `size` is the
    /// sub-grid's `(H, W, D)`.
    pub fn subgrid(
        src: &[T],
        channels: usize,
        size: [usize; 3],
        step: usize,
        phase: [usize; 3],
        lo: [usize; 3],
        hi: [usize; 3],
    ) -> Self {
        let [h, w, d] = size;
        let full = size.map(|s| s * step);
        let dims = [h + lo[0] + hi[0], w + lo[1] + hi[1], d + lo[2] + hi[2]];
        let mut data = vec![T::default(); dims[0] * dims[1] * dims[2] * channels];
        let plane = full[0] * full[1] * full[2];
        debug_assert_eq!(src.len(), plane * channels);
        // One task per padded `h` plane that holds data (a copy of 100+ MB at 96x96x104
        // with 32 channels is worth both cores).
        let padded_plane = dims[1] * dims[2] * channels;
        data.par_chunks_mut(padded_plane)
            .skip(lo[0])
            .take(h)
            .enumerate()
            .for_each(|(ih, dst_plane)| {
                for iw in 0..w {
                    let row = (iw + lo[1]) * dims[2] + lo[2];
                    let dst = &mut dst_plane[row * channels..(row + d) * channels];
                    let src_row = ((step * ih + phase[0]) * full[1] + step * iw + phase[1])
                        * full[2]
                        + phase[2];
                    for c in 0..channels {
                        let src_c = &src[c * plane + src_row..];
                        for id in 0..d {
                            dst[id * channels + c] = src_c[step * id];
                        }
                    }
                }
            });
        Self { data, channels }
    }
}

impl<T: Float> PaddedVolume<T> {
    /// Folds `taps` neighbours along one axis into the channels: voxel `q` of the result
    /// holds, at channel `t * C + i`, channel `i` of voxel `q + t * stride` of `self` (zero
    /// past the end). A correlation whose taps along that axis read consecutive
    /// `stride`-apart voxels then reads `taps` times more channels from one voxel, which
    /// gives its GEMMs a `taps` times longer inner dimension (worth it for few channels).
    pub fn fold(&self, taps: usize, stride: usize) -> Self {
        let c = self.channels;
        let voxels = self.data.len() / c;
        let mut data = vec![T::default(); voxels * taps * c];
        data.par_chunks_exact_mut(taps * c)
            .enumerate()
            .for_each(|(q, dst)| {
                for (t, dst_t) in dst.chunks_exact_mut(c).enumerate() {
                    let src = q + t * stride;
                    if src < voxels {
                        dst_t.copy_from_slice(&self.data[src * c..(src + 1) * c]);
                    }
                }
            });
        Self {
            data,
            channels: taps * c,
        }
    }
}

/// Copies the valid positions of a padded-stride, channels-last result (`src[f * C + c]`,
/// `f = h*Wp*Dp + w*Dp + d`, with `src_strides = (Wp*Dp, Dp)`) into a channels-first
/// `(C, H, W, D)` volume `dst` of spatial `size`.
pub(super) fn crop<T: Float>(
    src: &[T],
    channels: usize,
    size: [usize; 3],
    src_strides: [usize; 2],
    dst: &mut [T],
) {
    let [h, w, d] = size;
    let plane = h * w * d;
    debug_assert_eq!(dst.len(), plane * channels);
    for ih in 0..h {
        for iw in 0..w {
            let f0 = ih * src_strides[0] + iw * src_strides[1];
            let o0 = (ih * w + iw) * d;
            for c in 0..channels {
                let dst_c = &mut dst[c * plane + o0..c * plane + o0 + d];
                for (id, v) in dst_c.iter_mut().enumerate() {
                    *v = src[(f0 + id) * channels + c];
                }
            }
        }
    }
}

/// Like [`crop`], but writes voxel `m` of the `size` result to voxel `step*m + phase` of
/// the channels-first `(C, step*H, step*W, step*D)` volume `dst`.
pub(super) fn crop_to_subgrid<T: Float>(
    src: &[T],
    channels: usize,
    size: [usize; 3],
    src_strides: [usize; 2],
    step: usize,
    phase: [usize; 3],
    dst: &mut [T],
) {
    let [h, w, d] = size;
    let full = size.map(|s| s * step);
    let plane = full[0] * full[1] * full[2];
    debug_assert_eq!(dst.len(), plane * channels);
    for ih in 0..h {
        for iw in 0..w {
            let f0 = ih * src_strides[0] + iw * src_strides[1];
            let o0 = ((step * ih + phase[0]) * full[1] + step * iw + phase[1]) * full[2] + phase[2];
            for c in 0..channels {
                let dst_c = &mut dst[c * plane + o0..];
                for id in 0..d {
                    dst_c[step * id] = src[(f0 + id) * channels + c];
                }
            }
        }
    }
}

/// Kernel taps that read consecutive voxels, run as one GEMM.
#[derive(Debug, Clone)]
pub(super) struct TapGroup<T> {
    /// Voxel offset (in the padded volume) that the first tap reads for output `f = 0`.
    pub offset: usize,
    /// Number of taps; tap `t` reads voxel `offset + t`.
    pub taps: usize,
    /// Row-major `(Co, taps * Ci)` weights; column `t * Ci + i` multiplies input channel
    /// `i` read by tap `t`.
    pub weights: Vec<T>,
}

/// Number of padded-stride positions that cover every valid output voxel of a `size`
/// volume: `(H-1)*Wp*Dp + (W-1)*Dp + D`.
pub(super) fn span(size: [usize; 3], strides: [usize; 2]) -> usize {
    (size[0] - 1) * strides[0] + (size[1] - 1) * strides[1] + size[2]
}

/// Computes `out[f * Co + o] = sum_groups W_g[o, :] . Xp[(f + offset_g) * Ci ..]` for the
/// first `span` positions `f`, in parallel over blocks of positions.
pub(super) fn correlate<T: Float>(
    input: &PaddedVolume<T>,
    groups: &[TapGroup<T>],
    out_channels: usize,
    span: usize,
) -> Vec<T> {
    let ci = input.channels;
    let co = out_channels;
    let mut out = vec![T::default(); span * co];
    if span == 0 || co == 0 {
        return out;
    }
    out.par_chunks_mut(VOXELS_PER_BLOCK * co)
        .enumerate()
        .for_each(|(block, dst)| {
            let f0 = block * VOXELS_PER_BLOCK;
            let n = dst.len() / co;
            for (gi, group) in groups.iter().enumerate() {
                tap_group_gemm(dst, n, group, &input.data, f0 + group.offset, ci, gi > 0);
            }
        });
    out
}

/// [`correlate`] at the valid positions only, written straight into the channels-first
/// `(Co, H, W, D)` volume `dst`: the tap groups run per `(h, w)` row of `D` outputs, so the
/// padded-stride positions that [`correlate`] computes and [`crop`] drops (about
/// `Wp*Dp / (W*D) - 1` of the work: 20% for a 7-tap kernel at 64^3) are never computed,
/// and each row's `Co x D` block stays in the L1 cache while all groups accumulate into it.
/// f32 with `Co` a multiple of 32 on an AVX-512 CPU runs [`super::avx512`], with `Co` a
/// multiple of 16 on an AVX2/FMA CPU [`super::avx2`] (the level as [`crate::ops::simd`]
/// allows); everything else one `gemm` call per group and row. With an `epilogue`, each value is mapped as it
/// is written. Parallel over `h`.
pub(super) fn correlate_rows<T: Float>(
    input: &PaddedVolume<T>,
    groups: &[TapGroup<T>],
    out_channels: usize,
    size: [usize; 3],
    strides: [usize; 2],
    epilogue: Option<&Epilogue>,
    dst: &mut [T],
) {
    let ci = input.channels;
    let co = out_channels;
    assert_eq!(
        dst.len(),
        co * size.iter().product::<usize>(),
        "conv3d kernel: destination size"
    );
    if dst.is_empty() {
        return;
    }
    for group in groups {
        // The last row's GEMM reads up to voxel span - 1 + offset + taps - 1.
        let end = span(size, strides) - 1 + group.offset + group.taps;
        assert!(
            end * ci <= input.data.len() && group.weights.len() == co * group.taps * ci,
            "conv3d kernel: tap group out of the padded input"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        use crate::ops::simd::{simd_level, SimdLevel};
        let level = simd_level();
        let kernel = if level >= SimdLevel::Avx512 && co.is_multiple_of(super::avx512::PANEL) {
            Some((super::avx512::PANEL, SimdLevel::Avx512))
        } else if level >= SimdLevel::Avx2 && co.is_multiple_of(super::avx2::PANEL) {
            Some((super::avx2::PANEL, SimdLevel::Avx2))
        } else {
            None
        };
        if let Some((panel, kernel)) = kernel {
            // SAFETY: T is f32 (checked above), so these are the same slices retyped.
            let (data, groups) = unsafe {
                (
                    std::slice::from_raw_parts(input.data.as_ptr().cast::<f32>(), input.data.len()),
                    &*(groups as *const [TapGroup<T>] as *const [TapGroup<f32>]),
                )
            };
            let panels = pack_panels(groups, co, ci, panel);
            for_each_row(size, strides, co, epilogue, dst, |f0, row: &mut [T]| {
                // SAFETY: T is f32; the CPU has the kernel's instructions (the level is at
                // most the detected one); row holds d * co values and every group's reads
                // end inside the input (asserted above).
                unsafe {
                    let row =
                        std::slice::from_raw_parts_mut(row.as_mut_ptr().cast::<f32>(), row.len());
                    if kernel == SimdLevel::Avx512 {
                        super::avx512::row(data, ci, groups, &panels, f0, size[2], row);
                    } else {
                        super::avx2::row(data, ci, groups, &panels, f0, size[2], row);
                    }
                }
            });
            return;
        }
    }
    for_each_row(size, strides, co, epilogue, dst, |f0, row: &mut [T]| {
        for (gi, group) in groups.iter().enumerate() {
            tap_group_gemm(
                row,
                size[2],
                group,
                &input.data,
                f0 + group.offset,
                ci,
                gi > 0,
            );
        }
    });
}

/// The weights of every group, packed in panels of `panel` output channels:
/// `panels[g][p][kk * panel + r]` is row `p * panel + r` (an output channel), column `kk` of
/// group `g`'s `(Co, taps * Ci)` weights. `Co` must be a multiple of `panel`.
pub(super) fn pack_panels(
    groups: &[TapGroup<f32>],
    co: usize,
    ci: usize,
    panel: usize,
) -> Vec<Vec<Vec<f32>>> {
    groups
        .iter()
        .map(|g| {
            let k = g.taps * ci;
            (0..co / panel)
                .map(|p| {
                    let mut packed = Vec::with_capacity(k * panel);
                    for kk in 0..k {
                        for r in 0..panel {
                            packed.push(g.weights[(p * panel + r) * k + kk]);
                        }
                    }
                    packed
                })
                .collect()
        })
        .collect()
}

/// One tap group's product for `n` consecutive positions, one single-threaded `gemm`:
/// `dst[j * Co + o] (+)= Σ_kk weights[o * k + kk] * input[(voxel + j) * Ci + kk]` for
/// `j < n`, `k = taps * Ci`, where `voxel` is the padded voxel the group's first tap reads
/// for the first position. Adds to `dst` with `accumulate`, overwrites it otherwise.
fn tap_group_gemm<T: Float>(
    dst: &mut [T],
    n: usize,
    group: &TapGroup<T>,
    input: &[T],
    voxel: usize,
    ci: usize,
    accumulate: bool,
) {
    let k = group.taps * ci;
    let co = group.weights.len() / k.max(1);
    let first = voxel * ci;
    assert!(
        n > 0
            && dst.len() >= co * n
            && group.weights.len() == co * k
            && first + (n - 1 + group.taps) * ci <= input.len(),
        "conv3d kernel: tap group out of the padded input"
    );
    // SAFETY: dst is (co x n) with column stride co and row stride 1, inside `dst`; lhs is
    // the (co x k) row-major weights; rhs (k x n) reads input[first + j*ci + kk] for
    // j < n, kk < k, whose largest index first + (n-1)*ci + taps*ci - 1 is inside `input`
    // (all asserted above).
    unsafe {
        gemm(
            co,
            n,
            k,
            dst.as_mut_ptr(),
            co as isize,
            1,
            accumulate,
            group.weights.as_ptr(),
            1,
            k as isize,
            input.as_ptr().add(first),
            ci as isize,
            1,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Runs `row_fn(f0, row)` for every `(h, w)` row of a `size` output, `f0 = h*s0 + w*s1`
/// being its first padded-stride position and `row` a channels-last `D x Co` scratch, and
/// copies each row into the channels-first `(Co, H, W, D)` volume `dst`, through the
/// `epilogue` if any. Parallel over `h`.
fn for_each_row<T: Float>(
    size: [usize; 3],
    strides: [usize; 2],
    co: usize,
    epilogue: Option<&Epilogue>,
    dst: &mut [T],
    row_fn: impl Fn(usize, &mut [T]) + Sync,
) {
    let [h, w, d] = size;
    let plane = w * d;
    debug_assert_eq!(dst.len(), co * h * plane);
    let map = epilogue.map(|e| e.coefficients::<T>(co));
    let out = SharedOut(dst.as_mut_ptr());
    (0..h).into_par_iter().for_each(|ih| {
        let mut row = vec![T::default(); d * co];
        for iw in 0..w {
            row_fn(ih * strides[0] + iw * strides[1], &mut row);
            let base = ih * plane + iw * d;
            for o in 0..co {
                // SAFETY: base + o * h * plane + id < co * h * plane = dst.len(), and only
                // the task of this `ih` writes row (ih, iw) of any channel.
                unsafe {
                    let dst_row = out.at(o * h * plane + base);
                    match &map {
                        None => {
                            for id in 0..d {
                                *dst_row.add(id) = row[id * co + o];
                            }
                        }
                        Some((scale, shift, relu)) => {
                            let zero = T::default();
                            for id in 0..d {
                                let v = row[id * co + o] * scale[o] + shift[o];
                                // `v < 0`, not `!(v > 0)`: NaN stays NaN, as in PyTorch.
                                *dst_row.add(id) = if *relu && v < zero { zero } else { v };
                            }
                        }
                    }
                }
            }
        }
    });
}

/// A per-output-channel map applied to a convolution's output as it is written:
/// `relu?(y * scale[o] + shift[o])`; an eval-mode BatchNorm (and its ReLU) folded into
/// the convolution.
#[derive(Debug, Clone, PartialEq)]
pub struct Epilogue {
    /// Per output channel factor.
    pub scale: Vec<f64>,
    /// Per output channel offset.
    pub shift: Vec<f64>,
    /// Whether a ReLU follows.
    pub relu: bool,
}

impl Epilogue {
    pub(super) fn coefficients<T: Float>(&self, co: usize) -> (Vec<T>, Vec<T>, bool) {
        debug_assert!(self.scale.len() == co && self.shift.len() == co);
        let cast = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
        (cast(&self.scale), cast(&self.shift), self.relu)
    }
}

/// The destination pointer of [`correlate_rows`], shared by the tasks that write its
/// disjoint rows.
struct SharedOut<T>(*mut T);

impl<T> SharedOut<T> {
    /// The pointer to element `i` (a method, so that closures capture the whole wrapper).
    ///
    /// # Safety
    /// `i` must be inside the buffer.
    unsafe fn at(&self, i: usize) -> *mut T {
        // SAFETY: the caller keeps i inside the buffer.
        unsafe { self.0.add(i) }
    }
}

// SAFETY: every task writes a disjoint set of elements (its own `h` rows) and the buffer
// outlives the parallel loop that uses the pointer.
unsafe impl<T: Send> Sync for SharedOut<T> {}
unsafe impl<T: Send> Send for SharedOut<T> {}

/// Gradient of [`correlate`] with respect to the group weights:
/// `dW_g[o, t*Ci + i] = sum_f G[f, o] * Xp[(f + offset_g + t) * Ci + i]`, where `grad`
/// holds `G[f, o]` at `grad.data[(f + grad_shift) * Co + o]` (zero at the positions that
/// are not valid outputs). Returns one weight vector per group, laid out as
/// [`TapGroup::weights`].
pub(super) fn correlate_weight_grad<T: Float>(
    input: &PaddedVolume<T>,
    grad: &PaddedVolume<T>,
    grad_shift: usize,
    groups: &[(usize, usize)],
    span: usize,
) -> Vec<Vec<T>> {
    let ci = input.channels;
    let co = grad.channels;
    let sizes: Vec<usize> = groups.iter().map(|&(_, taps)| co * taps * ci).collect();
    let zero = || {
        sizes
            .iter()
            .map(|&s| vec![T::default(); s])
            .collect::<Vec<_>>()
    };
    if span == 0 {
        return zero();
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(out) = weight_grad_tiles(input, grad, grad_shift, groups, span) {
        return out;
    }
    let blocks = (rayon::current_num_threads() * 2).clamp(1, span);
    let block_len = span.div_ceil(blocks);
    (0..span.div_ceil(block_len))
        .into_par_iter()
        .map(|block| {
            let f0 = block * block_len;
            let n = block_len.min(span - f0);
            let mut acc = zero();
            for (&(offset, taps), dst) in groups.iter().zip(acc.iter_mut()) {
                let k = taps * ci;
                let rhs_first = (f0 + offset) * ci;
                let lhs_first = (f0 + grad_shift) * co;
                assert!(
                    rhs_first + (n - 1 + taps) * ci <= input.data.len()
                        && lhs_first + n * co <= grad.data.len(),
                    "conv3d weight gradient: tap group out of the padded volumes"
                );
                // SAFETY: dst is (co x k) row-major; lhs (co x n) reads
                // grad.data[lhs_first + j*co + o] < lhs_first + n*co; rhs (n x k) reads
                // input.data[rhs_first + j*ci + kk] < rhs_first + (n-1+taps)*ci; both
                // bounds are asserted above.
                unsafe {
                    gemm(
                        co,
                        k,
                        n,
                        dst.as_mut_ptr(),
                        1,
                        k as isize,
                        false,
                        grad.data.as_ptr().add(lhs_first),
                        co as isize,
                        1,
                        input.data.as_ptr().add(rhs_first),
                        1,
                        ci as isize,
                        T::ONE,
                        T::ONE,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
            acc
        })
        .reduce(zero, |mut a, b| {
            for (x, y) in a.iter_mut().zip(b) {
                for (p, q) in x.iter_mut().zip(y) {
                    *p += q;
                }
            }
            a
        })
}

/// Output positions per chunk of the weight-gradient tiles: a chunk's gradient rows
/// (`256 Co` values) and input rows stay in L2 while every tap group and tile sweeps them.
#[cfg(target_arch = "x86_64")]
const WG_CHUNK: usize = 256;

/// [`correlate_weight_grad`] with a SIMD register tile (`avx512.rs` or `avx2.rs`
/// `wg_tile_any`), when the level allows one, the values are f32 and `Co` is a multiple of
/// its panel (32 or 16 output channels); `None` otherwise. The tile is the forward tile's
/// with the reduction over output positions: a panel of output channels (registers loaded
/// from one gradient row) x consecutive `kk`, each broadcast input value feeding two FMAs.
#[cfg(target_arch = "x86_64")]
fn weight_grad_tiles<T: Float>(
    input: &PaddedVolume<T>,
    grad: &PaddedVolume<T>,
    grad_shift: usize,
    groups: &[(usize, usize)],
    span: usize,
) -> Option<Vec<Vec<T>>> {
    use crate::ops::simd::{simd_level, SimdLevel};
    let (ci, co) = (input.channels, grad.channels);
    let level = simd_level();
    let (panel, width) = if level >= SimdLevel::Avx512 && co.is_multiple_of(super::avx512::PANEL) {
        (super::avx512::PANEL, super::avx512::WG_TILE)
    } else if level >= SimdLevel::Avx2 && co.is_multiple_of(super::avx2::PANEL) {
        (super::avx2::PANEL, super::avx2::WG_TILE)
    } else {
        return None;
    };
    let (x, g) = (T::as_f32(&input.data)?, T::as_f32(&grad.data)?);
    for &(offset, taps) in groups {
        assert!(
            (span - 1 + offset + taps) * ci <= x.len() && (span + grad_shift) * co <= g.len(),
            "conv3d weight gradient: tap group out of the padded volumes"
        );
    }
    // Per group, (taps Ci x Co): row kk holds the Co values of one weight-gradient column.
    let zero = || {
        groups
            .iter()
            .map(|&(_, taps)| vec![0f32; taps * ci * co])
            .collect::<Vec<_>>()
    };
    let tile = |n: usize, gp: *const f32, xp: *const f32, m: usize, cp: *mut f32| {
        // SAFETY: the level has the tile's features (checked above, capped by the CPU's);
        // the callers below keep every address inside the asserted bounds.
        unsafe {
            if panel == super::avx512::PANEL {
                super::avx512::wg_tile_any(n, gp, co, xp, ci, m, cp, co);
            } else {
                super::avx2::wg_tile_any(n, gp, co, xp, ci, m, cp, co);
            }
        }
    };
    let blocks = (rayon::current_num_threads() * 2).clamp(1, span);
    let block_len = span.div_ceil(blocks);
    let transposed = (0..span.div_ceil(block_len))
        .into_par_iter()
        .map(|block| {
            let f0 = block * block_len;
            let end = (f0 + block_len).min(span);
            let mut acc = zero();
            let mut c0 = f0;
            while c0 < end {
                let m = WG_CHUNK.min(end - c0);
                for (&(offset, taps), dst) in groups.iter().zip(acc.iter_mut()) {
                    let k = taps * ci;
                    for p in 0..co / panel {
                        let mut kk = 0;
                        while kk < k {
                            let n = width.min(k - kk);
                            // The tile reads g[(c0 + shift + f) co + p panel + r] and
                            // x[(c0 + offset + f) ci + kk + j] for f < m <= span - c0,
                            // r < panel, j < n <= k - kk: inside both (asserted above); it
                            // adds to dst[(kk + j) co + p panel + r] < k co = dst.len().
                            let gp = g[(c0 + grad_shift) * co + p * panel..].as_ptr();
                            let xp = x[(c0 + offset) * ci + kk..].as_ptr();
                            let cp = dst[kk * co + p * panel..].as_mut_ptr();
                            tile(n, gp, xp, m, cp);
                            kk += n;
                        }
                    }
                }
                c0 += m;
            }
            acc
        })
        .reduce(zero, |mut a, b| {
            for (x, y) in a.iter_mut().zip(b) {
                for (p, q) in x.iter_mut().zip(y) {
                    *p += q;
                }
            }
            a
        });
    // (taps Ci x Co) per group, to the (Co x taps Ci) of the other paths.
    transposed
        .into_iter()
        .map(|t| {
            let k = t.len() / co;
            let mut out = vec![0f32; t.len()];
            for (kk, row) in t.chunks_exact(co).enumerate() {
                for (o, v) in row.iter().enumerate() {
                    out[o * k + kk] = *v;
                }
            }
            T::from_f32(out)
        })
        .collect()
}
