//! Samples a case's anatomy and breathing on the grid: both scans, both lung masks and the
//! true DDF, slab by slab along axis 0 in parallel.

use ndarray::{Array3, Array4};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::anatomy::{Anatomy, Chest};
use super::breathing::{expiration_hu, Breathing};
use super::SynthConfig;

/// The sampled volumes of one case.
pub(super) struct Volumes {
    pub fixed: Array3<f32>,
    pub moving: Array3<f32>,
    pub fixed_mask: Array3<f32>,
    pub moving_mask: Array3<f32>,
    /// Backward DDF on the fixed grid, `[3, H, W, D]`, voxels.
    pub ddf: Array4<f32>,
}

/// Samples case `index`: the moving (inspiration) scan is the anatomy on the grid; the fixed
/// (expiration) scan is the anatomy at `Φ(p)`, its parenchyma compressed by the lung map's
/// volume change when [`SynthConfig::density_follows_volume`]. Edges are blurred over the
/// mean voxel size.
pub(super) fn sample(
    config: &SynthConfig,
    index: usize,
    anatomy: &Anatomy,
    breathing: &Breathing<Chest>,
) -> Volumes {
    let size = config.size;
    let spacing = config.spacing();
    let edge = spacing.iter().sum::<f64>() / 3.0;
    let mut anatomy = anatomy.clone();
    anatomy.vessels.index(edge);
    let anatomy = &anatomy;
    let insp_hu = config.lung_hu_insp as f64;
    let slab = size[1] * size[2];
    let voxels = size[0] * slab;
    let noise = |phase: u64, i: usize| {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream((1 << 63) | ((index as u64) << 32) | (phase << 24) | i as u64);
        move || gaussian(&mut rng) * config.noise_hu as f64
    };
    let at_mm = |i: usize, j: usize, k: usize| {
        [
            i as f64 * spacing[0],
            j as f64 * spacing[1],
            k as f64 * spacing[2],
        ]
    };

    let mut moving = vec![0f32; voxels];
    let mut moving_mask = vec![0f32; voxels];
    moving
        .par_chunks_mut(slab)
        .zip(moving_mask.par_chunks_mut(slab))
        .enumerate()
        .for_each(|(i, (image, mask))| {
            let mut next_noise = noise(0, i);
            for j in 0..size[1] {
                for k in 0..size[2] {
                    let p = at_mm(i, j, k);
                    let at = j * size[2] + k;
                    image[at] = (anatomy.hounsfield(p, insp_hu, edge) + next_noise()) as f32;
                    mask[at] = (anatomy.lung_distance(p) <= 0.0) as u8 as f32;
                }
            }
        });

    let mut fixed = vec![0f32; voxels];
    let mut fixed_mask = vec![0f32; voxels];
    let mut ddf = vec![0f32; 3 * voxels];
    let (ddf0, rest) = ddf.split_at_mut(voxels);
    let (ddf1, ddf2) = rest.split_at_mut(voxels);
    fixed
        .par_chunks_mut(slab)
        .zip(fixed_mask.par_chunks_mut(slab))
        .zip(ddf0.par_chunks_mut(slab))
        .zip(ddf1.par_chunks_mut(slab).zip(ddf2.par_chunks_mut(slab)))
        .enumerate()
        .for_each(|(i, (((image, mask), u0), (u1, u2)))| {
            let mut next_noise = noise(1, i);
            for j in 0..size[1] {
                for k in 0..size[2] {
                    let p = at_mm(i, j, k);
                    let (q, lung) = breathing.map(p);
                    let lung_hu = match lung {
                        Some(_) if config.density_follows_volume => {
                            expiration_hu(insp_hu, breathing.volume_change(lung, p))
                        }
                        _ => insp_hu,
                    };
                    let at = j * size[2] + k;
                    image[at] = (anatomy.hounsfield(q, lung_hu, edge) + next_noise()) as f32;
                    mask[at] = (anatomy.lung_distance(q) <= 0.0) as u8 as f32;
                    u0[at] = ((q[0] - p[0]) / spacing[0]) as f32;
                    u1[at] = ((q[1] - p[1]) / spacing[1]) as f32;
                    u2[at] = ((q[2] - p[2]) / spacing[2]) as f32;
                }
            }
        });

    let shape = (size[0], size[1], size[2]);
    let array = |v: Vec<f32>| Array3::from_shape_vec(shape, v).expect("vector sized H*W*D");
    Volumes {
        fixed: array(fixed),
        moving: array(moving),
        fixed_mask: array(fixed_mask),
        moving_mask: array(moving_mask),
        ddf: Array4::from_shape_vec((3, size[0], size[1], size[2]), ddf)
            .expect("vector sized 3*H*W*D"),
    }
}

/// A standard normal sample (Box-Muller).
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
