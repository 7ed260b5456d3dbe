//! The inspiration anatomy of the phantom as a continuous function of position: an elliptic
//! body with a fat layer, ribs and a spine, two lungs cut by a diaphragm dome, and vessel
//! trees inside the lungs. Every boundary is blurred over about one voxel (partial volume),
//! so the function can be evaluated anywhere, on the grid or at displaced points.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::vec3::Vec3;
use super::vessels::{Growth, Vessels};

/// Air, in Hounsfield units.
pub(crate) const AIR_HU: f64 = -1000.0;
/// Subcutaneous fat.
const FAT_HU: f64 = -100.0;
/// Muscle, mediastinum, abdomen.
const SOFT_TISSUE_HU: f64 = 40.0;
/// Ribs and vertebrae.
const BONE_HU: f64 = 700.0;
/// Blood in the pulmonary vessels.
const VESSEL_HU: f64 = 50.0;

/// Scale (voxels) of every boundary's blur: a scanner's point spread (10%-90% rise over
/// about 2.2 x this), which also keeps the phantom smooth enough for trilinear resampling.
const EDGE_SCALE_VOXELS: f64 = 1.0;
/// Beyond this distance (voxels) from a surface the blur is taken as complete.
pub(crate) const EDGE_REACH_VOXELS: f64 = 5.0 * EDGE_SCALE_VOXELS;

/// Fraction of "inside" for a signed distance in voxels (negative inside): a smooth
/// `(1 - tanh(d / s)) / 2` step, exactly 0 or 1 beyond [`EDGE_REACH_VOXELS`].
pub(crate) fn inside(signed_distance: f64) -> f64 {
    if signed_distance >= EDGE_REACH_VOXELS {
        0.0
    } else if signed_distance <= -EDGE_REACH_VOXELS {
        1.0
    } else {
        0.5 * (1.0 - (signed_distance / EDGE_SCALE_VOXELS).tanh())
    }
}

fn mix(a: f64, b: f64, t: f64) -> f64 {
    a + (b - a) * t
}

/// One lung: an ellipsoid whose base is cut by the diaphragm dome.
#[derive(Debug, Clone)]
pub(crate) struct Lung {
    /// Ellipsoid centre (voxels).
    pub center: Vec3,
    /// Ellipsoid radii (voxels).
    pub radii: Vec3,
    /// Height (axis 2, voxels) of the top of the diaphragm dome under this lung.
    dome_top: f64,
    /// How much lower (voxels) the dome is at the lung's rim than at its centre.
    dome_drop: f64,
}

impl Lung {
    /// Approximate signed distance to the lung surface in voxels (negative inside).
    pub fn signed_distance(&self, p: Vec3) -> f64 {
        let e = [0, 1, 2].map(|a| (p[a] - self.center[a]) / self.radii[a]);
        let rho = (e[0] * e[0] + e[1] * e[1] + e[2] * e[2]).sqrt();
        let min_radius = self.radii.iter().copied().fold(f64::INFINITY, f64::min);
        let to_ellipsoid = (rho - 1.0) * min_radius;
        let dome = self.dome_top - self.dome_drop * (e[0] * e[0] + e[1] * e[1]);
        let to_dome = dome - p[2];
        to_ellipsoid.max(to_dome)
    }
}

/// The elliptic cross-section of the body (constant along axis 2).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Body {
    /// Centre in the (axis 0, axis 1) plane (voxels).
    pub center: [f64; 2],
    /// Radii along axes 0 and 1 (voxels).
    pub radii: [f64; 2],
}

impl Body {
    /// Elliptic radius: 0 at the centre, 1 on the skin.
    pub fn rho(&self, p: Vec3) -> f64 {
        let x = (p[0] - self.center[0]) / self.radii[0];
        let y = (p[1] - self.center[1]) / self.radii[1];
        (x * x + y * y).sqrt()
    }

    fn min_radius(&self) -> f64 {
        self.radii[0].min(self.radii[1])
    }
}

/// The whole inspiration anatomy of one case.
#[derive(Debug, Clone)]
pub(crate) struct Anatomy {
    pub body: Body,
    pub lungs: [Lung; 2],
    pub vessels: Vessels,
    /// Distance between ribs along axis 2 (voxels).
    rib_period: f64,
    rib_phase: f64,
    /// Half thickness of a rib (voxels).
    rib_half_width: f64,
    /// Spine centre (axes 0, 1) and radius (voxels).
    spine: [f64; 3],
}

impl Anatomy {
    /// Draws a random anatomy for a grid of `size` voxels.
    pub fn random(size: [usize; 3], rng: &mut ChaCha8Rng) -> Self {
        let half = size.map(|n| n as f64 / 2.0);
        let mid = size.map(|n| (n as f64 - 1.0) / 2.0);
        let body = Body {
            center: [mid[0], mid[1] + rng.gen_range(-0.03..0.03) * half[1]],
            radii: [
                rng.gen_range(0.86..0.94) * half[0],
                rng.gen_range(0.66..0.74) * half[1],
            ],
        };
        let lung_center_z = mid[2] + rng.gen_range(0.05..0.15) * half[2];
        let radii = [
            rng.gen_range(0.25..0.31) * half[0],
            rng.gen_range(0.40..0.48) * half[1],
            rng.gen_range(0.72..0.82) * half[2],
        ];
        let dome_top = lung_center_z - rng.gen_range(0.35..0.5) * radii[2];
        let dome_drop = rng.gen_range(0.2..0.35) * radii[2];
        let lungs = [-1.0, 1.0].map(|side: f64| {
            let offset = rng.gen_range(0.36..0.41) * half[0];
            Lung {
                center: [mid[0] + side * offset, body.center[1], lung_center_z],
                radii: [
                    radii[0] * rng.gen_range(0.95..1.05),
                    radii[1],
                    radii[2] * rng.gen_range(0.95..1.05),
                ],
                dome_top: dome_top + rng.gen_range(-0.04..0.04) * half[2],
                dome_drop,
            }
        });
        let scale = size.iter().map(|&n| n as f64).sum::<f64>() / (3.0 * 192.0);
        let growth = Growth {
            depth: 5,
            radius: (rng.gen_range(2.4..3.2) * scale).max(1.0),
            length: 0.45 * radii[0].min(radii[2]),
        };
        let mut vessels = Vessels::default();
        for (lung, side) in lungs.iter().zip([-1.0, 1.0]) {
            vessels.grow_in(lung, side, growth, rng);
        }
        vessels.index(size);
        let rib_period = rng.gen_range(0.13..0.17) * half[2];
        Anatomy {
            body,
            lungs,
            vessels,
            rib_period,
            rib_phase: rng.gen_range(0.0..rib_period),
            rib_half_width: (0.25 * rib_period).max(0.75),
            spine: [
                mid[0],
                body.center[1] - 0.62 * body.radii[1],
                0.14 * body.radii[1],
            ],
        }
    }

    /// Lung volume fraction at `p` (either lung).
    pub fn lung_fraction(&self, p: Vec3) -> f64 {
        let d = self.lungs[0]
            .signed_distance(p)
            .min(self.lungs[1].signed_distance(p));
        inside(d)
    }

    /// CT value (HU) at `p` with lung parenchyma at `lung_hu`.
    pub fn hounsfield(&self, p: Vec3, lung_hu: f64) -> f64 {
        let rho = self.body.rho(p);
        let r = self.body.min_radius();
        let in_body = inside((rho - 1.0) * r);
        if in_body == 0.0 {
            return AIR_HU;
        }
        let mut hu = mix(SOFT_TISSUE_HU, FAT_HU, inside((0.93 - rho) * r));
        // Ribs: a ring at 84% of the body radius, in bands along axis 2.
        let ring = inside(((rho - 0.84) * r).abs() - 0.03 * r);
        if ring > 0.0 {
            let t = (p[2] - self.rib_phase).rem_euclid(self.rib_period);
            let band = inside((t - 0.5 * self.rib_period).abs() - self.rib_half_width);
            hu = mix(hu, BONE_HU, ring * band);
        }
        let spine_d = ((p[0] - self.spine[0]).powi(2) + (p[1] - self.spine[1]).powi(2)).sqrt();
        hu = mix(hu, BONE_HU, inside(spine_d - self.spine[2]));
        let lung = self.lung_fraction(p);
        if lung > 0.0 {
            hu = mix(hu, lung_hu, lung);
            let vessel = self.vessels.fraction(p);
            hu = mix(hu, VESSEL_HU, vessel * lung);
        }
        mix(AIR_HU, hu, in_body)
    }
}
