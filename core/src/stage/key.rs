//! The stage key: 32 random bytes for AES-256-GCM, with a short public id stored in every
//! object header so that a wrong key is reported as such rather than as corruption.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Length of a stage key in bytes (AES-256).
pub const KEY_BYTES: usize = 32;
/// Length of a key id in bytes (its hex form is twice as long).
pub const KEY_ID_BYTES: usize = 8;
/// The environment variable that may hold the stage key (hex or base64 of 32 bytes).
pub const STAGE_KEY_ENV: &str = "MEDRAY_STAGE_KEY";

/// The public id of a stage key: the first 8 bytes of `sha256("medray-stage-key" || key)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KEY_ID_BYTES]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// An AES-256-GCM key for a stage, with its id.
#[derive(Clone)]
pub struct StageKey {
    bytes: [u8; KEY_BYTES],
    id: KeyId,
}

impl std::fmt::Debug for StageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key itself.
        f.debug_struct("StageKey").field("id", &self.id).finish()
    }
}

impl StageKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        let mut h = Sha256::new();
        h.update(b"medray-stage-key");
        h.update(bytes);
        let digest = h.finalize();
        let mut id = [0u8; KEY_ID_BYTES];
        id.copy_from_slice(&digest[..KEY_ID_BYTES]);
        Self {
            bytes,
            id: KeyId(id),
        }
    }

    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; KEY_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    /// Parses a key written as hex (64 digits) or base64 (standard alphabet, 44 characters)
    /// of 32 bytes; surrounding whitespace is ignored. `source_name` names where the text
    /// came from, for the error message.
    ///
    /// # Errors
    /// [`Error::StageKey`] if the text is neither, or does not hold exactly 32 bytes.
    pub fn parse(text: &str, source_name: &str) -> Result<Self> {
        let text = text.trim();
        let decoded = if text.len() == 2 * KEY_BYTES {
            hex::decode(text).ok()
        } else {
            base64::engine::general_purpose::STANDARD.decode(text).ok()
        };
        let bytes: [u8; KEY_BYTES] =
            decoded
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| Error::StageKey {
                    source_name: source_name.to_string(),
                    reason: format!(
                        "expected {KEY_BYTES} bytes as 64 hex digits or base64, got {} characters",
                        text.len()
                    ),
                })?;
        Ok(Self::from_bytes(bytes))
    }

    /// Reads the key file at `path`, creating it (mode 0600, hex) with a fresh random key if
    /// it does not exist. Creation is race-free: the file is written aside and linked into
    /// place only if no other process created it first.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read or created; [`Error::StageKey`] if it is
    /// malformed.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        if !path.exists() {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let key = Self::generate();
            // tempfile creates files with mode 0600 on Unix.
            let mut tmp = tempfile::Builder::new()
                .prefix(".stage.key.")
                .tempfile_in(&dir)
                .map_err(|e| Error::io(&dir, e))?;
            writeln!(tmp, "{}", hex::encode(key.bytes)).map_err(|e| Error::io(tmp.path(), e))?;
            tmp.as_file()
                .sync_all()
                .map_err(|e| Error::io(tmp.path(), e))?;
            match tmp.persist_noclobber(path) {
                Ok(_) => {
                    tracing::info!(path = %path.display(), key_id = %key.id, "created stage key");
                    return Ok(key);
                }
                Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(path, e.error)),
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The key's public id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The raw key bytes.
    pub(crate) fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_hex_and_base64_and_rejects_short_keys() {
        let key = StageKey::from_bytes([7; 32]);
        let hex_text = hex::encode([7u8; 32]);
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(StageKey::parse(&hex_text, "t").unwrap().id(), key.id());
        assert_eq!(StageKey::parse(&b64, "t").unwrap().id(), key.id());
        let err = StageKey::parse("abcd", "MEDRAY_STAGE_KEY").unwrap_err();
        assert!(err.to_string().contains("MEDRAY_STAGE_KEY"), "{err}");
    }

    #[test]
    fn key_file_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/stage.key");
        let a = StageKey::load_or_create(&path).unwrap();
        let b = StageKey::load_or_create(&path).unwrap();
        assert_eq!(a.id(), b.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
