//! Loading and saving LocalNet weights as safetensors with MONAI `state_dict` names.
//!
//! A MONAI checkpoint converted with `tools/pth_to_safetensors.py` loads unchanged, and a
//! file written by [`LocalNet::save_safetensors`] loads in MONAI with
//! `model.load_state_dict(safetensors.torch.load_file(path))`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{LocalNet, LocalNetConfig, OutputInit};
use crate::{Error, Result};

fn weights_error(path: &Path, tensor: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        tensor: tensor.into(),
        reason: reason.into(),
    }
}

/// Reads every tensor of a safetensors file onto `device`.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| weights_error(path, "*", format!("not a readable safetensors file: {e}")))
}

/// Infers the architecture from tensor names and shapes: `num_channel_initial` and
/// `in_channels` from `encode_convs.0.0.conv.weight`, the depth from the encoder levels
/// present, and `extract_levels` from the input channels of each output layer.
pub fn infer_config(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<LocalNetConfig> {
    let first = "encode_convs.0.0.conv.weight";
    let w0 = tensors
        .get(first)
        .ok_or_else(|| weights_error(path, first, "missing: is this a LocalNet state_dict?"))?;
    let dims = w0.dims();
    if dims.len() != 5 {
        return Err(weights_error(
            path,
            first,
            format!("expected a 5-D conv weight, got shape {dims:?}"),
        ));
    }
    let (nci, in_channels) = (dims[0], dims[1]);
    if nci == 0 {
        return Err(weights_error(path, first, "zero output channels"));
    }
    let depth = (0..)
        .take_while(|d| tensors.contains_key(&format!("encode_convs.{d}.0.conv.weight")))
        .count();
    let mut extract_levels = Vec::new();
    let mut out_channels = None;
    for k in 0.. {
        let name = format!("output_block.layers.{k}.conv.weight");
        let Some(w) = tensors.get(&name) else { break };
        let d = w.dims();
        if d.len() != 5 || d[1] % nci != 0 || !(d[1] / nci).is_power_of_two() {
            return Err(weights_error(
                path,
                &name,
                format!("shape {d:?} does not match num_channel_initial {nci}"),
            ));
        }
        extract_levels.push((d[1] / nci).trailing_zeros() as usize);
        out_channels = Some(d[0]);
    }
    let out_channels = out_channels
        .ok_or_else(|| weights_error(path, "output_block.layers.0.conv.weight", "missing"))?;
    let config = LocalNetConfig {
        in_channels,
        out_channels,
        num_channel_initial: nci,
        extract_levels,
        output_init: OutputInit::Zeros,
    };
    if config.depth() != depth {
        return Err(weights_error(
            path,
            "output_block",
            format!(
                "the output layers imply depth {}, but the encoder has {depth} levels",
                config.depth()
            ),
        ));
    }
    config.validate()?;
    Ok(config)
}

impl LocalNet {
    /// Loads a network from a safetensors file with MONAI names. Without `config`, the
    /// architecture is inferred from the tensors. Every expected tensor must be present with
    /// its exact shape, and no other tensor may be present (like PyTorch's strict
    /// `load_state_dict`); errors name the file and the tensor.
    pub fn load_safetensors(
        path: &Path,
        config: Option<&LocalNetConfig>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tensors = read_safetensors(path, device)?;
        let config = match config {
            Some(c) => c.clone(),
            None => infer_config(&tensors, path)?,
        };
        let net = LocalNet::new(&config, 0, dtype, device)?;
        net.load_tensors(&tensors, path)?;
        Ok(net)
    }

    /// Copies named tensors into this network (strict: all present, none extra).
    pub fn load_tensors(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        let vars = self.named_vars();
        let norms = self.batch_norms();
        let mut expected: Vec<String> = vars.iter().map(|v| v.name.clone()).collect();
        expected.extend(norms.iter().map(|n| n.counter_name()));
        if let Some(extra) = tensors.keys().find(|k| !expected.contains(k)) {
            return Err(weights_error(
                source,
                extra.clone(),
                format!(
                    "unexpected tensor for LocalNet(num_channel_initial={}, extract_levels={:?})",
                    self.config.num_channel_initial, self.config.extract_levels
                ),
            ));
        }
        for v in &vars {
            let t = tensors
                .get(&v.name)
                .ok_or_else(|| weights_error(source, v.name.clone(), "missing"))?;
            if t.dims() != v.var.dims() {
                return Err(weights_error(
                    source,
                    v.name.clone(),
                    format!("shape {:?}, expected {:?}", t.dims(), v.var.dims()),
                ));
            }
            if !t.dtype().is_float() {
                return Err(weights_error(
                    source,
                    v.name.clone(),
                    format!("dtype {:?} is not a float type", t.dtype()),
                ));
            }
            let t = t.to_dtype(self.dtype)?.to_device(&self.device)?;
            let finite = t
                .to_dtype(DType::F64)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?
                .is_finite();
            if !finite {
                return Err(weights_error(source, v.name.clone(), "contains NaN or Inf"));
            }
            v.var.set(&t)?;
        }
        for n in norms {
            let name = n.counter_name();
            let t = tensors
                .get(&name)
                .ok_or_else(|| weights_error(source, name.clone(), "missing"))?;
            if t.elem_count() != 1 {
                return Err(weights_error(
                    source,
                    name,
                    format!("expected a scalar, got shape {:?}", t.dims()),
                ));
            }
            let count = t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?[0];
            n.set_num_batches_tracked(count);
        }
        Ok(())
    }

    /// The MONAI `state_dict` as named tensors: parameters and running statistics in f32,
    /// `num_batches_tracked` as 0-d int64.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for v in self.named_vars() {
            let t = v
                .var
                .as_tensor()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?;
            out.insert(v.name, t);
        }
        for n in self.batch_norms() {
            let t = Tensor::new(n.num_batches_tracked(), &Device::Cpu)?;
            out.insert(n.counter_name(), t);
        }
        Ok(out)
    }

    /// Writes the `state_dict` to a safetensors file atomically (temporary file + rename).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let tensors = self.state_dict()?;
        crate::atomic::write_with(path, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(Error::from)
        })
    }
}
