//! `medray bench --quality`: registration quality on held-out pairs with a known answer.
//!
//! 1. The data: phantoms from `medray synth` (the realistic breathing defaults, `--quality-cases`
//!    at `--quality-size`), or an existing Learn2Reg-layout folder with landmarks
//!    (`--quality-data`, e.g. pairs made from a real CT). The last `--held-out` cases are held
//!    out; the others train.
//! 2. The network: `--weights` (trained elsewhere; the held-out cases must not be among its
//!    training cases), or trained here on the training cases only (`train-local`'s loop).
//! 3. Every held-out pair is registered by each method: the identity, the network alone, the
//!    network + `--refine` instance optimisation and, with `--compare-peers PYTHON`, elastix
//!    (affine + B-spline) and ANTs SyN through `tools/quality_peers.py`. Every field is scored
//!    by the same code ([`medray_core::quality::score_ddf`]) on the fixed image's own grid.
//! 4. A table per method (means over the held-out pairs), the landmark motion of the data, the
//!    machine, and with `--json` one object per method and pair.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use medray_core::dataset::{CaseFiles, Learn2RegDataset};
use medray_core::localnet::Preset;
use medray_core::model::load_model;
use medray_core::nifti_io::Volume;
use medray_core::predict::{load_pair, KeypointFiles, LoadedPair, PairFiles};
use medray_core::quality::{read_raw_ddf, score_ddf, QualityScore, ScoringInputs};
use medray_core::refine::RefineOptions;
use medray_core::registration::LossPreset;
use medray_core::train::TrainConfig;
use serde::Serialize;

/// Options of `medray bench --quality` (each needs `--quality`).
#[derive(Debug, Clone, clap::Args)]
pub struct QualityArgs {
    /// Measure registration quality on held-out pairs instead of timing steps.
    #[arg(long)]
    pub quality: bool,
    /// Work folder (data, trained weights, fields); replaced on each run.
    #[arg(long, default_value = "quality-bench", requires = "quality")]
    pub quality_out: PathBuf,
    /// An existing dataset in the Learn2Reg layout with keypoints (e.g. `medray synth` output,
    /// or pairs made from a real CT) instead of new phantoms.
    #[arg(long, requires = "quality")]
    pub quality_data: Option<PathBuf>,
    /// Phantoms to synthesise (training + held-out). 40 training phantoms: with keypoint
    /// supervision, 8 overfit (BENCHMARKS.md, "Levers tried for the network alone").
    #[arg(long, default_value_t = 42, requires = "quality")]
    pub quality_cases: usize,
    /// Phantom grid X Y Z.
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"], default_values_t = [192, 192, 208], requires = "quality")]
    pub quality_size: Vec<usize>,
    /// Seed of the phantoms.
    #[arg(long, default_value_t = 2, requires = "quality")]
    pub quality_seed: u64,
    /// Cases held out (the last ones); every figure is on these.
    #[arg(long, default_value_t = 2, requires = "quality")]
    pub held_out: usize,
    /// Trained weights to evaluate (their `.json` config beside them) instead of training here.
    #[arg(long, requires = "quality")]
    pub weights: Option<PathBuf>,
    /// Training here: epochs.
    #[arg(long, default_value_t = 12, requires = "quality")]
    pub train_epochs: usize,
    /// Training here: network preset.
    #[arg(long, default_value = "seed", requires = "quality")]
    pub train_preset: Preset,
    /// Training here: objective (the default uses the training phantoms' keypoints; the
    /// held-out ones' never).
    #[arg(long, default_value = "mse-dice-kp-be", requires = "quality")]
    pub train_loss: LossPreset,
    /// Training here: network grid X Y Z (each divisible by 8).
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"], default_values_t = [64, 64, 72], requires = "quality")]
    pub train_size: Vec<usize>,
    /// Training here: channels of the first level.
    #[arg(long, default_value_t = 16, requires = "quality")]
    pub train_channels: usize,
    /// Training here: Adam learning rate.
    #[arg(long, default_value_t = 1e-3, requires = "quality")]
    pub train_lr: f64,
    /// Instance optimisation steps per pyramid level for the "network + refine" row (0: no
    /// such row).
    #[arg(long, default_value_t = 30, requires = "quality")]
    pub refine: usize,
    /// Weight of the refinement's diffusion regulariser (as `medray predict --refine-lambda`).
    #[arg(long, default_value_t = RefineOptions::default().lambda, requires = "quality")]
    pub refine_lambda: f64,
    /// Register with ANTs SyN and elastix too, with this Python (`pip install antspyx
    /// itk-elastix`), through `--peers-script`.
    #[arg(long, requires = "quality")]
    pub compare_peers: Option<PathBuf>,
    /// Which peers, comma-separated: elastix, ants.
    #[arg(
        long,
        default_value = "elastix,ants",
        value_delimiter = ',',
        requires = "compare_peers"
    )]
    pub peers: Vec<String>,
    /// Path of tools/quality_peers.py.
    #[arg(
        long,
        default_value = "tools/quality_peers.py",
        requires = "compare_peers"
    )]
    pub peers_script: PathBuf,
}

/// One method's score on one pair.
#[derive(Debug, Clone, Serialize)]
struct PairResult {
    method: String,
    case: String,
    seconds: f64,
    #[serde(flatten)]
    score: QualityScore,
}

/// The machine, for the report: CPU model and logical CPUs.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cpus} logical CPUs")
}

fn size3(v: &[usize], flag: &str) -> anyhow::Result<[usize; 3]> {
    match v {
        [x, y, z] => Ok([*x, *y, *z]),
        _ => bail!("{flag}: expected three sizes X Y Z"),
    }
}

impl QualityArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if self.held_out == 0 {
            bail!("--held-out must be at least 1");
        }
        RefineOptions {
            steps: self.refine,
            lambda: self.refine_lambda,
            ..RefineOptions::default()
        }
        .validate()?;
        if self.quality_data.is_none() && self.quality_cases <= self.held_out {
            bail!(
                "--quality-cases ({}) must exceed --held-out ({}): some cases must train",
                self.quality_cases,
                self.held_out
            );
        }
        for p in &self.peers {
            if !matches!(p.as_str(), "elastix" | "ants") {
                bail!("--peers: `{p}` is not elastix or ants");
            }
        }
        if let Some(w) = &self.weights {
            if !w.is_file() {
                bail!("--weights {}: no such file", w.display());
            }
        }
        if let Some(d) = &self.quality_data {
            if !d.is_dir() {
                bail!("--quality-data {}: no such folder", d.display());
            }
        }
        if self.compare_peers.is_some() && !self.peers_script.is_file() {
            bail!(
                "--peers-script {}: no such file (run from the repository root or pass the path)",
                self.peers_script.display()
            );
        }
        Ok(())
    }
}

/// Links (or copies) the files of `cases` into `dir` in the Learn2Reg layout.
fn link_cases(cases: &[CaseFiles], dir: &Path) -> anyhow::Result<()> {
    let place = |src: &Path, sub: &str| -> anyhow::Result<()> {
        let name = src.file_name().context("a case file without a name")?;
        let target = dir.join(sub).join(name);
        std::fs::create_dir_all(dir.join(sub))?;
        let src = std::fs::canonicalize(src).with_context(|| src.display().to_string())?;
        #[cfg(unix)]
        std::os::unix::fs::symlink(&src, &target)
            .with_context(|| format!("linking {}", target.display()))?;
        #[cfg(not(unix))]
        std::fs::copy(&src, &target).with_context(|| format!("copying {}", target.display()))?;
        Ok(())
    };
    for c in cases {
        place(&c.fixed, "scans")?;
        place(&c.moving, "scans")?;
        for m in [&c.fixed_mask, &c.moving_mask].into_iter().flatten() {
            place(m, "lungMasks")?;
        }
        if let Some(k) = &c.keypoints {
            place(k, "keypoints")?;
        }
    }
    Ok(())
}

/// Trains a network on `train` (validation: the last 20% of them) and returns its weights.
fn train(args: &QualityArgs, train: &[CaseFiles], device: &Device) -> anyhow::Result<PathBuf> {
    let dir = args.quality_out.join("train-data");
    link_cases(train, &dir)?;
    let config = TrainConfig {
        preset: args.train_preset,
        num_channel_initial: args.train_channels,
        loss: args.train_loss,
        epochs: args.train_epochs,
        lr: args.train_lr,
        size: size3(&args.train_size, "--train-size")?,
        checkpoint_every: args.train_epochs.max(1),
        ..TrainConfig::default()
    };
    eprintln!(
        "training on {} cases ({} epochs, {:?} preset, loss {}, grid {:?}, {} channels)",
        train.len(),
        config.epochs,
        config.preset,
        config.loss.name(),
        config.size,
        config.num_channel_initial
    );
    let start = Instant::now();
    // The epoch lines of the run, on stderr (stdout carries the report).
    let summary = crate::train_local::train_in_process(
        &dir,
        &args.quality_out.join("model"),
        &config,
        false,
        device,
        &|row| {
            if row.worker_id.is_empty() && row.line.starts_with("epoch ") {
                eprintln!("  {}", row.line);
            }
        },
    )?;
    eprintln!("trained in {:.0} s", start.elapsed().as_secs_f64());
    Ok(summary.best_weights)
}

fn pair_files(case: &CaseFiles) -> anyhow::Result<PairFiles> {
    let keypoints = case
        .keypoints
        .clone()
        .with_context(|| format!("case {}: no keypoints file: TRE cannot be scored", case.id))?;
    Ok(PairFiles {
        fixed: case.fixed.clone(),
        moving: case.moving.clone(),
        fixed_mask: case.fixed_mask.clone(),
        moving_mask: case.moving_mask.clone(),
        keypoints: Some(KeypointFiles::Pairs(keypoints)),
        names: Vec::new(),
    })
}

fn score(
    pair: &LoadedPair,
    fixed_mask: Option<&Volume>,
    ddf: &candle_core::Tensor,
    method: &str,
    case: &str,
    seconds: f64,
) -> anyhow::Result<PairResult> {
    let (f, m) = pair
        .keypoints
        .as_ref()
        .context("the pair has no keypoints")?;
    let masks = match (fixed_mask, &pair.moving_mask_volume) {
        (Some(f), Some(m)) => Some((f, m)),
        _ => None,
    };
    let inputs = ScoringInputs {
        spacing_mm: pair.fixed_volume.spacing,
        keypoints: Some((f, m)),
        masks,
    };
    Ok(PairResult {
        method: method.into(),
        case: case.into(),
        seconds,
        score: score_ddf(ddf, &inputs)?,
    })
}

/// Runs a peer on one pair; returns its field (voxels, fixed grid) and its seconds.
fn run_peer(
    args: &QualityArgs,
    python: &Path,
    peer: &str,
    case: &CaseFiles,
    grid: [usize; 3],
    device: &Device,
) -> anyhow::Result<(candle_core::Tensor, f64)> {
    let out = args
        .quality_out
        .join("peers")
        .join(format!("{}_{peer}.f32", case.id));
    std::fs::create_dir_all(out.parent().context("peers folder")?)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let result = Command::new(python)
        .arg(&args.peers_script)
        .args(["--method", peer])
        .arg("--fixed")
        .arg(&case.fixed)
        .arg("--moving")
        .arg(&case.moving)
        .arg("--out")
        .arg(&out)
        .args(["--threads", &threads.to_string()])
        .output()
        .with_context(|| {
            format!(
                "running {} {}",
                python.display(),
                args.peers_script.display()
            )
        })?;
    if !result.status.success() {
        bail!(
            "{peer} on {} failed:\n{}",
            case.id,
            String::from_utf8_lossy(&result.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&result.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{peer} on {}: no JSON line in its output", case.id))?;
    let v: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("{peer} on {}: bad JSON `{line}`", case.id))?;
    let seconds = v
        .get("seconds")
        .and_then(serde_json::Value::as_f64)
        .with_context(|| format!("{peer} on {}: no `seconds`", case.id))?;
    Ok((read_raw_ddf(&out, grid, device)?, seconds))
}

/// Marks a folder as this benchmark's, so that a later run may clear it.
const MARKER: &str = ".medray-quality-bench";

/// Empties `out` for a new run: only a folder this benchmark made (it holds [`MARKER`]) or an
/// empty one is ever cleared, so a mistyped `--quality-out` cannot delete a user's files.
fn clear_work_folder(out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .with_context(|| format!("--quality-out {}", out.display()))?
            .next()
            .is_none();
        if !empty && !out.join(MARKER).is_file() {
            bail!(
                "--quality-out {}: the folder holds files that this benchmark did not write; \
                 choose an empty or new folder",
                out.display()
            );
        }
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    std::fs::write(out.join(MARKER), "medray bench --quality work folder\n")
        .with_context(|| out.display().to_string())?;
    Ok(())
}

/// `medray bench --quality`.
pub fn run(args: &QualityArgs, json: bool, device: &Device) -> anyhow::Result<()> {
    args.validate()?;
    let out = &args.quality_out;
    clear_work_folder(out)?;
    eprintln!("machine: {}", machine());

    let data_dir = match &args.quality_data {
        Some(d) => d.clone(),
        None => {
            let dir = out.join("data");
            let config = medray_core::synth::SynthConfig::default()
                .with_cases(args.quality_cases)
                .with_size(size3(&args.quality_size, "--quality-size")?)
                .with_seed(args.quality_seed);
            eprintln!(
                "synthesising {} phantoms at {:?} (seed {})",
                config.cases, config.size, config.seed
            );
            let start = Instant::now();
            medray_core::synth::generate(&config, &dir, |done, total| {
                eprintln!("  phantom {done}/{total}");
            })?;
            eprintln!("synthesised in {:.0} s", start.elapsed().as_secs_f64());
            dir
        }
    };
    let dataset = Learn2RegDataset::open(&data_dir)?;
    let n = dataset.cases.len();
    if n <= args.held_out && args.weights.is_none() {
        bail!(
            "{}: {n} cases, --held-out {}: none would train",
            data_dir.display(),
            args.held_out
        );
    }
    let held_out: Vec<CaseFiles> = dataset.cases[n.saturating_sub(args.held_out)..].to_vec();
    let training: Vec<CaseFiles> = dataset.cases[..n.saturating_sub(args.held_out)].to_vec();
    let weights = match &args.weights {
        Some(w) => w.clone(),
        None => train(args, &training, device)?,
    };
    let model = load_model(&weights, None, DType::F32, device)?;

    let mut results: Vec<PairResult> = Vec::new();
    for case in &held_out {
        eprintln!("registering held-out {}", case.id);
        let pair = load_pair(&pair_files(case)?, &model.config.preprocess, device)?;
        let grid = pair.original_size();
        // LoadedPair keeps only the network's view of the fixed mask: Dice is scored on the
        // mask as stored.
        let fixed_mask = case
            .fixed_mask
            .as_ref()
            .map(medray_core::nifti_io::read_volume)
            .transpose()?;
        let fm = fixed_mask.as_ref();
        let zero =
            candle_core::Tensor::zeros((1, 3, grid[0], grid[1], grid[2]), DType::F32, device)?;
        results.push(score(&pair, fm, &zero, "identity", &case.id, 0.0)?);

        let mut rows = vec![("network", 0usize)];
        if args.refine > 0 {
            rows.push(("network + refine", args.refine));
        }
        for (method, steps) in rows {
            let options = RefineOptions {
                steps,
                lambda: args.refine_lambda,
                ..RefineOptions::default()
            };
            let start = Instant::now();
            let reg = medray_core::predict::register_pair_with(&model, &pair, true, &options)?;
            let seconds = start.elapsed().as_secs_f64();
            let ddf = reg
                .ddf_original
                .as_ref()
                .context("register_pair gave no original-grid field")?;
            results.push(score(&pair, fm, ddf, method, &case.id, seconds)?);
        }
        if let Some(python) = &args.compare_peers {
            for peer in &args.peers {
                eprintln!("  {peer} on {} ...", case.id);
                let (ddf, seconds) = run_peer(args, python, peer, case, grid, device)?;
                let name = if peer == "ants" {
                    "ANTs SyN"
                } else {
                    "elastix affine+B-spline"
                };
                results.push(score(&pair, fm, &ddf, name, &case.id, seconds)?);
            }
        }
    }
    report(&results, &held_out, json);
    Ok(())
}

fn mean_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

fn report(results: &[PairResult], held_out: &[CaseFiles], json: bool) {
    if json {
        for r in results {
            if let Ok(line) = serde_json::to_string(r) {
                println!("{line}");
            }
        }
        return;
    }
    let ids: Vec<&str> = held_out.iter().map(|c| c.id.as_str()).collect();
    println!("held-out pairs: {} ({})", held_out.len(), ids.join(", "));
    let identity: Vec<&PairResult> = results.iter().filter(|r| r.method == "identity").collect();
    println!(
        "landmark motion before registration: mean {} mm, 95th percentile {} mm (mean over pairs), {} landmarks per pair",
        fmt(mean_of(identity.iter().map(|r| r.score.tre_before_mm)), 2),
        fmt(mean_of(identity.iter().map(|r| r.score.tre_before_p95_mm)), 2),
        fmt(mean_of(identity.iter().map(|r| Some(r.score.landmarks as f64))), 0),
    );
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>8} {:>9} {:>10} {:>9}",
        "method", "TRE mm", "TRE p95", "TRE max", "Dice", "fold %", "SD logJ", "s/pair"
    );
    let mut methods: Vec<&str> = Vec::new();
    for r in results {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
    }
    for m in methods {
        let rows: Vec<&PairResult> = results.iter().filter(|r| r.method == m).collect();
        println!(
            "{:<26} {:>9} {:>9} {:>9} {:>8} {:>9} {:>10} {:>9}",
            m,
            fmt(mean_of(rows.iter().map(|r| r.score.tre_mm)), 2),
            fmt(mean_of(rows.iter().map(|r| r.score.tre_p95_mm)), 2),
            fmt(mean_of(rows.iter().map(|r| r.score.tre_max_mm)), 2),
            fmt(mean_of(rows.iter().map(|r| r.score.dice)), 3),
            fmt(mean_of(rows.iter().map(|r| Some(r.score.folding_pct))), 3),
            fmt(mean_of(rows.iter().map(|r| Some(r.score.log_jac_std))), 3),
            fmt(mean_of(rows.iter().map(|r| Some(r.seconds))), 1),
        );
    }
}
