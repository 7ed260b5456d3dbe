//! `medray stage`: list, read and write objects of the stage (decrypting and encrypting).

use std::path::PathBuf;

use anyhow::Context;
use medray_core::stage::ObjectKey;

use crate::cluster::client::ClientArgs;
use crate::data_dir::{runtime, DataArgs, Target};

/// Arguments of `medray stage`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// List objects (key and stored size) under a prefix.
    Ls {
        /// Key prefix (whole path segments); default: everything.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Decrypt an object into a local file.
    Get {
        /// Object key.
        key: String,
        /// Output file (written atomically).
        out: PathBuf,
    },
    /// Encrypt a local file into an object.
    Put {
        /// Input file.
        file: PathBuf,
        /// Object key.
        key: String,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Target::Head = args.data.target(&args.client)? {
        return match &args.command {
            Command::Ls { prefix } => crate::remote::stage_ls(&args.client, prefix),
            Command::Get { key, out } => crate::remote::stage_get(&args.client, key, out),
            Command::Put { file, key } => crate::remote::stage_put(&args.client, file, key),
        };
    }
    let stage = args.data.open_stage()?;
    let rt = runtime()?;
    match args.command {
        Command::Ls { prefix } => {
            for o in rt.block_on(stage.list(&prefix))? {
                println!("{}\t{}", o.stored_bytes, o.key);
            }
        }
        Command::Get { key, out } => {
            let key = ObjectKey::new(key)?;
            let data = rt.block_on(stage.get(&key))?;
            medray_core::atomic::write_bytes(&out, &data)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} bytes to {}", data.len(), out.display());
        }
        Command::Put { file, key } => {
            let key = ObjectKey::new(key)?;
            let data =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let stored = rt.block_on(stage.put(&key, &data))?;
            println!("stored {key} ({} bytes, {stored} stored)", data.len());
        }
    }
    Ok(())
}
