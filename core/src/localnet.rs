//! LocalNet, the deformable-registration network of Hu et al., "Weakly-supervised
//! convolutional neural networks for multimodal image registration" (Medical Image Analysis,
//! 2018), as implemented by MONAI's `monai/networks/nets/regunet.py` (`LocalNet`, built on
//! `RegUNet`) and `monai/networks/blocks/regunet_block.py`.
//!
//! The network maps `cat(moving, fixed)` of shape (B, 2, H, W, D) to a dense displacement
//! field (B, 3, H, W, D) in voxel units. Every spatial size must be divisible by
//! 2^depth = 8. Variable names reproduce MONAI's `state_dict` exactly (see
//! `shared/docs/localnet_extract*_state_dict.tsv`), so MONAI weights load unchanged and ours
//! load in MONAI. Two presets: [`LocalNetConfig::seed`] (`extract_levels = [3]`, the
//! quickstart's network: no decoder, DDF predicted at 1/8 resolution) and
//! [`LocalNetConfig::full`] (`[0, 1, 2, 3]`, the U-Net decoder).

mod blocks;
mod weights;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use blocks::{AdditiveUpSample, ConvBlock, Init, ResidualBlock};
pub use blocks::{BatchNorm3d, BatchStats, NamedVar, TensorKind};
pub use weights::{infer_config, read_safetensors};

use crate::{ops, Error, Result};

/// Named network presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// `extract_levels = [3]`: the quickstart / MONAI tutorial network.
    Seed,
    /// `extract_levels = [0, 1, 2, 3]`: LocalNet with its decoder.
    Full,
}

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "seed" => Ok(Preset::Seed),
            "full" => Ok(Preset::Full),
            other => Err(Error::invalid(
                "preset",
                format!("`{other}` is not one of: seed, full"),
            )),
        }
    }
}

/// How the output convolutions are initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputInit {
    /// All zeros: the initial DDF is exactly 0 (the quickstart's choice).
    Zeros,
    /// Kaiming normal, like MONAI's `out_kernel_initializer="kaiming_uniform"`.
    KaimingNormal,
}

/// Architecture of a LocalNet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalNetConfig {
    /// Input channels (2: moving and fixed).
    pub in_channels: usize,
    /// Output channels (3: one displacement component per axis).
    pub out_channels: usize,
    /// Channels of the first level; level d has `num_channel_initial * 2^d`.
    pub num_channel_initial: usize,
    /// Levels whose features produce the DDF (averaged); depth = max level.
    pub extract_levels: Vec<usize>,
    /// Initialisation of the output convolutions.
    pub output_init: OutputInit,
}

impl LocalNetConfig {
    /// The quickstart's network: 32 initial channels, `extract_levels = [3]`.
    pub fn seed() -> Self {
        Self {
            in_channels: 2,
            out_channels: 3,
            num_channel_initial: 32,
            extract_levels: vec![3],
            output_init: OutputInit::Zeros,
        }
    }

    /// LocalNet with the full decoder, `extract_levels = [0, 1, 2, 3]`.
    pub fn full() -> Self {
        Self {
            extract_levels: vec![0, 1, 2, 3],
            ..Self::seed()
        }
    }

    /// The configuration of a preset.
    pub fn preset(preset: Preset) -> Self {
        match preset {
            Preset::Seed => Self::seed(),
            Preset::Full => Self::full(),
        }
    }

    /// Replaces the number of initial channels.
    pub fn with_num_channel_initial(mut self, n: usize) -> Self {
        self.num_channel_initial = n;
        self
    }

    /// Replaces the output initialisation.
    pub fn with_output_init(mut self, init: OutputInit) -> Self {
        self.output_init = init;
        self
    }

    /// The encoder depth, `max(extract_levels)`.
    pub fn depth(&self) -> usize {
        self.extract_levels.iter().copied().max().unwrap_or(0)
    }

    /// Every spatial size must be divisible by this.
    pub fn size_multiple(&self) -> usize {
        1 << self.depth()
    }

    fn channels(&self, level: usize) -> usize {
        self.num_channel_initial << level
    }

    /// Checks that the configuration describes a buildable network.
    pub fn validate(&self) -> Result<()> {
        if self.extract_levels.is_empty() {
            return Err(Error::invalid("extract_levels", "must not be empty"));
        }
        let depth = self.depth();
        if depth == 0 || depth > 6 {
            return Err(Error::invalid(
                "extract_levels",
                format!("the deepest level must be in 1..=6, got {depth}"),
            ));
        }
        let mut seen = self.extract_levels.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != self.extract_levels.len() {
            return Err(Error::invalid(
                "extract_levels",
                format!("{:?} has duplicates", self.extract_levels),
            ));
        }
        if self.num_channel_initial == 0 || self.in_channels == 0 || self.out_channels == 0 {
            return Err(Error::invalid(
                "channels",
                "in_channels, out_channels and num_channel_initial must be positive",
            ));
        }
        Ok(())
    }
}

/// A LocalNet with its parameters and BatchNorm running statistics.
#[derive(Debug)]
pub struct LocalNet {
    config: LocalNetConfig,
    /// `encode_convs.d.0` and `encode_convs.d.1` for d in 0..depth.
    encode: Vec<(ConvBlock, ResidualBlock)>,
    bottom: ConvBlock,
    /// `decode_deconvs.i`, `decode_convs.i.0`, `decode_convs.i.1` for level d = depth-1-i.
    decode: Vec<(AdditiveUpSample, ConvBlock, ResidualBlock)>,
    /// `output_block.layers.k.conv.weight`, in the order of `extract_levels`.
    output: Vec<Var>,
    dtype: DType,
    device: Device,
}

impl LocalNet {
    /// A freshly initialised network (MONAI's initialisation, seeded).
    pub fn new(config: &LocalNetConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let depth = config.depth();
        let mut encode = Vec::with_capacity(depth);
        let mut c_prev = config.in_channels;
        for d in 0..depth {
            let k = if d == 0 { 7 } else { 3 };
            let c = config.channels(d);
            let conv = ConvBlock::new(
                format!("encode_convs.{d}.0"),
                c_prev,
                c,
                k,
                &mut rng,
                dtype,
                device,
            )?;
            let res =
                ResidualBlock::new(format!("encode_convs.{d}.1"), c, k, &mut rng, dtype, device)?;
            encode.push((conv, res));
            c_prev = c;
        }
        let bottom = ConvBlock::new(
            "bottom_block".into(),
            c_prev,
            config.channels(depth),
            3,
            &mut rng,
            dtype,
            device,
        )?;
        let min_level = config.extract_levels.iter().copied().min().unwrap_or(depth);
        let mut decode = Vec::new();
        for (i, d) in (min_level..depth).rev().enumerate() {
            let c = config.channels(d);
            let up = AdditiveUpSample::new(
                format!("decode_deconvs.{i}"),
                config.channels(d + 1),
                c,
                &mut rng,
                dtype,
                device,
            )?;
            let conv = ConvBlock::new(
                format!("decode_convs.{i}.0"),
                c,
                c,
                3,
                &mut rng,
                dtype,
                device,
            )?;
            let res =
                ResidualBlock::new(format!("decode_convs.{i}.1"), c, 3, &mut rng, dtype, device)?;
            decode.push((up, conv, res));
        }
        let init = match config.output_init {
            OutputInit::Zeros => Init::Zeros,
            OutputInit::KaimingNormal => Init::KaimingNormal,
        };
        let output = config
            .extract_levels
            .iter()
            .map(|&level| {
                let c = config.channels(level);
                blocks::init_weight(
                    &[config.out_channels, c, 3, 3, 3],
                    c * 27,
                    init,
                    &mut rng,
                    dtype,
                    device,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            encode,
            bottom,
            decode,
            output,
            dtype,
            device: device.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &LocalNetConfig {
        &self.config
    }

    /// The dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Checks an input's shape: (B, in_channels, H, W, D) with every size divisible by 8.
    pub fn check_input(&self, x: &Tensor) -> Result<()> {
        let dims = x.dims();
        let multiple = self.config.size_multiple();
        if dims.len() != 5 || dims[1] != self.config.in_channels {
            return Err(Error::ShapeMismatch {
                op: "LocalNet input",
                expected: format!("(B, {}, H, W, D)", self.config.in_channels),
                got: format!("{dims:?}"),
            });
        }
        if dims[2..].iter().any(|&s| s == 0 || s % multiple != 0) {
            return Err(Error::ShapeMismatch {
                op: "LocalNet input",
                expected: format!("spatial sizes divisible by {multiple}"),
                got: format!("{:?}", &dims[2..]),
            });
        }
        Ok(())
    }

    /// The DDF for `x = cat(moving, fixed)`. In training mode BatchNorm uses the batch
    /// statistics and updates its running statistics. In eval mode the parameters are read
    /// detached: no gradient reaches them, and a forward pass keeps no intermediate alive
    /// (a gradient with respect to `x` still flows).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check_input(x)?;
        let x = x.to_dtype(self.dtype)?;
        let image_size = [x.dim(2)?, x.dim(3)?, x.dim(4)?];
        let depth = self.config.depth();
        let mut h = x;
        let mut skips = Vec::with_capacity(depth);
        for (conv, res) in &self.encode {
            h = res.forward_t(&conv.forward_t(&h, train)?, train)?;
            skips.push(h.clone());
            h = ops::max_pool3d(&h, 2)?;
        }
        h = self.bottom.forward_t(&h, train)?;
        // outs[0] is the bottom (level `depth`), outs[depth - l] the decoder output at level l.
        let mut outs = vec![h.clone()];
        for (i, (up, conv, res)) in self.decode.iter().enumerate() {
            let level = depth - 1 - i;
            h = up.forward_t(&h, &skips[level], train)?;
            h = res.forward_t(&conv.forward_t(&h, train)?, train)?;
            outs.push(h.clone());
        }
        let mut sum: Option<Tensor> = None;
        for (weight, &level) in self.output.iter().zip(&self.config.extract_levels) {
            let feat = ops::conv3d(&outs[depth - level], &blocks::param(weight, train), None)?;
            let feat = if level == 0 {
                feat
            } else {
                ops::upsample_nearest3d_to(&feat, image_size)?
            };
            sum = Some(match sum {
                None => feat,
                Some(s) => (s + feat)?,
            });
        }
        let sum = sum.expect("validated: extract_levels is not empty");
        Ok((sum / self.config.extract_levels.len() as f64)?)
    }

    /// Every variable in MONAI `state_dict` order (parameters and running statistics;
    /// `num_batches_tracked` counters are in [`LocalNet::batch_norms`]).
    pub fn named_vars(&self) -> Vec<NamedVar> {
        let mut out = Vec::new();
        for (conv, res) in &self.encode {
            conv.collect(&mut out);
            res.collect(&mut out);
        }
        self.bottom.collect(&mut out);
        for (up, _, _) in &self.decode {
            up.collect(&mut out);
        }
        for (_, conv, res) in &self.decode {
            conv.collect(&mut out);
            res.collect(&mut out);
        }
        for (k, w) in self.output.iter().enumerate() {
            out.push(NamedVar {
                name: format!("output_block.layers.{k}.conv.weight"),
                kind: TensorKind::Parameter,
                var: w.clone(),
            });
        }
        out
    }

    /// The trainable parameters, by name.
    pub fn parameters(&self) -> Vec<(String, Var)> {
        self.named_vars()
            .into_iter()
            .filter(|v| v.kind == TensorKind::Parameter)
            .map(|v| (v.name, v.var))
            .collect()
    }

    /// Every BatchNorm layer (for running statistics and counters).
    pub fn batch_norms(&self) -> Vec<&BatchNorm3d> {
        let mut out = Vec::new();
        for (conv, res) in &self.encode {
            conv.norms(&mut out);
            res.norms(&mut out);
        }
        self.bottom.norms(&mut out);
        for (up, conv, res) in &self.decode {
            up.norms(&mut out);
            conv.norms(&mut out);
            res.norms(&mut out);
        }
        out
    }

    /// Values in one forward's flattened batch statistics (see
    /// [`LocalNet::take_deferred_bn`]): a mean and a variance per channel of every BatchNorm.
    pub fn bn_batch_len(&self) -> usize {
        self.batch_norms().iter().map(|n| 2 * n.channels()).sum()
    }

    /// Defers (`true`) or resumes (`false`) every BatchNorm's running-statistic updates (see
    /// [`BatchNorm3d::defer_updates`]).
    pub fn defer_bn_updates(&self, on: bool) {
        self.batch_norms().iter().for_each(|n| n.defer_updates(on));
    }

    /// The batch statistics the training forwards recorded while updates were deferred, one
    /// flat vector per forward: for each BatchNorm in [`LocalNet::batch_norms`] order, its
    /// means then its unbiased variances.
    pub fn take_deferred_bn(&self) -> Result<Vec<Vec<f32>>> {
        let norms = self.batch_norms();
        let logs: Vec<Vec<BatchStats>> = norms.iter().map(|n| n.take_deferred()).collect();
        let forwards = logs.first().map_or(0, Vec::len);
        if logs.iter().any(|l| l.len() != forwards) {
            return Err(Error::invalid(
                "batch-norm statistics",
                "the layers recorded different numbers of forwards",
            ));
        }
        let mut out = vec![Vec::with_capacity(self.bn_batch_len()); forwards];
        for log in &logs {
            for (flat, stats) in out.iter_mut().zip(log) {
                for t in [&stats.mean, &stats.var_unbiased] {
                    flat.extend(t.to_dtype(DType::F32)?.to_vec1::<f32>()?);
                }
            }
        }
        Ok(out)
    }

    /// Applies one forward's flattened batch statistics (as [`LocalNet::take_deferred_bn`]
    /// returns them) to the running statistics: the update that forward would have made.
    pub fn apply_bn_batch(&self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.bn_batch_len() {
            return Err(Error::ShapeMismatch {
                op: "batch-norm statistics",
                expected: format!("{} values", self.bn_batch_len()),
                got: flat.len().to_string(),
            });
        }
        let mut offset = 0;
        for n in self.batch_norms() {
            let c = n.channels();
            let dev = self.device();
            let t = |o: usize| -> Result<Tensor> {
                Ok(Tensor::from_slice(&flat[o..o + c], c, dev)?.to_dtype(self.dtype)?)
            };
            n.update_running(&BatchStats {
                mean: t(offset)?,
                var_unbiased: t(offset + c)?,
            })?;
            offset += 2 * c;
        }
        Ok(())
    }

    /// The number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.parameters().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

#[cfg(test)]
mod tests;
