//! The breathing model's view of a real chest ([`Thorax`]) built from its lung and body masks
//! on the output grid. Everything is a smooth 2-D map over the columns `(x, y)` (mm from
//! output voxel 0), interpolated bilinearly:
//!
//! * per lung, the footprint (columns holding lung), its normalised radius
//!   `1 + signed distance to the rim / L` (`L` the footprint's smaller half extent, so the
//!   radius is 1 on the rim, grows 1 per `L` mm outside and stays in 0..1 inside), and the top
//!   and base heights (the highest and lowest lung voxel of each column), continued outside
//!   the footprint from its rim and smoothed;
//! * the wall mobility: 1 over the thoracic cavity (the lungs' footprints closed over the
//!   mediastinum), 0 over the chest wall, the spine and the sternum (columns mostly of bone),
//!   fading over [`MOBILITY_FADE_MM`]; and, so that no column is squeezed beyond what the
//!   model allows (its descent is capped at 55% of the shortest column, and a real lung's
//!   columns are short in the costophrenic recesses and along sloping walls), times
//!   `min(1, column height / reference height)`: short columns' diaphragm rises in proportion
//!   to their height ([`CtThorax::with_reference_height`]).

use ndarray::{Array3, Axis};

use super::morphology::{close, dilate, distance_to, fill_holes_per_slice, gaussian};
use crate::synth::breathing::Thorax;

/// Radius (mm) of the closing that joins both lungs' footprints over the mediastinum.
const CAVITY_CLOSE_MM: f64 = 40.0;
/// Over how many mm outside the cavity the mobility falls to 0.
const MOBILITY_FADE_MM: f64 = 8.0;
/// A column counts as spine or sternum when more than this fraction of its lung-height span
/// is bone.
const BONE_COLUMN_FRACTION: f64 = 0.5;
/// Bone (HU).
const BONE_HU: f32 = 200.0;
/// Smoothing (mm, standard deviation) of the footprint radius and the column heights.
const SMOOTH_MM: f64 = 2.0;
/// ... and at least this many columns (the maps' slopes must not jump from column to column:
/// the written field is sampled per voxel and interpolated).
const MIN_SMOOTH_VOXELS: f64 = 1.5;

/// A scalar map over the columns, bilinear between column centres, the edge repeated.
#[derive(Debug, Clone)]
struct ColumnMap {
    values: Array3<f32>,
    spacing: [f64; 2],
}

impl ColumnMap {
    fn at(&self, x: f64, y: f64) -> f64 {
        let (h, w, _) = self.values.dim();
        let u = (x / self.spacing[0]).clamp(0.0, (h - 1) as f64);
        let v = (y / self.spacing[1]).clamp(0.0, (w - 1) as f64);
        let (i, j) = (
            (u.floor() as usize).min(h.saturating_sub(2)),
            (v.floor() as usize).min(w.saturating_sub(2)),
        );
        let (fu, fv) = (u - i as f64, v - j as f64);
        let (i1, j1) = ((i + 1).min(h - 1), (j + 1).min(w - 1));
        let g = |a: usize, b: usize| self.values[[a, b, 0]] as f64;
        (1.0 - fu) * ((1.0 - fv) * g(i, j) + fv * g(i, j1))
            + fu * ((1.0 - fv) * g(i1, j) + fv * g(i1, j1))
    }
}

/// One lung seen as columns.
#[derive(Debug, Clone)]
struct LungColumns {
    radius: ColumnMap,
    top: ColumnMap,
    base: ColumnMap,
    center: [f64; 2],
    half: [f64; 2],
}

/// A real chest as the breathing model sees it (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct CtThorax {
    lungs: Vec<LungColumns>,
    mobility: ColumnMap,
    /// Lung column height (either lung), continued outside the footprints.
    height: ColumnMap,
    reference_height_mm: f64,
}

impl CtThorax {
    /// Builds the maps from the lung labels (`1..=lungs`), the CT (HU, for bone) and the voxel
    /// size, all on the output grid.
    pub fn new(labels: &Array3<u8>, lungs: usize, ct: &Array3<f32>, spacing: [f64; 3]) -> Self {
        let (h, w, d) = labels.dim();
        let plane = [spacing[0], spacing[1], 1.0];
        let cell = [spacing[0], spacing[1]];
        let sigma = [
            (SMOOTH_MM / spacing[0]).max(MIN_SMOOTH_VOXELS),
            (SMOOTH_MM / spacing[1]).max(MIN_SMOOTH_VOXELS),
            0.0,
        ];
        let mut union = Array3::from_elem((h, w, 1), false);
        let mut height = Array3::<f32>::zeros((h, w, 1));
        let (mut z_lo, mut z_hi) = (d, 0);
        let mut columns = Vec::with_capacity(lungs);
        for lung in 1..=lungs as u8 {
            let mut footprint = Array3::from_elem((h, w, 1), false);
            let mut top = Array3::<f32>::zeros((h, w, 1));
            let mut base = Array3::<f32>::zeros((h, w, 1));
            for ((i, j), column) in labels
                .lanes(Axis(2))
                .into_iter()
                .enumerate()
                .map(|(n, c)| ((n / w, n % w), c))
            {
                let first = column.iter().position(|&l| l == lung);
                let last = column.iter().rposition(|&l| l == lung);
                if let (Some(lo), Some(hi)) = (first, last) {
                    footprint[[i, j, 0]] = true;
                    base[[i, j, 0]] = ((lo as f64 - 0.5) * spacing[2]) as f32;
                    top[[i, j, 0]] = ((hi as f64 + 0.5) * spacing[2]) as f32;
                    let tall = ((hi + 1 - lo) as f64 * spacing[2]) as f32;
                    height[[i, j, 0]] = height[[i, j, 0]].max(tall);
                    z_lo = z_lo.min(lo);
                    z_hi = z_hi.max(hi);
                }
            }
            fill_holes_per_slice(&mut footprint);
            let known = footprint.clone();
            let (mut lo_i, mut hi_i, mut lo_j, mut hi_j) = (h, 0, w, 0);
            for ((i, j, _), &f) in footprint.indexed_iter() {
                if f {
                    union[[i, j, 0]] = true;
                    (lo_i, hi_i, lo_j, hi_j) = (lo_i.min(i), hi_i.max(i), lo_j.min(j), hi_j.max(j));
                }
            }
            let half = [
                0.5 * (hi_i + 1).saturating_sub(lo_i) as f64 * spacing[0],
                0.5 * (hi_j + 1).saturating_sub(lo_j) as f64 * spacing[1],
            ];
            let center = [
                0.5 * (lo_i + hi_i) as f64 * spacing[0],
                0.5 * (lo_j + hi_j) as f64 * spacing[1],
            ];
            let scale = half[0].min(half[1]).max(1e-3);
            let outside = distance_to(&footprint, plane);
            let inside = distance_to(&footprint.mapv(|f| !f), plane);
            let edge = 0.5 * spacing[0].min(spacing[1]) as f32;
            let signed = ndarray::Zip::from(&footprint)
                .and(&outside)
                .and(&inside)
                .map_collect(|&f, &o, &i| if f { -(i - edge) } else { o - edge });
            let radius =
                gaussian(&signed, sigma).mapv(|s| (1.0 + s as f64 / scale).max(0.0) as f32);
            columns.push(LungColumns {
                radius: ColumnMap {
                    values: radius,
                    spacing: cell,
                },
                top: ColumnMap {
                    values: gaussian(&extend(&top, &known), sigma),
                    spacing: cell,
                },
                base: ColumnMap {
                    values: gaussian(&extend(&base, &known), sigma),
                    spacing: cell,
                },
                center,
                half,
            });
        }
        let mobility = mobility(&union, ct, (z_lo, z_hi), plane);
        let height = gaussian(&extend(&height, &union), sigma);
        CtThorax {
            lungs: columns,
            mobility: ColumnMap {
                values: mobility,
                spacing: cell,
            },
            height: ColumnMap {
                values: height,
                spacing: cell,
            },
            reference_height_mm: 0.0,
        }
    }

    /// Columns shorter than `mm` get a proportionally smaller diaphragm rise (0: none
    /// shortened).
    pub fn with_reference_height(mut self, mm: f64) -> Self {
        self.reference_height_mm = mm;
        self
    }
}

/// `values` known where `known`, continued outward: each unknown column takes the mean of its
/// known 8-neighbours, ring by ring, until all are known.
fn extend(values: &Array3<f32>, known: &Array3<bool>) -> Array3<f32> {
    let (h, w, _) = values.dim();
    let mut values = values.clone();
    let mut known = known.clone();
    if !known.iter().any(|&k| k) {
        return values;
    }
    loop {
        let mut updates = Vec::new();
        for i in 0..h {
            for j in 0..w {
                if known[[i, j, 0]] {
                    continue;
                }
                let (mut sum, mut n) = (0.0, 0);
                for a in i.saturating_sub(1)..(i + 2).min(h) {
                    for b in j.saturating_sub(1)..(j + 2).min(w) {
                        if known[[a, b, 0]] {
                            sum += values[[a, b, 0]];
                            n += 1;
                        }
                    }
                }
                if n > 0 {
                    updates.push((i, j, sum / n as f32));
                }
            }
        }
        if updates.is_empty() {
            return values;
        }
        for (i, j, v) in updates {
            values[[i, j, 0]] = v;
            known[[i, j, 0]] = true;
        }
    }
}

/// The wall mobility map (see the module docs).
fn mobility(
    footprints: &Array3<bool>,
    ct: &Array3<f32>,
    (z_lo, z_hi): (usize, usize),
    plane: [f64; 3],
) -> Array3<f32> {
    let (h, w, _) = footprints.dim();
    let mut cavity = close(footprints, CAVITY_CLOSE_MM, plane);
    fill_holes_per_slice(&mut cavity);
    let span = (z_hi + 1).saturating_sub(z_lo).max(1);
    let mut bone = Array3::from_elem((h, w, 1), false);
    for i in 0..h {
        for j in 0..w {
            let count = (z_lo..=z_hi.min(ct.dim().2 - 1))
                .filter(|&k| ct[[i, j, k]] > BONE_HU)
                .count();
            bone[[i, j, 0]] = count as f64 > BONE_COLUMN_FRACTION * span as f64;
        }
    }
    let bone = dilate(&bone, 0.5 * MOBILITY_FADE_MM, plane);
    for (c, b) in cavity.iter_mut().zip(bone.iter()) {
        *c &= !b;
    }
    distance_to(&cavity, plane).mapv(|d| {
        let t = (d as f64 / MOBILITY_FADE_MM).clamp(0.0, 1.0);
        (1.0 - t * t * (3.0 - 2.0 * t)) as f32
    })
}

impl Thorax for CtThorax {
    fn lung_count(&self) -> usize {
        self.lungs.len()
    }

    fn footprint_radius(&self, lung: usize, x: f64, y: f64) -> f64 {
        self.lungs[lung].radius.at(x, y)
    }

    fn top(&self, lung: usize, x: f64, y: f64) -> f64 {
        self.lungs[lung].top.at(x, y)
    }

    fn base(&self, lung: usize, x: f64, y: f64) -> f64 {
        self.lungs[lung].base.at(x, y)
    }

    fn footprint_frame(&self, lung: usize) -> ([f64; 2], [f64; 2]) {
        (self.lungs[lung].center, self.lungs[lung].half)
    }

    fn wall_mobility(&self, x: f64, y: f64) -> f64 {
        let short = if self.reference_height_mm > 0.0 {
            (self.height.at(x, y) / self.reference_height_mm).clamp(0.0, 1.0)
        } else {
            1.0
        };
        self.mobility.at(x, y) * short
    }
}
