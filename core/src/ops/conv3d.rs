//! 3D convolution and transposed convolution, as used by MONAI's LocalNet blocks
//! (`monai/networks/blocks/regunet_block.py`: `get_conv_block`, `get_deconv_block`), with the
//! PyTorch semantics of `nn.Conv3d(k, stride=1, padding=(k-1)//2)` and
//! `nn.ConvTranspose3d(3, stride=2, padding=1, output_padding=1, bias=False)`.
//!
//! On the CPU, [`conv3d`] runs a candle custom op whose forward and backward passes are
//! tap-group products over a zero-padded channels-last copy of the input (see `cpu.rs`;
//! f32 runs an AVX2/FMA register tile where the CPU has it, `avx2.rs`), or, for f32 with
//! large kernels and many channels (LocalNet's level-0 k7 32 -> 32), FFT tiles (`fft.rs`,
//! chosen by [`Algorithm::Auto`]); and
//! [`conv3d_fused`] applies an eval-mode BatchNorm + ReLU as the outputs are written. On
//! other devices, and in
//! [`conv3d_generic`], it is a sum over the depth taps of candle `conv2d`s, whose gradient
//! candle already knows. [`conv_transpose3d`] follows the recipe of monai-spec §1.2: insert
//! zeros with stride 2, then run a "same" 3x3x3 convolution with the kernel flipped in all
//! three spatial axes and its two channel axes swapped.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod cpu;
#[cfg(feature = "cudnn")]
mod cudnn;
mod fft;
#[cfg(test)]
mod tests;
mod transposed;

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::ops::kernel::{has_fast_path, run_cpu, CpuKernel, Float};
pub use cpu::Epilogue;
use cpu::{PaddedVolume, TapGroup};
use transposed::TransposedPass;

/// 3D cross-correlation with stride 1 and zero "same" padding `(k-1)/2`, as PyTorch's
/// `F.conv3d(x, w, bias, padding=(k-1)//2)`.
///
/// `x` is `(B, Ci, H, W, D)`, `w` is `(Co, Ci, k, k, k)` with `k` odd, `bias` is `(Co)`.
/// Returns `(B, Co, H, W, D)`. Differentiable with respect to all three inputs. CPU tensors
/// of dtype f32 or f64 take the fast path; everything else runs [`conv3d_generic`].
pub fn conv3d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    conv3d_with(x, w, bias, Algorithm::Auto)
}

/// Which CPU algorithm runs an f32 [`conv3d`] (forward and both gradients); f64 and other
/// devices ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// FFT tiles (`fft.rs`) where they need less time than the direct tap loops, unless
    /// the environment variable `MEDRAY_CONV3D` is `direct`: kernels of 5 and up with
    /// `Ci * Co * k^3 >= 1300 * (Ci + Co)` (the FFT work grows with `Ci + Co` transforms,
    /// the direct work with `Ci * Co * k^3` taps; the constant is where the two measured
    /// equal on a 2-core AVX2 machine: LocalNet's k7 32 -> 32 runs 4x faster as FFT, its
    /// k7 2 -> 32 2x slower).
    Auto,
    /// Always the direct tap loops (`cpu.rs`, `avx2.rs`).
    Direct,
    /// FFT tiles for kernels of 5 and up, whatever the environment says.
    Fft,
}

impl Algorithm {
    /// Whether a convolution of these sizes takes the FFT path (which itself only takes
    /// kernels of 5 and up).
    fn uses_fft(self, ci: usize, co: usize, k: usize) -> bool {
        match self {
            Algorithm::Auto => fft_enabled() && ci * co * k * k * k >= 1300 * (ci + co),
            Algorithm::Direct => false,
            Algorithm::Fft => true,
        }
    }
}

/// Whether an f32 CPU [`conv3d`] with these channel counts and odd kernel size runs as
/// FFT tiles under [`Algorithm::Auto`] on this thread.
pub fn conv3d_auto_uses_fft(in_channels: usize, out_channels: usize, kernel: usize) -> bool {
    kernel >= fft::MIN_KERNEL
        && resolve(Algorithm::Auto).uses_fft(in_channels, out_channels, kernel)
}

thread_local! {
    /// The algorithm that replaces [`Algorithm::Auto`] on this thread, if any.
    static AUTO_OVERRIDE: std::cell::Cell<Option<Algorithm>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every [`Algorithm::Auto`] convolution started on this thread (by
/// [`conv3d`], [`conv3d_fused`], and their gradients) running `algorithm` instead: for
/// tests and benchmarks of whole networks on one path.
pub fn with_conv3d_algorithm<R>(algorithm: Algorithm, f: impl FnOnce() -> R) -> R {
    /// Puts the previous override back, also when `f` panics.
    struct Restore(Option<Algorithm>);
    impl Drop for Restore {
        fn drop(&mut self) {
            AUTO_OVERRIDE.with(|cell| cell.set(self.0));
        }
    }
    let _restore = Restore(AUTO_OVERRIDE.with(|cell| cell.replace(Some(algorithm))));
    f()
}

/// `algorithm`, with [`Algorithm::Auto`] replaced by this thread's override.
fn resolve(algorithm: Algorithm) -> Algorithm {
    match algorithm {
        Algorithm::Auto => AUTO_OVERRIDE
            .with(|cell| cell.get())
            .unwrap_or(Algorithm::Auto),
        other => other,
    }
}

/// [`conv3d`] with an explicit CPU [`Algorithm`] (for tests and benchmarks).
pub fn conv3d_with(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    algorithm: Algorithm,
) -> candle_core::Result<Tensor> {
    check_conv3d("conv3d", x, w, bias)?;
    if !has_fast_path(&[x]) && !runs_cudnn(x) {
        return conv3d_generic(x, w, bias);
    }
    let y = x.contiguous()?.apply_op2(
        &w.contiguous()?,
        ConvKernel(Pass::Forward, None, resolve(algorithm)),
    )?;
    add_bias(y, bias)
}

/// `relu?(conv3d(x, w) * scale + shift)` per output channel ([`Epilogue`]): an eval-mode
/// BatchNorm and its ReLU folded into the convolution. On the CPU, when neither `x` nor
/// `w` needs a gradient, the map is applied as the outputs are written, with no extra
/// pass or tensor; otherwise it is composed from differentiable candle ops.
pub fn conv3d_fused(x: &Tensor, w: &Tensor, epilogue: &Epilogue) -> candle_core::Result<Tensor> {
    check_conv3d("conv3d_fused", x, w, None)?;
    let co = w.dim(0)?;
    if epilogue.scale.len() != co || epilogue.shift.len() != co {
        bail!(
            "conv3d_fused: the epilogue has {} scales and {} shifts for {co} output channels",
            epilogue.scale.len(),
            epilogue.shift.len()
        );
    }
    if has_fast_path(&[x]) && !x.track_op() && !w.track_op() {
        let epilogue = Some(std::sync::Arc::new(epilogue.clone()));
        let kernel = ConvKernel(Pass::Forward, epilogue, resolve(Algorithm::Auto));
        return x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &kernel);
    }
    let channel = |v: &[f64]| {
        Tensor::new(v, x.device())?
            .to_dtype(x.dtype())?
            .reshape((1, co, 1, 1, 1))
    };
    let y = conv3d(x, w, None)?
        .broadcast_mul(&channel(&epilogue.scale)?)?
        .broadcast_add(&channel(&epilogue.shift)?)?;
    if epilogue.relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// [`conv3d`] built only from candle ops (`pad_with_zeros`, `conv2d`, sums), so it runs
/// on every device and gets its gradient from candle's autograd. Same contract as
/// [`conv3d`]; public so that tests can compare it with the CPU fast path.
pub fn conv3d_generic(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    check_conv3d("conv3d_generic", x, w, bias)?;
    let (b, ci, h, wd, d) = x.dims5()?;
    let (co, _, k, _, _) = w.dims5()?;
    let pad = (k - 1) / 2;
    // Depth becomes a batch axis: (B, D + 2p, Ci, H, W).
    let xt = x.permute((0, 4, 1, 2, 3))?.pad_with_zeros(1, pad, pad)?;
    let mut acc: Option<Tensor> = None;
    for c in 0..k {
        let slab = xt.narrow(1, c, d)?.reshape((b * d, ci, h, wd))?;
        let kernel = w.narrow(4, c, 1)?.squeeze(4)?.contiguous()?;
        let y = slab.conv2d(&kernel, pad, 1, 1, 1)?;
        acc = Some(match acc {
            None => y,
            Some(a) => (a + y)?,
        });
    }
    let acc = acc.expect("the kernel has at least one depth tap");
    let y = acc
        .reshape((b, d, co, h, wd))?
        .permute((0, 2, 3, 4, 1))?
        .contiguous()?;
    add_bias(y, bias)
}

/// PyTorch `ConvTranspose3d(Ci, Co, kernel_size=3, stride=2, padding=1, output_padding=1,
/// bias=False)`: `x` is `(B, Ci, H, W, D)`, `w` is `(Ci, Co, 3, 3, 3)` (PyTorch's layout),
/// the result is `(B, Co, 2H, 2W, 2D)` with `out[2i - 1 + a] += x[i] * w[a]` per axis.
/// Differentiable with respect to `x` and `w`.
///
/// CPU tensors of dtype f32 or f64 run a sub-pixel decomposition (see `transposed.rs`) that
/// multiplies no inserted zero; everything else runs [`conv_transpose3d_generic`].
pub fn conv_transpose3d(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    check_conv_transpose3d("conv_transpose3d", x, w)?;
    if !has_fast_path(&[x, w]) && !runs_cudnn(x) {
        return conv_transpose3d_generic(x, w);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, TransposedKernel(TransposedPass::Forward))
}

/// [`conv_transpose3d`] as zero insertion plus [`conv3d_generic`] with the flipped kernel
/// (monai-spec §1.2), for every device. Same contract.
pub fn conv_transpose3d_generic(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    check_conv_transpose3d("conv_transpose3d_generic", x, w)?;
    conv3d_generic(&dilate2(x)?, &flip_transpose(w)?, None)
}

fn add_bias(y: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        None => Ok(y),
        Some(bias) => {
            let co = bias.dim(0)?;
            y.broadcast_add(&bias.reshape((1, co, 1, 1, 1))?)
        }
    }
}

/// Whether `x` takes the cuDNN custom ops: a CUDA tensor of dtype f32 or f64 in a build
/// with the `cudnn` feature. (The other arguments are checked to match `x` before.)
fn runs_cudnn(x: &Tensor) -> bool {
    cfg!(feature = "cudnn")
        && x.device().is_cuda()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// Checks shapes, dtypes and devices of a [`conv3d`] call.
fn check_conv3d(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<()> {
    if x.rank() != 5 || w.rank() != 5 {
        bail!(
            "{op}: expected x (B, Ci, H, W, D) and w (Co, Ci, k, k, k), got x {:?} and w {:?}",
            x.dims(),
            w.dims()
        );
    }
    let (_, ci, h, wd, d) = x.dims5()?;
    let (co, wci, k0, k1, k2) = w.dims5()?;
    if wci != ci {
        bail!(
            "{op}: x has {ci} channels but w expects {wci} (x {:?}, w {:?})",
            x.dims(),
            w.dims()
        );
    }
    if k0 != k1 || k1 != k2 || k0 % 2 == 0 {
        bail!(
            "{op}: the kernel must be cubic with an odd size, got w {:?}",
            w.dims()
        );
    }
    if h == 0 || wd == 0 || d == 0 {
        bail!("{op}: empty spatial size in x {:?}", x.dims());
    }
    if let Some(bias) = bias {
        if bias.dims() != [co] {
            bail!(
                "{op}: bias must be ({co}) for w {:?}, got {:?}",
                w.dims(),
                bias.dims()
            );
        }
    }
    for (name, t) in [("w", Some(w)), ("bias", bias)] {
        let Some(t) = t else { continue };
        if t.dtype() != x.dtype() {
            bail!("{op}: {name} is {:?} but x is {:?}", t.dtype(), x.dtype());
        }
        if !t.device().same_device(x.device()) {
            bail!("{op}: {name} and x are on different devices");
        }
    }
    Ok(())
}

/// Checks the shapes of a [`conv_transpose3d`] call.
fn check_conv_transpose3d(op: &'static str, x: &Tensor, w: &Tensor) -> candle_core::Result<()> {
    if x.rank() != 5 || w.rank() != 5 {
        bail!(
            "{op}: expected x (B, Ci, H, W, D) and w (Ci, Co, 3, 3, 3), got x {:?} and w {:?}",
            x.dims(),
            w.dims()
        );
    }
    if w.dim(0)? != x.dim(1)? || w.dims()[2..] != [3, 3, 3] {
        bail!(
            "{op}: w must be (Ci={}, Co, 3, 3, 3), got x {:?} and w {:?}",
            x.dim(1)?,
            x.dims(),
            w.dims()
        );
    }
    if w.dtype() != x.dtype() {
        bail!("{op}: w is {:?} but x is {:?}", w.dtype(), x.dtype());
    }
    if !w.device().same_device(x.device()) {
        bail!("{op}: w and x are on different devices");
    }
    Ok(())
}

/// Inserts a zero after every voxel along the three spatial axes:
/// `(B, C, H, W, D) -> (B, C, 2H, 2W, 2D)` with `out[2i] = x[i]`, `out[2i + 1] = 0`.
fn dilate2(x: &Tensor) -> candle_core::Result<Tensor> {
    let mut y = x.clone();
    for dim in 2..5 {
        let zeros = y.zeros_like()?;
        y = Tensor::stack(&[&y, &zeros], dim + 1)?.flatten(dim, dim + 1)?;
    }
    Ok(y)
}

/// `(Ci, Co, k, k, k) -> (Co, Ci, k, k, k)` with the kernel reversed along its three
/// spatial axes: the correlation kernel equivalent to a transposed convolution.
fn flip_transpose(w: &Tensor) -> candle_core::Result<Tensor> {
    let mut w = w.transpose(0, 1)?;
    for dim in 2..5 {
        let n = w.dim(dim)?;
        let rev: Vec<u32> = (0..n as u32).rev().collect();
        let rev = Tensor::new(rev.as_slice(), w.device())?;
        w = w.contiguous()?.index_select(&rev, dim)?;
    }
    w.contiguous()
}

/// The five dimensions of a rank-5 layout.
#[cfg(feature = "cudnn")]
fn dims5(layout: &Layout) -> candle_core::Result<[usize; 5]> {
    let (a, b, c, d, e) = layout.shape().dims5()?;
    Ok([a, b, c, d, e])
}

/// Sizes of one convolution call.
#[derive(Debug, Clone, Copy)]
struct ConvDims {
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    size: [usize; 3],
    kernel: usize,
}

impl ConvDims {
    fn new(x: &Layout, w: &Layout) -> candle_core::Result<Self> {
        let (batch, in_channels, h, wd, d) = x.shape().dims5()?;
        let (out_channels, _, kernel, _, _) = w.shape().dims5()?;
        Ok(Self {
            batch,
            in_channels,
            out_channels,
            size: [h, wd, d],
            kernel,
        })
    }

    fn pad(&self) -> usize {
        (self.kernel - 1) / 2
    }

    fn voxels(&self) -> usize {
        self.size.iter().product()
    }

    /// Voxel strides `(Wp*Dp, Dp)` of the padded volume.
    fn padded_strides(&self) -> [usize; 2] {
        let p = 2 * self.pad();
        [(self.size[1] + p) * (self.size[2] + p), self.size[2] + p]
    }

    /// Whether the forward pass and weight gradient fold the second kernel axis into the
    /// channels ([`PaddedVolume::fold`]): for few input channels (LocalNet's first conv
    /// has 2, so 7 taps x 2 channels would be a GEMM inner dimension of 14).
    fn folds(&self) -> bool {
        self.kernel > 1 && self.in_channels * self.kernel <= 32
    }

    /// The tap groups of the forward correlation on the folded input, one per `a`: taps
    /// `c` along the last axis, channels `b * Ci + i`.
    fn folded_groups<T: Float>(&self, w: &[T]) -> Vec<TapGroup<T>> {
        let (ci, co, k) = (self.in_channels, self.out_channels, self.kernel);
        let [s0, _] = self.padded_strides();
        (0..k)
            .map(|a| {
                let mut weights = Vec::with_capacity(co * k * k * ci);
                for o in 0..co {
                    for c in 0..k {
                        for b in 0..k {
                            for i in 0..ci {
                                weights.push(w[(((o * ci + i) * k + a) * k + b) * k + c]);
                            }
                        }
                    }
                }
                TapGroup {
                    offset: a * s0,
                    taps: k,
                    weights,
                }
            })
            .collect()
    }

    /// The tap groups of the correlation with `w` (`(Co, Ci, k, k, k)`, row-major), one
    /// per `(a, b)`. With `adjoint`, the groups of the input gradient instead: the kernel
    /// flipped in all axes, with `Ci` and `Co` swapped.
    fn groups<T: Float>(&self, w: &[T], adjoint: bool) -> Vec<TapGroup<T>> {
        let (ci, co, k) = (self.in_channels, self.out_channels, self.kernel);
        let [s0, s1] = self.padded_strides();
        let at = |o: usize, i: usize, a: usize, b: usize, c: usize| {
            w[(((o * ci + i) * k + a) * k + b) * k + c]
        };
        let (rows, cols) = if adjoint { (ci, co) } else { (co, ci) };
        let mut groups = Vec::with_capacity(k * k);
        for a in 0..k {
            for b in 0..k {
                let mut weights = Vec::with_capacity(rows * k * cols);
                for r in 0..rows {
                    for c in 0..k {
                        for s in 0..cols {
                            weights.push(if adjoint {
                                at(s, r, k - 1 - a, k - 1 - b, k - 1 - c)
                            } else {
                                at(r, s, a, b, c)
                            });
                        }
                    }
                }
                groups.push(TapGroup {
                    offset: a * s0 + b * s1,
                    taps: k,
                    weights,
                });
            }
        }
        groups
    }
}

/// Runs the correlation `groups` on every batch item of the channels-first `x`
/// (`in_channels` wide) and returns the channels-first result (`out_channels` wide).
/// With `fold`, `groups` are [`ConvDims::folded_groups`] and the padded input is folded;
/// with an `epilogue`, the outputs pass through it.
fn correlate_batch<T: Float>(
    x: &[T],
    groups: &[TapGroup<T>],
    dims: &ConvDims,
    in_channels: usize,
    out_channels: usize,
    fold: bool,
    epilogue: Option<&Epilogue>,
) -> Vec<T> {
    let n = dims.voxels();
    let p = dims.pad();
    let strides = dims.padded_strides();
    let mut out = vec![T::default(); dims.batch * out_channels * n];
    for (xb, ob) in x
        .chunks_exact(in_channels * n)
        .zip(out.chunks_exact_mut(out_channels * n))
    {
        let mut padded = PaddedVolume::new(xb, in_channels, dims.size, [p; 3], [p; 3]);
        if fold {
            padded = padded.fold(dims.kernel, strides[1]);
        }
        cpu::correlate_rows(
            &padded,
            groups,
            out_channels,
            dims.size,
            strides,
            epilogue,
            ob,
        );
    }
    out
}

/// The weight gradient `(Co, Ci, k, k, k)` from the input `x` and output gradient `g`.
fn weight_grad<T: Float>(x: &[T], g: &[T], dims: &ConvDims) -> Vec<T> {
    let (ci, co, k) = (dims.in_channels, dims.out_channels, dims.kernel);
    let n = dims.voxels();
    let p = dims.pad();
    let [s0, s1] = dims.padded_strides();
    let span = cpu::span(dims.size, [s0, s1]);
    let fold = dims.folds();
    let groups: Vec<(usize, usize)> = if fold {
        (0..k).map(|a| (a * s0, k)).collect()
    } else {
        (0..k * k)
            .map(|ab| ((ab / k) * s0 + (ab % k) * s1, k))
            .collect()
    };
    // Output position f sits at padded voxel f + p*(s0 + s1 + 1) of the padded gradient,
    // whose padding supplies the zeros at the invalid positions.
    let shift = p * (s0 + s1 + 1);
    let mut dw = vec![T::default(); co * ci * k * k * k];
    for (xb, gb) in x.chunks_exact(ci * n).zip(g.chunks_exact(co * n)) {
        let mut xp = PaddedVolume::new(xb, ci, dims.size, [p; 3], [p; 3]);
        let gp = PaddedVolume::new(gb, co, dims.size, [p; 3], [p; 3]);
        if fold {
            xp = xp.fold(k, s1);
        }
        let per_group = cpu::correlate_weight_grad(&xp, &gp, shift, &groups, span);
        if fold {
            // Group a: gw[(o * k + c) * (k * Ci) + b * Ci + i] = dW[o, i, a, b, c].
            for (a, gw) in per_group.iter().enumerate() {
                for o in 0..co {
                    for c in 0..k {
                        for b in 0..k {
                            for i in 0..ci {
                                dw[(((o * ci + i) * k + a) * k + b) * k + c] +=
                                    gw[((o * k + c) * k + b) * ci + i];
                            }
                        }
                    }
                }
            }
            continue;
        }
        for (ab, gw) in per_group.iter().enumerate() {
            let (a, b) = (ab / k, ab % k);
            for o in 0..co {
                for c in 0..k {
                    for i in 0..ci {
                        dw[(((o * ci + i) * k + a) * k + b) * k + c] += gw[(o * k + c) * ci + i];
                    }
                }
            }
        }
    }
    dw
}

/// Which computation a [`ConvKernel`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// `conv3d(x, w)`: arguments `(x, w)`.
    Forward,
    /// Input gradient: arguments `(grad_out, w)`.
    InputGrad,
    /// Weight gradient: arguments `(grad_out, x)`, kernel size from the op.
    WeightGrad { kernel: usize },
}

/// The CPU custom op of [`conv3d`] (and, with an epilogue, [`conv3d_fused`]); only
/// [`Pass::Forward`] without an epilogue has a backward pass.
#[derive(Debug, Clone)]
struct ConvKernel(Pass, Option<std::sync::Arc<Epilogue>>, Algorithm);

impl CpuKernel for ConvKernel {
    fn kernel_name(&self) -> &'static str {
        match self.0 {
            Pass::Forward => "conv3d",
            Pass::InputGrad => "conv3d-input-grad",
            Pass::WeightGrad { .. } => "conv3d-weight-grad",
        }
    }

    fn run<T: Float>(&self, args: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let [(a, la), (b, lb)] = args else {
            bail!("{}: expected 2 arguments", self.kernel_name());
        };
        let dims = self.dims(la, lb)?;
        let [h, wd, d] = dims.size;
        let (ci, co, k) = (dims.in_channels, dims.out_channels, dims.kernel);
        let shape = match self.0 {
            Pass::Forward => Shape::from((dims.batch, co, h, wd, d)),
            Pass::InputGrad => Shape::from((dims.batch, ci, h, wd, d)),
            Pass::WeightGrad { .. } => Shape::from((co, ci, k, k, k)),
        };
        if let Some(out) = self.run_fft(a, b, &dims) {
            return Ok((out, shape));
        }
        fft::release_buffers();
        let out = match self.0 {
            Pass::Forward => {
                let fold = dims.folds();
                let groups = if fold {
                    dims.folded_groups(b)
                } else {
                    dims.groups(b, false)
                };
                correlate_batch(a, &groups, &dims, ci, co, fold, self.1.as_deref())
            }
            // a = grad_out (B, Co, H, W, D), b = w (Co, Ci, k, k, k).
            Pass::InputGrad => {
                correlate_batch(a, &dims.groups(b, true), &dims, co, ci, false, None)
            }
            // a = grad_out (B, Co, H, W, D), b = x (B, Ci, H, W, D).
            Pass::WeightGrad { .. } => weight_grad(b, a, &dims),
        };
        Ok((out, shape))
    }
}

impl ConvKernel {
    /// The sizes of this pass's call: arguments `(x, w)` for [`Pass::Forward`], `(grad_out,
    /// w)` for [`Pass::InputGrad`], `(grad_out, x)` for [`Pass::WeightGrad`].
    fn dims(&self, la: &Layout, lb: &Layout) -> candle_core::Result<ConvDims> {
        if self.0 == Pass::Forward {
            return ConvDims::new(la, lb);
        }
        let (batch, out_channels, h, wd, d) = la.shape().dims5()?;
        let (in_channels, kernel) = match self.0 {
            Pass::WeightGrad { kernel } => (lb.shape().dims5()?.1, kernel),
            _ => {
                let (_, ci, kernel, _, _) = lb.shape().dims5()?;
                (ci, kernel)
            }
        };
        Ok(ConvDims {
            batch,
            in_channels,
            out_channels,
            size: [h, wd, d],
            kernel,
        })
    }

    /// This pass through the FFT convolution (`fft.rs`), when it takes the call: f32,
    /// kernels of 5 and up, and the [`Algorithm`] allows it.
    fn run_fft<T: Float>(&self, a: &[T], b: &[T], dims: &ConvDims) -> Option<Vec<T>> {
        if !self
            .2
            .uses_fft(dims.in_channels, dims.out_channels, dims.kernel)
        {
            return None;
        }
        let (a, b) = (T::as_f32(a)?, T::as_f32(b)?);
        let channels = [dims.in_channels, dims.out_channels];
        let (batch, size, k) = (dims.batch, dims.size, dims.kernel);
        let out = match self.0 {
            Pass::Forward => fft::forward(a, b, batch, channels, size, k, self.1.as_deref()),
            Pass::InputGrad => fft::input_grad(a, b, batch, channels, size, k),
            Pass::WeightGrad { .. } => fft::weight_grad(b, a, batch, channels, size, k),
        }?;
        T::from_f32(out)
    }
}

/// Whether f32 convolutions with kernels of 5 and up take the FFT path: yes, unless the
/// environment variable `MEDRAY_CONV3D` is `direct` (for comparisons; `auto`, the default,
/// picks FFT). Read once per process.
fn fft_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| match std::env::var("MEDRAY_CONV3D") {
        Err(_) => true,
        Ok(v) if v == "auto" => true,
        Ok(v) if v == "direct" => false,
        Ok(v) => {
            tracing::warn!("MEDRAY_CONV3D={v:?} is neither `auto` nor `direct`; using `auto`");
            true
        }
    })
}

impl CustomOp2 for ConvKernel {
    fn name(&self) -> &'static str {
        self.kernel_name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run_cpu(self, &[(s1, l1), (s2, l2)])
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if self.1.is_some() {
            bail!(
                "{}: the fused epilogue runs on the CPU only",
                self.kernel_name()
            );
        }
        let (a, b) = (dims5(l1)?, dims5(l2)?);
        let same =
            |x: [usize; 5], batch: usize, channels: usize| [batch, channels, x[2], x[3], x[4]];
        // a and b per pass: Forward (x, w), InputGrad (dy, w), WeightGrad (dy, x).
        let (call, x, w, y, kernel) = match self.0 {
            Pass::Forward => (cudnn::Call::Forward, a, b, same(a, a[0], b[0]), b[2]),
            Pass::InputGrad => (cudnn::Call::BackwardData, same(a, a[0], b[1]), b, a, b[2]),
            Pass::WeightGrad { kernel } => {
                let w = [a[1], b[1], kernel, kernel, kernel];
                (cudnn::Call::BackwardFilter, b, w, a, kernel)
            }
        };
        let geometry = cudnn::Geometry {
            x,
            w,
            y,
            pad: (kernel - 1) / 2,
            stride: 1,
        };
        cudnn::run(self.kernel_name(), call, &geometry, (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.0 != Pass::Forward || self.1.is_some() {
            bail!("{}: no gradient for this pass", self.kernel_name());
        }
        let kernel = w.dim(2)?;
        // An input that no variable depends on (LocalNet's first conv reads the images)
        // needs no gradient; with 2 input channels its GEMM is the slowest of the step.
        input_and_weight_grads(
            x,
            w,
            grad,
            &ConvKernel(Pass::InputGrad, None, self.2),
            &ConvKernel(Pass::WeightGrad { kernel }, None, self.2),
        )
    }
}

/// The backward pass of a forward op with arguments `(x, w)`: `input_grad` applied to
/// `(grad, w)` and `weight_grad` to `(grad, x)`, each only when that argument tracks a
/// variable.
fn input_and_weight_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    input_grad: &impl CustomOp2,
    weight_grad: &impl CustomOp2,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    // The weight gradient first: its padded copies of x and grad are freed before the
    // input gradient allocates its own and its result, which lowers the step's peak.
    let dw = w
        .track_op()
        .then(|| grad.apply_op2_no_bwd(x, weight_grad))
        .transpose()?;
    let dx = x
        .track_op()
        .then(|| grad.apply_op2_no_bwd(w, input_grad))
        .transpose()?;
    Ok((dx, dw))
}

/// The CPU custom op of [`conv_transpose3d`]; only [`TransposedPass::Forward`] has a
/// backward pass.
#[derive(Debug, Clone, Copy)]
struct TransposedKernel(TransposedPass);

impl CpuKernel for TransposedKernel {
    fn kernel_name(&self) -> &'static str {
        match self.0 {
            TransposedPass::Forward => "conv_transpose3d",
            TransposedPass::InputGrad => "conv_transpose3d-input-grad",
            TransposedPass::WeightGrad => "conv_transpose3d-weight-grad",
        }
    }

    fn run<T: Float>(&self, args: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let [(a, la), (b, lb)] = args else {
            bail!("{}: expected 2 arguments", self.kernel_name());
        };
        self.0.run(a, la, b, lb)
    }
}

impl CustomOp2 for TransposedKernel {
    fn name(&self) -> &'static str {
        self.kernel_name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run_cpu(self, &[(s1, l1), (s2, l2)])
    }

    /// The transposed convolution is the input gradient of the stride-2 convolution from
    /// the `(B, Co, 2H, 2W, 2D)` volume to the `(B, Ci, H, W, D)` one with the same
    /// `(Ci, Co, 3, 3, 3)` filter: see `cudnn.rs`.
    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (a, b) = (dims5(l1)?, dims5(l2)?);
        let up = |x: [usize; 5], channels: usize| [x[0], channels, 2 * x[2], 2 * x[3], 2 * x[4]];
        let down = |x: [usize; 5], channels: usize| [x[0], channels, x[2] / 2, x[3] / 2, x[4] / 2];
        let name = self.kernel_name();
        // a and b per pass: Forward (x, w), InputGrad (dy, w), WeightGrad (dy, x).
        let (call, big, w, small, args) = match self.0 {
            TransposedPass::Forward => (
                cudnn::Call::BackwardData,
                up(a, b[1]),
                b,
                a,
                [(s1, l1), (s2, l2)],
            ),
            TransposedPass::InputGrad => (
                cudnn::Call::Forward,
                a,
                b,
                down(a, b[0]),
                [(s1, l1), (s2, l2)],
            ),
            // The convolution's dy is this op's x, its input this op's dy.
            TransposedPass::WeightGrad => (
                cudnn::Call::BackwardFilter,
                a,
                [b[1], a[1], 3, 3, 3],
                b,
                [(s2, l2), (s1, l1)],
            ),
        };
        let geometry = cudnn::Geometry {
            x: big,
            w,
            y: small,
            pad: 1,
            stride: 2,
        };
        cudnn::run(name, call, &geometry, args[0], args[1])
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.0 != TransposedPass::Forward {
            bail!("{}: no second-order gradient", self.kernel_name());
        }
        input_and_weight_grads(
            x,
            w,
            grad,
            &TransposedKernel(TransposedPass::InputGrad),
            &TransposedKernel(TransposedPass::WeightGrad),
        )
    }
}
