//! Safe extraction of a Learn2Reg zip archive.
//!
//! The archive is read twice. The first pass looks at every entry's header and refuses the
//! whole archive, naming the entry, if any entry has a `..` component, an absolute name
//! (`/x`, `\x`, `C:x`), a NUL byte, is a symbolic link or is encrypted, if there are more
//! entries than [`ExtractLimits::max_entries`], or if the entries kept declare more than
//! [`ExtractLimits::max_total_bytes`]. Only the expected entries are kept:
//! `[training/]scans/*.nii[.gz]`, `[training/]lungMasks/*.nii[.gz]` and
//! `[training/]keypoints/*.csv` (hidden files such as `._case_001_exp.nii.gz` excluded);
//! everything else (folders, `__MACOSX/`, READMEs) is skipped and listed. The second pass
//! writes the kept entries to fresh files in the output folder (never over an existing
//! one), counting the bytes actually inflated against the limit, so an archive that lies
//! about its sizes is stopped too. The output has the Learn2Reg layout
//! ([`crate::dataset::Learn2RegDataset`]) without the `training/` level.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Limits on what an archive may expand to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Most bytes the kept entries may expand to, in total.
    pub max_total_bytes: u64,
    /// Most entries (files, folders, anything) the archive may hold.
    pub max_entries: usize,
}

impl Default for ExtractLimits {
    /// 16 GiB and 10,000 entries: the Learn2Reg lung CT training archive is about 2.5 GB
    /// holding about 100 files (80 NIfTI volumes and their keypoint lists).
    fn default() -> Self {
        Self {
            max_total_bytes: 16 << 30,
            max_entries: 10_000,
        }
    }
}

impl ExtractLimits {
    /// Sets the total size limit.
    pub fn with_max_total_bytes(mut self, bytes: u64) -> Self {
        self.max_total_bytes = bytes;
        self
    }

    /// Sets the entry count limit.
    pub fn with_max_entries(mut self, entries: usize) -> Self {
        self.max_entries = entries;
        self
    }
}

/// What an extraction did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Files written, as paths relative to the output folder (`scans/case_001_exp.nii.gz`).
    pub files: Vec<PathBuf>,
    /// Bytes written.
    pub bytes: u64,
    /// Entries skipped because they are not part of the Learn2Reg layout.
    pub skipped: Vec<String>,
}

/// Why a name is unsafe, if it is.
fn unsafe_name(name: &str) -> Option<&'static str> {
    let bytes = name.as_bytes();
    if name.is_empty() {
        return Some("empty name");
    }
    if name.contains('\0') {
        return Some("the name holds a NUL byte");
    }
    let drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    if name.starts_with('/') || name.starts_with('\\') || drive {
        return Some("absolute path");
    }
    if name.split(['/', '\\']).any(|part| part == "..") {
        return Some("path traversal (`..`) outside the extraction folder");
    }
    None
}

/// Where a safe entry goes in the output, or `None` if it is not part of the layout.
fn target_of(name: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let parts = match parts.as_slice() {
        ["training", rest @ ..] => rest,
        all => all,
    };
    let [folder, file] = parts else {
        return None;
    };
    if file.starts_with('.') || file.contains('\\') {
        return None;
    }
    let nifti = file.ends_with(".nii.gz") || file.ends_with(".nii");
    let keep = match *folder {
        "scans" | "lungMasks" => nifti,
        "keypoints" => file.ends_with(".csv"),
        _ => false,
    };
    keep.then(|| Path::new(folder).join(file))
}

fn archive_error(archive: &Path, entry: Option<&str>, reason: impl Into<String>) -> Error {
    Error::Archive {
        archive: archive.to_path_buf(),
        entry: entry.map(str::to_string),
        reason: reason.into(),
    }
}

/// Extracts the Learn2Reg entries of the zip `archive` into `out` (see the module docs),
/// reporting `(bytes written, bytes declared)` to `progress`.
///
/// # Errors
/// [`Error::Archive`] naming the archive and the entry for an unreadable archive, an
/// unsafe entry, a limit passed, a duplicate or a damaged entry; [`Error::Io`] for the
/// output. On error the caller discards `out` (a temporary folder).
pub fn extract_learn2reg(
    archive: &Path,
    out: &Path,
    limits: &ExtractLimits,
    mut progress: impl FnMut(u64, u64),
) -> Result<Extracted> {
    let file = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| archive_error(archive, None, format!("not a readable zip archive: {e}")))?;
    if zip.len() > limits.max_entries {
        return Err(archive_error(
            archive,
            None,
            format!(
                "{} entries, over the limit of {}",
                zip.len(),
                limits.max_entries
            ),
        ));
    }

    // Pass 1: headers only.
    let mut kept: Vec<(usize, String, PathBuf)> = Vec::new();
    let mut skipped = Vec::new();
    let mut declared = 0u64;
    for index in 0..zip.len() {
        let entry = zip
            .by_index_raw(index)
            .map_err(|e| archive_error(archive, None, format!("entry #{index}: {e}")))?;
        let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
        if let Some(reason) = unsafe_name(&name) {
            return Err(archive_error(archive, Some(&name), reason));
        }
        if entry.enclosed_name().is_none() {
            return Err(archive_error(archive, Some(&name), "unsafe path"));
        }
        if entry.is_symlink() {
            return Err(archive_error(
                archive,
                Some(&name),
                "symbolic links are not allowed",
            ));
        }
        if entry.encrypted() {
            return Err(archive_error(
                archive,
                Some(&name),
                "encrypted entries are not supported",
            ));
        }
        if entry.is_dir() {
            continue;
        }
        let Some(target) = target_of(&name) else {
            skipped.push(name);
            continue;
        };
        if kept.iter().any(|(_, _, t)| *t == target) {
            return Err(archive_error(
                archive,
                Some(&name),
                format!("a second entry for {}", target.display()),
            ));
        }
        declared = declared.saturating_add(entry.size());
        if declared > limits.max_total_bytes {
            return Err(archive_error(
                archive,
                Some(&name),
                format!(
                    "the archive expands to more than the limit of {} bytes",
                    limits.max_total_bytes
                ),
            ));
        }
        kept.push((index, name, target));
    }
    if kept.is_empty() {
        return Err(archive_error(
            archive,
            None,
            "no Learn2Reg entries (expected [training/]scans/case_XXX_exp.nii.gz and friends)",
        ));
    }

    // Pass 2: inflate, counting real bytes.
    let mut written = 0u64;
    progress(0, declared);
    let mut files = Vec::with_capacity(kept.len());
    for (index, name, target) in kept {
        let mut entry = zip
            .by_index(index)
            .map_err(|e| archive_error(archive, Some(&name), e.to_string()))?;
        let path = out.join(&target);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let file = std::fs::File::create_new(&path).map_err(|e| Error::io(&path, e))?;
        let mut sink = BufWriter::with_capacity(1 << 20, file);
        let allowance = limits.max_total_bytes - written;
        let mut limited = (&mut entry).take(allowance.saturating_add(1));
        let mut buf = vec![0u8; 1 << 20];
        let mut copied = 0u64;
        loop {
            let n = limited
                .read(&mut buf)
                .map_err(|e| archive_error(archive, Some(&name), format!("damaged: {e}")))?;
            if n == 0 {
                break;
            }
            copied += n as u64;
            if copied > allowance {
                return Err(archive_error(
                    archive,
                    Some(&name),
                    format!(
                        "the archive expands to more than the limit of {} bytes",
                        limits.max_total_bytes
                    ),
                ));
            }
            sink.write_all(&buf[..n]).map_err(|e| Error::io(&path, e))?;
            progress(written + copied, declared);
        }
        if copied != entry.size() {
            return Err(archive_error(
                archive,
                Some(&name),
                format!(
                    "expands to {copied} bytes, its header says {}",
                    entry.size()
                ),
            ));
        }
        sink.flush().map_err(|e| Error::io(&path, e))?;
        written += copied;
        files.push(target);
    }
    Ok(Extracted {
        files,
        bytes: written,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use medray_testkit::ZipBuilder;

    fn extract(zip: Vec<u8>, limits: ExtractLimits) -> (tempfile::TempDir, Result<Extracted>) {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.zip");
        std::fs::write(&archive, zip).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let r = extract_learn2reg(&archive, &out, &limits, |_, _| {});
        (dir, r)
    }

    fn files_under(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.path().is_dir() {
                out.extend(files_under(&entry.path()));
            } else {
                out.push(entry.path().display().to_string());
            }
        }
        out
    }

    #[test]
    fn keeps_the_layout_and_skips_the_rest() {
        let zip = ZipBuilder::new()
            .directory("training")
            .unwrap()
            .file("training/scans/case_001_exp.nii.gz", b"exp")
            .unwrap()
            .file("training/scans/case_001_insp.nii", b"insp")
            .unwrap()
            .file("training/lungMasks/case_001_exp.nii.gz", b"m")
            .unwrap()
            .file("training/keypoints/case_001.csv", b"1,2,3,4,5,6\n")
            .unwrap()
            .file("training/README.md", b"hello")
            .unwrap()
            .file("__MACOSX/training/scans/._case_001_exp.nii.gz", b"junk")
            .unwrap()
            .file("training/scans/._case_001_exp.nii.gz", b"junk")
            .unwrap()
            .finish()
            .unwrap();
        let (dir, r) = extract(zip, ExtractLimits::default());
        let r = r.unwrap();
        assert_eq!(r.files.len(), 4);
        assert_eq!(r.bytes, 3 + 4 + 1 + 12);
        assert_eq!(r.skipped.len(), 3, "{:?}", r.skipped);
        let out = dir.path().join("out");
        assert_eq!(
            std::fs::read(out.join("keypoints/case_001.csv")).unwrap(),
            b"1,2,3,4,5,6\n"
        );
        assert_eq!(
            std::fs::read(out.join("scans/case_001_insp.nii")).unwrap(),
            b"insp"
        );
        assert_eq!(files_under(&out).len(), 4);
    }

    /// Adds one entry to an archive under construction.
    type AddEntry = Box<dyn Fn(ZipBuilder) -> ZipBuilder>;

    #[test]
    fn hostile_entries_refuse_the_whole_archive_naming_the_entry() {
        let cases: Vec<(&str, AddEntry, &str)> = vec![
            (
                "../evil.nii.gz",
                Box::new(|z| z.file("../evil.nii.gz", b"x").unwrap()),
                "path traversal",
            ),
            (
                "training/scans/../../../etc/passwd",
                Box::new(|z| z.file("training/scans/../../../etc/passwd", b"x").unwrap()),
                "path traversal",
            ),
            (
                "/etc/cron.d/x",
                Box::new(|z| z.file("/etc/cron.d/x", b"x").unwrap()),
                "absolute path",
            ),
            (
                "C:\\x",
                Box::new(|z| z.file("C:\\x", b"x").unwrap()),
                "absolute path",
            ),
            (
                "training/scans/case_002_exp.nii.gz",
                Box::new(|z| {
                    z.symlink("training/scans/case_002_exp.nii.gz", "/etc/shadow")
                        .unwrap()
                }),
                "symbolic link",
            ),
        ];
        for (entry, add, why) in cases {
            let z = ZipBuilder::new()
                .file("training/scans/case_001_exp.nii.gz", b"ok")
                .unwrap();
            let (dir, r) = extract(add(z).finish().unwrap(), ExtractLimits::default());
            let err = r.unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("entry `{entry}`")), "{msg}");
            assert!(msg.contains(why), "{msg}");
            // Refused before anything was written.
            assert!(files_under(&dir.path().join("out")).is_empty(), "{entry}");
        }
    }

    #[test]
    fn limits_on_total_size_and_entry_count_refuse_the_archive() {
        let big = vec![0u8; 10_000];
        let zip = ZipBuilder::new()
            .file("scans/case_001_exp.nii", &big)
            .unwrap()
            .file("scans/case_001_insp.nii", &big)
            .unwrap()
            .finish()
            .unwrap();
        let (_d, r) = extract(
            zip.clone(),
            ExtractLimits::default().with_max_total_bytes(15_000),
        );
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("more than the limit of 15000 bytes"), "{msg}");
        assert!(msg.contains("case_001_insp.nii"), "{msg}");
        let (_d, r) = extract(zip.clone(), ExtractLimits::default().with_max_entries(1));
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("2 entries, over the limit of 1"), "{msg}");
        let (_d, r) = extract(zip, ExtractLimits::default());
        assert_eq!(r.unwrap().bytes, 20_000);
    }

    #[test]
    fn garbage_is_not_an_archive() {
        let (_d, r) = extract(b"PK not really".to_vec(), ExtractLimits::default());
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("not a readable zip archive"), "{msg}");
        let empty = ZipBuilder::new().file("notes.txt", b"x").unwrap();
        let (_d, r) = extract(empty.finish().unwrap(), ExtractLimits::default());
        assert!(r.unwrap_err().to_string().contains("no Learn2Reg entries"));
    }
}
