//! A trained model on disk: LocalNet weights (`W.safetensors`, MONAI names) plus an optional
//! model config (`W.json` beside them) recording the architecture and the preprocessing the
//! network was trained with, so that prediction applies the same window and size.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::localnet::{LocalNet, LocalNetConfig};
use crate::preprocess::PreprocessConfig;
use crate::registration::LossPreset;
use crate::{Error, Result};

/// What a model needs besides its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The architecture.
    pub network: LocalNetConfig,
    /// Intensity window and network grid size applied before the network.
    #[serde(default)]
    pub preprocess: PreprocessConfig,
    /// The objective it was trained with, if known.
    #[serde(default)]
    pub loss: Option<LossPreset>,
}

impl ModelConfig {
    /// The config file that belongs to a weights file: same stem, `.json`.
    pub fn path_for(weights: &Path) -> PathBuf {
        weights.with_extension("json")
    }

    /// Reads and validates a config file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: ModelConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        config.network.validate()?;
        config.preprocess.validate()?;
        Ok(config)
    }

    /// Writes the config atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        crate::atomic::write_bytes(path, text.as_bytes())
    }
}

/// A network with the config it runs under.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network.
    pub net: LocalNet,
    /// Architecture and preprocessing.
    pub config: ModelConfig,
    /// Where the config came from: a file, or `None` when inferred from the weights.
    pub config_source: Option<PathBuf>,
}

/// Loads weights and their config. `config_path` overrides the file beside the weights;
/// without either, the architecture is inferred from the weights and no preprocessing is
/// applied (bare weights).
pub fn load_model(
    weights: &Path,
    config_path: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    let beside = ModelConfig::path_for(weights);
    let source = match config_path {
        Some(p) => Some(p.to_path_buf()),
        None if beside.is_file() => Some(beside),
        None => None,
    };
    let config = source.as_deref().map(ModelConfig::read).transpose()?;
    let net =
        LocalNet::load_safetensors(weights, config.as_ref().map(|c| &c.network), dtype, device)?;
    let config = config.unwrap_or_else(|| ModelConfig {
        network: net.config().clone(),
        preprocess: PreprocessConfig::default(),
        loss: None,
    });
    Ok(LoadedModel {
        net,
        config,
        config_source: source,
    })
}
