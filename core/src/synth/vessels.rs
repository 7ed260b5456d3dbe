//! Branching vessel trees (mm): recursive line segments of decreasing radius grown inside a
//! lung from its hilum, and a bucket grid that finds the segments near a point quickly.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::anatomy::{inside, Lung, EXTENT_MM};
use super::vec3::{add, dot, norm, normalize, scale, sub, Vec3};

/// Cell edge of the bucket grid (mm).
const CELL_MM: f64 = 12.0;
/// Clearance (mm) between a segment's end and the lung surface, beyond its radius.
const CLEARANCE_MM: f64 = 2.0;
/// How many directions a child branch tries before it is given up.
const CHILD_TRIES: usize = 5;
/// Vessels thinner than this (mm) are not grown.
const MIN_RADIUS_MM: f64 = 0.6;

/// One cylindrical vessel piece from `a` to `b` (mm).
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub a: Vec3,
    pub b: Vec3,
    pub radius: f64,
}

impl Segment {
    fn distance(&self, p: Vec3) -> f64 {
        let ab = sub(self.b, self.a);
        let t = (dot(sub(p, self.a), ab) / dot(ab, ab).max(1e-12)).clamp(0.0, 1.0);
        norm(sub(p, add(self.a, scale(ab, t))))
    }
}

/// How a tree grows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Growth {
    /// Generations below each trunk (a trunk of depth `d` has up to `2^(d-1) - 1` branch
    /// points).
    pub depth: usize,
    /// Trunk radius (mm).
    pub radius: f64,
    /// Trunk length (mm).
    pub length: f64,
}

/// All vessel segments of a volume, their branch points, and the bucket grid.
#[derive(Debug, Clone, Default)]
pub(crate) struct Vessels {
    pub segments: Vec<Segment>,
    /// Points where a vessel splits in two (the landmarks), mm.
    pub branch_points: Vec<Vec3>,
    cells: [usize; 3],
    buckets: Vec<Vec<u32>>,
}

impl Vessels {
    /// Grows five trunks (upper, lateral, anterior, posterior, lower) from the hilum of
    /// `lung`; `side` is -1 or 1 (which way is lateral).
    pub fn grow_in(&mut self, lung: &Lung, side: f64, growth: Growth, rng: &mut ChaCha8Rng) {
        let height = lung.apex - lung.dome_top;
        let hilum = [
            lung.center[0] - side * 0.35 * lung.radii[0],
            lung.center[1] + 0.05 * lung.radii[1],
            lung.dome_top + 0.5 * height,
        ];
        let trunks = [
            [side * 0.2, 0.0, 1.0],
            [side, rng.gen_range(-0.3..0.3), 0.2],
            [side * 0.4, 1.0, -0.5],
            [side * 0.4, -1.0, -0.5],
            [side * 0.3, rng.gen_range(-0.3..0.3), -1.0],
        ];
        for dir in trunks {
            self.grow(
                lung,
                hilum,
                normalize(dir),
                growth.length,
                growth.radius,
                growth.depth,
                rng,
            );
        }
    }

    /// Grows a segment and its subtree; false if the segment does not fit in the lung.
    #[allow(clippy::too_many_arguments)]
    fn grow(
        &mut self,
        lung: &Lung,
        start: Vec3,
        dir: Vec3,
        length: f64,
        radius: f64,
        depth: usize,
        rng: &mut ChaCha8Rng,
    ) -> bool {
        if depth == 0 || radius < MIN_RADIUS_MM || length < 2.0 {
            return false;
        }
        // Shorten the segment until its end is inside the lung, away from the surface.
        let Some(end) = (0..3)
            .map(|attempt| add(start, scale(dir, length * 0.6f64.powi(attempt))))
            .find(|&end| lung.signed_distance(end) < -(radius + CLEARANCE_MM))
        else {
            return false;
        };
        self.segments.push(Segment {
            a: start,
            b: end,
            radius,
        });
        if depth == 1 {
            return true;
        }
        self.branch_points.push(end);
        let mut perp = random_perpendicular(dir, rng);
        for sign in [1.0, -1.0] {
            // A child that leaves the lung is retried in other directions.
            for _ in 0..CHILD_TRIES {
                let angle = rng.gen_range(0.45..0.8f64);
                let child = normalize(add(
                    scale(dir, angle.cos()),
                    scale(perp, sign * angle.sin()),
                ));
                let shrink = rng.gen_range(0.72..0.88);
                if self.grow(
                    lung,
                    end,
                    child,
                    length * shrink,
                    radius * 0.8,
                    depth - 1,
                    rng,
                ) {
                    break;
                }
                perp = random_perpendicular(dir, rng);
            }
        }
        true
    }

    /// Builds the bucket grid over [`EXTENT_MM`] for walls blurred over `edge` mm; call after
    /// growing, and before [`Vessels::fraction`] with that `edge`.
    pub fn index(&mut self, edge: f64) {
        self.cells = EXTENT_MM.map(|e| (e / CELL_MM).ceil() as usize);
        self.buckets = vec![Vec::new(); self.cells.iter().product()];
        for (id, s) in self.segments.iter().enumerate() {
            let reach = s.radius + 5.0 * edge;
            let lo = [0, 1, 2].map(|a| self.cell_of(a, s.a[a].min(s.b[a]) - reach));
            let hi = [0, 1, 2].map(|a| self.cell_of(a, s.a[a].max(s.b[a]) + reach));
            for i in lo[0]..=hi[0] {
                for j in lo[1]..=hi[1] {
                    for k in lo[2]..=hi[2] {
                        let at = (i * self.cells[1] + j) * self.cells[2] + k;
                        self.buckets[at].push(id as u32);
                    }
                }
            }
        }
    }

    fn cell_of(&self, axis: usize, x: f64) -> usize {
        ((x / CELL_MM).floor().max(0.0) as usize).min(self.cells[axis] - 1)
    }

    /// Vessel volume fraction at `p`, walls blurred over `edge` mm (as indexed).
    pub fn fraction(&self, p: Vec3, edge: f64) -> f64 {
        if self.buckets.is_empty() {
            return 0.0;
        }
        let c = [0, 1, 2].map(|a| self.cell_of(a, p[a]));
        let bucket = &self.buckets[(c[0] * self.cells[1] + c[1]) * self.cells[2] + c[2]];
        let mut best: f64 = 0.0;
        for &id in bucket {
            let s = &self.segments[id as usize];
            best = best.max(inside(s.distance(p) - s.radius, edge));
            if best >= 1.0 {
                break;
            }
        }
        best
    }
}

fn random_perpendicular(dir: Vec3, rng: &mut ChaCha8Rng) -> Vec3 {
    loop {
        let r = [0, 1, 2].map(|_| rng.gen_range(-1.0..1.0));
        let perp = sub(r, scale(dir, dot(r, dir)));
        if norm(perp) > 0.1 {
            return normalize(perp);
        }
    }
}
