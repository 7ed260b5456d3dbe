//! `medray predict`: register one pair with trained weights.

use std::path::PathBuf;

use anyhow::Context;
use medray_core::predict::{predict, KeypointFiles, OutputGrid, PredictRequest};

/// Arguments of `medray predict`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// LocalNet weights (safetensors with MONAI state_dict names).
    #[arg(long)]
    weights: PathBuf,
    /// Model config (JSON); default: the .json beside the weights, if any. Without one, no
    /// intensity window and no resize are applied.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Fixed image (expiration): a NIfTI file or a folder holding one DICOM series.
    #[arg(long)]
    fixed: PathBuf,
    /// Moving image (inspiration): a NIfTI file or a folder holding one DICOM series.
    #[arg(long)]
    moving: PathBuf,
    /// Lung mask of the fixed image (enables Dice).
    #[arg(long, requires = "moving_mask")]
    fixed_mask: Option<PathBuf>,
    /// Lung mask of the moving image.
    #[arg(long, requires = "fixed_mask")]
    moving_mask: Option<PathBuf>,
    /// Keypoints of the fixed image, CSV of voxel coordinates (enables TRE).
    #[arg(long, requires = "moving_keypoints", conflicts_with = "keypoints")]
    fixed_keypoints: Option<PathBuf>,
    /// Keypoints of the moving image, CSV of voxel coordinates.
    #[arg(long, requires = "fixed_keypoints")]
    moving_keypoints: Option<PathBuf>,
    /// Keypoint pairs, 6-column CSV (fixed x y z, moving x y z), as `medray synth` writes.
    #[arg(long)]
    keypoints: Option<PathBuf>,
    /// Where to write the DDF (NIfTI vector image, voxel units).
    #[arg(long)]
    out_ddf: PathBuf,
    /// Where to write the warped moving image.
    #[arg(long)]
    out_warped: Option<PathBuf>,
    /// Where to write the displacement as an ITK/ANTs/Slicer displacement field transform
    /// (5-D NIfTI, intent 1007, mm, LPS; fixed -> moving points); needs --original-grid.
    #[arg(long, requires = "original_grid")]
    out_transform: Option<PathBuf>,
    /// Where to write the Jacobian determinant map of x -> x + u(x) (float32 NIfTI).
    #[arg(long)]
    out_jacobian: Option<PathBuf>,
    /// Write the DDF and warped image on the original grid of the fixed image instead of the
    /// network grid.
    #[arg(long)]
    original_grid: bool,
    #[command(flatten)]
    refinement: crate::refine_args::RefineArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "n/a".into())
}

pub fn run(args: Args, device: &candle_core::Device) -> anyhow::Result<()> {
    let keypoints = match (args.keypoints, args.fixed_keypoints, args.moving_keypoints) {
        (Some(p), _, _) => Some(KeypointFiles::Pairs(p)),
        (None, Some(fixed), Some(moving)) => Some(KeypointFiles::Separate { fixed, moving }),
        _ => None,
    };
    let request = PredictRequest {
        weights: args.weights,
        model_config: args.config,
        fixed: args.fixed,
        moving: args.moving,
        fixed_mask: args.fixed_mask,
        moving_mask: args.moving_mask,
        keypoints,
        out_ddf: args.out_ddf,
        out_warped: args.out_warped,
        out_transform: args.out_transform,
        out_jacobian: args.out_jacobian,
        output_grid: if args.original_grid {
            OutputGrid::Original
        } else {
            OutputGrid::Network
        },
        refine_steps: args.refinement.steps,
        refine: args.refinement.options()?,
    };
    let report = predict(&request, device).context("predict failed")?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let m = &report.metrics;
    println!(
        "registered {:?} on {:?} ({}) in {:.0} ms (network {:.0} ms)",
        report.original_size,
        report.network_size,
        report.device,
        report.runtime_ms,
        report.inference_ms
    );
    println!("  MI loss         {:.4}", m.mi_loss);
    println!("  bending energy  {:.5}", m.bending_energy);
    println!(
        "  Dice            {} (before {})",
        fmt_opt(m.dice, 4),
        fmt_opt(m.dice_before, 4)
    );
    println!("  soft Dice       {}", fmt_opt(m.soft_dice, 4));
    println!("  SSIM            {:.4}", m.ssim);
    println!(
        "  TRE             {} mm (before {} mm)",
        fmt_opt(m.tre_mm, 2),
        fmt_opt(m.tre_before_mm, 2)
    );
    println!(
        "  folding         {:.3} % (min det J {:.3})",
        m.folding_pct, m.jacobian_min
    );
    println!("  mean |DDF|      {:.3} voxels", m.ddf_magnitude);
    println!("  SD log det J    {}", fmt_opt(m.log_jac_std, 4));
    if let Some(r) = &report.refine {
        println!(
            "  refined         {} Adam steps (lr {}): {} loss {:.5} -> {:.5} in {:.0} ms",
            r.steps, r.lr, r.loss, r.loss_before, r.loss_after, r.refine_ms
        );
        for l in &r.levels {
            println!(
                "    level {:?} (control grid {:?}): {} loss {:.5} -> {:.5} in {:.0} ms",
                l.size, l.control_grid, r.loss, l.loss_before, l.loss_after, l.ms
            );
        }
    }
    println!("  DDF written to  {}", report.out_ddf.display());
    if let Some(w) = &report.out_warped {
        println!("  warped image    {}", w.display());
    }
    Ok(())
}
