//! `medray ingest`, `medray datasets` and `medray stage` through the head (when no local
//! data directory is named): the same output as the local commands.

use std::path::Path;

use anyhow::Context;
use medray_proto::v1::job_spec::Kind;
use medray_proto::v1::{
    GetDatasetRequest, GetDatasetResponse, IngestSpec, JobSpec, ListDatasetsRequest,
    StageGetRequest, StageListRequest, StagePutRequest,
};
use sha2::{Digest, Sha256};

use crate::cluster::client::{status_error, ClientArgs, HeadClient};

/// Submits an ingest job and streams it to its end.
pub fn ingest(client: &ClientArgs, spec: IngestSpec, no_wait: bool) -> anyhow::Result<()> {
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let (address, _) = client.resolve()?;
        eprintln!("ingesting on the cluster at {address} (pass --data-dir to ingest locally)");
        let mut c = client.connect().await?;
        let job = crate::cluster::job::submit_and_wait(
            &mut c,
            JobSpec {
                kind: Some(Kind::Ingest(spec)),
            },
            no_wait,
        )
        .await?;
        if !no_wait {
            println!("{}", job.result_json);
        }
        Ok(())
    })
}

/// `datasets list` through the head.
pub fn datasets_list(client: &ClientArgs) -> anyhow::Result<()> {
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut c = client.connect().await?;
        let list = c
            .list_datasets(ListDatasetsRequest {})
            .await
            .map_err(|e| status_error("datasets list", e))?
            .into_inner();
        println!("name\tcases\tbytes\tcreated_at\tsource");
        for d in list.datasets {
            println!(
                "{}\t{}\t{}\t{}\t{}",
                d.name, d.case_count, d.bytes, d.created_at, d.source
            );
        }
        Ok(())
    })
}

/// `datasets show` through the head.
pub fn datasets_show(client: &ClientArgs, name: &str) -> anyhow::Result<()> {
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut c = client.connect().await?;
        let r = c
            .get_dataset(GetDatasetRequest { name: name.into() })
            .await
            .map_err(|e| status_error("datasets show", e))?
            .into_inner();
        print_dataset(&r)
    })
}

/// Prints a dataset and its cases (the local and the remote `datasets show`).
pub fn print_dataset(r: &GetDatasetResponse) -> anyhow::Result<()> {
    let d = r
        .dataset
        .as_ref()
        .context("the head answered without a dataset")?;
    println!("name:           {}", d.name);
    println!("source:         {}", d.source);
    println!("created_at:     {}", d.created_at);
    println!("cases:          {}", d.case_count);
    println!("bytes:          {}", d.bytes);
    println!("content_sha256: {}", r.content_sha256);
    println!("case_id\tshape\tspacing_mm\tintensity_min\tintensity_max\tkeypoints\tfixed\tmoving");
    for c in &r.cases {
        let shape: Vec<String> = c.shape.iter().map(ToString::to_string).collect();
        println!(
            "{}\t{}\t{:?}\t{}\t{}\t{}\t{}\t{}",
            c.case_id,
            shape.join("x"),
            c.spacing_mm,
            c.intensity_min,
            c.intensity_max,
            c.keypoint_count,
            c.fixed_key,
            c.moving_key
        );
    }
    Ok(())
}

/// `stage ls` through the head.
pub fn stage_ls(client: &ClientArgs, prefix: &str) -> anyhow::Result<()> {
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut c = client.connect().await?;
        let list = c
            .stage_list(StageListRequest {
                prefix: prefix.into(),
            })
            .await
            .map_err(|e| status_error("stage ls", e))?
            .into_inner();
        for o in list.objects {
            println!("{}\t{}", o.stored_bytes, o.key);
        }
        Ok(())
    })
}

/// Reads a stage object through the head; the chunks are checked against the announced
/// size and sha256.
///
/// # Errors
/// The head's answer, or a damaged transfer naming the key.
pub async fn fetch_object(c: &mut HeadClient, key: &str) -> anyhow::Result<Vec<u8>> {
    let mut stream = c
        .stage_get(StageGetRequest { key: key.into() })
        .await
        .map_err(|e| status_error(&format!("stage get {key}"), e))?
        .into_inner();
    let mut data = Vec::new();
    let mut announced = None;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|e| status_error(&format!("stage get {key}"), e))?
    {
        if announced.is_none() {
            announced = Some((chunk.size, chunk.sha256.clone()));
        }
        data.extend_from_slice(&chunk.data);
    }
    let (size, sha) = announced.with_context(|| format!("{key}: the head sent no data"))?;
    let got = hex::encode(Sha256::digest(&data));
    if data.len() as u64 != size || got != sha {
        anyhow::bail!(
            "{key}: transfer damaged ({} of {size} bytes, sha256 {got} instead of {sha})",
            data.len()
        );
    }
    Ok(data)
}

/// `stage get` through the head, written atomically.
pub fn stage_get(client: &ClientArgs, key: &str, out: &Path) -> anyhow::Result<()> {
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut c = client.connect().await?;
        let data = fetch_object(&mut c, key).await?;
        medray_core::atomic::write_bytes(out, &data)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {} bytes to {}", data.len(), out.display());
        Ok(())
    })
}

/// `stage put` through the head, in chunks.
pub fn stage_put(client: &ClientArgs, file: &Path, key: &str) -> anyhow::Result<()> {
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let mut c = client.connect().await?;
        let chunk = medray_proto::DEFAULT_CHUNK_BYTES;
        let key = key.to_string();
        let mut messages: Vec<StagePutRequest> = data
            .chunks(chunk)
            .map(|d| StagePutRequest {
                key: String::new(),
                data: d.to_vec(),
            })
            .collect();
        if messages.is_empty() {
            messages.push(StagePutRequest::default());
        }
        messages[0].key.clone_from(&key);
        let r = c
            .stage_put(futures::stream::iter(messages))
            .await
            .map_err(|e| status_error("stage put", e))?
            .into_inner();
        let local = hex::encode(Sha256::digest(&data));
        if r.sha256 != local {
            anyhow::bail!(
                "{key}: the head stored sha256 {} but the file has {local}",
                r.sha256
            );
        }
        println!("stored {key} ({} bytes)", r.bytes);
        Ok(())
    })
}
