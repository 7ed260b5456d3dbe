//! `medray bench`: LocalNet train step and inference timings, optionally beside MONAI/PyTorch
//! (`tools/bench_monai.py`) on the same machine in the same run, with the ratio.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;
use medray_core::bench::{bench, gemm_ceiling, median, profile_ops, BenchKind, BenchResult};
use medray_core::localnet::{LocalNetConfig, Preset};

/// Arguments of `medray bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Presets to time, comma-separated: seed, full.
    #[arg(long, default_value = "seed", value_delimiter = ',')]
    presets: Vec<Preset>,
    /// Sizes, comma-separated: N (a cube) or XxYxZ.
    #[arg(long, default_value = "64,96x96x104", value_delimiter = ',')]
    sizes: Vec<String>,
    /// What to time, comma-separated: train, infer.
    #[arg(long, default_value = "train,infer", value_delimiter = ',')]
    kinds: Vec<String>,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Also run tools/bench_monai.py with this Python (MONAI 1.6.1 + torch installed) after
    /// medray's own runs, and print the ratio medray / MONAI.
    #[arg(long)]
    compare_monai: Option<PathBuf>,
    /// Path of tools/bench_monai.py.
    #[arg(long, default_value = "tools/bench_monai.py")]
    monai_script: PathBuf,
    /// With --compare-monai: time each configuration in this many rounds, each round one
    /// medray run right followed by one MONAI run of the same configuration, so that both
    /// sides of every ratio share the machine's state; reports the median over rounds of
    /// each side and of the per-round ratios.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Run every configuration in this process instead of one fresh child process each
    /// (the peak RSS is then the process's peak over all configurations so far).
    #[arg(long)]
    in_process: bool,
    /// Instead of whole steps, time each main op alone at the shapes of each preset and
    /// size (forward and backward, GFLOP/s, share of the step), after the GEMM ceiling.
    #[arg(long)]
    ops: bool,
    /// Registration quality on held-out pairs (see `--quality-*`, `--held-out`, `--weights`,
    /// `--refine`, `--compare-peers`) instead of timings.
    #[command(flatten)]
    quality: crate::bench_quality::QualityArgs,
}

fn parse_size(s: &str) -> anyhow::Result<[usize; 3]> {
    let parts: Vec<usize> = s
        .split('x')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--sizes: `{s}` is not N or XxYxZ"))?;
    match parts.as_slice() {
        [n] => Ok([*n; 3]),
        [x, y, z] => Ok([*x, *y, *z]),
        _ => anyhow::bail!("--sizes: `{s}` is not N or XxYxZ"),
    }
}

fn parse_kind(s: &str) -> anyhow::Result<BenchKind> {
    match s {
        "train" => Ok(BenchKind::Train),
        "infer" => Ok(BenchKind::Infer),
        other => anyhow::bail!("--kinds: `{other}` is not train or infer"),
    }
}

fn size_key(size: [usize; 3]) -> String {
    format!("{}x{}x{}", size[0], size[1], size[2])
}

fn preset_name(p: Preset) -> &'static str {
    match p {
        Preset::Seed => "seed",
        Preset::Full => "full",
    }
}

fn kind_name(k: BenchKind) -> &'static str {
    match k {
        BenchKind::Train => "train",
        BenchKind::Infer => "infer",
    }
}

/// What the MONAI script reports for one configuration.
#[derive(Debug, Clone, Copy)]
struct MonaiResult {
    median_s: f64,
    peak_rss_mib: Option<f64>,
    /// On a GPU: peak device memory in use (total minus free, whole device), MiB.
    peak_gpu_mib: Option<f64>,
}

/// The `--device` spelling of `device` (`cpu`, `cuda:N`), for the child runs of medray and
/// of `tools/bench_monai.py`: every run of a comparison is on the same device.
fn device_spec(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".to_string(),
    }
}

/// Runs the MONAI script on every configuration of `presets` x `sizes` x `kinds` and
/// returns its results by (preset, size, kind).
fn run_monai(
    args: &Args,
    python: &PathBuf,
    presets: &[&str],
    sizes: &[String],
    kinds: &[&str],
    device: &candle_core::Device,
) -> anyhow::Result<HashMap<(String, String, String), MonaiResult>> {
    let out = Command::new(python)
        .arg(&args.monai_script)
        .args(["--device", &device_spec(device)])
        .args(["--presets", &presets.join(",")])
        .args(["--sizes", &sizes.join(",")])
        .args(["--kinds", &kinds.join(",")])
        .args(["--repeats", &args.repeats.to_string()])
        .output()
        .with_context(|| {
            format!(
                "running {} {}",
                python.display(),
                args.monai_script.display()
            )
        })?;
    if !out.status.success() {
        anyhow::bail!(
            "{} failed:\n{}",
            args.monai_script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut medians = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        if let (Some(p), Some(s), Some(k), Some(m)) = (
            field("preset"),
            field("size"),
            field("kind"),
            v.get("median_s").and_then(|x| x.as_f64()),
        ) {
            let peak_rss_mib = v.get("peak_rss_mib").and_then(|x| x.as_f64());
            let peak_gpu_mib = v.get("peak_gpu_mib").and_then(|x| x.as_f64());
            medians.insert(
                (p, s, k),
                MonaiResult {
                    median_s: m,
                    peak_rss_mib,
                    peak_gpu_mib,
                },
            );
        }
    }
    Ok(medians)
}

pub fn run(args: Args, device: &candle_core::Device) -> anyhow::Result<()> {
    if args.quality.quality {
        return crate::bench_quality::run(&args.quality, args.json, device);
    }
    let sizes = args
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kinds = args
        .kinds
        .iter()
        .map(|k| parse_kind(k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.repeats == 0 {
        anyhow::bail!("--repeats must be at least 1");
    }
    if args.ops {
        return run_ops(&args, &sizes, device);
    }
    if args.rounds == 0 {
        anyhow::bail!("--rounds must be at least 1");
    }
    if args.rounds > 1 && args.compare_monai.is_none() {
        anyhow::bail!("--rounds interleaves medray and MONAI runs: it needs --compare-monai");
    }
    let time_medray = |preset: Preset, size: [usize; 3], kind: BenchKind| {
        eprintln!(
            "timing medray {} {} {} ...",
            preset_name(preset),
            size_key(size),
            kind_name(kind)
        );
        if args.in_process {
            bench(preset, size, kind, args.repeats, device).map_err(anyhow::Error::from)
        } else {
            bench_in_child(preset, size, kind, args.repeats, device)
        }
        .with_context(|| format!("benchmark {} {}", preset_name(preset), size_key(size)))
    };
    let mut results: Vec<BenchResult> = Vec::new();
    // Per configuration with --rounds > 1: the ratio of each round.
    let mut round_ratios: HashMap<(String, String, String), Vec<f64>> = HashMap::new();
    let mut monai: Option<HashMap<(String, String, String), MonaiResult>> = None;
    if let (Some(python), true) = (&args.compare_monai, args.rounds > 1) {
        let mut references = HashMap::new();
        for &preset in &args.presets {
            for &size in &sizes {
                for &kind in &kinds {
                    let key = (
                        preset_name(preset).to_string(),
                        size_key(size),
                        kind_name(kind).to_string(),
                    );
                    let mut ours = Vec::new();
                    let mut theirs = Vec::new();
                    for round in 1..=args.rounds {
                        eprintln!("round {round} of {}", args.rounds);
                        ours.push(time_medray(preset, size, kind)?);
                        eprintln!("timing MONAI {} {} {} ...", key.0, key.1, key.2);
                        let m = run_monai(
                            &args,
                            python,
                            &[&key.0],
                            std::slice::from_ref(&key.1),
                            &[&key.2],
                            device,
                        )?;
                        let m = *m.get(&key).with_context(|| {
                            format!(
                                "{} printed no result for {key:?}",
                                args.monai_script.display()
                            )
                        })?;
                        theirs.push(m);
                    }
                    let ratios: Vec<f64> = ours
                        .iter()
                        .zip(&theirs)
                        .map(|(o, t)| o.median_s / t.median_s)
                        .collect();
                    references.insert(key.clone(), aggregate_monai(&theirs));
                    round_ratios.insert(key, ratios);
                    results.push(aggregate_medray(ours));
                }
            }
        }
        monai = Some(references);
    } else {
        for &preset in &args.presets {
            for &size in &sizes {
                for &kind in &kinds {
                    results.push(time_medray(preset, size, kind)?);
                }
            }
        }
        if let Some(python) = &args.compare_monai {
            eprintln!("timing MONAI with {} ...", python.display());
            let presets: Vec<&str> = args.presets.iter().map(|p| preset_name(*p)).collect();
            let kinds: Vec<&str> = args.kinds.iter().map(String::as_str).collect();
            monai = Some(run_monai(
                &args,
                python,
                &presets,
                &args.sizes,
                &kinds,
                device,
            )?);
        }
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let gpu = medray_core::gpu::info(device)?;
    if !args.json {
        let on = match &gpu {
            Some(g) => format!(
                "GPU {} ({:.0} GiB), {device:?}",
                g.name,
                g.total_bytes as f64 / (1u64 << 30) as f64
            ),
            None => format!("device {device:?}"),
        };
        println!(
            "machine: {}, {on}; median of {} runs after 1 warm-up",
            crate::bench_quality::machine(),
            args.repeats
        );
        println!("{}", medray_core::ops::simd::describe());
        println!("{}", medray_core::memory::describe());
        if gpu.is_some() {
            println!(
                "GPU MiB: peak device memory in use while the configuration ran (total minus \
                 free, whole device, CUDA context included), the same measure for both"
            );
        }
        if args.rounds > 1 {
            println!(
                "{} rounds of medray then MONAI per configuration: times are medians over \
                 rounds, the ratio the median of the rounds' ratios",
                args.rounds
            );
        }
        let (ours, theirs) = if gpu.is_some() {
            ("medray GPU MiB", "MONAI GPU MiB")
        } else {
            ("medray MiB", "MONAI MiB")
        };
        println!(
            "{:<6} {:<12} {:<6} {:>12} {:>12} {:>8} {:>14} {:>14}",
            "preset", "size", "kind", "medray (s)", "MONAI (s)", "ratio", ours, theirs
        );
    }
    for r in &results {
        let key = (
            preset_name(r.preset).to_string(),
            size_key(r.size),
            kind_name(r.kind).to_string(),
        );
        let monai_result = monai.as_ref().and_then(|m| m.get(&key)).copied();
        let reference = monai_result.map(|m| m.median_s);
        let monai_rss = monai_result.and_then(|m| m.peak_rss_mib);
        let monai_gpu = monai_result.and_then(|m| m.peak_gpu_mib);
        let ratios = round_ratios.get(&key);
        // With rounds, the median of the per-round ratios; otherwise medray / MONAI.
        let ratio = match ratios {
            Some(r) => Some(median(r)),
            None => reference.map(|m| r.median_s / m),
        };
        let mib = |v: Option<f64>| v.map(|m| format!("{m:.0}")).unwrap_or_else(|| "-".into());
        if args.json {
            let mut v = serde_json::to_value(r)?;
            v["monai_median_s"] = serde_json::json!(reference);
            v["monai_peak_rss_mib"] = serde_json::json!(monai_rss);
            v["monai_peak_gpu_mib"] = serde_json::json!(monai_gpu);
            v["ratio"] = serde_json::json!(ratio);
            v["round_ratios"] = serde_json::json!(ratios);
            v["cores"] = serde_json::json!(cores);
            println!("{v}");
        } else {
            println!(
                "{:<6} {:<12} {:<6} {:>12.3} {:>12} {:>8} {:>14} {:>14}",
                key.0,
                key.1,
                key.2,
                r.median_s,
                reference
                    .map(|m| format!("{m:.3}"))
                    .unwrap_or_else(|| "-".into()),
                ratio
                    .map(|q| format!("{q:.2}x"))
                    .unwrap_or_else(|| "-".into()),
                mib(if gpu.is_some() {
                    r.peak_gpu_mib
                } else {
                    r.peak_rss_mib
                }),
                mib(if gpu.is_some() { monai_gpu } else { monai_rss })
            );
            if let Some(ratios) = ratios {
                let each: Vec<String> = ratios.iter().map(|q| format!("{q:.2}x")).collect();
                println!("{:<26} rounds: {}", "", each.join(" "));
            }
        }
    }
    Ok(())
}

/// One configuration's medray result over rounds: the median of the rounds' medians, every
/// timed repeat, the largest peak RSS.
fn aggregate_medray(rounds: Vec<BenchResult>) -> BenchResult {
    let mut out = rounds[0].clone();
    out.median_s = median(&rounds.iter().map(|r| r.median_s).collect::<Vec<_>>());
    out.times_s = rounds.iter().flat_map(|r| r.times_s.clone()).collect();
    out.peak_rss_mib = rounds
        .iter()
        .filter_map(|r| r.peak_rss_mib)
        .reduce(f64::max);
    out.peak_gpu_mib = rounds
        .iter()
        .filter_map(|r| r.peak_gpu_mib)
        .reduce(f64::max);
    out
}

/// One configuration's MONAI result over rounds, as [`aggregate_medray`].
fn aggregate_monai(rounds: &[MonaiResult]) -> MonaiResult {
    MonaiResult {
        median_s: median(&rounds.iter().map(|r| r.median_s).collect::<Vec<_>>()),
        peak_rss_mib: rounds
            .iter()
            .filter_map(|r| r.peak_rss_mib)
            .reduce(f64::max),
        peak_gpu_mib: rounds
            .iter()
            .filter_map(|r| r.peak_gpu_mib)
            .reduce(f64::max),
    }
}

/// Runs one configuration in a fresh `medray bench --in-process --json` child, so that its
/// peak RSS is its own (as `tools/bench_monai.py` does for MONAI).
fn bench_in_child(
    preset: Preset,
    size: [usize; 3],
    kind: BenchKind,
    repeats: usize,
    device: &candle_core::Device,
) -> anyhow::Result<BenchResult> {
    let device_arg = device_spec(device);
    let exe = std::env::current_exe().context("locating the medray binary")?;
    let out = Command::new(&exe)
        .args(["--device", &device_arg, "bench", "--in-process", "--json"])
        .args(["--presets", preset_name(preset)])
        .args(["--sizes", &size_key(size)])
        .args(["--kinds", kind_name(kind)])
        .args(["--repeats", &repeats.to_string()])
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "the bench child failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .context("the bench child printed no JSON result")?;
    serde_json::from_str(line).context("parsing the bench child's result")
}

/// `--ops`: the GEMM ceiling, then every op of each preset at each size.
fn run_ops(args: &Args, sizes: &[[usize; 3]], device: &candle_core::Device) -> anyhow::Result<()> {
    // One level-0 conv GEMM: 32 output channels, 7 taps x 32 input channels, a 64^3 volume.
    let ceiling = gemm_ceiling(32, 64 * 64 * 64, 7 * 32, args.repeats);
    if args.json {
        println!("{}", serde_json::json!({ "gemm_ceiling": ceiling }));
    } else {
        println!(
            "machine: {}; {}; {}",
            crate::bench_quality::machine(),
            medray_core::ops::simd::describe(),
            medray_core::memory::describe()
        );
        println!(
            "GEMM ceiling: f32 {}x{}x{} (m x n x k) on {} threads: {:.4} s, {:.1} GFLOP/s",
            ceiling.shape[0],
            ceiling.shape[1],
            ceiling.shape[2],
            ceiling.threads,
            ceiling.median_s,
            ceiling.gflops
        );
    }
    for &preset in &args.presets {
        for &size in sizes {
            eprintln!(
                "timing ops of {} {} ...",
                preset_name(preset),
                size_key(size)
            );
            let config = LocalNetConfig::preset(preset);
            let timings = profile_ops(&config, size, args.repeats, device)?;
            let total: f64 = timings
                .iter()
                .map(|t| t.count as f64 * (t.forward_s + t.backward_s))
                .sum();
            if args.json {
                for t in &timings {
                    let mut v = serde_json::to_value(t)?;
                    v["preset"] = serde_json::json!(preset_name(preset));
                    v["size"] = serde_json::json!(size_key(size));
                    v["forward_gflops"] = serde_json::json!(t.forward_gflops());
                    v["backward_gflops"] = serde_json::json!(t.backward_gflops());
                    println!("{v}");
                }
                continue;
            }
            println!(
                "\n{} {}: median of {} runs per op; share = count x (fwd + bwd) / sum",
                preset_name(preset),
                size_key(size),
                args.repeats
            );
            println!(
                "{:<34} {:>5} {:>9} {:>9} {:>8} {:>8} {:>7} {:>6}",
                "op", "count", "fwd (s)", "bwd (s)", "fwd GF/s", "bwd GF/s", "fwd/ceil", "share"
            );
            let gf = |v: Option<f64>| v.map(|g| format!("{g:.1}")).unwrap_or_else(|| "-".into());
            for t in &timings {
                println!(
                    "{:<34} {:>5} {:>9.4} {:>9.4} {:>8} {:>8} {:>7} {:>5.1}%",
                    t.label,
                    t.count,
                    t.forward_s,
                    t.backward_s,
                    gf(t.forward_gflops()),
                    gf(t.backward_gflops()),
                    t.forward_gflops()
                        .map(|g| format!("{:.2}", g / ceiling.gflops))
                        .unwrap_or_else(|| "-".into()),
                    100.0 * t.count as f64 * (t.forward_s + t.backward_s) / total
                );
            }
            let fwd: f64 = timings.iter().map(|t| t.count as f64 * t.forward_s).sum();
            println!(
                "sum: forward {fwd:.3} s, forward + backward {total:.3} s (no Adam, no elementwise glue)"
            );
        }
    }
    Ok(())
}
