//! `medray bench-transfer`: object transfer throughput out of the head over gRPC on loopback
//! (the chunked object stream that a worker's `FetchObject` and a client's `StageGet` share,
//! decryption included; timed through `StageGet`, since `FetchObject` serves only objects of
//! a task the worker holds), against a raw TCP copy of the same bytes in the same run.

use std::time::{Duration, Instant};

use anyhow::Context;
use medray_proto::auth::BearerToken;
use medray_proto::v1::{StageGetRequest, StagePutRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Arguments of `medray bench-transfer`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Object size, MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.size_mib == 0 || args.size_mib > 4096 || args.repeats == 0 {
        anyhow::bail!("--size-mib must be 1..=4096 and --repeats at least 1");
    }
    let rt = crate::data_dir::runtime()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let token = "bench-transfer-token-0123456789".to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = medray_head::HeadConfig::default()
            .with_data_dir(dir.path())
            .with_token(&token);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let head = tokio::spawn(medray_head::run(config, listener, |_| {}, async move {
            let _ = stop_rx.await;
        }));
        let channel = medray_proto::transport::connect(
            &format!("http://{addr}"),
            None,
            Duration::from_secs(10),
        )
        .await?;
        let bearer = BearerToken::new(&token)?;
        let bytes = args.size_mib << 20;
        let data: Vec<u8> = (0..bytes)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut client = medray_proto::v1::client_client::ClientClient::with_interceptor(
            channel.clone(),
            bearer.clone(),
        );
        let chunks: Vec<StagePutRequest> = data
            .chunks(medray_proto::DEFAULT_CHUNK_BYTES)
            .enumerate()
            .map(|(i, c)| StagePutRequest {
                key: if i == 0 {
                    "bench/object.bin".into()
                } else {
                    String::new()
                },
                data: c.to_vec(),
            })
            .collect();
        client
            .stage_put(futures::stream::iter(chunks))
            .await
            .context("storing the object")?;

        let mut reader =
            medray_proto::v1::client_client::ClientClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(medray_proto::DEFAULT_MAX_MESSAGE_BYTES);
        let mut grpc = Vec::new();
        for _ in 0..=args.repeats {
            let t = Instant::now();
            let mut stream = reader
                .stage_get(StageGetRequest {
                    key: "bench/object.bin".into(),
                })
                .await?
                .into_inner();
            let mut n = 0usize;
            while let Some(c) = stream.message().await? {
                n += c.data.len();
            }
            anyhow::ensure!(n == bytes, "received {n} of {bytes} bytes");
            grpc.push(t.elapsed().as_secs_f64());
        }
        grpc.remove(0); // warm-up

        let raw_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let raw_addr = raw_listener.local_addr()?;
        let payload = std::sync::Arc::new(data);
        let server_payload = payload.clone();
        let server = tokio::spawn(async move {
            while let Ok((mut s, _)) = raw_listener.accept().await {
                let p = server_payload.clone();
                tokio::spawn(async move {
                    let _ = s.write_all(&p).await;
                });
            }
        });
        let mut raw = Vec::new();
        for _ in 0..=args.repeats {
            let t = Instant::now();
            let mut s = tokio::net::TcpStream::connect(raw_addr).await?;
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0usize;
            loop {
                let k = s.read(&mut buf).await?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            anyhow::ensure!(n == bytes, "raw copy received {n} of {bytes} bytes");
            raw.push(t.elapsed().as_secs_f64());
        }
        raw.remove(0);
        server.abort();
        let _ = stop_tx.send(());
        head.await??;

        let mib = args.size_mib as f64;
        let (g, r) = (median(grpc), median(raw));
        println!(
            "object: {} MiB, median of {} runs after one warm-up",
            args.size_mib, args.repeats
        );
        println!(
            "gRPC FetchObject (stage read + decrypt + chunks): {g:.3} s = {:.0} MiB/s",
            mib / g
        );
        println!(
            "raw TCP copy of the same bytes:                   {r:.3} s = {:.0} MiB/s",
            mib / r
        );
        println!("ratio gRPC / raw throughput: {:.2}", r / g);
        Ok(())
    })
}
