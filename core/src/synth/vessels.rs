//! Branching vessel trees: recursive line segments of decreasing radius, grown inside a
//! lung, and a bucket grid that finds the segments near a point quickly.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::anatomy::{inside, Lung, EDGE_REACH_VOXELS};
use super::vec3::{add, dot, norm, normalize, scale, sub, Vec3};

/// Cell edge of the bucket grid, in voxels.
const CELL: f64 = 8.0;

/// One cylindrical vessel piece from `a` to `b`.
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
    /// Generations below each trunk (a trunk of depth `d` has `2^d - 1` segments).
    pub depth: usize,
    /// Trunk radius in voxels.
    pub radius: f64,
    /// Trunk length in voxels.
    pub length: f64,
}

/// All vessel segments of a volume, their branch points, and the bucket grid.
#[derive(Debug, Clone, Default)]
pub(crate) struct Vessels {
    pub segments: Vec<Segment>,
    /// Points where a vessel splits in two (the landmarks).
    pub branch_points: Vec<Vec3>,
    cells: [usize; 3],
    buckets: Vec<Vec<u32>>,
}

impl Vessels {
    /// Grows three trunks (upper, middle, lower lobe) from the hilum of `lung`.
    pub fn grow_in(&mut self, lung: &Lung, side: f64, growth: Growth, rng: &mut ChaCha8Rng) {
        let hilum = add(
            lung.center,
            [-side * 0.55 * lung.radii[0], 0.0, 0.1 * lung.radii[2]],
        );
        let trunks = [
            [side * 0.3, 0.0, 1.0],
            [side, rng.gen_range(-0.4..0.4), -0.1],
            [side * 0.35, 0.0, -1.0],
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
    ) {
        if depth == 0 || radius < 0.7 || length < 1.0 {
            return;
        }
        // Shorten the segment until its end is inside the lung, away from the surface.
        let Some(end) = (0..3)
            .map(|attempt| add(start, scale(dir, length * 0.5f64.powi(attempt))))
            .find(|&end| lung.signed_distance(end) < -(radius + 1.5))
        else {
            return;
        };
        self.segments.push(Segment {
            a: start,
            b: end,
            radius,
        });
        if depth == 1 {
            return;
        }
        self.branch_points.push(end);
        let perp = random_perpendicular(dir, rng);
        for sign in [1.0, -1.0] {
            let angle = rng.gen_range(0.4..0.7f64);
            let child = normalize(add(
                scale(dir, angle.cos()),
                scale(perp, sign * angle.sin()),
            ));
            let shrink = rng.gen_range(0.7..0.85);
            self.grow(
                lung,
                end,
                child,
                length * shrink,
                radius * 0.72,
                depth - 1,
                rng,
            );
        }
    }

    /// Builds the bucket grid over a volume of `size` voxels; call after growing.
    pub fn index(&mut self, size: [usize; 3]) {
        self.cells = size.map(|n| (n as f64 / CELL).ceil().max(1.0) as usize);
        self.buckets = vec![Vec::new(); self.cells.iter().product()];
        for (id, s) in self.segments.iter().enumerate() {
            let reach = s.radius + EDGE_REACH_VOXELS;
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
        ((x / CELL).floor().max(0.0) as usize).min(self.cells[axis] - 1)
    }

    /// Vessel volume fraction at `p`: 1 inside a vessel, 0 outside, linear across the wall.
    pub fn fraction(&self, p: Vec3) -> f64 {
        if self.buckets.is_empty() {
            return 0.0;
        }
        let c = [0, 1, 2].map(|a| self.cell_of(a, p[a]));
        let bucket = &self.buckets[(c[0] * self.cells[1] + c[1]) * self.cells[2] + c[2]];
        let mut best: f64 = 0.0;
        for &id in bucket {
            let s = &self.segments[id as usize];
            best = best.max(inside(s.distance(p) - s.radius));
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
