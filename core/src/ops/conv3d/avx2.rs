//! An f32 AVX2/FMA kernel for the rows of [`super::cpu::correlate_rows`]: the same
//! arithmetic as its `gemm` calls, without their per-call cost.
//!
//! `correlate_rows` makes one GEMM per tap group and row of `D` outputs (Co x D x taps*Ci),
//! 49 x 4096 calls for a 7-tap conv at 64^3; each call re-checks its arguments, picks a
//! kernel and packs the weights. Here the weights of every group are packed once per
//! convolution into panels of 16 output channels (`[kk][16]`, so a panel column is two
//! AVX registers), and a register tile of 16 channels x 6 voxels (12 accumulators) runs
//! the whole inner dimension, reading the channels-last input directly: voxel `j` of the
//! tile, input row `kk`, is one broadcast load at `x[j * Ci + kk]`.

use std::arch::x86_64::{
    __m256, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
    _mm256_storeu_ps,
};

use super::cpu::TapGroup;

/// Output channels per panel (two AVX registers of f32).
pub(super) const PANEL: usize = 16;

/// Output voxels per register tile.
const TILE: usize = 6;

/// Computes one row of outputs, channels-last: `row[j * Co + o] = Σ_g W_g[o, :] ·
/// input[(f0 + j + offset_g) * Ci ..]` for `j < n`, with `Co = panels[g].len() * 16`, from
/// panels of [`PANEL`] channels ([`super::cpu::pack_panels`]).
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`crate::ops::simd`]); `row` must hold `n * Co` values; for
/// every group, `input` must hold `(f0 + n - 1 + offset + taps) * Ci` values.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn row(
    input: &[f32],
    ci: usize,
    groups: &[TapGroup<f32>],
    panels: &[Vec<Vec<f32>>],
    f0: usize,
    n: usize,
    out: &mut [f32],
) {
    // LocalNet's hot convolutions read 32 or 64 input channels: with the voxel stride a
    // constant, the tile's six input reads are immediate offsets from one pointer.
    // SAFETY: forwarded from the caller.
    unsafe {
        match ci {
            32 => row_with::<32>(input, ci, groups, panels, f0, n, out),
            64 => row_with::<64>(input, ci, groups, panels, f0, n, out),
            _ => row_with::<0>(input, ci, groups, panels, f0, n, out),
        }
    }
}

/// [`row`] for `Ci == CI`, or any `Ci` when `CI == 0`.
///
/// # Safety
/// As [`row`]; `CI` is 0 or `ci`.
#[target_feature(enable = "avx2,fma")]
unsafe fn row_with<const CI: usize>(
    input: &[f32],
    ci: usize,
    groups: &[TapGroup<f32>],
    panels: &[Vec<Vec<f32>>],
    f0: usize,
    n: usize,
    row: &mut [f32],
) {
    debug_assert!(CI == 0 || CI == ci);
    let co = panels.first().map_or(0, |p| p.len() * PANEL);
    debug_assert!(row.len() >= n * co);
    for (gi, (group, group_panels)) in groups.iter().zip(panels).enumerate() {
        let k = group.taps * ci;
        let x0 = (f0 + group.offset) * ci;
        debug_assert!(x0 + (n - 1 + group.taps) * ci <= input.len());
        for (p, panel) in group_panels.iter().enumerate() {
            let mut j = 0;
            while j < n {
                let width = TILE.min(n - j);
                // SAFETY: the tile reads input[x0 + (j + t) * ci + kk] for t < width,
                // kk < k: below x0 + (n - 1) * ci + k, inside `input` (caller); it reads
                // and writes row[(j + t) * co + p * 16 + r] for r < 16, inside `row`.
                unsafe {
                    let x = input.as_ptr().add(x0 + j * ci);
                    let c = row.as_mut_ptr().add(j * co + p * PANEL);
                    match width {
                        6 => tile::<6, CI>(panel.as_ptr(), x, ci, k, c, co, gi > 0),
                        5 => tile::<5, CI>(panel.as_ptr(), x, ci, k, c, co, gi > 0),
                        4 => tile::<4, CI>(panel.as_ptr(), x, ci, k, c, co, gi > 0),
                        3 => tile::<3, CI>(panel.as_ptr(), x, ci, k, c, co, gi > 0),
                        2 => tile::<2, CI>(panel.as_ptr(), x, ci, k, c, co, gi > 0),
                        _ => tile::<1, CI>(panel.as_ptr(), x, ci, k, c, co, gi > 0),
                    }
                }
                j += width;
            }
        }
    }
}

/// `C[:, j] (+)= W (16 x k) · X[:, j]` for `j < N`: `w` is the packed panel (`[kk][16]`),
/// column `j` of `X` starts at `x + j * xs`, column `j` of `C` at `c + j * cs` (16
/// contiguous values). With `accumulate`, adds to `C`; otherwise overwrites it.
///
/// # Safety
/// AVX2 and FMA; `w` holds `16 k` values, `x + j * xs + kk` and `c + j * cs + r` are valid
/// for `j < N`, `kk < k`, `r < 16`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const N: usize, const XS: usize>(
    w: *const f32,
    x: *const f32,
    xs: usize,
    k: usize,
    c: *mut f32,
    cs: usize,
    accumulate: bool,
) {
    let xs = if XS == 0 { xs } else { XS };
    // SAFETY: every pointer below stays inside the ranges the caller guarantees.
    unsafe {
        let mut acc: [[__m256; 2]; N] = [[_mm256_setzero_ps(); 2]; N];
        let step = |acc: &mut [[__m256; 2]; N], kk: usize| {
            let w0 = _mm256_loadu_ps(w.add(kk * PANEL));
            let w1 = _mm256_loadu_ps(w.add(kk * PANEL + 8));
            for (j, a) in acc.iter_mut().enumerate() {
                let v = _mm256_broadcast_ss(&*x.add(j * xs + kk));
                a[0] = _mm256_fmadd_ps(w0, v, a[0]);
                a[1] = _mm256_fmadd_ps(w1, v, a[1]);
            }
        };
        // Two inner-dimension steps per iteration halve the loop's own instructions.
        let mut kk = 0;
        while kk + 2 <= k {
            step(&mut acc, kk);
            step(&mut acc, kk + 1);
            kk += 2;
        }
        if kk < k {
            step(&mut acc, kk);
        }
        for (j, a) in acc.iter().enumerate() {
            let dst = c.add(j * cs);
            if accumulate {
                let lo = std::arch::x86_64::_mm256_add_ps(_mm256_loadu_ps(dst), a[0]);
                let hi = std::arch::x86_64::_mm256_add_ps(_mm256_loadu_ps(dst.add(8)), a[1]);
                _mm256_storeu_ps(dst, lo);
                _mm256_storeu_ps(dst.add(8), hi);
            } else {
                _mm256_storeu_ps(dst, a[0]);
                _mm256_storeu_ps(dst.add(8), a[1]);
            }
        }
    }
}

/// Positions per weight-gradient tile: [`TILE`].
pub(super) const WG_TILE: usize = TILE;

/// The weight gradient's register tile at AVX2: `C[j] += Σ_{f < m} G[f] · X[f][j]` for
/// `j < n` (1 to [`WG_TILE`]), where `G[f]` is the 16 output channels at `g + f gs`,
/// `X[f][j]` the value at `x + f xs + j` and `C[j]` the 16 values at `c + j cs`.
///
/// # Safety
/// AVX2 and FMA; every address named above is valid for `f < m`, `j < n`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn wg_tile_any(
    n: usize,
    g: *const f32,
    gs: usize,
    x: *const f32,
    xs: usize,
    m: usize,
    c: *mut f32,
    cs: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match n {
            6 => wg_tile::<6>(g, gs, x, xs, m, c, cs),
            5 => wg_tile::<5>(g, gs, x, xs, m, c, cs),
            4 => wg_tile::<4>(g, gs, x, xs, m, c, cs),
            3 => wg_tile::<3>(g, gs, x, xs, m, c, cs),
            2 => wg_tile::<2>(g, gs, x, xs, m, c, cs),
            _ => wg_tile::<1>(g, gs, x, xs, m, c, cs),
        }
    }
}

/// [`wg_tile_any`] for `n == N`.
///
/// # Safety
/// As [`wg_tile_any`].
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn wg_tile<const N: usize>(
    g: *const f32,
    gs: usize,
    x: *const f32,
    xs: usize,
    m: usize,
    c: *mut f32,
    cs: usize,
) {
    // SAFETY: every pointer below stays inside the ranges the caller guarantees.
    unsafe {
        let mut acc: [[__m256; 2]; N] = [[_mm256_setzero_ps(); 2]; N];
        for f in 0..m {
            let row = g.add(f * gs);
            let g0 = _mm256_loadu_ps(row);
            let g1 = _mm256_loadu_ps(row.add(8));
            let xf = x.add(f * xs);
            for (j, a) in acc.iter_mut().enumerate() {
                let v = _mm256_broadcast_ss(&*xf.add(j));
                a[0] = _mm256_fmadd_ps(g0, v, a[0]);
                a[1] = _mm256_fmadd_ps(g1, v, a[1]);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let dst = c.add(j * cs);
            let lo = std::arch::x86_64::_mm256_add_ps(_mm256_loadu_ps(dst), a[0]);
            let hi = std::arch::x86_64::_mm256_add_ps(_mm256_loadu_ps(dst.add(8)), a[1]);
            _mm256_storeu_ps(dst, lo);
            _mm256_storeu_ps(dst.add(8), hi);
        }
    }
}
