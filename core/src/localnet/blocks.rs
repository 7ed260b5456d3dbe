//! The building blocks of LocalNet, each named as in MONAI's `regunet_block.py` so that the
//! variable paths reproduce MONAI's `state_dict` names.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

use crate::ops;

/// Where a tensor of the model lives and whether the optimiser updates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    /// A trainable parameter (conv weight, BN weight and bias).
    Parameter,
    /// A BN running statistic (running_mean, running_var).
    Buffer,
}

/// A named variable of the model, in MONAI `state_dict` order.
#[derive(Clone, Debug)]
pub struct NamedVar {
    /// The MONAI `state_dict` name.
    pub name: String,
    /// Parameter or buffer.
    pub kind: TensorKind,
    /// The variable itself.
    pub var: Var,
}

/// How a convolution weight is initialised (MONAI / PyTorch defaults, see monai-spec §1.4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Init {
    /// `nn.init.kaiming_normal_`: N(0, 2 / fan_in).
    KaimingNormal,
    /// PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    TorchDefault,
    /// All zeros (MONAI's `out_kernel_initializer="zeros"`).
    Zeros,
}

/// Creates a weight of `shape` with `fan_in` for the initialiser.
pub(crate) fn init_weight(
    shape: &[usize],
    fan_in: usize,
    init: Init,
    rng: &mut impl Rng,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Var> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = match init {
        Init::Zeros => vec![0.0; n],
        Init::TorchDefault => {
            let bound = (1.0 / fan_in as f64).sqrt() as f32;
            (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
        }
        Init::KaimingNormal => {
            let std = (2.0 / fan_in as f64).sqrt();
            (0..n)
                .map(|_| {
                    // Box-Muller; two uniforms per sample keep the stream simple.
                    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
                    let u2: f64 = rng.gen();
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
                })
                .collect()
        }
    };
    Var::from_tensor(&Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
}

/// A parameter as the forward pass reads it: tracked in training mode; detached in eval
/// mode, so that inference builds no autograd graph and frees each intermediate as soon as
/// the next layer has read it.
pub(crate) fn param(var: &Var, train: bool) -> Tensor {
    if train {
        var.as_tensor().clone()
    } else {
        var.as_tensor().detach()
    }
}

/// `nn.BatchNorm3d(C)` with eps 1e-5 and momentum 0.1.
#[derive(Debug)]
pub struct BatchNorm3d {
    prefix: String,
    weight: Var,
    bias: Var,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: AtomicI64,
    /// `Some` while running-statistic updates are deferred: each training forward appends
    /// its batch statistics here instead of updating the running ones (see
    /// [`BatchNorm3d::defer_updates`]).
    deferred: Mutex<Option<Vec<BatchStats>>>,
}

/// One training forward's batch statistics of a BatchNorm layer: the per-channel mean and
/// unbiased variance that the running statistics move towards.
#[derive(Clone, Debug)]
pub struct BatchStats {
    /// Per-channel batch mean.
    pub mean: Tensor,
    /// Per-channel unbiased batch variance.
    pub var_unbiased: Tensor,
}

impl BatchNorm3d {
    const EPS: f64 = 1e-5;
    const MOMENTUM: f64 = 0.1;

    pub(crate) fn new(
        prefix: String,
        channels: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            prefix,
            weight: Var::ones(channels, dtype, device)?,
            bias: Var::zeros(channels, dtype, device)?,
            running_mean: Var::zeros(channels, dtype, device)?,
            running_var: Var::ones(channels, dtype, device)?,
            num_batches_tracked: AtomicI64::new(0),
            deferred: Mutex::new(None),
        })
    }

    fn deferred(&self) -> std::sync::MutexGuard<'_, Option<Vec<BatchStats>>> {
        self.deferred.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Defers (`true`) or resumes (`false`) the running-statistic updates of training
    /// forwards. While deferred, each training forward records its [`BatchStats`] (taken with
    /// [`BatchNorm3d::take_deferred`]) and leaves the running statistics and
    /// `num_batches_tracked` alone, so that a data-parallel step can apply them later, in the
    /// global batch's order, or drop them when the step is aborted. Turning it off drops
    /// what was not taken.
    pub fn defer_updates(&self, on: bool) {
        *self.deferred() = on.then(Vec::new);
    }

    /// The batch statistics recorded since updates were deferred (or last taken), in forward
    /// order.
    pub fn take_deferred(&self) -> Vec<BatchStats> {
        self.deferred()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Moves the running statistics towards one batch's statistics (momentum 0.1) and counts
    /// the batch: exactly what a training forward does when updates are not deferred.
    pub fn update_running(&self, stats: &BatchStats) -> candle_core::Result<()> {
        let m = Self::MOMENTUM;
        let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (&stats.mean * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (&stats.var_unbiased * m)?)?;
        self.running_mean.set(&rm.detach())?;
        self.running_var.set(&rv.detach())?;
        self.num_batches_tracked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Channels (the length of each batch statistic).
    pub fn channels(&self) -> usize {
        self.running_mean.elem_count()
    }

    /// Normalises `x`; in training mode with the batch statistics (and updates the running
    /// statistics), otherwise with the running statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.apply(x, train, false, None)
    }

    /// `ReLU(self.forward_t(x, train))`, fused into one op on the CPU.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.apply(x, train, true, None)
    }

    /// `ReLU(self.forward_t(x, train) + residual)`, fused into one op on the CPU in
    /// training mode (the tail of a residual block).
    pub fn forward_add_relu_t(
        &self,
        x: &Tensor,
        residual: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        self.apply(x, train, true, Some(residual))
    }

    fn apply(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (weight, bias) = (param(&self.weight, train), param(&self.bias, train));
        if train {
            let stats = match residual {
                Some(r) => ops::batch_norm_add_relu3d_train(x, &weight, &bias, r, Self::EPS)?,
                None if relu => ops::batch_norm_relu3d_train(x, &weight, &bias, Self::EPS)?,
                None => ops::batch_norm3d_train(x, &weight, &bias, Self::EPS)?,
            };
            let batch = BatchStats {
                mean: stats.mean.detach(),
                var_unbiased: stats.var_unbiased.detach(),
            };
            if let Some(log) = self.deferred().as_mut() {
                log.push(batch);
            } else {
                self.update_running(&batch)?;
            }
            return Ok(stats.output);
        }
        let eval = if relu && residual.is_none() {
            ops::batch_norm_relu3d_eval
        } else {
            ops::batch_norm3d_eval
        };
        let y = eval(
            x,
            &weight,
            &bias,
            self.running_mean.as_tensor(),
            self.running_var.as_tensor(),
            Self::EPS,
        )?;
        match residual {
            Some(r) => (y + r)?.relu(),
            None => Ok(y),
        }
    }

    /// This layer in eval mode as the [`ops::Epilogue`] of the convolution before it:
    /// `scale = weight / sqrt(running_var + eps)`, `shift = bias - running_mean * scale`,
    /// and a ReLU when `relu`.
    pub(crate) fn epilogue(&self, relu: bool) -> candle_core::Result<ops::Epilogue> {
        let values = |v: &Var| v.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>();
        let (weight, bias) = (values(&self.weight)?, values(&self.bias)?);
        let (mean, var) = (values(&self.running_mean)?, values(&self.running_var)?);
        let scale: Vec<f64> = weight
            .iter()
            .zip(&var)
            .map(|(w, v)| w / (v + Self::EPS).sqrt())
            .collect();
        let shift = bias
            .iter()
            .zip(&mean)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        Ok(ops::Epilogue { scale, shift, relu })
    }

    /// The number of training batches seen (`num_batches_tracked`).
    pub fn num_batches_tracked(&self) -> i64 {
        self.num_batches_tracked.load(Ordering::Relaxed)
    }

    pub(crate) fn set_num_batches_tracked(&self, n: i64) {
        self.num_batches_tracked.store(n, Ordering::Relaxed);
    }

    pub(crate) fn counter_name(&self) -> String {
        format!("{}.num_batches_tracked", self.prefix)
    }

    pub(crate) fn collect(&self, out: &mut Vec<NamedVar>) {
        let p = &self.prefix;
        for (suffix, kind, var) in [
            ("weight", TensorKind::Parameter, &self.weight),
            ("bias", TensorKind::Parameter, &self.bias),
            ("running_mean", TensorKind::Buffer, &self.running_mean),
            ("running_var", TensorKind::Buffer, &self.running_var),
        ] {
            out.push(NamedVar {
                name: format!("{p}.{suffix}"),
                kind,
                var: var.clone(),
            });
        }
    }

    pub(crate) fn collect_self<'a>(&'a self, out: &mut Vec<&'a BatchNorm3d>) {
        out.push(self);
    }
}

/// MONAI `get_conv_block`: conv (no bias, "same" padding) -> BatchNorm -> ReLU.
/// Names: `<prefix>.conv.weight`, `<prefix>.adn.N.*`.
#[derive(Debug)]
pub struct ConvBlock {
    prefix: String,
    weight: Var,
    norm: BatchNorm3d,
}

impl ConvBlock {
    pub(crate) fn new(
        prefix: String,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        rng: &mut impl Rng,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let fan_in = c_in * kernel.pow(3);
        let weight = init_weight(
            &[c_out, c_in, kernel, kernel, kernel],
            fan_in,
            Init::KaimingNormal,
            rng,
            dtype,
            device,
        )?;
        let norm = BatchNorm3d::new(format!("{prefix}.adn.N"), c_out, dtype, device)?;
        Ok(Self {
            prefix,
            weight,
            norm,
        })
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let weight = param(&self.weight, train);
        if !train {
            return ops::conv3d_fused(x, &weight, &self.norm.epilogue(true)?);
        }
        let h = ops::conv3d(x, &weight, None)?;
        self.norm.forward_relu_t(&h, train)
    }

    pub(crate) fn collect(&self, out: &mut Vec<NamedVar>) {
        out.push(NamedVar {
            name: format!("{}.conv.weight", self.prefix),
            kind: TensorKind::Parameter,
            var: self.weight.clone(),
        });
        self.norm.collect(out);
    }

    pub(crate) fn norms<'a>(&'a self, out: &mut Vec<&'a BatchNorm3d>) {
        self.norm.collect_self(out);
    }
}

/// MONAI `RegistrationResidualConvBlock` with two layers:
/// `x -> ReLU(BN0(conv0(x))) -> ReLU(BN1(conv1(.)) + x)`.
/// Names: `<prefix>.layers.{0,1}.conv.weight`, `<prefix>.norms.{0,1}.*`.
#[derive(Debug)]
pub struct ResidualBlock {
    prefix: String,
    weights: [Var; 2],
    norms: [BatchNorm3d; 2],
}

impl ResidualBlock {
    pub(crate) fn new(
        prefix: String,
        channels: usize,
        kernel: usize,
        rng: &mut impl Rng,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let shape = [channels, channels, kernel, kernel, kernel];
        let fan_in = channels * kernel.pow(3);
        let w0 = init_weight(&shape, fan_in, Init::TorchDefault, rng, dtype, device)?;
        let w1 = init_weight(&shape, fan_in, Init::TorchDefault, rng, dtype, device)?;
        let n0 = BatchNorm3d::new(format!("{prefix}.norms.0"), channels, dtype, device)?;
        let n1 = BatchNorm3d::new(format!("{prefix}.norms.1"), channels, dtype, device)?;
        Ok(Self {
            prefix,
            weights: [w0, w1],
            norms: [n0, n1],
        })
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let [w0, w1] = [0, 1].map(|i| param(&self.weights[i], train));
        if !train {
            let h = ops::conv3d_fused(x, &w0, &self.norms[0].epilogue(true)?)?;
            let h = ops::conv3d_fused(&h, &w1, &self.norms[1].epilogue(false)?)?;
            return (h + x)?.relu();
        }
        let h = ops::conv3d(x, &w0, None)?;
        let h = self.norms[0].forward_relu_t(&h, train)?;
        let h = ops::conv3d(&h, &w1, None)?;
        self.norms[1].forward_add_relu_t(&h, x, train)
    }

    pub(crate) fn collect(&self, out: &mut Vec<NamedVar>) {
        for (i, w) in self.weights.iter().enumerate() {
            out.push(NamedVar {
                name: format!("{}.layers.{i}.conv.weight", self.prefix),
                kind: TensorKind::Parameter,
                var: w.clone(),
            });
        }
        for n in &self.norms {
            n.collect(out);
        }
    }

    pub(crate) fn norms<'a>(&'a self, out: &mut Vec<&'a BatchNorm3d>) {
        for n in &self.norms {
            n.collect_self(out);
        }
    }
}

/// MONAI `AdditiveUpSampleBlock`: `ReLU(BN(ConvT(x))) + sum of the two channel halves of
/// nearest-upsampled x`. Names: `<prefix>.deconv.conv.weight`, `<prefix>.deconv.adn.N.*`.
#[derive(Debug)]
pub struct AdditiveUpSample {
    prefix: String,
    weight: Var,
    norm: BatchNorm3d,
    c_out: usize,
}

impl AdditiveUpSample {
    pub(crate) fn new(
        prefix: String,
        c_in: usize,
        c_out: usize,
        rng: &mut impl Rng,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        // torch computes the transposed conv's fan_in from weight.shape[1] * k^3 = c_out * 27.
        let weight = init_weight(
            &[c_in, c_out, 3, 3, 3],
            c_out * 27,
            Init::TorchDefault,
            rng,
            dtype,
            device,
        )?;
        let norm = BatchNorm3d::new(format!("{prefix}.deconv.adn.N"), c_out, dtype, device)?;
        Ok(Self {
            prefix,
            weight,
            norm,
            c_out,
        })
    }

    /// The block's output plus the decoder's skip connection `skip` (LocalNet adds it
    /// right after the block), in one op on the CPU.
    pub fn forward_t(&self, x: &Tensor, skip: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let deconved = ops::conv_transpose3d(x, &param(&self.weight, train))?;
        let deconved = self.norm.forward_relu_t(&deconved, train)?;
        // Nearest upsampling copies values, so summing the halves first is exact and cheaper.
        let halves = (x.narrow(1, 0, self.c_out)? + x.narrow(1, self.c_out, self.c_out)?)?;
        ops::add_upsampled2x(&deconved, &halves, skip)
    }

    pub(crate) fn collect(&self, out: &mut Vec<NamedVar>) {
        out.push(NamedVar {
            name: format!("{}.deconv.conv.weight", self.prefix),
            kind: TensorKind::Parameter,
            var: self.weight.clone(),
        });
        self.norm.collect(out);
    }

    pub(crate) fn norms<'a>(&'a self, out: &mut Vec<&'a BatchNorm3d>) {
        self.norm.collect_self(out);
    }
}
