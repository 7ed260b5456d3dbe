//! The breathing motion of a real chest: [`Breathing`]'s lung map inside the lungs, and an
//! outer map that differs from [`Breathing::outer_map`] in one place. A real lung's walls
//! slope (its columns end under the chest wall, well below the apex), so tissue right above a
//! lung column is chest wall, not mediastinum: it must stay still, or the wall tears away from
//! the (still) top of the lung column. Here the outer tissue above the expiration diaphragm
//! follows it over at most the lung column's own expiration height under a footprint (then
//! stays still), and over [`MEDIASTINUM_REACH_MM`] away from the footprints, as in the
//! phantoms; and the diaphragm under a column is the nearer lung's base (the phantoms take
//! the higher of both lungs' bases, which are alike there, but a real lung's base continued
//! far outside its footprint is not a diaphragm). The map stays continuous and monotone in
//! `z` (fold-free).

use super::thorax::CtThorax;
use crate::synth::breathing::{Breathing, Point, Thorax};

/// How far (mm) the abdomen's motion fades below the diaphragm (as the phantoms' model).
const ABDOMEN_DECAY_MM: f64 = 150.0;
/// Over how many mm above the expiration diaphragm the mediastinum's motion fades to 0 (as the
/// phantoms' model).
const MEDIASTINUM_REACH_MM: f64 = 50.0;
/// Over how many mm outside a footprint its column rule fades (as the phantoms' descent).
const FOOTPRINT_REACH_MM: f64 = 20.0;
/// Length (mm) over which the nearer lung's base and top take over from the other's.
const BLEND_MM: f64 = 10.0;
/// Finite-difference step (mm) of [`CtMotion::volume_change`].
const FD_STEP_MM: f64 = 0.25;

fn smoothstep(t: f64) -> f64 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// The motion of one case (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct CtMotion {
    /// The phantoms' model over the real chest: lung map, descent, inversion.
    pub breathing: Breathing<CtThorax>,
}

impl CtMotion {
    /// `Φ(p)`: where expiration point `p` lies at inspiration, and the lung it is in.
    pub fn map(&self, p: Point) -> (Point, Option<usize>) {
        match self.breathing.expiration_lung(p) {
            Some(l) => (self.breathing.lung_map(l, p), Some(l)),
            None => (self.outer_map(p), None),
        }
    }

    /// The vertical map outside the lungs.
    pub fn outer_map(&self, p: Point) -> Point {
        let [x, y, z] = p;
        let delta = self.breathing.descent(x, y);
        if delta == 0.0 {
            return p;
        }
        let thorax = self.breathing.thorax();
        // The nearer lung's base and top (blended smoothly by the distance outside each
        // footprint, so the map stays continuous between the lungs), and how much a footprint
        // is near at all.
        let (mut weights, mut near) = (0.0, 0.0f64);
        let (mut base, mut top) = (0.0, 0.0);
        for l in 0..thorax.lung_count() {
            let (_, half) = thorax.footprint_frame(l);
            let outside_mm =
                (thorax.footprint_radius(l, x, y) - 1.0).max(0.0) * half[0].min(half[1]);
            let w = (-outside_mm / BLEND_MM).exp();
            weights += w;
            base += w * thorax.base(l, x, y);
            top += w * thorax.top(l, x, y);
            near = near.max(1.0 - smoothstep(outside_mm / FOOTPRINT_REACH_MM));
        }
        let (diaphragm, top) = (base / weights, top / weights);
        let column = (top - diaphragm - delta).clamp(1.0, MEDIASTINUM_REACH_MM);
        if !weights.is_finite() || weights <= 0.0 {
            return p;
        }
        let t = z - (diaphragm + delta);
        let follow = if t <= 0.0 {
            (t / ABDOMEN_DECAY_MM.max(2.0 * delta)).exp()
        } else {
            let reach = near * column + (1.0 - near) * MEDIASTINUM_REACH_MM;
            1.0 - smoothstep(t / reach)
        };
        [x, y, z - delta * follow]
    }

    /// Jacobian determinant of the map of `region` at `p` (inspiration volume per expiration
    /// volume): the lung map's from [`Breathing::volume_change`], the outer map's `∂Φ_z/∂z`.
    pub fn volume_change(&self, region: Option<usize>, p: Point) -> f64 {
        match region {
            Some(_) => self.breathing.volume_change(region, p),
            None => {
                let (mut lo, mut hi) = (p, p);
                lo[2] -= FD_STEP_MM;
                hi[2] += FD_STEP_MM;
                (self.outer_map(hi)[2] - self.outer_map(lo)[2]) / (2.0 * FD_STEP_MM)
            }
        }
    }
}
