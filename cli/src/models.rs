//! `medray models`: the model registry, on a local data directory or through the head (the
//! same rules as `medray datasets`, see [`DataArgs::target`]). Both print the same.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use medray_core::catalog::Catalog;
use medray_core::localnet::{LocalNetConfig, Preset};
use medray_core::model::ModelConfig;
use medray_core::models::{self, ModelName, ModelVersion, NewModelVersion, VersionRef};
use medray_core::preprocess::{PreprocessConfig, Window};
use medray_core::stage::Stage;
use medray_proto::convert::model_ref;
use medray_proto::v1::{
    DeleteModelRequest, ExportModelRequest, GetModelRequest, ImportModelHeader, ImportModelRequest,
    ListModelsRequest, ModelVersionInfo, SetModelAliasRequest,
};
use sha2::{Digest, Sha256};

use crate::cluster::client::{status_error, ClientArgs, HeadClient};
use crate::data_dir::{DataArgs, Target};

/// Arguments of `medray models`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: Command,
}

/// Output format of `list` and `show`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    /// Aligned columns (list) or `key: value` lines (show).
    Table,
    /// JSON.
    Json,
}

/// `--version` / `--alias`; neither: the latest registered version.
#[derive(Debug, clap::Args)]
struct Which {
    /// Version (v1, v2, ... or an explicit one).
    #[arg(long, conflicts_with = "alias")]
    version: Option<String>,
    /// Alias (e.g. production).
    #[arg(long)]
    alias: Option<String>,
}

impl Which {
    fn version_ref(&self) -> anyhow::Result<VersionRef> {
        Ok(VersionRef::from_options(
            self.version.clone(),
            self.alias.clone(),
        )?)
    }
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Every version of every model (the quickstart's `SHOW MODELS`).
    List {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// One version of a model, with its config, data and artifact.
    Show {
        /// Model name.
        name: String,
        #[command(flatten)]
        which: Which,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Write a version's weights (safetensors, MONAI state_dict names) to a file, and its
    /// model config beside it (same stem, .json), both atomically; prints the sha256.
    Export {
        /// Model name.
        name: String,
        #[command(flatten)]
        which: Which,
        /// Output weights file, e.g. W.safetensors (W.json is written beside it).
        #[arg(long)]
        out: PathBuf,
    },
    /// Register weights trained elsewhere (e.g. MONAI weights converted with
    /// tools/pth_to_safetensors.py) as a new version.
    Import {
        /// Model name.
        name: String,
        /// Version to register; default: the next vN.
        #[arg(long)]
        version: Option<String>,
        /// Safetensors file with MONAI LocalNet state_dict names.
        #[arg(long)]
        weights: PathBuf,
        /// Network preset: `seed` (`extract_levels` `[3]`) or `full` (`[0, 1, 2, 3]`).
        #[arg(long)]
        preset: Preset,
        /// Channels of the first level.
        #[arg(long, default_value_t = 32)]
        num_channel_initial: usize,
        /// Network grid the model expects, H W D (each divisible by 8).
        #[arg(long, num_args = 3, value_names = ["H", "W", "D"], default_values_t = [96, 96, 104])]
        size: Vec<usize>,
        /// Intensity window A_MIN A_MAX mapped to [0, 1].
        #[arg(long, num_args = 2, value_names = ["A_MIN", "A_MAX"], default_values_t = [-1000.0, 500.0], allow_negative_numbers = true)]
        window: Vec<f32>,
    },
    /// Point an alias (e.g. production) at a version, moving it if it pointed elsewhere.
    Alias {
        /// Model name.
        name: String,
        /// Alias.
        alias: String,
        /// Version the alias points at.
        #[arg(long)]
        version: String,
    },
    /// Delete a version (its catalog row, then its weights and config in the stage).
    Delete {
        /// Model name.
        name: String,
        /// Version to delete.
        #[arg(long)]
        version: String,
        /// Delete even while aliases point at it (they are removed too).
        #[arg(long)]
        force: bool,
    },
}

/// Where the registry is: a local data directory or the head.
enum Registry {
    Local { stage: Stage, catalog: Catalog },
    Head(HeadClient),
}

impl Registry {
    async fn list(&mut self) -> anyhow::Result<Vec<ModelVersion>> {
        match self {
            Registry::Local { catalog, .. } => Ok(models::list_models(catalog)?),
            Registry::Head(c) => c
                .list_models(ListModelsRequest {})
                .await
                .map_err(|e| status_error("models list", e))?
                .into_inner()
                .versions
                .into_iter()
                .map(from_info)
                .collect(),
        }
    }

    async fn get(&mut self, name: &ModelName, which: &VersionRef) -> anyhow::Result<ModelVersion> {
        match self {
            Registry::Local { catalog, .. } => Ok(models::model_version(catalog, name, which)?),
            Registry::Head(c) => from_info(
                c.get_model(GetModelRequest {
                    model: Some(model_ref(name, which)),
                })
                .await
                .map_err(|e| status_error("models show", e))?
                .into_inner()
                .version
                .context("the head answered without a version")?,
            ),
        }
    }

    /// The weights of `v`, checked against its registered size and sha256.
    async fn weights(&mut self, v: &ModelVersion) -> anyhow::Result<Vec<u8>> {
        let data = match self {
            Registry::Local { stage, .. } => models::load_weights(stage, v).await?,
            Registry::Head(c) => {
                let which = VersionRef::Version(v.version.clone());
                let mut stream = c
                    .export_model(ExportModelRequest {
                        model: Some(model_ref(&v.name, &which)),
                    })
                    .await
                    .map_err(|e| status_error("models export", e))?
                    .into_inner();
                let mut data = Vec::with_capacity(v.artifact_bytes as usize);
                while let Some(chunk) = stream
                    .message()
                    .await
                    .map_err(|e| status_error("models export", e))?
                {
                    data.extend_from_slice(&chunk.data);
                }
                data
            }
        };
        let got = hex::encode(Sha256::digest(&data));
        if got != v.artifact_sha256 || data.len() as u64 != v.artifact_bytes {
            bail!(
                "model {} {}: received {} bytes with sha256 {got}, registered {} bytes with sha256 {}",
                v.name,
                v.version,
                data.len(),
                v.artifact_bytes,
                v.artifact_sha256
            );
        }
        Ok(data)
    }

    async fn import(&mut self, new: NewModelVersion) -> anyhow::Result<ModelVersion> {
        match self {
            Registry::Local { stage, catalog } => {
                Ok(models::register_model(stage, catalog, new).await?)
            }
            Registry::Head(c) => {
                let header = ImportModelHeader {
                    name: new.name.to_string(),
                    version: new.version.clone().unwrap_or_default(),
                    model_config_json: serde_json::to_string(&new.model_config)?,
                    train_config_json: new.train_config_json.clone(),
                    size: new.weights.len() as u64,
                    sha256: hex::encode(Sha256::digest(&new.weights)),
                };
                let mut messages: Vec<ImportModelRequest> = new
                    .weights
                    .chunks(medray_proto::DEFAULT_CHUNK_BYTES)
                    .map(|d| ImportModelRequest {
                        header: None,
                        data: d.to_vec(),
                    })
                    .collect();
                if messages.is_empty() {
                    messages.push(ImportModelRequest::default());
                }
                messages[0].header = Some(header);
                from_info(
                    c.import_model(futures::stream::iter(messages))
                        .await
                        .map_err(|e| status_error("models import", e))?
                        .into_inner()
                        .version
                        .context("the head answered without a version")?,
                )
            }
        }
    }

    async fn alias(
        &mut self,
        name: &ModelName,
        alias: &str,
        version: &str,
    ) -> anyhow::Result<Option<String>> {
        match self {
            Registry::Local { catalog, .. } => {
                Ok(models::set_alias(catalog, name, alias, version)?)
            }
            Registry::Head(c) => {
                let previous = c
                    .set_model_alias(SetModelAliasRequest {
                        name: name.to_string(),
                        alias: alias.into(),
                        version: version.into(),
                    })
                    .await
                    .map_err(|e| status_error("models alias", e))?
                    .into_inner()
                    .previous_version;
                Ok((!previous.is_empty()).then_some(previous))
            }
        }
    }

    async fn delete(
        &mut self,
        name: &ModelName,
        version: &str,
        force: bool,
    ) -> anyhow::Result<ModelVersion> {
        match self {
            Registry::Local { stage, catalog } => {
                Ok(models::delete_version(stage, catalog, name, version, force).await?)
            }
            Registry::Head(c) => from_info(
                c.delete_model(DeleteModelRequest {
                    name: name.to_string(),
                    version: version.into(),
                    force,
                })
                .await
                .map_err(|e| status_error("models delete", e))?
                .into_inner()
                .version
                .context("the head answered without a version")?,
            ),
        }
    }
}

fn from_info(info: ModelVersionInfo) -> anyhow::Result<ModelVersion> {
    ModelVersion::try_from(info).context("the head sent an invalid model version")
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut registry = match args.data.target(&args.client)? {
            Target::Head => Registry::Head(args.client.connect().await?),
            Target::Local => Registry::Local {
                stage: args.data.open_stage()?,
                catalog: args.data.open_catalog()?,
            },
        };
        execute(&mut registry, args.command).await
    })
}

async fn execute(registry: &mut Registry, command: Command) -> anyhow::Result<()> {
    match command {
        Command::List { format } => {
            let versions = registry.list().await?;
            match format {
                Format::Table => print!("{}", list_table(&versions)),
                Format::Json => {
                    let all: Vec<_> = versions.iter().map(version_json).collect();
                    println!("{}", serde_json::to_string_pretty(&all)?);
                }
            }
        }
        Command::Show {
            name,
            which,
            format,
        } => {
            let v = registry
                .get(&ModelName::new(name)?, &which.version_ref()?)
                .await?;
            match format {
                Format::Table => print!("{}", show_text(&v)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&version_json(&v))?),
            }
        }
        Command::Export { name, which, out } => {
            let config_path = ModelConfig::path_for(&out);
            if config_path == out {
                bail!(
                    "--out {}: the config is written beside the weights as <stem>.json; choose another name (e.g. W.safetensors)",
                    out.display()
                );
            }
            let v = registry
                .get(&ModelName::new(name)?, &which.version_ref()?)
                .await?;
            let data = registry.weights(&v).await?;
            medray_core::atomic::write_bytes(&out, &data)
                .with_context(|| format!("writing {}", out.display()))?;
            v.model_config
                .write(&config_path)
                .with_context(|| format!("writing {}", config_path.display()))?;
            println!(
                "exported {} {} ({} bytes) to {}, config {}",
                v.name,
                v.version,
                data.len(),
                out.display(),
                config_path.display()
            );
            println!("{}  {}", v.artifact_sha256, out.display());
        }
        Command::Import {
            name,
            version,
            weights,
            preset,
            num_channel_initial,
            size,
            window,
        } => {
            let name = ModelName::new(name)?;
            if let Some(v) = &version {
                models::validate_version(v)?;
            }
            let config = import_config(preset, num_channel_initial, &size, &window)?;
            let data = std::fs::read(&weights)
                .with_context(|| format!("reading {}", weights.display()))?;
            let new = NewModelVersion::imported(
                name,
                version,
                config,
                data,
                serde_json::json!({ "imported_from": file_name(&weights) }).to_string(),
            );
            let v = registry
                .import(new)
                .await
                .with_context(|| format!("importing {}", weights.display()))?;
            println!(
                "registered {} {} ({} bytes, sha256 {})",
                v.name, v.version, v.artifact_bytes, v.artifact_sha256
            );
        }
        Command::Alias {
            name,
            alias,
            version,
        } => {
            let name = ModelName::new(name)?;
            match registry.alias(&name, &alias, &version).await? {
                Some(previous) if previous != version => {
                    println!("{name} {alias}: moved from {previous} to {version}");
                }
                _ => println!("{name} {alias}: {version}"),
            }
        }
        Command::Delete {
            name,
            version,
            force,
        } => {
            let v = registry
                .delete(&ModelName::new(name)?, &version, force)
                .await?;
            let aliases = if v.aliases.is_empty() {
                String::new()
            } else {
                format!(" and its aliases {}", v.aliases.join(", "))
            };
            println!("deleted {} {}{aliases}", v.name, v.version);
        }
    }
    Ok(())
}

/// The model config of `models import`.
fn import_config(
    preset: Preset,
    num_channel_initial: usize,
    size: &[usize],
    window: &[f32],
) -> anyhow::Result<ModelConfig> {
    let size: [usize; 3] = size
        .try_into()
        .map_err(|_| anyhow::anyhow!("--size takes three numbers H W D"))?;
    let [a_min, a_max]: [f32; 2] = window
        .try_into()
        .map_err(|_| anyhow::anyhow!("--window takes two numbers A_MIN A_MAX"))?;
    let config = ModelConfig {
        network: LocalNetConfig::preset(preset).with_num_channel_initial(num_channel_initial),
        preprocess: PreprocessConfig::default()
            .with_window(Some(Window { a_min, a_max }))
            .with_size(Some(size)),
        loss: None,
    };
    config.network.validate().context("--num-channel-initial")?;
    config.preprocess.validate().context("--size / --window")?;
    Ok(config)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn dice_text(d: Option<f64>) -> String {
    d.map_or_else(|| "-".to_string(), |d| format!("{d:.4}"))
}

/// `models list` as aligned columns.
fn list_table(versions: &[ModelVersion]) -> String {
    let header = [
        "NAME",
        "VERSION",
        "ALIASES",
        "PRESET",
        "DATASET",
        "EPOCHS",
        "BEST_VAL_DICE",
        "CREATED_AT",
    ]
    .map(String::from);
    let mut rows = vec![header.to_vec()];
    for v in versions {
        rows.push(vec![
            v.name.to_string(),
            v.version.clone(),
            or_dash(&v.aliases.join(",")).to_string(),
            v.preset.clone(),
            or_dash(&v.dataset).to_string(),
            v.epochs.to_string(),
            dice_text(v.best_val_dice),
            v.created_at.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `models show` as `key: value` lines.
fn show_text(v: &ModelVersion) -> String {
    let c = &v.model_config;
    let window = c.preprocess.window.map_or_else(
        || "-".to_string(),
        |w| format!("[{}, {}]", w.a_min, w.a_max),
    );
    let size = c.preprocess.size.map_or_else(
        || "-".to_string(),
        |s| format!("{} x {} x {}", s[0], s[1], s[2]),
    );
    let lines = [
        ("name", v.name.to_string()),
        ("version", v.version.clone()),
        ("aliases", or_dash(&v.aliases.join(", ")).to_string()),
        ("source", v.source.as_str().to_string()),
        ("preset", v.preset.clone()),
        (
            "network",
            format!(
                "LocalNet(num_channel_initial={}, extract_levels={:?})",
                c.network.num_channel_initial, c.network.extract_levels
            ),
        ),
        ("window", window),
        ("size", size),
        ("loss", c.loss.map_or("-", |l| l.name()).to_string()),
        ("dataset", or_dash(&v.dataset).to_string()),
        ("train_cases", or_dash(&v.train_cases.join(",")).to_string()),
        ("val_cases", or_dash(&v.val_cases.join(",")).to_string()),
        (
            "training_data",
            v.training_data.as_ref().map_or_else(
                || "unknown (results of this version have no split)".to_string(),
                |t| {
                    format!(
                        "{} train + {} validation case(s) with their image sha256; dataset content {}",
                        t.train.len(),
                        t.validation.len(),
                        t.dataset_sha256.as_deref().unwrap_or("changed during training")
                    )
                },
            ),
        ),
        ("job_id", v.job_id.clone().unwrap_or_else(|| "-".into())),
        ("epochs", v.epochs.to_string()),
        ("best_val_dice", dice_text(v.best_val_dice)),
        ("final_losses", v.final_losses_json.clone()),
        ("train_config", v.train_config_json.clone()),
        ("artifact", v.artifact_key.to_string()),
        ("artifact_sha256", v.artifact_sha256.clone()),
        ("artifact_bytes", v.artifact_bytes.to_string()),
        ("config", v.config_key.to_string()),
        ("created_at", v.created_at.clone()),
        ("medray_version", v.medray_version.clone()),
    ];
    let mut out = String::new();
    for (k, value) in lines {
        out.push_str(&format!("{:<17}{value}\n", format!("{k}:")));
    }
    out
}

/// A version as JSON, with the training config and losses as JSON values, not strings.
fn version_json(v: &ModelVersion) -> serde_json::Value {
    let mut value = serde_json::to_value(v).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        for (from, to) in [
            ("train_config_json", "train_config"),
            ("final_losses_json", "final_losses"),
        ] {
            if let Some(serde_json::Value::String(text)) = obj.remove(from) {
                let parsed = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
                obj.insert(to.to_string(), parsed);
            }
        }
    }
    value
}
