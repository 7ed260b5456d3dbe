//! The scan in the breathing model's frame: its voxel axes permuted and flipped to run toward
//! +x, +y and +z of the RAS world (left-right, posterior to anterior, caudal to cranial; any
//! obliquity is kept), and the output grid, a box of it resampled to the requested size.

use ndarray::{Array3, Axis};

/// How the scan's voxel axes map onto the model's: output axis `b` is input axis `perm[b]`,
/// reversed when `flip[b]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Orientation {
    perm: [usize; 3],
    flip: [bool; 3],
}

impl Orientation {
    /// The permutation and flips that bring the voxel axes of `affine` closest to RAS+
    /// (largest direction cosines first, as nibabel's `as_closest_canonical`).
    pub fn of(affine: &[[f64; 4]; 4]) -> Self {
        let cosine = |world: usize, axis: usize| {
            let norm = (0..3).map(|r| affine[r][axis].powi(2)).sum::<f64>().sqrt();
            affine[world][axis] / norm.max(f64::MIN_POSITIVE)
        };
        let mut perm = [usize::MAX; 3];
        let mut flip = [false; 3];
        let mut pairs: Vec<(usize, usize)> =
            (0..3).flat_map(|w| (0..3).map(move |a| (w, a))).collect();
        pairs.sort_by(|&(w1, a1), &(w2, a2)| cosine(w2, a2).abs().total_cmp(&cosine(w1, a1).abs()));
        let mut used = [false; 3];
        for (world, axis) in pairs {
            if perm[world] == usize::MAX && !used[axis] {
                perm[world] = axis;
                flip[world] = cosine(world, axis) < 0.0;
                used[axis] = true;
            }
        }
        Orientation { perm, flip }
    }

    /// `data` (input axes) in the model's axes.
    pub fn apply<T: Clone>(&self, data: &Array3<T>) -> Array3<T> {
        let mut view = data.view().permuted_axes(self.perm);
        for (b, &flip) in self.flip.iter().enumerate() {
            if flip {
                view.invert_axis(Axis(b));
            }
        }
        view.as_standard_layout().into_owned()
    }

    /// The voxel-to-world affine of [`Orientation::apply`]'s result, for an input of `shape`.
    pub fn affine(&self, affine: &[[f64; 4]; 4], shape: [usize; 3]) -> [[f64; 4]; 4] {
        let mut corner = [0.0; 3];
        let mut out = [[0.0; 4]; 4];
        out[3][3] = 1.0;
        for b in 0..3 {
            let a = self.perm[b];
            let sign = if self.flip[b] { -1.0 } else { 1.0 };
            if self.flip[b] {
                corner[a] = (shape[a] - 1) as f64;
            }
            for (r, row) in out.iter_mut().take(3).enumerate() {
                row[b] = sign * affine[r][a];
            }
        }
        for (r, row) in out.iter_mut().take(3).enumerate() {
            row[3] = affine[r][3] + (0..3).map(|a| affine[r][a] * corner[a]).sum::<f64>();
        }
        out
    }

    /// The voxel size after [`Orientation::apply`].
    pub fn spacing(&self, spacing: [f64; 3]) -> [f64; 3] {
        self.perm.map(|a| spacing[a])
    }
}

/// The output grid: `size` voxels of `spacing` mm, whose voxel `v` lies at voxel
/// `origin + v · step` of the reoriented scan.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OutputGrid {
    /// Voxels per axis.
    pub size: [usize; 3],
    /// Voxel size (mm).
    pub spacing: [f64; 3],
    /// Reoriented-scan voxel coordinates of output voxel 0.
    pub origin: [f64; 3],
    /// Reoriented-scan voxels per output voxel.
    pub step: [f64; 3],
    /// Voxel-to-world affine of the output grid.
    pub affine: [[f64; 4]; 4],
}

impl OutputGrid {
    /// The grid of `size` voxels over the reoriented-scan voxel box `lo..=hi` (spacing: the
    /// box's extent over the size); `scan_affine` and `scan_spacing` are the reoriented
    /// scan's.
    pub fn over(
        lo: [f64; 3],
        hi: [f64; 3],
        size: [usize; 3],
        scan_affine: &[[f64; 4]; 4],
        scan_spacing: [f64; 3],
    ) -> Self {
        let spacing = [0, 1, 2].map(|a| (hi[a] - lo[a] + 1.0) * scan_spacing[a] / size[a] as f64);
        let step = [0, 1, 2].map(|a| spacing[a] / scan_spacing[a]);
        // Output voxel 0's centre sits half an output voxel inside the box.
        let origin = [0, 1, 2].map(|a| lo[a] - 0.5 + 0.5 * step[a]);
        let mut affine = [[0.0; 4]; 4];
        affine[3][3] = 1.0;
        for (r, row) in affine.iter_mut().take(3).enumerate() {
            for a in 0..3 {
                row[a] = scan_affine[r][a] * step[a];
            }
            row[3] = scan_affine[r][3] + (0..3).map(|a| scan_affine[r][a] * origin[a]).sum::<f64>();
        }
        OutputGrid {
            size,
            spacing,
            origin,
            step,
            affine,
        }
    }

    /// Reoriented-scan voxel coordinates of the point `p` (mm from output voxel 0's centre,
    /// along the output axes).
    pub fn scan_voxel(&self, p: [f64; 3]) -> [f64; 3] {
        [0, 1, 2].map(|a| self.origin[a] + p[a] / self.spacing[a] * self.step[a])
    }

    /// Output voxels in total.
    pub fn voxels(&self) -> usize {
        self.size.iter().product()
    }
}

/// Trilinear interpolation of `data` at voxel coordinates `at`, the edge repeated outside.
pub(crate) fn trilinear(data: &Array3<f32>, at: [f64; 3]) -> f32 {
    let (h, w, d) = data.dim();
    let dims = [h, w, d];
    let mut base = [0usize; 3];
    let mut frac = [0.0f64; 3];
    for a in 0..3 {
        let max = (dims[a] - 1) as f64;
        let x = at[a].clamp(0.0, max);
        let f = x.floor().min((dims[a].max(2) - 2) as f64).max(0.0);
        base[a] = f as usize;
        frac[a] = if dims[a] > 1 { x - f } else { 0.0 };
    }
    let next = |a: usize| (base[a] + 1).min(dims[a] - 1);
    let mut acc = 0.0f64;
    for corner in 0..8 {
        let pick = |a: usize| corner >> a & 1 == 1;
        let index = [0, 1, 2].map(|a| if pick(a) { next(a) } else { base[a] });
        let weight: f64 = (0..3)
            .map(|a| if pick(a) { frac[a] } else { 1.0 - frac[a] })
            .product();
        if weight > 0.0 {
            acc += weight * data[index] as f64;
        }
    }
    acc as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An LPS-ordered scan (as DICOM and the POPI NIfTI store it: axes toward L, P, S, so a
    /// RAS+ affine with negative x and y columns) comes out with axes toward R, A, S, and every
    /// voxel keeps its world position.
    #[test]
    fn reorientation_keeps_world_positions() {
        let affine = [
            [-0.5, 0.0, 0.0, 10.0],
            [0.0, 0.0, -0.7, 20.0],
            [0.0, 2.0, 0.0, -30.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let data = Array3::from_shape_fn((4, 3, 5), |(i, j, k)| (100 * i + 10 * j + k) as f32);
        let o = Orientation::of(&affine);
        let out = o.apply(&data);
        let out_affine = o.affine(&affine, [4, 3, 5]);
        assert_eq!(out.dim(), (4, 5, 3));
        assert_eq!(o.spacing([0.5, 2.0, 0.7]), [0.5, 0.7, 2.0]);
        let world = |a: &[[f64; 4]; 4], v: [usize; 3]| {
            [0, 1, 2].map(|r| a[r][3] + (0..3).map(|c| a[r][c] * v[c] as f64).sum::<f64>())
        };
        for ((i, j, k), &value) in out.indexed_iter() {
            let src = [
                value as usize / 100,
                value as usize / 10 % 10,
                value as usize % 10,
            ];
            let (a, b) = (world(&out_affine, [i, j, k]), world(&affine, src));
            assert!((0..3).all(|r| (a[r] - b[r]).abs() < 1e-9), "{a:?} vs {b:?}");
        }
        assert!((0..3).all(|b| out_affine[b][b] > 0.0), "{out_affine:?}");
        // The output grid over the whole scan at the same size samples the same voxels.
        let grid = OutputGrid::over(
            [0.0; 3],
            [3.0, 4.0, 2.0],
            [4, 5, 3],
            &out_affine,
            [0.5, 0.7, 2.0],
        );
        assert_eq!(grid.affine, out_affine);
        let at = grid.scan_voxel([1.0, 1.4, 4.0]);
        assert!(
            (0..3).all(|a| (at[a] - [2.0, 2.0, 2.0][a]).abs() < 1e-12),
            "{at:?}"
        );
        assert_eq!(trilinear(&out, at), out[[2, 2, 2]]);
        let mid = trilinear(&out, [1.5, 0.0, 0.0]);
        assert!((mid - 0.5 * (out[[1, 0, 0]] + out[[2, 0, 0]])).abs() < 1e-4);
    }
}
