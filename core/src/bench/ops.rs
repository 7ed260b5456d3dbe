//! Where the time of a LocalNet step goes: each main op timed alone at the shapes a LocalNet
//! configuration uses (`medray bench --ops`), and the GEMM ceiling of the machine.
//!
//! The layer list ([`layers`]) mirrors `LocalNet::new`/`forward_t`: per encoder level a
//! conv block and a two-conv residual block (kernel 7 at level 0, 3 below), a 2x max pool,
//! the bottom block, then per decoder level a transposed conv, a conv block and a residual
//! block, and one output conv per extract level. Identical shapes are timed once and
//! counted, so the table's `count x time` column adds up to an estimate of the whole step.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::median;
use crate::localnet::LocalNetConfig;
use crate::losses::{BendingEnergyLoss, GlobalMutualInformationLoss};
use crate::ops;
use crate::Result;

/// One op of a LocalNet step at one shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerOp {
    /// `conv3d(x (1, ci, size), w (co, ci, k, k, k))`, followed by BatchNorm and ReLU
    /// unless it is an output conv.
    Conv {
        /// Input channels.
        ci: usize,
        /// Output channels.
        co: usize,
        /// Kernel size.
        k: usize,
        /// Spatial size of input and output.
        size: [usize; 3],
        /// Whether a BatchNorm + ReLU follows (every conv but the output convs); timed as
        /// its own row.
        norm: bool,
    },
    /// `conv_transpose3d(x (1, ci, size), w (ci, co, 3, 3, 3))` to `2 x size`, followed by
    /// BatchNorm and ReLU (timed as its own row).
    ConvTranspose {
        /// Input channels.
        ci: usize,
        /// Output channels.
        co: usize,
        /// Spatial size of the input.
        size: [usize; 3],
    },
    /// 2x max pooling of `(1, c, size)`.
    MaxPool {
        /// Channels.
        c: usize,
        /// Spatial size of the input.
        size: [usize; 3],
    },
}

impl LayerOp {
    /// Multiply-adds times two of the forward pass (the useful ones: a transposed conv
    /// counts the 27 taps per input voxel, not the zeros of a dilated input).
    pub fn forward_flop(&self) -> f64 {
        match *self {
            LayerOp::Conv {
                ci, co, k, size, ..
            } => 2.0 * (ci * co * k * k * k) as f64 * voxels(size),
            LayerOp::ConvTranspose { ci, co, size } => 2.0 * (ci * co * 27) as f64 * voxels(size),
            LayerOp::MaxPool { .. } => 0.0,
        }
    }

    /// A short label, e.g. `conv k7 32->32 64x64x64`.
    pub fn label(&self) -> String {
        let s = |v: [usize; 3]| format!("{}x{}x{}", v[0], v[1], v[2]);
        match *self {
            LayerOp::Conv {
                ci,
                co,
                k,
                size,
                norm,
            } => format!(
                "conv k{k} {ci}->{co} {}{}",
                s(size),
                if norm { "" } else { " (output)" }
            ),
            LayerOp::ConvTranspose { ci, co, size } => format!("convT {ci}->{co} {}", s(size)),
            LayerOp::MaxPool { c, size } => format!("maxpool {c} {}", s(size)),
        }
    }
}

fn voxels(size: [usize; 3]) -> f64 {
    size.iter().product::<usize>() as f64
}

/// The ops of one LocalNet forward pass at input size `size`, each with the number of
/// times it occurs, in first-occurrence order.
pub fn layers(config: &LocalNetConfig, size: [usize; 3]) -> Vec<(LayerOp, usize)> {
    let depth = config.depth();
    let channels = |level: usize| config.num_channel_initial << level;
    let at = |level: usize| size.map(|s| s >> level);
    let mut list: Vec<(LayerOp, usize)> = Vec::new();
    let mut push = |op: LayerOp| match list.iter_mut().find(|(o, _)| *o == op) {
        Some((_, n)) => *n += 1,
        None => list.push((op, 1)),
    };
    let mut c_prev = config.in_channels;
    for d in 0..depth {
        let (c, k, size) = (channels(d), if d == 0 { 7 } else { 3 }, at(d));
        let conv = |ci| LayerOp::Conv {
            ci,
            co: c,
            k,
            size,
            norm: true,
        };
        push(conv(c_prev));
        push(conv(c));
        push(conv(c));
        push(LayerOp::MaxPool { c, size });
        c_prev = c;
    }
    push(LayerOp::Conv {
        ci: c_prev,
        co: channels(depth),
        k: 3,
        size: at(depth),
        norm: true,
    });
    let min_level = config.extract_levels.iter().copied().min().unwrap_or(depth);
    for d in (min_level..depth).rev() {
        let c = channels(d);
        push(LayerOp::ConvTranspose {
            ci: channels(d + 1),
            co: c,
            size: at(d + 1),
        });
        for _ in 0..3 {
            push(LayerOp::Conv {
                ci: c,
                co: c,
                k: 3,
                size: at(d),
                norm: true,
            });
        }
    }
    for &level in &config.extract_levels {
        push(LayerOp::Conv {
            ci: channels(level),
            co: config.out_channels,
            k: 3,
            size: at(level),
            norm: false,
        });
    }
    list
}

/// The timing of one op.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpTiming {
    /// What was timed.
    pub label: String,
    /// How many times a LocalNet step runs it.
    pub count: usize,
    /// Forward pass (training mode where it matters), median seconds.
    pub forward_s: f64,
    /// Backward pass alone (gradient of a sum of the output), median seconds.
    pub backward_s: f64,
    /// Useful forward FLOP (0 where not meaningful).
    pub forward_flop: f64,
}

impl OpTiming {
    /// Forward GFLOP/s, when the op has a FLOP count.
    pub fn forward_gflops(&self) -> Option<f64> {
        (self.forward_flop > 0.0).then(|| self.forward_flop / self.forward_s / 1e9)
    }

    /// Backward GFLOP/s (input and weight gradients: twice the forward FLOP).
    pub fn backward_gflops(&self) -> Option<f64> {
        (self.forward_flop > 0.0).then(|| 2.0 * self.forward_flop / self.backward_s / 1e9)
    }
}

fn random(shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::rand(0f32, 1f32, shape, device)?)
}

/// Times `forward` (returning a tensor) and the backward pass of the sum of its output;
/// one warm-up then `repeats` runs.
fn time_op(repeats: usize, mut forward: impl FnMut() -> Result<Tensor>) -> Result<(f64, f64)> {
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    for i in 0..=repeats.max(1) {
        let t0 = Instant::now();
        let y = forward()?;
        // Reading one value forces completion on asynchronous devices.
        y.flatten_all()?
            .get(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let t1 = Instant::now();
        let grads = y.sum_all()?.backward()?;
        drop(grads);
        let t2 = Instant::now();
        if i > 0 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
        }
    }
    Ok((median(&fwd), median(&bwd)))
}

/// Times every op of [`layers`] plus warp, MI and bending energy at `size`.
pub fn profile_ops(
    config: &LocalNetConfig,
    size: [usize; 3],
    repeats: usize,
    device: &Device,
) -> Result<Vec<OpTiming>> {
    let mut out = Vec::new();
    // BatchNorm + ReLU shapes (channels, size) with their counts, in first-use order.
    let mut norms: Vec<((usize, [usize; 3]), usize)> = Vec::new();
    let mut add_norm =
        |key: (usize, [usize; 3]), count: usize| match norms.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += count,
            None => norms.push((key, count)),
        };
    for (op, count) in layers(config, size) {
        let (forward_s, backward_s) = match op {
            LayerOp::Conv {
                ci,
                co,
                k,
                size: [h, w, d],
                norm,
            } => {
                // The network's first conv reads the images, which need no gradient.
                let x = random(&[1, ci, h, w, d], device)?;
                let x = if ci == config.in_channels {
                    x
                } else {
                    Var::from_tensor(&x)?.as_tensor().clone()
                };
                let wt = Var::from_tensor(&(random(&[co, ci, k, k, k], device)? * 0.05)?)?;
                if norm {
                    add_norm((co, [h, w, d]), count);
                }
                time_op(repeats, || Ok(ops::conv3d(&x, &wt, None)?))?
            }
            LayerOp::ConvTranspose {
                ci,
                co,
                size: [h, w, d],
            } => {
                let x = Var::from_tensor(&random(&[1, ci, h, w, d], device)?)?;
                let wt = Var::from_tensor(&(random(&[ci, co, 3, 3, 3], device)? * 0.05)?)?;
                add_norm((co, [2 * h, 2 * w, 2 * d]), count);
                time_op(repeats, || Ok(ops::conv_transpose3d(&x, &wt)?))?
            }
            LayerOp::MaxPool { c, size: [h, w, d] } => {
                let x = Var::from_tensor(&random(&[1, c, h, w, d], device)?)?;
                time_op(repeats, || Ok(ops::max_pool3d(&x, 2)?))?
            }
        };
        // FFT convolutions do far fewer operations than the direct count of forward_flop:
        // their GFLOP/s is the direct-equivalent rate.
        let label = match op {
            LayerOp::Conv { ci, co, k, .. }
                if device.is_cpu() && ops::conv3d_auto_uses_fft(ci, co, k) =>
            {
                format!("{} [fft]", op.label())
            }
            _ => op.label(),
        };
        out.push(OpTiming {
            label,
            count,
            forward_s,
            backward_s,
            forward_flop: op.forward_flop(),
        });
    }
    for ((c, [h, w, d]), count) in norms {
        let x = Var::from_tensor(&random(&[1, c, h, w, d], device)?)?;
        let gamma = Var::ones(c, DType::F32, device)?;
        let beta = Var::zeros(c, DType::F32, device)?;
        let (forward_s, backward_s) = time_op(repeats, || {
            Ok(ops::batch_norm_relu3d_train(&x, &gamma, &beta, 1e-5)?.output)
        })?;
        out.push(OpTiming {
            label: format!("batchnorm+relu {c} {h}x{w}x{d}"),
            count,
            forward_s,
            backward_s,
            forward_flop: 0.0,
        });
    }
    let [h, w, d] = size;
    let image = crate::bench::smooth_volume(size, 0.0, device)?;
    let fixed = crate::bench::smooth_volume(size, 0.4, device)?;
    let ddf = Var::from_tensor(&(random(&[1, 3, h, w, d], device)? * 2.0)?)?;
    let (f, b) = time_op(repeats, || {
        Ok(ops::warp(&image, &ddf, ops::Padding::Border)?)
    })?;
    out.push(op_timing("warp (border)", f, b));
    let warped = Var::from_tensor(&image)?;
    let mi = GlobalMutualInformationLoss::default();
    let (f, b) = time_op(repeats, || mi.forward(&warped, &fixed))?;
    out.push(op_timing("mutual information (23 bins)", f, b));
    let be = BendingEnergyLoss::default();
    let (f, b) = time_op(repeats, || be.forward(&ddf))?;
    out.push(op_timing("bending energy", f, b));
    Ok(out)
}

fn op_timing(label: &str, forward_s: f64, backward_s: f64) -> OpTiming {
    OpTiming {
        label: label.to_string(),
        count: 1,
        forward_s,
        backward_s,
        forward_flop: 0.0,
    }
}

/// The machine's achieved f32 GEMM rate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GemmCeiling {
    /// `(m, n, k)` of the product `C (m x n) = A (m x k) B (k x n)`.
    pub shape: [usize; 3],
    /// Rayon threads used.
    pub threads: usize,
    /// Median seconds of one product.
    pub median_s: f64,
    /// `2 m n k / median_s / 1e9`.
    pub gflops: f64,
}

/// Times a plain f32 GEMM of a conv-like shape on all rayon threads: `m` output channels,
/// `n` voxels, `k` = taps x input channels, as one level-0 conv GEMM of LocalNet. The `n`
/// columns are split into blocks of 1024, one single-threaded GEMM per block on the rayon
/// pool (how the conv kernels use `gemm`; its own `Parallelism::Rayon` splits an `m` of 32
/// poorly).
pub fn gemm_ceiling(m: usize, n: usize, k: usize, repeats: usize) -> GemmCeiling {
    const BLOCK: usize = 1024;
    let a: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
    // B is stored column-major (k contiguous per column), as the padded channels-last
    // volume the conv GEMMs read.
    let b: Vec<f32> = (0..k * n).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    let mut c = vec![0f32; m * n];
    let threads = rayon::current_num_threads();
    let mut times = Vec::new();
    for i in 0..=repeats.max(1) {
        let t0 = Instant::now();
        c.par_chunks_mut(BLOCK * m)
            .enumerate()
            .for_each(|(block, dst)| {
                let cols = dst.len() / m;
                let b_first = block * BLOCK * k;
                assert!(b_first + cols * k <= b.len() && a.len() == m * k);
                // SAFETY: dst is (m x cols) column-major (column stride m); a is (m x k)
                // row-major; the rhs (k x cols) reads b[b_first + j*k + kk] for j < cols,
                // kk < k, inside b (asserted).
                unsafe {
                    gemm(
                        m,
                        cols,
                        k,
                        dst.as_mut_ptr(),
                        m as isize,
                        1,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        b.as_ptr().add(b_first),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            });
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let median_s = median(&times);
    GemmCeiling {
        shape: [m, n, k],
        threads,
        median_s,
        gflops: 2.0 * (m * n * k) as f64 / median_s / 1e9,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use super::*;

    #[test]
    fn seed_layers_at_64() {
        let list = layers(&LocalNetConfig::seed(), [64, 64, 64]);
        let conv = |ci, co, k, s: usize, norm| LayerOp::Conv {
            ci,
            co,
            k,
            size: [s; 3],
            norm,
        };
        assert_eq!(list[0], (conv(2, 32, 7, 64, true), 1));
        assert_eq!(list[1], (conv(32, 32, 7, 64, true), 2));
        assert_eq!(
            list[2],
            (
                LayerOp::MaxPool {
                    c: 32,
                    size: [64; 3]
                },
                1
            )
        );
        // 3 levels x (conv, residual, pool) + bottom + one output conv; no transposed conv.
        assert_eq!(list.len(), 3 * 3 + 2);
        assert_eq!(list[9], (conv(128, 256, 3, 8, true), 1));
        assert_eq!(list[10], (conv(256, 3, 3, 8, false), 1));
        let convs: usize = list
            .iter()
            .filter(|(op, _)| matches!(op, LayerOp::Conv { .. }))
            .map(|(_, n)| n)
            .sum();
        assert_eq!(convs, 3 * 3 + 1 + 1);
    }

    #[test]
    fn full_layers_have_the_decoder() {
        let list = layers(&LocalNetConfig::full(), [32, 32, 32]);
        let transposed: Vec<_> = list
            .iter()
            .filter(|(op, _)| matches!(op, LayerOp::ConvTranspose { .. }))
            .collect();
        assert_eq!(transposed.len(), 3);
        assert_eq!(
            transposed[2].0,
            LayerOp::ConvTranspose {
                ci: 64,
                co: 32,
                size: [16; 3]
            }
        );
        // Level-0 32->32 k3 convs: 3 in the decoder; output convs at 4 levels.
        let k3_level0 = list
            .iter()
            .find(|(op, _)| {
                *op == LayerOp::Conv {
                    ci: 32,
                    co: 32,
                    k: 3,
                    size: [32; 3],
                    norm: true,
                }
            })
            .unwrap();
        assert_eq!(k3_level0.1, 3);
        let outputs = list
            .iter()
            .filter(|(op, _)| matches!(op, LayerOp::Conv { norm: false, .. }))
            .count();
        assert_eq!(outputs, 4);
    }

    #[test]
    fn flop_counts() {
        let conv = LayerOp::Conv {
            ci: 32,
            co: 32,
            k: 7,
            size: [64; 3],
            norm: true,
        };
        assert_eq!(conv.forward_flop(), 2.0 * 32.0 * 32.0 * 343.0 * 262_144.0);
        let t = LayerOp::ConvTranspose {
            ci: 64,
            co: 32,
            size: [32; 3],
        };
        assert_eq!(t.forward_flop(), 2.0 * 64.0 * 32.0 * 27.0 * 32_768.0);
    }

    #[test]
    fn gemm_ceiling_is_positive_on_a_small_shape() {
        let g = gemm_ceiling(16, 64, 32, 1);
        assert!(g.gflops > 0.0 && g.median_s > 0.0);
    }

    #[test]
    fn profile_runs_on_a_tiny_full_network() {
        let config = LocalNetConfig::full().with_num_channel_initial(2);
        let t = profile_ops(&config, [16, 16, 16], 1, &Device::Cpu).unwrap();
        // Every layer, one BatchNorm row per (channels, size) that follows a conv, and
        // warp, MI and bending energy.
        // (channels 2, 4, 8 at levels 0-2 and 16 at the bottom; the decoder's share them.)
        let norm_shapes = 4;
        assert_eq!(
            t.len(),
            layers(&config, [16, 16, 16]).len() + norm_shapes + 3
        );
        assert!(t.iter().all(|o| o.forward_s > 0.0 && o.backward_s >= 0.0));
    }
}
