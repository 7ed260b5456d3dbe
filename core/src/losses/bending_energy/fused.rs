//! The bending energy and its gradient in one CPU pass, kept for the backward pass.
//!
//! Composed from candle ops (`BendingEnergyLoss::forward_generic`), the energy keeps every
//! sliced difference, square and partial sum of the six stencil terms for the backward pass:
//! about thirty DDF-sized tensors, some 400 MiB for a training step at 96x96x104, held until
//! the backward pass reaches the loss. The energy is a quadratic form of the DDF,
//!
//! ```text
//! E = (1 / M) Σ_t Σ_c w_t,c Σ_{p in region} (S_t u_c)(p)²,   S_t u(p) = Σ_k a_k u(p + o_k)
//! ```
//!
//! (`M` the number of energy-map elements), so its gradient `(2 / M) Σ_t w_t,c S_tᵀ(S_t u)` is
//! computed here at once, and only it (one DDF-sized tensor) is kept.
//!
//! Both sums are gathers, parallel over rows of the output with no write conflicts: the
//! gradient at `q` adds `a_k · (S_t u)(q - o_k)` for every tap `k` whose source point
//! `q - o_k` lies in the region, recomputing `S_t u` there (4 taps at most, so at most 16
//! multiply-adds per tap and term). Arithmetic is in f64 whatever the input dtype.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::BendingEnergyFormula;
use crate::ops::kernel::Float;
use crate::ops::stashed::StashedGradient;

/// One squared stencil term: `(Σ_k a_k u(p + o_k))²`, weighted per channel.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Term {
    /// Offsets `o_k` (voxels along the three spatial axes) and coefficients `a_k`.
    pub taps: Vec<([isize; 3], f64)>,
    /// `w_t,c` for channels 0, 1, 2: the multiplicity (1 for a pure derivative, 2 for a
    /// mixed one) times the square of the channel's normalisation factor.
    pub weight: [f64; 3],
}

/// The energy of a formula as stencil terms: the crop `r` of every spatial axis (the region
/// is `[r, n - r)`) and the terms.
pub(super) fn stencils(
    formula: BendingEnergyFormula,
    normalize: bool,
    sizes: [usize; 3],
) -> (usize, Vec<Term>) {
    // MONAI's float32 factor `numerator / n_c` (see `channel_factors`), per channel.
    let factor = |numerator: usize| -> [f64; 3] {
        sizes.map(|n_c| {
            if normalize {
                f64::from((1.0f32 / n_c as f32) * numerator as f32)
            } else {
                1.0
            }
        })
    };
    let unit = |axis: usize, step: isize| {
        let mut o = [0isize; 3];
        o[axis] = step;
        o
    };
    let both = |a: usize, sa: isize, b: usize, sb: isize| {
        let mut o = [0isize; 3];
        o[a] = sa;
        o[b] = sb;
        o
    };
    let weighted = |multiplicity: f64, f: [f64; 3]| f.map(|v| multiplicity * v * v);
    let mut terms = Vec::with_capacity(6);
    match formula {
        BendingEnergyFormula::Monai16 => {
            for a in 0..3 {
                terms.push(Term {
                    taps: vec![(unit(a, 1), 1.0), ([0; 3], -2.0), (unit(a, -1), 1.0)],
                    weight: weighted(1.0, factor(sizes[a] * sizes[a])),
                });
                for b in a + 1..3 {
                    terms.push(Term {
                        taps: mixed(both, a, b, 1),
                        weight: weighted(2.0, factor(sizes[a] * sizes[b])),
                    });
                }
            }
            (1, terms)
        }
        BendingEnergyFormula::Monai15 => {
            // Central differences composed: the first scaled by `n_a / n_c` (float32), the
            // second by the integer `n_d` of its axis (see `energy_monai15`).
            let scale = |a: usize, d: usize| -> [f64; 3] {
                let first = factor(sizes[a]);
                let second = if normalize { sizes[d] as f64 } else { 1.0 };
                first.map(|f| f * second)
            };
            for a in 0..3 {
                terms.push(Term {
                    taps: vec![(unit(a, 2), 0.25), ([0; 3], -0.5), (unit(a, -2), 0.25)],
                    weight: weighted(1.0, scale(a, a)),
                });
                for b in a + 1..3 {
                    terms.push(Term {
                        taps: mixed(both, a, b, 1),
                        weight: weighted(2.0, scale(a, b)),
                    });
                }
            }
            (2, terms)
        }
    }
}

/// The mixed stencil `(u[+a+b] - u[+a-b] - u[-a+b] + u[-a-b]) / 4` with steps of `s`.
fn mixed(
    both: impl Fn(usize, isize, usize, isize) -> [isize; 3],
    a: usize,
    b: usize,
    s: isize,
) -> Vec<([isize; 3], f64)> {
    vec![
        (both(a, s, b, s), 0.25),
        (both(a, s, b, -s), -0.25),
        (both(a, -s, b, s), -0.25),
        (both(a, -s, b, -s), 0.25),
    ]
}

/// Value and gradient of the energy in one pass; the gradient is kept for the backward pass.
pub(super) struct FusedBendingEnergy {
    pub crop: usize,
    pub terms: Vec<Term>,
    pub grad: StashedGradient,
}

/// Where the volume is and which part of it the energy covers.
struct Grid {
    /// `[B·C, H, W, D]`.
    dims: [usize; 4],
    channels: usize,
    crop: usize,
}

impl Grid {
    fn in_region(&self, axis: usize, i: isize) -> bool {
        let n = self.dims[1 + axis] as isize;
        i >= self.crop as isize && i < n - self.crop as isize
    }

    /// Elements of the energy map: `B·C·Π(n - 2r)`.
    fn count(&self) -> usize {
        self.dims[0]
            * self.dims[1..]
                .iter()
                .map(|&n| n - 2 * self.crop)
                .product::<usize>()
    }
}

/// `S_t u` along the region's part of row `(bc, i, j)` (which must lie in the region), into
/// `out` (length `D - 2r`).
fn residual_row<T: Float>(x: &[T], grid: &Grid, term: &Term, at: [usize; 3], out: &mut [f64]) {
    let [_, h, w, d] = grid.dims;
    let [bc, i, j] = at;
    out.fill(0.0);
    let len = out.len();
    for &(o, a) in &term.taps {
        let row = ((bc * h + (i as isize + o[0]) as usize) * w + (j as isize + o[1]) as usize) * d;
        let start = (row as isize + grid.crop as isize + o[2]) as usize;
        for (r, v) in out.iter_mut().zip(&x[start..start + len]) {
            *r += a * v.to_f64();
        }
    }
}

impl FusedBendingEnergy {
    /// The energy and its gradient (in `T`) of the contiguous `(B, C, H, W, D)` field `x`.
    fn run<T: Float>(&self, x: &[T], dims: [usize; 5]) -> (f64, Vec<T>) {
        let [b, c, h, w, d] = dims;
        let grid = Grid {
            dims: [b * c, h, w, d],
            channels: c,
            crop: self.crop,
        };
        let r = self.crop;
        let len = d - 2 * r;
        let inv_count = 1.0 / grid.count() as f64;

        // The energy: rows of the region in parallel, by index (row `t` is `(bc, r + t / rw %
        // rh, r + t % rw)`), one residual buffer per task.
        let (rh, rw) = (h - 2 * r, w - 2 * r);
        let energy: f64 = (0..b * c * rh * rw)
            .into_par_iter()
            .with_min_len(64)
            .fold(
                || (vec![0f64; len], 0.0),
                |(mut res, mut sum), t| {
                    let at = [t / (rh * rw), r + t / rw % rh, r + t % rw];
                    for term in &self.terms {
                        residual_row(x, &grid, term, at, &mut res);
                        let squares: f64 = res.iter().map(|v| v * v).sum();
                        sum += term.weight[at[0] % grid.channels] * squares;
                    }
                    (res, sum)
                },
            )
            .map(|(_, sum)| sum)
            .sum();

        // The gradient: every output row gathers from the region rows its taps reach.
        let mut grad = vec![T::default(); x.len()];
        grad.par_chunks_mut(d).enumerate().for_each(|(row, out)| {
            let (bc, i, j) = (row / (h * w), row / w % h, row % w);
            let mut res = vec![0f64; len];
            let mut acc = vec![0f64; d];
            for term in &self.terms {
                let scale = 2.0 * term.weight[bc % grid.channels] * inv_count;
                for &(o, a) in &term.taps {
                    let (si, sj) = (i as isize - o[0], j as isize - o[1]);
                    if !(grid.in_region(0, si) && grid.in_region(1, sj)) {
                        continue;
                    }
                    residual_row(x, &grid, term, [bc, si as usize, sj as usize], &mut res);
                    // Output k reads the residual at k - o_k along the row: region index
                    // k - o_k - r.
                    let first = (r as isize + o[2]) as usize;
                    for (g, v) in acc[first..first + len].iter_mut().zip(&res) {
                        *g += scale * a * v;
                    }
                }
            }
            for (g, v) in out.iter_mut().zip(&acc) {
                *g = T::from_f64(*v);
            }
        });
        (energy * inv_count, grad)
    }
}

impl CustomOp1 for FusedBendingEnergy {
    fn name(&self) -> &'static str {
        "bending-energy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [b, c, h, w, d] = *layout.shape().dims() else {
            candle_core::bail!(
                "bending energy: expected a 5-d DDF, got {:?}",
                layout.shape()
            )
        };
        if [h, w, d].iter().any(|&n| n <= 2 * self.crop) {
            candle_core::bail!("bending energy: spatial sizes {:?} too small", [h, w, d])
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("bending energy: the DDF must be contiguous")
        };
        let dims = [b, c, h, w, d];
        match storage {
            CpuStorage::F32(v) => {
                let (loss, grad) = self.run(&v[start..end], dims);
                self.grad
                    .forward(loss, grad, layout.shape(), storage.dtype())
            }
            CpuStorage::F64(v) => {
                let (loss, grad) = self.run(&v[start..end], dims);
                self.grad
                    .forward(loss, grad, layout.shape(), storage.dtype())
            }
            _ => candle_core::bail!("bending energy: f32 or f64 DDF"),
        }
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
