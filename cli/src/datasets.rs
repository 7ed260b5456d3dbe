//! `medray datasets`: what the catalog holds.

use medray_core::catalog::DatasetName;
use medray_proto::convert::dataset_response;

use crate::cluster::client::ClientArgs;
use crate::data_dir::{DataArgs, Target};

/// Arguments of `medray datasets`.
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
    /// List published datasets.
    List,
    /// Show a dataset and its cases.
    Show {
        /// Dataset name.
        name: String,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Target::Head = args.data.target(&args.client)? {
        return match &args.command {
            Command::List => crate::remote::datasets_list(&args.client),
            Command::Show { name } => crate::remote::datasets_show(&args.client, name),
        };
    }
    let catalog = args.data.open_catalog()?;
    match args.command {
        Command::List => {
            println!("name\tcases\tbytes\tcreated_at\tsource");
            for d in catalog.datasets()? {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    d.name, d.case_count, d.bytes, d.created_at, d.source
                );
            }
        }
        Command::Show { name } => {
            let name = DatasetName::new(name)?;
            let d = catalog
                .dataset(&name)?
                .ok_or_else(|| medray_core::Error::DatasetNotFound {
                    name: name.to_string(),
                })?;
            let cases = catalog.cases(&name)?;
            crate::remote::print_dataset(&dataset_response(&d, &cases))?;
        }
    }
    Ok(())
}
