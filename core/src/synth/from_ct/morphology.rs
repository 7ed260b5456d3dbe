//! Binary morphology and filters on 3-D `ndarray` volumes, in mm (anisotropic voxels): the
//! exact Euclidean distance transform (Felzenszwalb & Huttenlocher, "Distance transforms of
//! sampled functions", Theory of Computing 8, 2012), erosion / dilation / opening / closing
//! built on it, 6-connected component labelling, per-slice hole filling and a separable
//! Gaussian filter. A volume of depth 1 is a 2-D image (6-connectivity is then 4-connectivity).
//!
//! Written here rather than taken from a crate: the one maintained `ndarray` image crate
//! (`ndarray-ndimage`) has only 3x3x3 structuring elements (not Euclidean, not in mm) and no
//! distance transform.

use ndarray::{Array3, Axis, Zip};

/// Squared distance (mm²) of the 1-D lower envelope: `d[q] = min_p f[p] + w2 (q - p)²`
/// (`f[p] = ∞` where no source). `v`, `z` are scratch buffers of length `n` and `n + 1`.
fn envelope_1d(f: &[f64], w2: f64, d: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let mut k: isize = -1;
    for q in 0..n {
        if !f[q].is_finite() {
            continue;
        }
        loop {
            if k < 0 {
                k = 0;
                v[0] = q;
                z[0] = f64::NEG_INFINITY;
                z[1] = f64::INFINITY;
                break;
            }
            let p = v[k as usize];
            let (qf, pf) = (q as f64, p as f64);
            let s = ((f[q] + w2 * qf * qf) - (f[p] + w2 * pf * pf)) / (2.0 * w2 * (qf - pf));
            if s <= z[k as usize] {
                k -= 1;
                continue;
            }
            k += 1;
            v[k as usize] = q;
            z[k as usize] = s;
            z[k as usize + 1] = f64::INFINITY;
            break;
        }
    }
    if k < 0 {
        d.fill(f64::INFINITY);
        return;
    }
    let mut k = 0usize;
    for (q, out) in d.iter_mut().enumerate() {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let dq = q as f64 - v[k] as f64;
        *out = w2 * dq * dq + f[v[k]];
    }
}

/// Euclidean distance (mm) from every voxel to the nearest `true` voxel of `target` (0 on
/// it; `f32::INFINITY` everywhere when `target` is empty). `spacing` is the voxel size (mm).
pub(crate) fn distance_to(target: &Array3<bool>, spacing: [f64; 3]) -> Array3<f32> {
    let mut sq = target.mapv(|t| if t { 0.0f64 } else { f64::INFINITY });
    for (axis, s) in spacing.iter().enumerate() {
        let n = sq.len_of(Axis(axis));
        let (mut f, mut d, mut v, mut z) = (
            vec![0.0; n],
            vec![0.0; n],
            vec![0usize; n],
            vec![0.0; n + 1],
        );
        for mut lane in sq.lanes_mut(Axis(axis)) {
            for (dst, src) in f.iter_mut().zip(lane.iter()) {
                *dst = *src;
            }
            envelope_1d(&f, s * s, &mut d, &mut v, &mut z);
            for (dst, src) in lane.iter_mut().zip(&d) {
                *dst = *src;
            }
        }
    }
    sq.mapv(|v| v.sqrt() as f32)
}

/// Voxels within `radius_mm` of `mask` (Euclidean dilation).
pub(crate) fn dilate(mask: &Array3<bool>, radius_mm: f64, spacing: [f64; 3]) -> Array3<bool> {
    distance_to(mask, spacing).mapv(|d| (d as f64) <= radius_mm)
}

/// Voxels of `mask` farther than `radius_mm` from every voxel outside it (Euclidean erosion;
/// outside the array counts as outside the mask).
pub(crate) fn erode(mask: &Array3<bool>, radius_mm: f64, spacing: [f64; 3]) -> Array3<bool> {
    let padded = pad(mask, false);
    let outside = padded.mapv(|m| !m);
    let far = distance_to(&outside, spacing).mapv(|d| (d as f64) > radius_mm);
    unpad(&far)
}

/// Morphological opening (erosion then dilation) with a ball of `radius_mm`.
pub(crate) fn open(mask: &Array3<bool>, radius_mm: f64, spacing: [f64; 3]) -> Array3<bool> {
    let core = erode(mask, radius_mm, spacing);
    let mut opened = dilate(&core, radius_mm, spacing);
    Zip::from(&mut opened).and(mask).for_each(|o, &m| *o &= m);
    opened
}

/// Morphological closing (dilation then erosion) with a ball of `radius_mm`; the array border
/// does not erode the result.
pub(crate) fn close(mask: &Array3<bool>, radius_mm: f64, spacing: [f64; 3]) -> Array3<bool> {
    let grown = dilate(mask, radius_mm, spacing).mapv(|g| !g);
    let far = distance_to(&grown, spacing).mapv(|d| (d as f64) > radius_mm);
    let mut closed = far;
    Zip::from(&mut closed).and(mask).for_each(|c, &m| *c |= m);
    closed
}

/// `mask` with a border of one `value` voxel on every side.
fn pad(mask: &Array3<bool>, value: bool) -> Array3<bool> {
    let (h, w, d) = mask.dim();
    let mut out = Array3::from_elem((h + 2, w + 2, d + 2), value);
    out.slice_mut(ndarray::s![1..h + 1, 1..w + 1, 1..d + 1])
        .assign(mask);
    out
}

fn unpad(mask: &Array3<bool>) -> Array3<bool> {
    let (h, w, d) = mask.dim();
    mask.slice(ndarray::s![1..h - 1, 1..w - 1, 1..d - 1])
        .to_owned()
}

/// 6-connected components of `mask`: labels `1..=n` (0 outside) and the voxel count of each
/// (`sizes[label - 1]`).
pub(crate) fn label(mask: &Array3<bool>) -> (Array3<u32>, Vec<usize>) {
    let (h, w, d) = mask.dim();
    let flat: Vec<bool> = mask.iter().copied().collect();
    let mut labels = vec![0u32; flat.len()];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    for start in 0..flat.len() {
        if !flat[start] || labels[start] != 0 {
            continue;
        }
        let id = sizes.len() as u32 + 1;
        labels[start] = id;
        stack.push(start);
        let mut size = 0usize;
        while let Some(v) = stack.pop() {
            size += 1;
            let (i, j, k) = (v / (w * d), (v / d) % w, v % d);
            let mut visit = |n: usize| {
                if flat[n] && labels[n] == 0 {
                    labels[n] = id;
                    stack.push(n);
                }
            };
            if i > 0 {
                visit(v - w * d);
            }
            if i + 1 < h {
                visit(v + w * d);
            }
            if j > 0 {
                visit(v - d);
            }
            if j + 1 < w {
                visit(v + d);
            }
            if k > 0 {
                visit(v - 1);
            }
            if k + 1 < d {
                visit(v + 1);
            }
        }
        sizes.push(size);
    }
    let labels = Array3::from_shape_vec((h, w, d), labels).expect("labels sized like the mask");
    (labels, sizes)
}

/// The largest 6-connected component of `mask` (empty if `mask` is).
pub(crate) fn largest_component(mask: &Array3<bool>) -> Array3<bool> {
    let (labels, sizes) = label(mask);
    match (0..sizes.len()).max_by_key(|&i| sizes[i]) {
        Some(best) => labels.mapv(|l| l == best as u32 + 1),
        None => mask.clone(),
    }
}

/// Fills the holes of `mask` in every slice across axis 2 (background regions of the slice
/// that do not touch its border).
pub(crate) fn fill_holes_per_slice(mask: &mut Array3<bool>) {
    for mut slice in mask.axis_iter_mut(Axis(2)) {
        let (h, w) = slice.dim();
        let background = slice.mapv(|m| !m).insert_axis(Axis(2));
        let (labels, sizes) = label(&background);
        let mut touches = vec![false; sizes.len() + 1];
        for ((i, j, _), &l) in labels.indexed_iter() {
            if i == 0 || j == 0 || i + 1 == h || j + 1 == w {
                touches[l as usize] = true;
            }
        }
        for ((i, j, _), &l) in labels.indexed_iter() {
            if l != 0 && !touches[l as usize] {
                slice[[i, j]] = true;
            }
        }
    }
}

/// Gaussian filter with standard deviations `sigma` in voxels per axis (0: that axis is left
/// alone); values beyond the border repeat the edge.
pub(crate) fn gaussian(volume: &Array3<f32>, sigma: [f64; 3]) -> Array3<f32> {
    let mut out = volume.clone();
    for (axis, &s) in sigma.iter().enumerate() {
        if s <= 0.0 {
            continue;
        }
        let radius = (3.0 * s).ceil() as isize;
        let kernel: Vec<f32> = (-radius..=radius)
            .map(|t| (-(t * t) as f64 / (2.0 * s * s)).exp() as f32)
            .collect();
        let total: f32 = kernel.iter().sum();
        let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
        let n = out.len_of(Axis(axis));
        let mut line = vec![0f32; n];
        for mut lane in out.lanes_mut(Axis(axis)) {
            for (dst, src) in line.iter_mut().zip(lane.iter()) {
                *dst = *src;
            }
            for (q, dst) in lane.iter_mut().enumerate() {
                let mut acc = 0.0;
                for (t, k) in kernel.iter().enumerate() {
                    let at = (q as isize + t as isize - radius).clamp(0, n as isize - 1);
                    acc += k * line[at as usize];
                }
                *dst = acc;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_transform_is_euclidean_in_mm_and_morphology_follows() {
        let mut target = Array3::from_elem((9, 7, 5), false);
        target[[4, 3, 2]] = true;
        let d = distance_to(&target, [1.0, 2.0, 3.0]);
        assert_eq!(d[[4, 3, 2]], 0.0);
        let expected = (3.0f64 * 3.0 + 4.0 * 4.0 + 6.0 * 6.0).sqrt();
        assert!(
            (d[[7, 5, 4]] as f64 - expected).abs() < 1e-5,
            "{}",
            d[[7, 5, 4]]
        );
        // A ball of radius 4 mm: dilation then erosion by 2 mm keeps its core.
        let ball = d.mapv(|v| v <= 4.0);
        let (labels, sizes) = label(&ball);
        assert_eq!(sizes.len(), 1);
        assert_eq!(labels[[4, 3, 2]], 1);
        let eroded = erode(&ball, 2.0, [1.0, 2.0, 3.0]);
        assert!(eroded[[4, 3, 2]] && !eroded[[8, 3, 2]] && ball[[8, 3, 2]]);
        assert_eq!(open(&ball, 0.5, [1.0, 2.0, 3.0]), ball);
        // Two blobs: two components; a slice with a hole gets it filled.
        let mut two = ball.clone();
        two[[0, 0, 0]] = true;
        assert_eq!(label(&two).1.len(), 2);
        assert_eq!(largest_component(&two), ball);
        let mut ring = Array3::from_elem((5, 5, 1), true);
        ring[[2, 2, 0]] = false;
        ring[[0, 2, 0]] = false;
        fill_holes_per_slice(&mut ring);
        assert!(ring[[2, 2, 0]] && !ring[[0, 2, 0]]);
        let smooth = gaussian(&ring.mapv(|v| v as u8 as f32), [1.0, 1.0, 0.0]);
        assert!(smooth[[0, 2, 0]] > 0.0 && smooth[[0, 2, 0]] < 1.0);
    }
}
