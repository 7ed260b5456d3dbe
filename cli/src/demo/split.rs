//! The demo's held-out cases: the training dataset is a subset of the cases, written as its
//! own folder in the Learn2Reg layout (hard links, or copies across file systems), so that
//! `ingest dir` publishes it as a separate dataset. Inference then runs on every case and
//! each result says whether its images were trained on (`medray_core::models::provenance`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use medray_core::dataset::{CaseFiles, Learn2RegDataset};
use medray_core::ingest::{read_manifest, MANIFEST_FILE};

/// The cases of a folder that `medray ingest dir` accepts (a `manifest.csv`, else the
/// Learn2Reg layout), ordered by id.
pub fn list_cases(folder: &Path) -> anyhow::Result<Vec<CaseFiles>> {
    let manifest = folder.join(MANIFEST_FILE);
    let cases = if manifest.is_file() {
        read_manifest(&manifest)?
    } else {
        Learn2RegDataset::open(folder)?.cases
    };
    Ok(cases)
}

/// `.nii.gz`, `.nii` or `.csv`: the ending `ingest dir` recognises the file by.
fn ending(path: &Path) -> &'static str {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase());
    match name.as_deref() {
        Some(n) if n.ends_with(".nii.gz") => ".nii.gz",
        Some(n) if n.ends_with(".csv") => ".csv",
        _ => ".nii",
    }
}

/// Hard-links `from` to `to`, or copies it where a link cannot be made.
fn link_or_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// Writes `cases` into `out` (removed first if it exists) in the Learn2Reg layout:
/// `scans/<id>_{exp,insp}`, `lungMasks/<id>_{exp,insp}`, `keypoints/<id>.csv`, each file
/// a hard link to (or a copy of) the original, so its content and sha256 are the same.
pub fn write_subset(cases: &[CaseFiles], out: &Path) -> anyhow::Result<PathBuf> {
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    for sub in ["scans", "lungMasks", "keypoints"] {
        let dir = out.join(sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for c in cases {
        let files = [
            ("scans", "_exp", Some(&c.fixed)),
            ("scans", "_insp", Some(&c.moving)),
            ("lungMasks", "_exp", c.fixed_mask.as_ref()),
            ("lungMasks", "_insp", c.moving_mask.as_ref()),
            ("keypoints", "", c.keypoints.as_ref()),
        ];
        for (sub, suffix, from) in files {
            if let Some(from) = from {
                let name = format!("{}{suffix}{}", c.id, ending(from));
                link_or_copy(from, &out.join(sub).join(name))?;
            }
        }
    }
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subset_is_a_learn2reg_folder_with_the_same_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("src");
        for sub in ["scans", "lungMasks", "keypoints"] {
            std::fs::create_dir_all(src.join(sub)).expect("mkdir");
        }
        for id in ["case_001", "case_002", "case_003"] {
            for phase in ["exp", "insp"] {
                for sub in ["scans", "lungMasks"] {
                    let p = src.join(sub).join(format!("{id}_{phase}.nii.gz"));
                    std::fs::write(&p, format!("{sub}/{id}/{phase}")).expect("write");
                }
            }
            std::fs::write(src.join("keypoints").join(format!("{id}.csv")), id).expect("write");
        }
        let all = list_cases(&src).expect("cases");
        assert_eq!(all.len(), 3);
        let out = write_subset(&all[..2], &dir.path().join("train")).expect("subset");
        let subset = list_cases(&out).expect("subset cases");
        let ids: Vec<&str> = subset.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["case_001", "case_002"]);
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");
        assert_eq!(read(&subset[1].moving), "scans/case_002/insp");
        assert_eq!(
            subset[0].moving_mask.as_deref().map(read).as_deref(),
            Some("lungMasks/case_001/insp")
        );
        assert_eq!(
            subset[0].keypoints.as_deref().map(read).as_deref(),
            Some("case_001")
        );
        // Written again: the old folder is replaced, not merged.
        write_subset(&all[2..], &out).expect("again");
        assert_eq!(list_cases(&out).expect("cases").len(), 1);
    }
}
