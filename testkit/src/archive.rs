//! Zip archives built in memory for tests: from a folder, and entry by entry (hostile
//! entries included, which is the point).

use std::io::{Cursor, Write};
use std::path::Path;

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

fn io(e: zip::result::ZipError) -> std::io::Error {
    std::io::Error::other(e)
}

/// Builds a zip archive in memory.
pub struct ZipBuilder {
    writer: ZipWriter<Cursor<Vec<u8>>>,
}

impl std::fmt::Debug for ZipBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZipBuilder").finish_non_exhaustive()
    }
}

impl Default for ZipBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ZipBuilder {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            writer: ZipWriter::new(Cursor::new(Vec::new())),
        }
    }

    /// Adds a regular file named `name` (taken as is: no normalisation). Files ending in
    /// `.gz` are stored, others deflated, as `zip` does with already-compressed files.
    ///
    /// # Errors
    /// If the zip writer refuses the entry.
    pub fn file(mut self, name: &str, data: &[u8]) -> std::io::Result<Self> {
        let method = if name.ends_with(".gz") {
            CompressionMethod::Stored
        } else {
            CompressionMethod::Deflated
        };
        let options = SimpleFileOptions::default()
            .compression_method(method)
            .large_file(data.len() as u64 >= u64::from(u32::MAX));
        self.writer.start_file(name, options).map_err(io)?;
        self.writer.write_all(data)?;
        Ok(self)
    }

    /// Adds a directory entry `name/`.
    ///
    /// # Errors
    /// If the zip writer refuses the entry.
    pub fn directory(mut self, name: &str) -> std::io::Result<Self> {
        self.writer
            .add_directory(name, SimpleFileOptions::default())
            .map_err(io)?;
        Ok(self)
    }

    /// Adds a symbolic link `name` pointing at `target`.
    ///
    /// # Errors
    /// If the zip writer refuses the entry.
    pub fn symlink(mut self, name: &str, target: &str) -> std::io::Result<Self> {
        self.writer
            .add_symlink(name, target, SimpleFileOptions::default())
            .map_err(io)?;
        Ok(self)
    }

    /// Adds every file under `dir`, recursively and in name order, as `under/<relative
    /// path>` (or `<relative path>` when `under` is empty), with a directory entry for
    /// each folder.
    ///
    /// # Errors
    /// If a file cannot be read or the zip writer refuses an entry.
    pub fn tree(mut self, dir: &Path, under: &str) -> std::io::Result<Self> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        if !under.is_empty() {
            self = self.directory(under)?;
        }
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let inner = if under.is_empty() {
                name
            } else {
                format!("{under}/{name}")
            };
            if entry.file_type()?.is_dir() {
                self = self.tree(&entry.path(), &inner)?;
            } else {
                let data = std::fs::read(entry.path())?;
                self = self.file(&inner, &data)?;
            }
        }
        Ok(self)
    }

    /// The archive's bytes.
    ///
    /// # Errors
    /// If the central directory cannot be written.
    pub fn finish(self) -> std::io::Result<Vec<u8>> {
        Ok(self.writer.finish().map_err(io)?.into_inner())
    }
}
