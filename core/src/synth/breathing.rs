//! The breathing motion: a smooth displacement `u` on the expiration (fixed) grid such that
//! the point `p` of the expiration scan shows the tissue found at `p + u(p)` in the
//! inspiration scan. It is therefore exactly the backward DDF MONAI's `Warp` expects:
//! `warp(moving, u)(p) = moving(p + u(p)) ~ fixed(p)`.
//!
//! Inside the body, `u = E(p) * (a0 * x, a1 * (y + 0.3), -a2 * S(z))` in body-normalised
//! coordinates `x, y` (elliptic radius `rho`), with the envelope `E = (1 - rho^2)^2`, which
//! vanishes with its gradient on the skin (the body wall does not move), and
//! `S(z) = (1 - tanh((z - z_mid) / w)) / 2`, which is 0 at the lung apices and 1 below the
//! diaphragm (the diaphragm descends in inspiration). Lateral and antero-posterior expansion
//! are strongest near the lung bases. Outside the body `u = 0`.

use super::anatomy::Body;
use super::vec3::Vec3;

/// A breathing displacement field (voxel units).
#[derive(Debug, Clone)]
pub(crate) struct Breathing {
    body: Body,
    /// Amplitudes along axes 0, 1, 2 (voxels).
    amplitude: Vec3,
    /// Centre and half width (voxels, axis 2) of the transition from still apex to moving
    /// diaphragm.
    z_mid: f64,
    z_width: f64,
}

impl Breathing {
    /// A field for `body` with the given amplitudes; the transition is centred at `z_mid`.
    pub fn new(body: Body, amplitude: Vec3, z_mid: f64, z_width: f64) -> Self {
        Breathing {
            body,
            amplitude,
            z_mid,
            z_width,
        }
    }

    /// The displacement `u(p)` in voxels.
    pub fn displacement(&self, p: Vec3) -> Vec3 {
        let x = (p[0] - self.body.center[0]) / self.body.radii[0];
        let y = (p[1] - self.body.center[1]) / self.body.radii[1];
        let rho2 = x * x + y * y;
        if rho2 >= 1.0 {
            return [0.0; 3];
        }
        let envelope = (1.0 - rho2).powi(2);
        let descent = 0.5 * (1.0 - ((p[2] - self.z_mid) / self.z_width).tanh());
        let lateral = envelope * (0.4 + 0.6 * descent);
        [
            self.amplitude[0] * lateral * x,
            self.amplitude[1] * lateral * (y + 0.3),
            -self.amplitude[2] * envelope * descent,
        ]
    }

    /// Solves `f + u(f) = m` for `f` by fixed-point iteration (`u` is a contraction: its
    /// gradient is far below 1). Returns `f` and the residual `|f + u(f) - m|`.
    pub fn invert(&self, m: Vec3) -> (Vec3, f64) {
        let mut f = m;
        for _ in 0..100 {
            let u = self.displacement(f);
            let next = [m[0] - u[0], m[1] - u[1], m[2] - u[2]];
            let step = (0..3).map(|a| (next[a] - f[a]).abs()).fold(0.0, f64::max);
            f = next;
            if step < 1e-10 {
                break;
            }
        }
        let u = self.displacement(f);
        let residual = (0..3)
            .map(|a| (f[a] + u[a] - m[a]).powi(2))
            .sum::<f64>()
            .sqrt();
        (f, residual)
    }
}
