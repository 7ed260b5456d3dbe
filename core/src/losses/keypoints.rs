//! Keypoint supervision: the mean target registration error, in mm, of a case's training
//! keypoint pairs under the predicted DDF (`mse-dice-kp-be`).
//!
//! Learn2Reg's NLST and every `medray synth` phantom ship keypoint pairs with their training
//! cases; a network that is told where corresponding vessel branchings are learns the motion
//! inside the lungs, which the intensity and lung-mask terms see only faintly at the network's
//! resolution. The keypoints of validation and held-out cases are never used for training.
//!
//! Coordinates: the keypoint files hold voxel indices of the original grids; with the
//! aligned-corners resizing of [`crate::preprocess`], original index `Q` sits at network index
//! `Q (n - 1) / (N - 1)` on each axis, and one network voxel of displacement spans
//! `(N - 1) / (n - 1)` original voxels (see [`crate::preprocess::resample_ddf_to`]).

use candle_core::{Device, IndexOp, Tensor};

use crate::keypoints::KeypointPairs;
use crate::{Error, Result};

/// One case's keypoints, prepared on the network grid: the 8 trilinear corners of each fixed
/// point, their weights, the wanted displacement and the millimetres of a network voxel.
#[derive(Clone, Debug)]
pub struct KeypointTargets {
    /// Flat indices `(i * w + j) * d + k` of the 8 corners of every point, `(8 N,)` u32.
    corners: Tensor,
    /// Trilinear weights of those corners, `(8 N,)`.
    weights: Tensor,
    /// The wanted displacement of every point, network voxels, `(3, N)`.
    target: Tensor,
    /// Millimetres per network voxel on each axis, `(3, 1)`.
    mm_per_voxel: Tensor,
    /// Number of points.
    n: usize,
}

impl KeypointTargets {
    /// Prepares `pairs` (original-grid voxel indices, fixed and moving) of a case whose
    /// original grid is `original` with `spacing_mm`, for a network grid `network`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when there is no pair or a point lies outside the grid.
    pub fn new(
        pairs: &KeypointPairs,
        original: [usize; 3],
        spacing_mm: [f64; 3],
        network: [usize; 3],
        device: &Device,
    ) -> Result<Self> {
        if pairs.is_empty() {
            return Err(Error::invalid("keypoints", "no keypoint pair"));
        }
        if original.iter().chain(network.iter()).any(|&n| n < 2) {
            return Err(Error::invalid(
                "keypoints",
                "every grid axis needs at least 2 voxels",
            ));
        }
        let ratio: Vec<f64> = (0..3)
            .map(|a| (network[a] - 1) as f64 / (original[a] - 1) as f64)
            .collect();
        let [_, w, d] = network;
        let n = pairs.len();
        let mut corners = Vec::with_capacity(8 * n);
        let mut weights = Vec::with_capacity(8 * n);
        let mut target = vec![0f32; 3 * n];
        for (i, (f, m)) in pairs.fixed.iter().zip(&pairs.moving).enumerate() {
            let mut lo = [0usize; 3];
            let mut frac = [0f64; 3];
            for a in 0..3 {
                let outside = !(f[a].is_finite() && m[a].is_finite())
                    || f[a] < 0.0
                    || f[a] > (original[a] - 1) as f64;
                if outside {
                    return Err(Error::invalid(
                        "keypoints",
                        format!(
                            "pair {}: fixed point {:?} is outside the {original:?} grid",
                            i + 1,
                            f
                        ),
                    ));
                }
                let q = f[a] * ratio[a];
                let base = (q.floor() as usize).min(network[a] - 2);
                lo[a] = base;
                frac[a] = q - base as f64;
                target[a * n + i] = ((m[a] - f[a]) * ratio[a]) as f32;
            }
            for corner in 0..8 {
                let (di, dj, dk) = ((corner >> 2) & 1, (corner >> 1) & 1, corner & 1);
                let idx = ((lo[0] + di) * w + lo[1] + dj) * d + lo[2] + dk;
                let wt = [di, dj, dk]
                    .iter()
                    .zip(frac)
                    .map(|(&bit, t)| if bit == 1 { t } else { 1.0 - t })
                    .product::<f64>();
                corners.push(idx as u32);
                weights.push(wt as f32);
            }
        }
        let mm: Vec<f32> = (0..3).map(|a| (spacing_mm[a] / ratio[a]) as f32).collect();
        Ok(Self {
            corners: Tensor::from_vec(corners, 8 * n, device)?,
            weights: Tensor::from_vec(weights, 8 * n, device)?,
            target: Tensor::from_vec(target, (3, n), device)?,
            mm_per_voxel: Tensor::from_vec(mm, (3, 1), device)?,
            n,
        })
    }

    /// Number of keypoint pairs.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether there is no pair (never, for a value made by [`Self::new`]).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The mean TRE in mm of these points under `ddf` `(3, h, w, d)` (one case of a batch),
    /// differentiable in `ddf`. The square root is smoothed by 1e-6 mm² so its gradient is
    /// finite at a perfect match.
    ///
    /// # Errors
    /// A tensor error when `ddf` is not on the grid the targets were made for.
    pub fn mean_tre_mm(&self, ddf: &Tensor) -> Result<Tensor> {
        let dtype = ddf.dtype();
        let (c, h, w, d) = ddf.dims4()?;
        if c != 3 {
            return Err(Error::invalid("keypoints", "the DDF needs 3 channels"));
        }
        let flat = ddf.reshape((3, h * w * d))?;
        let at = flat
            .index_select(&self.corners, 1)?
            .broadcast_mul(&self.weights.to_dtype(dtype)?.unsqueeze(0)?)?
            .reshape((3, self.n, 8))?
            .sum(2)?;
        let residual = (at - self.target.to_dtype(dtype)?)?
            .broadcast_mul(&self.mm_per_voxel.to_dtype(dtype)?)?;
        let tre = (residual.sqr()?.sum(0)? + 1e-6)?.sqrt()?;
        Ok(tre.mean_all()?)
    }
}

/// The mean over the batch of each case's mean TRE in mm (`targets[b]` for `ddf[b]`).
///
/// # Errors
/// [`Error::InvalidArgument`] when the counts differ; a tensor error.
pub fn keypoint_loss(ddf: &Tensor, targets: &[KeypointTargets]) -> Result<Tensor> {
    let b = ddf.dim(0)?;
    if targets.len() != b {
        return Err(Error::invalid(
            "keypoints",
            format!("{} keypoint sets for a batch of {b}", targets.len()),
        ));
    }
    let per_case = targets
        .iter()
        .enumerate()
        .map(|(i, t)| t.mean_tre_mm(&ddf.i(i)?))
        .collect::<Result<Vec<_>>>()?;
    Ok((Tensor::stack(&per_case, 0)?.sum_all()? / b as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn pairs(fixed: &[[f64; 3]], moving: &[[f64; 3]]) -> KeypointPairs {
        KeypointPairs {
            fixed: fixed.to_vec(),
            moving: moving.to_vec(),
        }
    }

    #[test]
    fn the_loss_is_the_tre_in_mm_on_the_original_grid() {
        // Original grid 9x9x9 at 2 mm, network grid 5x5x5: one network voxel = 2 original
        // voxels = 4 mm. A constant DDF of 0.5 network voxels on axis 0 moves every point by
        // 1 original voxel (2 mm) along axis 0.
        let dev = Device::Cpu;
        let kp = pairs(
            &[[2.0, 3.0, 4.0], [7.5, 1.0, 0.0]],
            &[[3.0, 3.0, 4.0], [8.5, 1.0, 3.0]],
        );
        let t = KeypointTargets::new(&kp, [9, 9, 9], [2.0, 2.0, 2.0], [5, 5, 5], &dev).unwrap();
        let zero = Tensor::zeros((3, 5, 5, 5), DType::F64, &dev).unwrap();
        let before = t.mean_tre_mm(&zero).unwrap().to_scalar::<f64>().unwrap();
        // Pair 1 moved 1 voxel (2 mm); pair 2 moved (1, 0, 3) voxels = sqrt(10) * 2 mm.
        let want = (2.0 + 10f64.sqrt() * 2.0) / 2.0;
        assert!((before - want).abs() < 1e-3, "{before} vs {want}");
        let shift = Tensor::cat(
            &[
                (Tensor::ones((1, 5, 5, 5), DType::F64, &dev).unwrap() * 0.5).unwrap(),
                Tensor::zeros((2, 5, 5, 5), DType::F64, &dev).unwrap(),
            ],
            0,
        )
        .unwrap();
        let after = t.mean_tre_mm(&shift).unwrap().to_scalar::<f64>().unwrap();
        // Pair 1 now exact; pair 2 is off by 3 voxels on axis 2 = 6 mm.
        assert!((after - 3.0).abs() < 1e-3, "{after}");
        let batch = Tensor::stack(&[&zero, &shift], 0).unwrap();
        let loss = keypoint_loss(&batch, &[t.clone(), t]).unwrap();
        let mean = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((mean - (want + 3.0) / 2.0).abs() < 1e-3, "{mean}");
    }

    #[test]
    fn the_gradient_moves_the_field_toward_the_target() {
        let dev = Device::Cpu;
        let kp = pairs(&[[4.0, 4.0, 4.0]], &[[5.0, 4.0, 4.0]]);
        let t = KeypointTargets::new(&kp, [9, 9, 9], [1.0, 1.0, 1.0], [9, 9, 9], &dev).unwrap();
        let v = candle_core::Var::zeros((3, 9, 9, 9), DType::F64, &dev).unwrap();
        let grads = t.mean_tre_mm(v.as_tensor()).unwrap().backward().unwrap();
        let g = grads.get(&v).unwrap();
        // Only the point's voxel on axis 0 carries gradient, negative (raising u lowers TRE).
        let at = g.i((0, 4, 4, 4)).unwrap().to_scalar::<f64>().unwrap();
        assert!(at < -0.99, "{at}");
        let total = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((total - at.abs()).abs() < 1e-9, "{total}");
    }

    #[test]
    fn points_outside_the_grid_and_empty_sets_are_refused() {
        let dev = Device::Cpu;
        let e = KeypointTargets::new(
            &pairs(&[[9.5, 0.0, 0.0]], &[[0.0, 0.0, 0.0]]),
            [9, 9, 9],
            [1.0; 3],
            [5, 5, 5],
            &dev,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("keypoints") && e.contains("outside"), "{e}");
        let e = KeypointTargets::new(&pairs(&[], &[]), [9, 9, 9], [1.0; 3], [5, 5, 5], &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no keypoint"), "{e}");
    }
}
