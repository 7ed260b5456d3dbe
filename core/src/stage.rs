//! Stages: object storage for datasets, checkpoints and results, one API over a local
//! directory (the default) and S3-compatible buckets, through the `object_store` crate.
//!
//! Objects are encrypted at rest by default (AES-256-GCM, see [`envelope`]); the key comes
//! from a key file created on first use or from `MEDRAY_STAGE_KEY` (see [`key`]). Writes are
//! atomic: the local backend writes a staging file and renames it into place, S3 commits a
//! whole object per request, so a reader never sees a partial object.
//!
//! The API is async (the S3 backend is); blocking callers drive it with a Tokio runtime.

pub mod envelope;
pub mod key;
pub mod location;

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

pub use key::{KeyId, StageKey, STAGE_KEY_ENV};
pub use location::{S3Options, StageLocation};

use crate::{Error, Result};

/// The key of an object in a stage: `/`-separated, relative, without empty, `.` or `..`
/// segments (e.g. `datasets/lung/scansExp/case_001_exp.nii.gz`).
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct ObjectKey(String);

impl TryFrom<String> for ObjectKey {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl From<ObjectKey> for String {
    fn from(k: ObjectKey) -> Self {
        k.0
    }
}

impl ObjectKey {
    /// Validates `key`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty key, a leading `/`, or an empty, `.` or `..`
    /// segment.
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        let bad = key.is_empty()
            || key
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == ".." || s.contains('\\'));
        if bad {
            return Err(Error::invalid(
                "object key",
                format!("`{key}`: expected a relative a/b/c path without empty, `.` or `..` parts"),
            ));
        }
        Ok(Self(key))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn store_path(&self) -> StorePath {
        StorePath::from(self.0.as_str())
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One object found by [`Stage::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key.
    pub key: ObjectKey,
    /// Stored size in bytes (including the encryption header and tag).
    pub stored_bytes: u64,
}

/// A stage: an object store plus the encryption key (none: objects stored in clear).
#[derive(Clone, Debug)]
pub struct Stage {
    store: Arc<dyn ObjectStore>,
    location: StageLocation,
    key: Option<StageKey>,
}

impl Stage {
    /// Opens the stage at `location`. With `key`, objects are encrypted at rest; `None`
    /// stores them in clear (only for data that is not sensitive).
    ///
    /// # Errors
    /// See [`StageLocation::open`].
    pub fn open(location: StageLocation, key: Option<StageKey>) -> Result<Self> {
        Self::open_with(location, key, &S3Options::default())
    }

    /// As [`Stage::open`], with S3 settings that override the `AWS_*` environment.
    ///
    /// # Errors
    /// See [`StageLocation::open_with`].
    pub fn open_with(
        location: StageLocation,
        key: Option<StageKey>,
        s3: &S3Options,
    ) -> Result<Self> {
        let store = location.open_with(s3)?;
        Ok(Self {
            store,
            location,
            key,
        })
    }

    /// Where this stage lives.
    pub fn location(&self) -> &StageLocation {
        &self.location
    }

    /// The id of the encryption key, if objects are encrypted.
    pub fn key_id(&self) -> Option<KeyId> {
        self.key.as_ref().map(StageKey::id)
    }

    /// Stores `data` under `key` atomically (encrypting it if the stage has a key), replacing
    /// any previous object. Returns the stored size in bytes.
    ///
    /// # Errors
    /// [`Error::Stage`] if the store refuses the write.
    #[tracing::instrument(skip(self, data), fields(key = %key, bytes = data.len()))]
    pub async fn put(&self, key: &ObjectKey, data: &[u8]) -> Result<u64> {
        let stored = match &self.key {
            Some(k) => envelope::seal(k, key.as_str(), data)?,
            None => data.to_vec(),
        };
        let n = stored.len() as u64;
        self.store
            .put(&key.store_path(), PutPayload::from(stored))
            .await
            .map_err(|e| Error::stage("put", key.as_str(), e))?;
        Ok(n)
    }

    /// Reads and (if the stage has a key) decrypts the object at `key`.
    ///
    /// # Errors
    /// [`Error::Stage`] if it cannot be read (e.g. it does not exist);
    /// [`Error::WrongStageKey`] / [`Error::Decrypt`] if it was encrypted with another key or
    /// was damaged: no data is returned then.
    #[tracing::instrument(skip(self), fields(key = %key))]
    pub async fn get(&self, key: &ObjectKey) -> Result<Vec<u8>> {
        let stored = self.get_stored(key).await?;
        match &self.key {
            Some(k) => envelope::open(k, key.as_str(), &stored),
            None => Ok(stored),
        }
    }

    /// The bytes as stored (ciphertext when encrypted), without decrypting.
    ///
    /// # Errors
    /// [`Error::Stage`] if it cannot be read.
    pub async fn get_stored(&self, key: &ObjectKey) -> Result<Vec<u8>> {
        let result = self
            .store
            .get(&key.store_path())
            .await
            .map_err(|e| Error::stage("get", key.as_str(), e))?;
        let bytes = result
            .bytes()
            .await
            .map_err(|e| Error::stage("get", key.as_str(), e))?;
        Ok(bytes.to_vec())
    }

    /// Whether an object exists at `key`.
    ///
    /// # Errors
    /// [`Error::Stage`] if the store cannot be asked.
    pub async fn exists(&self, key: &ObjectKey) -> Result<bool> {
        match self.store.head(&key.store_path()).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::stage("head", key.as_str(), e)),
        }
    }

    /// Deletes the object at `key`; deleting a missing object is not an error.
    ///
    /// # Errors
    /// [`Error::Stage`] if the store refuses.
    pub async fn delete(&self, key: &ObjectKey) -> Result<()> {
        match self.store.delete(&key.store_path()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::stage("delete", key.as_str(), e)),
        }
    }

    /// Lists the objects whose key starts with the path `prefix` (whole segments: `a/b`
    /// matches `a/b/c`, not `a/bc`; empty lists everything), ordered by key.
    ///
    /// # Errors
    /// [`Error::Stage`] if the store cannot be listed.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let prefix = prefix.trim_matches('/');
        let path = (!prefix.is_empty()).then(|| StorePath::from(prefix));
        let metas: Vec<_> = self
            .store
            .list(path.as_ref())
            .try_collect()
            .await
            .map_err(|e| Error::stage("list", prefix, e))?;
        let mut out = metas
            .into_iter()
            .map(|m| {
                Ok(ObjectInfo {
                    key: ObjectKey::new(m.location.to_string())?,
                    stored_bytes: m.size,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(s: &str) -> ObjectKey {
        ObjectKey::new(s).unwrap()
    }

    fn local(dir: &std::path::Path, k: Option<StageKey>) -> Stage {
        Stage::open(StageLocation::Local(dir.to_path_buf()), k).unwrap()
    }

    #[test]
    fn object_keys_refuse_traversal() {
        for bad in ["", "/a", "a//b", "a/../b", "..", "a/./b", "a/"] {
            assert!(ObjectKey::new(bad).is_err(), "{bad}");
        }
        assert!(ObjectKey::new("datasets/x/case_001.csv").is_ok());
    }

    #[tokio::test]
    async fn encrypted_round_trip_stores_ciphertext_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let stage = local(dir.path(), Some(StageKey::from_bytes([3; 32])));
        let plain = b"plaintext voxels ".repeat(100);
        let k = key("datasets/d/scansExp/case_001_exp.nii.gz");
        stage.put(&k, &plain).await.unwrap();
        let on_disk = std::fs::read(dir.path().join(k.as_str())).unwrap();
        assert_ne!(on_disk, plain);
        assert!(!on_disk.windows(17).any(|w| w == b"plaintext voxels "));
        assert_eq!(stage.get(&k).await.unwrap(), plain);
        // Only the object itself is left in its folder: no staging files.
        let folder = dir.path().join("datasets/d/scansExp");
        assert_eq!(std::fs::read_dir(folder).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn a_flipped_byte_on_disk_is_detected_and_no_data_returned() {
        let dir = tempfile::tempdir().unwrap();
        let stage = local(dir.path(), Some(StageKey::from_bytes([3; 32])));
        let k = key("a/b.bin");
        stage.put(&k, b"secret scan").await.unwrap();
        let path = dir.path().join("a/b.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        std::fs::write(&path, &bytes).unwrap();
        let err = stage.get(&k).await.unwrap_err();
        assert!(matches!(err, Error::Decrypt { .. }), "{err}");
        assert!(err.to_string().contains("a/b.bin"), "{err}");
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let a = local(dir.path(), Some(StageKey::from_bytes([3; 32])));
        let b = local(dir.path(), Some(StageKey::from_bytes([4; 32])));
        let k = key("x");
        a.put(&k, b"data").await.unwrap();
        let err = b.get(&k).await.unwrap_err();
        assert!(matches!(err, Error::WrongStageKey { .. }), "{err}");
        assert!(err.to_string().contains("stage key"), "{err}");
    }

    #[tokio::test]
    async fn list_exists_delete() {
        let dir = tempfile::tempdir().unwrap();
        let stage = local(dir.path(), Some(StageKey::from_bytes([3; 32])));
        for k in ["d/a/1", "d/a/2", "d/ab/3", "e/4"] {
            stage.put(&key(k), k.as_bytes()).await.unwrap();
        }
        let names = |v: Vec<ObjectInfo>| {
            v.into_iter()
                .map(|o| o.key.as_str().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(stage.list("d/a").await.unwrap()), ["d/a/1", "d/a/2"]);
        assert_eq!(stage.list("").await.unwrap().len(), 4);
        assert!(stage.exists(&key("e/4")).await.unwrap());
        stage.delete(&key("e/4")).await.unwrap();
        stage.delete(&key("e/4")).await.unwrap();
        assert!(!stage.exists(&key("e/4")).await.unwrap());
        assert!(matches!(
            stage.get(&key("e/4")).await.unwrap_err(),
            Error::Stage { .. }
        ));
    }

    #[tokio::test]
    async fn unencrypted_stage_stores_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let stage = local(dir.path(), None);
        stage.put(&key("p"), b"clear").await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("p")).unwrap(), b"clear");
    }
}
