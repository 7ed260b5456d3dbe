//! The AVX-512 kernel for the rows of [`super::cpu::correlate_rows`]: [`super::avx2`]'s
//! register tile at twice the width. Weights are packed in panels of 32 output channels
//! (`[kk][32]`, a panel column is two ZMM registers) and a tile of 32 channels x 12 voxels
//! keeps 24 accumulators of AVX-512's 32 registers busy, so each broadcast input value
//! feeds two 16-lane FMAs, as in the AVX2 tile, but over twice the channels.

use std::arch::x86_64::{
    __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
    _mm512_storeu_ps,
};

use super::cpu::TapGroup;

/// Output channels per panel (two AVX-512 registers of f32).
pub(super) const PANEL: usize = 32;

/// Output voxels per register tile.
const TILE: usize = 12;

/// Computes one row of outputs, channels-last, exactly as [`super::avx2::row`] does, from
/// panels of [`PANEL`] channels ([`super::cpu::pack_panels`]).
///
/// # Safety
/// The CPU must have AVX-512F ([`crate::ops::simd`]); `row` must hold `n * Co` values; for
/// every group, `input` must hold `(f0 + n - 1 + offset + taps) * Ci` values.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn row(
    input: &[f32],
    ci: usize,
    groups: &[TapGroup<f32>],
    panels: &[Vec<Vec<f32>>],
    f0: usize,
    n: usize,
    out: &mut [f32],
) {
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
#[target_feature(enable = "avx512f")]
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
                let acc = gi > 0;
                // SAFETY: the tile reads input[x0 + (j + t) * ci + kk] for t < width,
                // kk < k: below x0 + (n - 1) * ci + k, inside `input` (caller); it reads
                // and writes row[(j + t) * co + p * 32 + r] for r < 32, inside `row`.
                unsafe {
                    let w = panel.as_ptr();
                    let x = input.as_ptr().add(x0 + j * ci);
                    let c = row.as_mut_ptr().add(j * co + p * PANEL);
                    match width {
                        12 => tile::<12, CI>(w, x, ci, k, c, co, acc),
                        11 => tile::<11, CI>(w, x, ci, k, c, co, acc),
                        10 => tile::<10, CI>(w, x, ci, k, c, co, acc),
                        9 => tile::<9, CI>(w, x, ci, k, c, co, acc),
                        8 => tile::<8, CI>(w, x, ci, k, c, co, acc),
                        7 => tile::<7, CI>(w, x, ci, k, c, co, acc),
                        6 => tile::<6, CI>(w, x, ci, k, c, co, acc),
                        5 => tile::<5, CI>(w, x, ci, k, c, co, acc),
                        4 => tile::<4, CI>(w, x, ci, k, c, co, acc),
                        3 => tile::<3, CI>(w, x, ci, k, c, co, acc),
                        2 => tile::<2, CI>(w, x, ci, k, c, co, acc),
                        _ => tile::<1, CI>(w, x, ci, k, c, co, acc),
                    }
                }
                j += width;
            }
        }
    }
}

/// `C[:, j] (+)= W (32 x k) · X[:, j]` for `j < N`: `w` is the packed panel (`[kk][32]`),
/// column `j` of `X` starts at `x + j * xs`, column `j` of `C` at `c + j * cs` (32
/// contiguous values). With `accumulate`, adds to `C`; otherwise overwrites it.
///
/// # Safety
/// AVX-512F; `w` holds `32 k` values, `x + j * xs + kk` and `c + j * cs + r` are valid for
/// `j < N`, `kk < k`, `r < 32`.
#[target_feature(enable = "avx512f")]
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
        let mut acc: [[__m512; 2]; N] = [[_mm512_setzero_ps(); 2]; N];
        for kk in 0..k {
            let w0 = _mm512_loadu_ps(w.add(kk * PANEL));
            let w1 = _mm512_loadu_ps(w.add(kk * PANEL + 16));
            for (j, a) in acc.iter_mut().enumerate() {
                let v = _mm512_set1_ps(*x.add(j * xs + kk));
                a[0] = _mm512_fmadd_ps(w0, v, a[0]);
                a[1] = _mm512_fmadd_ps(w1, v, a[1]);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let dst = c.add(j * cs);
            if accumulate {
                _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), a[0]));
                _mm512_storeu_ps(
                    dst.add(16),
                    _mm512_add_ps(_mm512_loadu_ps(dst.add(16)), a[1]),
                );
            } else {
                _mm512_storeu_ps(dst, a[0]);
                _mm512_storeu_ps(dst.add(16), a[1]);
            }
        }
    }
}

/// Positions per weight-gradient tile: [`TILE`].
pub(super) const WG_TILE: usize = TILE;

/// [`wg_tile`] for a width `n` of 1 to [`WG_TILE`] (`kk` values): `C[j] += Σ_{f < m}
/// G[f] · X[f][j]` over 32 output channels.
///
/// # Safety
/// As [`wg_tile`], with `N = n`.
#[target_feature(enable = "avx512f")]
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
            12 => wg_tile::<12>(g, gs, x, xs, m, c, cs),
            11 => wg_tile::<11>(g, gs, x, xs, m, c, cs),
            10 => wg_tile::<10>(g, gs, x, xs, m, c, cs),
            9 => wg_tile::<9>(g, gs, x, xs, m, c, cs),
            8 => wg_tile::<8>(g, gs, x, xs, m, c, cs),
            7 => wg_tile::<7>(g, gs, x, xs, m, c, cs),
            6 => wg_tile::<6>(g, gs, x, xs, m, c, cs),
            5 => wg_tile::<5>(g, gs, x, xs, m, c, cs),
            4 => wg_tile::<4>(g, gs, x, xs, m, c, cs),
            3 => wg_tile::<3>(g, gs, x, xs, m, c, cs),
            2 => wg_tile::<2>(g, gs, x, xs, m, c, cs),
            _ => wg_tile::<1>(g, gs, x, xs, m, c, cs),
        }
    }
}

/// `C[j] += Σ_{f < m} G[f] · X[f][j]` for `j < N`: `G[f]` is the 32 values at `g + f gs`,
/// `X[f][j]` the value at `x + f xs + j`, `C[j]` the 32 values at `c + j cs`.
///
/// # Safety
/// AVX-512F; every address named above is valid for `f < m`, `j < N`.
#[target_feature(enable = "avx512f")]
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
        let mut acc: [[__m512; 2]; N] = [[_mm512_setzero_ps(); 2]; N];
        for f in 0..m {
            let row = g.add(f * gs);
            let g0 = _mm512_loadu_ps(row);
            let g1 = _mm512_loadu_ps(row.add(16));
            let xf = x.add(f * xs);
            for (j, a) in acc.iter_mut().enumerate() {
                let v = _mm512_set1_ps(*xf.add(j));
                a[0] = _mm512_fmadd_ps(g0, v, a[0]);
                a[1] = _mm512_fmadd_ps(g1, v, a[1]);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let dst = c.add(j * cs);
            _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), a[0]));
            _mm512_storeu_ps(
                dst.add(16),
                _mm512_add_ps(_mm512_loadu_ps(dst.add(16)), a[1]),
            );
        }
    }
}
