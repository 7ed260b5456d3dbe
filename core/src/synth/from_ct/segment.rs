//! Body and lung segmentation of a chest CT by thresholds and morphology (in mm, any grid):
//!
//! * **body**: voxels above [`BODY_HU`], the largest connected component (drops the table,
//!   the blanket, air outside), holes filled in every axial slice (so the lungs, the airways
//!   and bowel gas are inside it);
//! * **lungs**: voxels below [`LUNG_HU`] inside the body. An opening with a ball of
//!   [`OPEN_RADIUS_MM`] cuts the trachea, the main bronchi and a thin anterior junction line
//!   off the lungs; the two largest remaining components are the lungs (a single one, when
//!   both lungs still touch, is split at its narrowest sagittal plane). Every air voxel within
//!   [`REATTACH_MM`] of a lung joins it (the thin recesses the opening removed), then each
//!   lung keeps its largest component, its slices' holes (vessels) filled.
//!
//! A given lung mask replaces the thresholds; it is split into two lungs the same way.

use ndarray::{Array3, Axis, Zip};

use super::morphology::{close, distance_to, fill_holes_per_slice, label, largest_component, open};

/// Body: above this (HU).
pub(crate) const BODY_HU: f32 = -500.0;
/// Lung parenchyma and airways: below this (HU), inside the body.
pub(crate) const LUNG_HU: f32 = -400.0;
/// Radius of the opening that separates the lungs from the airways (mm).
const OPEN_RADIUS_MM: f64 = 9.0;
/// Air voxels this close to a lung's core join it (mm).
const REATTACH_MM: f64 = 2.0 * OPEN_RADIUS_MM;
/// Radius of the closing that smooths each lung (mm).
const CLOSE_RADIUS_MM: f64 = 3.0;
/// A second lung must hold at least this fraction of the first one's volume.
const SECOND_LUNG_FRACTION: f64 = 0.1;

/// Lung labels: 0 outside, 1 and 2 the lungs (1 at lower axis-0 coordinates).
pub(crate) type LungLabels = Array3<u8>;

/// The body of `ct` (HU); see the module docs.
pub(crate) fn body_mask(ct: &Array3<f32>) -> Array3<bool> {
    let mut body = largest_component(&ct.mapv(|v| v > BODY_HU));
    fill_holes_per_slice(&mut body);
    body
}

/// The air inside `body` (lungs, airways, bowel gas).
pub(crate) fn air_in_body(ct: &Array3<f32>, body: &Array3<bool>) -> Array3<bool> {
    let mut air = ct.mapv(|v| v < LUNG_HU);
    Zip::from(&mut air).and(body).for_each(|a, &b| *a &= b);
    air
}

/// Splits `air` (lungs and airways, or a given lung mask) into two lungs; see the module docs.
/// Returns the labels and the number of lungs found (0 when nothing lung-sized is there).
pub(crate) fn split_lungs(air: &Array3<bool>, spacing: [f64; 3]) -> (LungLabels, usize) {
    let opened = open(air, OPEN_RADIUS_MM, spacing);
    let (labels, sizes) = label(&opened);
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let shape = air.raw_dim();
    let Some(&first) = order.first() else {
        return (Array3::zeros(shape), 0);
    };
    let mut cores: Vec<Array3<bool>> = vec![labels.mapv(|l| l == first as u32 + 1)];
    match order.get(1) {
        Some(&second) if sizes[second] as f64 >= SECOND_LUNG_FRACTION * sizes[first] as f64 => {
            cores.push(labels.mapv(|l| l == second as u32 + 1));
        }
        _ => {
            if let Some((a, b)) = split_at_narrowest(&cores[0]) {
                cores = vec![a, b];
            }
        }
    }
    // Lower axis-0 centre first.
    cores.sort_by(|a, b| centre0(a).total_cmp(&centre0(b)));
    let distances: Vec<Array3<f32>> = cores.iter().map(|c| distance_to(c, spacing)).collect();
    let mut lungs = Array3::<u8>::zeros(shape);
    for (index, lung) in lungs.indexed_iter_mut() {
        if !air[index] {
            continue;
        }
        let (best, d) = distances
            .iter()
            .enumerate()
            .map(|(l, d)| (l, d[index]))
            .fold((0, f32::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
        if (d as f64) <= REATTACH_MM {
            *lung = best as u8 + 1;
        }
    }
    let mut out = Array3::<u8>::zeros(shape);
    for l in 1..=cores.len() as u8 {
        let mut mask = largest_component(&lungs.mapv(|v| v == l));
        fill_holes_per_slice(&mut mask);
        let mask = close(&mask, CLOSE_RADIUS_MM, spacing);
        Zip::from(&mut out).and(&mask).for_each(|o, &m| {
            if m && *o == 0 {
                *o = l;
            }
        });
    }
    (out, cores.len())
}

/// Mean axis-0 index of a mask's voxels.
fn centre0(mask: &Array3<bool>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for ((i, _, _), &m) in mask.indexed_iter() {
        if m {
            sum += i as f64;
            n += 1;
        }
    }
    sum / n.max(1) as f64
}

/// Splits one component at the sagittal plane (axis 0) with the fewest voxels in the middle
/// 30% of its extent; `None` if either side would be under [`SECOND_LUNG_FRACTION`].
fn split_at_narrowest(mask: &Array3<bool>) -> Option<(Array3<bool>, Array3<bool>)> {
    let counts: Vec<usize> = mask
        .axis_iter(Axis(0))
        .map(|plane| plane.iter().filter(|&&m| m).count())
        .collect();
    let first = counts.iter().position(|&c| c > 0)?;
    let last = counts.iter().rposition(|&c| c > 0)?;
    let span = last - first;
    let (lo, hi) = (first + span * 35 / 100, first + span * 65 / 100);
    let cut = (lo..=hi).min_by_key(|&i| counts[i])?;
    let total: usize = counts.iter().sum();
    let left: usize = counts[..cut].iter().sum();
    let right = total - left - counts[cut];
    let small = SECOND_LUNG_FRACTION * left.max(right) as f64;
    if (left.min(right) as f64) < small {
        return None;
    }
    let mut a = mask.clone();
    let mut b = mask.clone();
    for (((i, _, _), x), y) in a.indexed_iter_mut().zip(b.iter_mut()) {
        if i >= cut {
            *x = false;
        }
        if i <= cut {
            *y = false;
        }
    }
    Some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two air boxes (lungs) joined by a thin bridge, a tube above them (trachea) and a small
    /// gas bubble, inside a body.
    #[test]
    fn lungs_are_split_from_airways_and_each_other() {
        let spacing = [2.0, 2.0, 2.0];
        let mut ct = Array3::from_elem((60, 40, 64), -1000.0f32);
        for ((i, j, k), v) in ct.indexed_iter_mut() {
            let body = (3..57).contains(&i) && (3..37).contains(&j);
            let lung_a = (8..26).contains(&i) && (8..32).contains(&j) && (10..40).contains(&k);
            let lung_b = (34..52).contains(&i) && (8..32).contains(&j) && (10..40).contains(&k);
            let bridge = (26..34).contains(&i) && (18..19).contains(&j) && (20..30).contains(&k);
            let trachea = (28..32).contains(&i) && (18..22).contains(&j) && k >= 30;
            let bubble = (28..30).contains(&i) && (10..12).contains(&j) && (2..4).contains(&k);
            *v = if lung_a || lung_b || bridge || trachea || bubble {
                -850.0
            } else if body {
                40.0
            } else {
                -1000.0
            };
        }
        let body = body_mask(&ct);
        assert!(body[[30, 20, 20]] && !body[[0, 0, 0]]);
        let (lungs, n) = split_lungs(&air_in_body(&ct, &body), spacing);
        assert_eq!(n, 2);
        assert_eq!(lungs[[15, 20, 25]], 1);
        assert_eq!(lungs[[45, 20, 25]], 2);
        assert_eq!(lungs[[30, 20, 58]], 0, "trachea top");
        assert_eq!(lungs[[29, 11, 3]], 0, "gas bubble");
    }
}
