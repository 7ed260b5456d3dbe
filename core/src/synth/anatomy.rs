//! The inspiration anatomy of the phantom as a continuous function of position in mm: an
//! elliptic body with a fat layer, ribs and a spine, two lungs (vertical columns over an
//! elliptic footprint, under a domed apex and over a diaphragm dome) and vessel trees inside
//! the lungs. Every boundary is blurred over an edge scale given at sampling time (about one
//! voxel: partial volume), so the function can be evaluated anywhere, on any grid or at
//! displaced points, and the same physical point gives the same tissue on every grid.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::breathing::Thorax;
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

/// The phantom's physical extent (mm): Learn2Reg's 192 x 192 x 208 voxels of
/// 1.75 x 1.25 x 1.75 mm.
pub const EXTENT_MM: [f64; 3] = [336.0, 240.0, 364.0];

/// Elliptic radius of the body where the lungs' footprints end at the most.
const LUNG_MAX_RHO: f64 = 0.80;
/// Centre and half thickness (elliptic radius) of the rib ring.
const RIB_RHO: (f64, f64) = (0.87, 0.025);
/// Where the chest wall stops following the diaphragm (elliptic radius, fully still beyond).
const WALL_RHO: (f64, f64) = (LUNG_MAX_RHO, 0.85);

/// Fraction of "inside" for a signed distance `d` (mm, negative inside) blurred over `edge`
/// mm: a smooth `(1 - tanh(d / edge)) / 2` step, exactly 0 or 1 beyond 5 edges.
pub(crate) fn inside(d: f64, edge: f64) -> f64 {
    if d >= 5.0 * edge {
        0.0
    } else if d <= -5.0 * edge {
        1.0
    } else {
        0.5 * (1.0 - (d / edge).tanh())
    }
}

fn mix(a: f64, b: f64, t: f64) -> f64 {
    a + (b - a) * t
}

/// One lung at inspiration (mm): columns over an elliptic footprint, from the diaphragm dome
/// `base` up to the domed apex surface `top`.
#[derive(Debug, Clone)]
pub(crate) struct Lung {
    /// Footprint centre (x, y).
    pub center: [f64; 2],
    /// Footprint half axes (x, y).
    pub radii: [f64; 2],
    /// Height of the apex (top at the footprint centre).
    pub apex: f64,
    /// How much lower the top is at the footprint rim.
    apex_drop: f64,
    /// Height of the diaphragm dome at the footprint centre.
    pub dome_top: f64,
    /// How much lower the dome is at the rim.
    dome_drop: f64,
    /// How much lower the dome is at the posterior rim than at the centre (linear in y).
    dome_tilt: f64,
}

impl Lung {
    fn normalised(&self, x: f64, y: f64) -> [f64; 2] {
        [
            (x - self.center[0]) / self.radii[0],
            (y - self.center[1]) / self.radii[1],
        ]
    }

    /// Normalised footprint radius (1 on the rim).
    pub fn radius(&self, x: f64, y: f64) -> f64 {
        let [a, b] = self.normalised(x, y);
        a.hypot(b)
    }

    /// Height of the apex surface over `(x, y)`.
    pub fn top(&self, x: f64, y: f64) -> f64 {
        let [a, b] = self.normalised(x, y);
        self.apex - self.apex_drop * (a * a + b * b)
    }

    /// Height of the diaphragm (inspiration) under `(x, y)`.
    pub fn base(&self, x: f64, y: f64) -> f64 {
        let [a, b] = self.normalised(x, y);
        self.dome_top - self.dome_drop * (a * a + b * b) + self.dome_tilt * b.clamp(-1.5, 1.5)
    }

    /// Approximate signed distance (mm, negative inside) to the lung surface: the largest of
    /// the first-order distances to the footprint's wall, the base and the top.
    pub fn signed_distance(&self, p: Vec3) -> f64 {
        let [a, b] = self.normalised(p[0], p[1]);
        let r = a.hypot(b);
        // Gradients of r^2 / 2 and of the two domes' quadratic part, per mm.
        let g = [a / self.radii[0], b / self.radii[1]];
        let g_norm = g[0].hypot(g[1]);
        let wall = if r > 1e-9 {
            (r - 1.0) * r / g_norm.max(1e-12)
        } else {
            -self.radii[0].min(self.radii[1])
        };
        let top_slope = 2.0 * self.apex_drop * g_norm;
        let to_top = (p[2] - self.top(p[0], p[1])) / (1.0 + top_slope * top_slope).sqrt();
        let base_slope = 2.0 * self.dome_drop * g_norm + self.dome_tilt / self.radii[1];
        let to_base = (self.base(p[0], p[1]) - p[2]) / (1.0 + base_slope * base_slope).sqrt();
        wall.max(to_top).max(to_base)
    }
}

/// The elliptic cross-section of the body (constant along axis 2), mm.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Body {
    /// Centre in the (axis 0, axis 1) plane.
    pub center: [f64; 2],
    /// Radii along axes 0 and 1.
    pub radii: [f64; 2],
}

impl Body {
    /// Elliptic radius: 0 at the centre, 1 on the skin.
    pub fn rho(&self, x: f64, y: f64) -> f64 {
        let a = (x - self.center[0]) / self.radii[0];
        let b = (y - self.center[1]) / self.radii[1];
        a.hypot(b)
    }

    fn min_radius(&self) -> f64 {
        self.radii[0].min(self.radii[1])
    }
}

/// The body and lungs: what the breathing model needs ([`Thorax`]).
#[derive(Debug, Clone)]
pub(crate) struct Chest {
    pub(crate) body: Body,
    pub(crate) lungs: [Lung; 2],
}

impl Thorax for Chest {
    fn lung_count(&self) -> usize {
        2
    }

    fn footprint_radius(&self, lung: usize, x: f64, y: f64) -> f64 {
        self.lungs[lung].radius(x, y)
    }

    fn top(&self, lung: usize, x: f64, y: f64) -> f64 {
        self.lungs[lung].top(x, y)
    }

    fn base(&self, lung: usize, x: f64, y: f64) -> f64 {
        self.lungs[lung].base(x, y)
    }

    fn footprint_frame(&self, lung: usize) -> ([f64; 2], [f64; 2]) {
        (self.lungs[lung].center, self.lungs[lung].radii)
    }

    fn wall_mobility(&self, x: f64, y: f64) -> f64 {
        let rho = self.body.rho(x, y);
        let t = ((rho - WALL_RHO.0) / (WALL_RHO.1 - WALL_RHO.0)).clamp(0.0, 1.0);
        1.0 - t * t * (3.0 - 2.0 * t)
    }
}

/// The whole inspiration anatomy of one case (mm).
#[derive(Debug, Clone)]
pub(crate) struct Anatomy {
    pub chest: Chest,
    pub vessels: Vessels,
    /// Distance between ribs along axis 2.
    rib_period: f64,
    rib_phase: f64,
    /// Half thickness of a rib along axis 2.
    rib_half_width: f64,
    /// Spine centre (axes 0, 1) and radius.
    spine: [f64; 3],
}

impl Anatomy {
    /// Draws a random anatomy in [`EXTENT_MM`] (independent of any grid).
    pub fn random(rng: &mut ChaCha8Rng) -> Self {
        let half = EXTENT_MM.map(|e| e / 2.0);
        let body = Body {
            center: [half[0], half[1] + rng.gen_range(-3.0..3.0)],
            radii: [
                rng.gen_range(0.86..0.94) * half[0],
                rng.gen_range(0.80..0.88) * half[1],
            ],
        };
        let apex = EXTENT_MM[2] - rng.gen_range(20.0..32.0);
        let apex_drop = rng.gen_range(45.0..65.0);
        let dome_top = apex - rng.gen_range(215.0..245.0);
        let dome_drop = rng.gen_range(30.0..50.0);
        let offset = rng.gen_range(0.42..0.46) * half[0];
        let radii = [
            rng.gen_range(0.26..0.30) * half[0],
            rng.gen_range(0.62..0.70) * body.radii[1],
        ];
        let lungs = [-1.0, 1.0].map(|side: f64| {
            let mut lung = Lung {
                center: [
                    half[0] + side * offset,
                    body.center[1] - 0.05 * body.radii[1],
                ],
                radii: [radii[0] * rng.gen_range(0.95..1.05), radii[1]],
                apex: apex + rng.gen_range(-6.0..6.0),
                apex_drop,
                dome_top: dome_top + rng.gen_range(-8.0..8.0),
                dome_drop,
                dome_tilt: rng.gen_range(8.0..16.0),
            };
            fit_in_body(&mut lung, &body, offset);
            lung
        });
        let vessel_radius = rng.gen_range(3.6..4.6);
        let mut vessels = Vessels::default();
        for (lung, side) in lungs.iter().zip([-1.0, 1.0]) {
            let growth = Growth {
                depth: 8,
                radius: vessel_radius,
                length: 0.16 * (lung.apex - lung.dome_top),
            };
            vessels.grow_in(lung, side, growth, rng);
        }
        let rib_period = rng.gen_range(24.0..30.0);
        Anatomy {
            chest: Chest { body, lungs },
            vessels,
            rib_period,
            rib_phase: rng.gen_range(0.0..rib_period),
            rib_half_width: 0.22 * rib_period,
            spine: [
                half[0],
                body.center[1] - 0.62 * body.radii[1],
                0.14 * body.radii[1],
            ],
        }
    }

    /// Lung volume fraction at `p` (either lung), boundaries blurred over `edge` mm.
    pub fn lung_fraction(&self, p: Vec3, edge: f64) -> f64 {
        inside(self.lung_distance(p), edge)
    }

    /// Signed distance (mm) to the nearer lung.
    pub fn lung_distance(&self, p: Vec3) -> f64 {
        let lungs = &self.chest.lungs;
        lungs[0].signed_distance(p).min(lungs[1].signed_distance(p))
    }

    /// CT value (HU) at `p` with lung parenchyma at `lung_hu`, boundaries blurred over `edge`
    /// mm.
    pub fn hounsfield(&self, p: Vec3, lung_hu: f64, edge: f64) -> f64 {
        let body = &self.chest.body;
        let rho = body.rho(p[0], p[1]);
        let r = body.min_radius();
        let in_body = inside((rho - 1.0) * r, edge);
        if in_body == 0.0 {
            return AIR_HU;
        }
        let mut hu = mix(SOFT_TISSUE_HU, FAT_HU, inside((0.94 - rho) * r, edge));
        let ring = inside(((rho - RIB_RHO.0) * r).abs() - RIB_RHO.1 * r, edge);
        if ring > 0.0 {
            let t = (p[2] - self.rib_phase).rem_euclid(self.rib_period);
            let band = inside(
                (t - 0.5 * self.rib_period).abs() - self.rib_half_width,
                edge,
            );
            hu = mix(hu, BONE_HU, ring * band);
        }
        let spine_d = (p[0] - self.spine[0]).hypot(p[1] - self.spine[1]);
        hu = mix(hu, BONE_HU, inside(spine_d - self.spine[2], edge));
        let lung = self.lung_fraction(p, edge);
        if lung > 0.0 {
            hu = mix(hu, lung_hu, lung);
            let vessel = self.vessels.fraction(p, edge);
            hu = mix(hu, VESSEL_HU, vessel * lung);
        }
        mix(AIR_HU, hu, in_body)
    }
}

/// Shrinks `lung`'s footprint until it lies inside [`LUNG_MAX_RHO`] of the body and keeps a
/// mediastinum of at least 25 mm on each side of the midline.
fn fit_in_body(lung: &mut Lung, body: &Body, offset: f64) {
    lung.radii[0] = lung.radii[0].min(offset - 25.0);
    for _ in 0..40 {
        let worst = (0..64)
            .map(|i| {
                let t = std::f64::consts::TAU * i as f64 / 64.0;
                body.rho(
                    lung.center[0] + lung.radii[0] * t.cos(),
                    lung.center[1] + lung.radii[1] * t.sin(),
                )
            })
            .fold(0.0, f64::max);
        if worst <= LUNG_MAX_RHO {
            return;
        }
        lung.radii = lung.radii.map(|r| r * 0.98);
    }
}
