//! The f32 loops of the fused BatchNorm, compiled per SIMD level
//! ([`crate::ops::simd::multiversion`]).
//!
//! Sums run in f32 over blocks of [`BLOCK`] values, [`LANES`] independent lanes each (so
//! every lane adds at most `BLOCK / LANES` = 64 terms), and the block totals add up in f64:
//! the vector width of f32 with close to the accuracy of an f64 running sum (PyTorch's CPU
//! BatchNorm also accumulates its statistics in double). Elementwise maps compute in f32, as
//! PyTorch's `x * alpha + beta` does for float tensors.

use crate::ops::simd::multiversion;

/// Values per f32 partial sum.
const BLOCK: usize = 1024;
/// Independent f32 accumulators per block (one AVX-512 register).
const LANES: usize = 16;

/// `Σ v` and `Σ (v - shift)²` over `values`.
#[inline(always)]
fn sum_body(values: &[f32], shift: f32, squares: bool) -> f64 {
    let mut total = 0f64;
    for block in values.chunks(BLOCK) {
        let mut lanes = [0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                let d = v - shift;
                *lane += if squares { d * d } else { v };
            }
        }
        let mut tail = 0f32;
        for &v in chunks.remainder() {
            let d = v - shift;
            tail += if squares { d * d } else { v };
        }
        total += lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(tail);
    }
    total
}

#[inline(always)]
fn sum_impl(values: &[f32]) -> f64 {
    sum_body(values, 0.0, false)
}

#[inline(always)]
fn squared_deviations_impl(values: &[f32], mean: f32) -> f64 {
    sum_body(values, mean, true)
}

multiversion! {
    /// `Σ v` over `values`.
    pub(super) fn sum(values: &[f32]) -> f64 = sum_impl;
}

multiversion! {
    /// `Σ (v - mean)²` over `values`.
    pub(super) fn squared_deviations(values: &[f32], mean: f32) -> f64 = squared_deviations_impl;
}

/// `dst = relu?(src · alpha + beta [+ residual])`; a NaN stays NaN through the ReLU.
#[inline(always)]
fn affine_impl(
    src: &[f32],
    residual: Option<&[f32]>,
    dst: &mut [f32],
    alpha: f32,
    beta: f32,
    relu: bool,
) {
    let rect = |y: f32| if relu && y < 0.0 { 0.0 } else { y };
    match residual {
        Some(r) => {
            for ((d, &v), &r) in dst.iter_mut().zip(src).zip(r) {
                *d = rect(v.mul_add(alpha, beta) + r);
            }
        }
        None => {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = rect(v.mul_add(alpha, beta));
            }
        }
    }
}

multiversion! {
    /// `dst = relu?(src · alpha + beta [+ residual])`.
    pub(super) fn affine(
        src: &[f32],
        residual: Option<&[f32]>,
        dst: &mut [f32],
        alpha: f32,
        beta: f32,
        relu: bool,
    ) = affine_impl;
}

/// The upstream gradient `g`, zero where the ReLU's output `y` is not positive.
#[inline(always)]
fn masked(g: f32, y: f32, relu: bool) -> f32 {
    if !relu || y > 0.0 {
        g
    } else {
        0.0
    }
}

#[inline(always)]
fn mask_impl(g: &[f32], y: &[f32], dst: &mut [f32], relu: bool) {
    for ((d, &g), &y) in dst.iter_mut().zip(g).zip(y) {
        *d = masked(g, y, relu);
    }
}

multiversion! {
    /// `dst = g` masked by `y > 0` (with `relu`).
    pub(super) fn mask(g: &[f32], y: &[f32], dst: &mut [f32], relu: bool) = mask_impl;
}

#[inline(always)]
fn grad_sums_impl(x: &[f32], g: &[f32], y: &[f32], mean: f32, relu: bool) -> (f64, f64) {
    let (mut s0, mut s1) = (0f64, 0f64);
    for ((x, g), y) in x.chunks(BLOCK).zip(g.chunks(BLOCK)).zip(y.chunks(BLOCK)) {
        let mut l0 = [0f32; LANES];
        let mut l1 = [0f32; LANES];
        let n = x.len() / LANES * LANES;
        for ((xc, gc), yc) in x[..n]
            .chunks_exact(LANES)
            .zip(g[..n].chunks_exact(LANES))
            .zip(y[..n].chunks_exact(LANES))
        {
            for i in 0..LANES {
                let gm = masked(gc[i], yc[i], relu);
                l0[i] += gm;
                l1[i] = gm.mul_add(xc[i] - mean, l1[i]);
            }
        }
        let (mut t0, mut t1) = (0f32, 0f32);
        for i in n..x.len() {
            let gm = masked(g[i], y[i], relu);
            t0 += gm;
            t1 += gm * (x[i] - mean);
        }
        s0 += l0.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(t0);
        s1 += l1.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(t1);
    }
    (s0, s1)
}

multiversion! {
    /// `(Σ g', Σ g' · (x - mean))` with `g'` the masked upstream gradient.
    pub(super) fn grad_sums(x: &[f32], g: &[f32], y: &[f32], mean: f32, relu: bool) -> (f64, f64) =
        grad_sums_impl;
}

/// The coefficients of the input gradient `dx = k · g' + c2 · (x - mean) + c0`.
#[derive(Debug, Clone, Copy)]
pub(super) struct InputGradCoef {
    pub k: f32,
    pub c2: f32,
    pub c0: f32,
    pub mean: f32,
}

#[inline(always)]
fn input_grad_impl(
    x: &[f32],
    g: &[f32],
    y: &[f32],
    dst: &mut [f32],
    coef: InputGradCoef,
    relu: bool,
) {
    let InputGradCoef { k, c2, c0, mean } = coef;
    for (((d, &x), &g), &y) in dst.iter_mut().zip(x).zip(g).zip(y) {
        *d = k.mul_add(masked(g, y, relu), c2.mul_add(x - mean, c0));
    }
}

multiversion! {
    /// `dst = k · g' + c2 · (x - mean) + c0`.
    pub(super) fn input_grad(
        x: &[f32],
        g: &[f32],
        y: &[f32],
        dst: &mut [f32],
        coef: InputGradCoef,
        relu: bool,
    ) = input_grad_impl;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::simd::SimdLevel;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_level_agrees_with_f64_references() {
        // Not a multiple of LANES or BLOCK, so that tails run.
        let n = 3 * BLOCK + 37;
        let (x, g, y) = (data(n, 1), data(n, 2), data(n, 3));
        let mean = 0.013f32;
        let sum_ref: f64 = x.iter().map(|&v| f64::from(v)).sum();
        let sq_ref: f64 = x
            .iter()
            .map(|&v| (f64::from(v) - f64::from(mean)).powi(2))
            .sum();
        let m = |g: f32, y: f32| if y > 0.0 { f64::from(g) } else { 0.0 };
        let s0_ref: f64 = g.iter().zip(&y).map(|(&g, &y)| m(g, y)).sum();
        let s1_ref: f64 = (0..n)
            .map(|i| m(g[i], y[i]) * (f64::from(x[i]) - f64::from(mean)))
            .sum();
        for level in SimdLevel::supported() {
            assert!((sum(level, &x) - sum_ref).abs() < 1e-3, "{level}");
            assert!(
                (squared_deviations(level, &x, mean) - sq_ref).abs() < 1e-3,
                "{level}"
            );
            let (s0, s1) = grad_sums(level, &x, &g, &y, mean, true);
            assert!(
                (s0 - s0_ref).abs() < 1e-3 && (s1 - s1_ref).abs() < 1e-3,
                "{level}"
            );

            let mut out = vec![0f32; n];
            affine(level, &x, Some(&g), &mut out, 1.5, -0.25, true);
            for i in 0..n {
                let want = (f64::from(x[i]) * 1.5 - 0.25 + f64::from(g[i])).max(0.0);
                assert!(
                    (f64::from(out[i]) - want).abs() < 1e-5,
                    "{level} affine at {i}"
                );
            }
            mask(level, &g, &y, &mut out, true);
            for i in 0..n {
                assert_eq!(f64::from(out[i]), m(g[i], y[i]), "{level} mask at {i}");
            }
            let coef = InputGradCoef {
                k: 0.5,
                c2: -0.125,
                c0: 0.03,
                mean,
            };
            input_grad(level, &x, &g, &y, &mut out, coef, true);
            for i in 0..n {
                let want = 0.5 * m(g[i], y[i]) - 0.125 * (f64::from(x[i]) - f64::from(mean)) + 0.03;
                assert!((f64::from(out[i]) - want).abs() < 1e-6, "{level} dx at {i}");
            }
        }
    }

    #[test]
    fn the_relu_keeps_nan() {
        for level in SimdLevel::supported() {
            let mut out = [0f32; 3];
            affine(
                level,
                &[f32::NAN, -1.0, 2.0],
                None,
                &mut out,
                1.0,
                0.0,
                true,
            );
            assert!(out[0].is_nan(), "{level}");
            assert_eq!(&out[1..], &[0.0, 2.0]);
        }
    }
}
