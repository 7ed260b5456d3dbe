//! A breath-hold breathing model in physical space (mm), independent of any grid, that can
//! drive any anatomy whose lungs it is told about through [`Thorax`].
//!
//! Coordinates are mm along the array axes: `x` (axis 0, left-right), `y` (axis 1,
//! antero-posterior, posterior at low `y`) and `z` (axis 2, cranio-caudal, apex at high `z`).
//! The anatomy is known at **inspiration**; the model says where each **expiration** point
//! lies in inspiration, `Φ(p) = p + u(p)`, so `u` is the backward DDF of MONAI's `Warp` on the
//! expiration (fixed) grid: `warp(moving = inspiration, u) ~ fixed = expiration`.
//!
//! # The model
//! * **The diaphragm drives it.** Each lung is seen as a set of vertical columns over its
//!   footprint (its projection along `z`), from its base `B(x, y)` (the diaphragm at
//!   inspiration) to its top `T(x, y)` (the apex surface, which stays still). In expiration
//!   the diaphragm is higher by the descent `Δ(x, y)` (a per-case amplitude, larger
//!   posteriorly and different for each hemidiaphragm), so the expiration column spans
//!   `B + Δ .. T`. A point at height fraction `s` of its expiration column maps to height
//!   fraction `h(s) = s + a s (1 - s)` (`a = κ Δ / (T - B)`, `κ` = [`BreathingParams::base_bias`])
//!   of the inspiration column: the displacement `≈ -Δ (1 - s)(1 - κ s)` is largest at the
//!   base and vanishes at the apex, and the lower lung expands most (as in real ventilation).
//! * **Lungs slide along a still chest wall.** In the lung, a small in-plane slide
//!   `c (1 - s²)(1 - r²) e` (`r` the footprint's normalised radius, 1 on its rim) vanishes on the
//!   footprint's rim, so the lung's side walls map onto themselves: the lung map sends the
//!   expiration lung exactly onto the inspiration lung, bijectively and fold-free (its
//!   Jacobian is triangular with positive diagonal blocks). Outside the lungs the tissue moves
//!   only vertically, `u = -Δ_ext(x, y) g(z - B_exp(x, y)) ẑ`: the abdomen below each lung
//!   follows the diaphragm (`g` decays slowly downwards), the mediastinum just above it a
//!   little, and the chest wall, ribs and spine not at all (`Δ_ext` fades outside the
//!   footprints and is cut by [`Thorax::wall_mobility`]). `u` is thus continuous across the
//!   diaphragm and jumps tangentially (vertically) across the pleura of the side walls, with
//!   no normal jump; each region's map is fold-free (`det = 1 + ∂u_z/∂z > 0` outside).
//! * **Density follows volume.** [`Breathing::volume_change`] is the Jacobian determinant of
//!   the lung map (inspiration volume per expiration volume); [`expiration_hu`] conserves the
//!   tissue mass of a voxel: `HU_exp = -1000 + (HU_insp + 1000) · det`.
//!
//! # Driving another anatomy
//! Everything the model reads about the anatomy goes through [`Thorax`]: per lung, its
//! footprint's normalised radius, top and base heights (defined everywhere, continued
//! smoothly outside the footprint), a footprint frame, and where the chest wall is. The
//! phantom implements it analytically (its `anatomy::Chest`); a real CT can implement
//! it from its lung and body masks (per column: lowest and highest lung voxel; the footprint
//! radius from a 2-D distance transform; wall mobility from the body mask's distance to the
//! skin), then sample `fixed(p) = CT(Φ(p))` with the density correction, exactly as
//! [`super::generate_case`] does.

use serde::{Deserialize, Serialize};

/// A point in mm (axes 0, 1, 2).
pub type Point = [f64; 3];

/// The lung geometry (inspiration, mm) the breathing model needs; see the module docs.
pub trait Thorax: Send + Sync {
    /// Number of lungs (usually 2).
    fn lung_count(&self) -> usize;
    /// Normalised footprint radius of `lung` at column `(x, y)`: 0 at its centre, below 1
    /// inside, 1 on the rim, above 1 outside (continuous).
    fn footprint_radius(&self, lung: usize, x: f64, y: f64) -> f64;
    /// Height of the lung's top (apex surface) over column `(x, y)`.
    fn top(&self, lung: usize, x: f64, y: f64) -> f64;
    /// Height of the lung's base (the diaphragm at inspiration) over column `(x, y)`.
    fn base(&self, lung: usize, x: f64, y: f64) -> f64;
    /// Centre and half extents (x, y) of the lung's footprint.
    fn footprint_frame(&self, lung: usize) -> ([f64; 2], [f64; 2]);
    /// 1 inside the thoracic cavity and abdomen (tissue that may follow the diaphragm),
    /// falling to 0 in the chest wall, ribs and beyond.
    fn wall_mobility(&self, x: f64, y: f64) -> f64;
}

/// The per-case amplitudes of the model (mm and ratios).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreathingParams {
    /// Diaphragm descent from expiration to inspiration at a footprint's centre (mm).
    pub descent_mm: f64,
    /// Multiplies the descent of each lung (hemidiaphragms differ), one per lung.
    pub lung_gain: Vec<f64>,
    /// Relative extra descent at the posterior rim (and less at the anterior rim).
    pub posterior_gain: f64,
    /// `κ` in 0..1: how much the motion concentrates near the base.
    pub base_bias: f64,
    /// In-plane slide at the base of the footprint's centre (mm).
    pub slide_mm: f64,
    /// Direction (x, y) of the slide for the lung at larger `x`; mirrored in `x` for the
    /// other.
    pub slide_direction: [f64; 2],
}

impl BreathingParams {
    /// Draws a case's amplitudes for `motion`: the target mean landmark displacement in
    /// `motion`'s range (returned first; the caller calibrates on it), a descent of twice
    /// that, and an in-plane slide of `slide_ratio` (a range) times the descent. The phantoms
    /// and the pairs made from a CT draw theirs here, in this order, from their own stream.
    pub fn draw(
        rng: &mut impl rand::Rng,
        motion: super::Motion,
        slide_ratio: (f64, f64),
    ) -> (f64, Self) {
        let (lo, hi) = motion.mean_displacement_range_mm();
        let target_mean = rng.gen_range(lo..hi);
        let slide_ratio = rng.gen_range(slide_ratio.0..slide_ratio.1);
        let params = Self {
            descent_mm: 2.0 * target_mean,
            lung_gain: vec![rng.gen_range(0.9..1.1), rng.gen_range(0.9..1.1)],
            posterior_gain: rng.gen_range(0.15..0.35),
            base_bias: rng.gen_range(0.4..0.7),
            slide_mm: 2.0 * target_mean * slide_ratio,
            slide_direction: [
                rng.gen_range(-0.5..0.5),
                if rng.gen_bool(0.5) { 1.0 } else { -1.0 },
            ],
        };
        (target_mean, params)
    }
}

/// How far (mm) the abdomen's motion fades below the diaphragm (e-folding length).
const ABDOMEN_DECAY_MM: f64 = 150.0;
/// Over how many mm above the expiration diaphragm the mediastinum's motion fades to 0.
const MEDIASTINUM_REACH_MM: f64 = 50.0;
/// Over how many mm outside a footprint its descent fades to 0 (in the abdomen).
const FOOTPRINT_REACH_MM: f64 = 20.0;
/// The descent never exceeds this fraction of a lung column's inspiration height.
const MAX_DESCENT_FRACTION: f64 = 0.55;
/// The slide never exceeds this fraction of a footprint's smaller half extent (keeps the
/// in-plane map's Jacobian above 0.5).
const MAX_SLIDE_FRACTION: f64 = 0.25;
/// Finite-difference step (mm) of [`Breathing::volume_change`].
const FD_STEP_MM: f64 = 0.25;

/// `3t² - 2t³` on `[0, 1]`, 0 below, 1 above.
fn smoothstep(t: f64) -> f64 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// The breathing motion of one case over a [`Thorax`].
#[derive(Debug, Clone)]
pub struct Breathing<T> {
    thorax: T,
    params: BreathingParams,
    /// +1 for lungs right of the lungs' mean centre, -1 for the others.
    sides: Vec<f64>,
}

impl<T: Thorax> Breathing<T> {
    /// The model for `thorax` with `params`. The descent is capped at 55% of the shortest
    /// lung column and the slide at 25% of the smallest footprint half extent, so the maps
    /// stay invertible for any amplitude; [`Breathing::params`] gives the values in use.
    pub fn new(thorax: T, mut params: BreathingParams) -> Self {
        let n = thorax.lung_count();
        params.lung_gain.resize(n, 1.0);
        let centres: Vec<f64> = (0..n).map(|l| thorax.footprint_frame(l).0[0]).collect();
        let mid = centres.iter().sum::<f64>() / n.max(1) as f64;
        let sides = centres
            .iter()
            .map(|&c| if c >= mid { 1.0 } else { -1.0 })
            .collect();
        let norm = params.slide_direction[0].hypot(params.slide_direction[1]);
        params.slide_direction = if norm > 0.0 {
            params.slide_direction.map(|v| v / norm)
        } else {
            [0.0, 1.0]
        };
        let mut model = Breathing {
            thorax,
            params,
            sides,
        };
        model.cap_amplitudes();
        model
    }

    /// Scales the descent and slide down where they would exceed the caps.
    fn cap_amplitudes(&mut self) {
        let mut ratio: f64 = 0.0; // largest descent / column height with descent_mm = 1
        let mut min_half = f64::INFINITY;
        let saved = self.params.descent_mm;
        self.params.descent_mm = 1.0;
        for l in 0..self.thorax.lung_count() {
            let (c, h) = self.thorax.footprint_frame(l);
            min_half = min_half.min(h[0]).min(h[1]);
            for i in 0..=24 {
                for j in 0..=24 {
                    let x = c[0] + h[0] * (i as f64 / 12.0 - 1.0);
                    let y = c[1] + h[1] * (j as f64 / 12.0 - 1.0);
                    if self.thorax.footprint_radius(l, x, y) > 1.0 {
                        continue;
                    }
                    let height = self.thorax.top(l, x, y) - self.thorax.base(l, x, y);
                    ratio = ratio.max(self.descent(x, y) / height.max(1e-6));
                }
            }
        }
        let cap = if ratio > 0.0 {
            MAX_DESCENT_FRACTION / ratio
        } else {
            f64::INFINITY
        };
        self.params.descent_mm = saved.clamp(0.0, cap);
        if min_half.is_finite() {
            self.params.slide_mm = self
                .params
                .slide_mm
                .clamp(0.0, MAX_SLIDE_FRACTION * min_half);
        }
    }

    /// The parameters in use (after the caps).
    pub fn params(&self) -> &BreathingParams {
        &self.params
    }

    /// The anatomy the model moves.
    pub fn thorax(&self) -> &T {
        &self.thorax
    }

    /// Multiplies the descent and the slide by `factor` (then caps them again).
    pub fn scaled(mut self, factor: f64) -> Self {
        self.params.descent_mm *= factor;
        self.params.slide_mm *= factor;
        self.cap_amplitudes();
        self
    }

    /// Descent (mm) of lung `lung`'s own diaphragm at antero-posterior position `y`, before
    /// fading.
    fn lung_descent(&self, lung: usize, y: f64) -> f64 {
        let (c, h) = self.thorax.footprint_frame(lung);
        let posterior = (-(y - c[1]) / h[1]).clamp(-1.0, 1.0);
        self.params.descent_mm
            * self.params.lung_gain[lung]
            * (1.0 + self.params.posterior_gain * posterior).max(0.0)
    }

    /// Diaphragm descent `Δ_ext` (mm) at column `(x, y)`: each lung's descent over its
    /// footprint, fading outside it and in the chest wall.
    pub fn descent(&self, x: f64, y: f64) -> f64 {
        let mut total = 0.0;
        for l in 0..self.thorax.lung_count() {
            let r = self.thorax.footprint_radius(l, x, y);
            let (_, h) = self.thorax.footprint_frame(l);
            let outside_mm = (r - 1.0).max(0.0) * h[0].min(h[1]);
            let fade = 1.0 - smoothstep(outside_mm / FOOTPRINT_REACH_MM);
            if fade > 0.0 {
                total += fade * self.lung_descent(l, y);
            }
        }
        total * self.thorax.wall_mobility(x, y)
    }

    /// The lung (if any) whose expiration volume contains `p`.
    pub fn expiration_lung(&self, p: Point) -> Option<usize> {
        let delta = self.descent(p[0], p[1]);
        (0..self.thorax.lung_count()).find(|&l| {
            self.thorax.footprint_radius(l, p[0], p[1]) < 1.0
                && p[2] > self.thorax.base(l, p[0], p[1]) + delta
                && p[2] < self.thorax.top(l, p[0], p[1])
        })
    }

    /// The lung (if any) whose inspiration volume contains `m`.
    pub fn inspiration_lung(&self, m: Point) -> Option<usize> {
        (0..self.thorax.lung_count()).find(|&l| {
            self.thorax.footprint_radius(l, m[0], m[1]) < 1.0
                && m[2] > self.thorax.base(l, m[0], m[1])
                && m[2] < self.thorax.top(l, m[0], m[1])
        })
    }

    /// The smooth map of lung `lung` (defined around it): where expiration point `p` of that
    /// lung lies at inspiration.
    pub fn lung_map(&self, lung: usize, p: Point) -> Point {
        let [x, y, z] = p;
        let th = &self.thorax;
        let (top, base) = (th.top(lung, x, y), th.base(lung, x, y));
        let delta = self.descent(x, y);
        let height = top - base;
        let exp_height = height - delta;
        if exp_height <= 1e-9 {
            return p;
        }
        let s = (z - base - delta) / exp_height;
        let a = self.params.base_bias * delta / height;
        let s_insp = s + a * s * (1.0 - s);
        let r = th.footprint_radius(lung, x, y);
        let slide = self.params.slide_mm * (1.0 - s * s).clamp(0.0, 1.0) * (1.0 - r * r).max(0.0);
        let dir = self.params.slide_direction;
        let q0 = x + slide * dir[0] * self.sides[lung];
        let q1 = y + slide * dir[1];
        let base_q = th.base(lung, q0, q1);
        [q0, q1, base_q + s_insp * (th.top(lung, q0, q1) - base_q)]
    }

    /// The map outside the lungs (vertical only): where expiration point `p` lies at
    /// inspiration.
    pub fn outer_map(&self, p: Point) -> Point {
        let [x, y, z] = p;
        let delta = self.descent(x, y);
        if delta == 0.0 {
            return p;
        }
        let diaphragm = (0..self.thorax.lung_count())
            .map(|l| self.thorax.base(l, x, y))
            .fold(f64::NEG_INFINITY, f64::max)
            + delta;
        let t = z - diaphragm;
        let follow = if t <= 0.0 {
            (t / ABDOMEN_DECAY_MM.max(2.0 * delta)).exp()
        } else {
            1.0 - smoothstep(t / MEDIASTINUM_REACH_MM)
        };
        [x, y, z - delta * follow]
    }

    /// `Φ(p)`: where expiration point `p` lies at inspiration, and the lung it is in.
    pub fn map(&self, p: Point) -> (Point, Option<usize>) {
        match self.expiration_lung(p) {
            Some(l) => (self.lung_map(l, p), Some(l)),
            None => (self.outer_map(p), None),
        }
    }

    /// The backward displacement `u(p) = Φ(p) - p` (mm) at expiration point `p`.
    pub fn displacement(&self, p: Point) -> Point {
        let (q, _) = self.map(p);
        [q[0] - p[0], q[1] - p[1], q[2] - p[2]]
    }

    /// Jacobian determinant of the map of `region` (a lung, or `None` for outside) at `p`:
    /// inspiration volume per expiration volume (central differences).
    pub fn volume_change(&self, region: Option<usize>, p: Point) -> f64 {
        let f = |q: Point| match region {
            Some(l) => self.lung_map(l, q),
            None => self.outer_map(q),
        };
        let mut jac = [[0.0; 3]; 3];
        for (axis, column) in jac.iter_mut().enumerate() {
            let (mut lo, mut hi) = (p, p);
            lo[axis] -= FD_STEP_MM;
            hi[axis] += FD_STEP_MM;
            let (a, b) = (f(lo), f(hi));
            for c in 0..3 {
                column[c] = (b[c] - a[c]) / (2.0 * FD_STEP_MM);
            }
        }
        // jac[axis][component]: the transpose has the same determinant.
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    }

    /// Inverts `Φ`: the expiration point `f` with `Φ(f) = m`, and the residual `|Φ(f) - m|`
    /// (mm). Inspiration lung points invert the lung map (fixed-point iteration: its
    /// displacement's gradient is well below 1); others invert the vertical outer map
    /// (bisection: it is monotone in `z`).
    pub fn invert(&self, m: Point) -> (Point, f64) {
        let f = match self.inspiration_lung(m) {
            Some(l) => {
                let mut f = m;
                for _ in 0..500 {
                    let q = self.lung_map(l, f);
                    let next = [0, 1, 2].map(|a| f[a] + (m[a] - q[a]));
                    let step = (0..3).map(|a| (next[a] - f[a]).abs()).fold(0.0, f64::max);
                    f = next;
                    if step < 1e-11 {
                        break;
                    }
                }
                f
            }
            None => {
                let reach = 2.0 * self.descent(m[0], m[1]) + 1.0;
                let (mut lo, mut hi) = (m[2] - reach, m[2] + reach);
                for _ in 0..80 {
                    let mid = 0.5 * (lo + hi);
                    if self.outer_map([m[0], m[1], mid])[2] < m[2] {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                [m[0], m[1], 0.5 * (lo + hi)]
            }
        };
        let (q, _) = self.map(f);
        let residual = (0..3).map(|a| (q[a] - m[a]).powi(2)).sum::<f64>().sqrt();
        (f, residual)
    }
}

/// Expiration CT value of parenchyma whose inspiration value is `insp_hu`, compressed by
/// `volume_change` (inspiration volume per expiration volume): the tissue mass of a voxel is
/// kept, `-1000 + (insp_hu + 1000) · volume_change`, clamped to -1000..=-300 HU.
pub fn expiration_hu(insp_hu: f64, volume_change: f64) -> f64 {
    (-1000.0 + (insp_hu + 1000.0) * volume_change).clamp(-1000.0, -300.0)
}
