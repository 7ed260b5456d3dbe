//! `medray synth --from-ct SCAN`: breath-hold pairs with a known deformation made from a real
//! chest CT ([`medray_core::synth::from_ct`]).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use medray_core::synth::from_ct::{generate_from_ct, FromCtConfig};

use super::{table, Args};

pub(super) fn run(args: &Args, scan: &Path, size: [usize; 3]) -> anyhow::Result<()> {
    let config = FromCtConfig {
        lung_mask: args.ct_lung_mask.clone(),
        amplitude_scale: args.motion_scale,
        ..FromCtConfig::new(scan)
            .with_cases(args.cases)
            .with_size(size)
            .with_seed(args.seed)
            .with_motion(args.motion)
    };
    println!("reading and segmenting {} ...", scan.display());
    let start = Instant::now();
    let mut last = Instant::now();
    let summary = generate_from_ct(&config, &args.out, |done, total, case| {
        let m = &case.motion;
        println!(
            "{}/{total} {}: {} landmarks, mean {:.1} mm, p95 {:.1} mm, max {:.1} mm, lung Dice {:.3} ({:.1} s)",
            done,
            case.case_id,
            case.keypoints,
            m.mean_mm,
            m.p95_mm,
            m.max_mm,
            case.lung_dice,
            last.elapsed().as_secs_f64()
        );
        last = Instant::now();
    })
    .with_context(|| format!("synth --from-ct {}", scan.display()))?;
    print!("{}", table(&summary.synth));
    let lungs: Vec<String> = summary.lung_ml.iter().map(|v| format!("{v:.0}")).collect();
    let s = summary.synth.spacing_mm;
    println!(
        "from {}: body {:.0} mL, lungs {} mL, {} vessel points; wrote {} cases ({}x{}x{} voxels \
         of {:.2}x{:.2}x{:.2} mm, motion {}) to {} in {:.1} s",
        scan.display(),
        summary.body_ml,
        lungs.join(" + "),
        summary.vessel_points,
        summary.synth.cases.len(),
        size[0],
        size[1],
        size[2],
        s[0],
        s[1],
        s[2],
        summary.synth.motion,
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
