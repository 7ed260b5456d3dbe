//! The catalog: an embedded SQLite database (WAL mode) recording what has been published —
//! datasets and their cases, jobs, the model registry ([`crate::models`]) and inference
//! results ([`crate::results`]); [`query`] runs read-only SQL on it. The schema evolves through the versioned [`migrations`]; the current version is
//! kept in `schema_version`.
//!
//! A dataset is published in one transaction, so it is either fully visible or not at all.

pub mod migrations;
pub mod query;
pub mod record;

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

pub use record::{CaseId, CaseRecord, DatasetName, DatasetRecord, StoredFile};

use crate::stage::ObjectKey;
use crate::{Error, Result};

/// What [`Catalog::publish`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum PublishOutcome {
    /// The dataset is new.
    Created,
    /// A dataset with this name and the same content was already published: nothing changed.
    Unchanged,
    /// The dataset replaced an older version; these are the old version's cases (their
    /// objects are no longer referenced).
    Replaced {
        /// The cases of the replaced version.
        old_cases: Vec<CaseRecord>,
    },
}

/// A dataset about to be published.
#[derive(Debug, Clone)]
pub struct NewDataset<'a> {
    /// Its name.
    pub name: &'a DatasetName,
    /// Where it came from.
    pub source: &'a str,
    /// Total plaintext bytes of its files.
    pub bytes: u64,
    /// sha256 of its content (see [`DatasetRecord::content_sha256`]).
    pub content_sha256: &'a str,
    /// Its cases.
    pub cases: &'a [CaseRecord],
}

/// An open catalog database.
#[derive(Debug)]
pub struct Catalog {
    conn: Connection,
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|source| Error::Json {
        path: "catalog".into(),
        source,
    })
}

fn from_json<T: serde::de::DeserializeOwned>(idx: usize, text: String) -> rusqlite::Result<T> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn key_from(idx: usize, text: String) -> rusqlite::Result<ObjectKey> {
    ObjectKey::new(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn file_from(row: &rusqlite::Row<'_>, key_idx: usize) -> rusqlite::Result<Option<StoredFile>> {
    let key: Option<String> = row.get(key_idx)?;
    let sha: Option<String> = row.get(key_idx + 1)?;
    match (key, sha) {
        (Some(k), Some(sha256)) => Ok(Some(StoredFile {
            key: key_from(key_idx, k)?,
            sha256,
        })),
        _ => Ok(None),
    }
}

fn name_from(idx: usize, text: String) -> rusqlite::Result<DatasetName> {
    DatasetName::new(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

const DATASET_COLUMNS: &str = "name, source, created_at, case_count, bytes, content_sha256";

fn dataset_from(row: &rusqlite::Row<'_>) -> rusqlite::Result<DatasetRecord> {
    Ok(DatasetRecord {
        name: name_from(0, row.get(0)?)?,
        source: row.get(1)?,
        created_at: row.get(2)?,
        case_count: row.get::<_, i64>(3)? as usize,
        bytes: row.get::<_, i64>(4)? as u64,
        content_sha256: row.get(5)?,
    })
}

fn opt_key(f: &Option<StoredFile>) -> (Option<&str>, Option<&str>) {
    match f {
        Some(f) => (Some(f.key.as_str()), Some(f.sha256.as_str())),
        None => (None, None),
    }
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path`, in WAL mode, and applies pending
    /// migrations.
    ///
    /// # Errors
    /// [`Error::Catalog`] if the database cannot be opened or migrated; [`Error::Io`] if its
    /// directory cannot be created.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let conn = Connection::open(path).map_err(|e| Error::catalog("open", e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| Error::catalog("enable WAL", e))?;
        Self::init(conn)
    }

    /// An empty catalog in memory (tests).
    ///
    /// # Errors
    /// [`Error::Catalog`] if SQLite fails.
    pub fn open_in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory().map_err(|e| Error::catalog("open", e))?)
    }

    fn init(conn: Connection) -> Result<Self> {
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| Error::catalog("busy timeout", e))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| Error::catalog("enable foreign keys", e))?;
        let mut catalog = Self { conn };
        catalog.migrate()?;
        Ok(catalog)
    }

    fn migrate(&mut self) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Error::catalog("migrate", e))?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .map_err(|e| Error::catalog("migrate", e))?;
        let current: Option<i64> = tx
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
            .map_err(|e| Error::catalog("read schema version", e))?;
        let current = current.unwrap_or(0) as usize;
        if current > migrations::MIGRATIONS.len() {
            return Err(Error::invalid(
                "catalog",
                format!(
                    "schema version {current} is newer than this medray ({}); upgrade medray",
                    migrations::MIGRATIONS.len()
                ),
            ));
        }
        for (i, sql) in migrations::MIGRATIONS.iter().enumerate().skip(current) {
            tx.execute_batch(sql)
                .map_err(|e| Error::catalog("apply migration", e))?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [(i + 1) as i64],
            )
            .map_err(|e| Error::catalog("apply migration", e))?;
            tracing::info!(version = i + 1, "catalog migrated");
        }
        tx.commit().map_err(|e| Error::catalog("migrate", e))
    }

    /// The connection, for the other catalog modules ([`crate::models`]).
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The connection, mutable (for transactions in the other catalog modules).
    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// The schema version (the number of migrations applied).
    ///
    /// # Errors
    /// [`Error::Catalog`] if SQLite fails.
    pub fn schema_version(&self) -> Result<usize> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
            .map_err(|e| Error::catalog("read schema version", e))?;
        Ok(v.unwrap_or(0) as usize)
    }

    /// The dataset called `name`, if published.
    ///
    /// # Errors
    /// [`Error::Catalog`] if SQLite fails.
    pub fn dataset(&self, name: &DatasetName) -> Result<Option<DatasetRecord>> {
        self.conn
            .query_row(
                &format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE name = ?1"),
                [name.as_str()],
                dataset_from,
            )
            .optional()
            .map_err(|e| Error::catalog("read dataset", e))
    }

    /// All published datasets, by name.
    ///
    /// # Errors
    /// [`Error::Catalog`] if SQLite fails.
    pub fn datasets(&self) -> Result<Vec<DatasetRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {DATASET_COLUMNS} FROM datasets ORDER BY name"
            ))
            .map_err(|e| Error::catalog("list datasets", e))?;
        let rows = stmt
            .query_map([], dataset_from)
            .map_err(|e| Error::catalog("list datasets", e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| Error::catalog("list datasets", e))
    }

    /// The cases of dataset `name`, by case id (empty if it does not exist).
    ///
    /// # Errors
    /// [`Error::Catalog`] if SQLite fails.
    pub fn cases(&self, name: &DatasetName) -> Result<Vec<CaseRecord>> {
        Self::cases_in(&self.conn, name)
    }

    fn cases_in(conn: &Connection, name: &DatasetName) -> Result<Vec<CaseRecord>> {
        let mut stmt = conn
            .prepare(
                "SELECT case_id, fixed_key, fixed_sha256, moving_key, moving_sha256,
                        fixed_mask_key, fixed_mask_sha256, moving_mask_key, moving_mask_sha256,
                        keypoints_key, keypoints_sha256, shape, spacing_mm, affine,
                        intensity_min, intensity_max, keypoint_count
                 FROM cases WHERE dataset = ?1 ORDER BY case_id",
            )
            .map_err(|e| Error::catalog("list cases", e))?;
        let rows = stmt
            .query_map([name.as_str()], |row| {
                let case_id = CaseId::new(row.get::<_, String>(0)?).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?;
                let required = |idx: usize| -> rusqlite::Result<StoredFile> {
                    Ok(StoredFile {
                        key: key_from(idx, row.get(idx)?)?,
                        sha256: row.get(idx + 1)?,
                    })
                };
                Ok(CaseRecord {
                    case_id,
                    fixed: required(1)?,
                    moving: required(3)?,
                    fixed_mask: file_from(row, 5)?,
                    moving_mask: file_from(row, 7)?,
                    keypoints: file_from(row, 9)?,
                    shape: from_json(11, row.get(11)?)?,
                    spacing_mm: from_json(12, row.get(12)?)?,
                    affine: from_json(13, row.get(13)?)?,
                    intensity_min: row.get(14)?,
                    intensity_max: row.get(15)?,
                    keypoint_count: row.get::<_, i64>(16)? as usize,
                })
            })
            .map_err(|e| Error::catalog("list cases", e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| Error::catalog("list cases", e))
    }

    /// Publishes `dataset` and its cases in one transaction.
    ///
    /// If a dataset of that name exists with the same `content_sha256`, nothing changes
    /// ([`PublishOutcome::Unchanged`]). With other content it is replaced when `replace` is
    /// set ([`PublishOutcome::Replaced`], in the same transaction), refused otherwise.
    ///
    /// # Errors
    /// [`Error::DatasetExists`] for other content without `replace`; [`Error::Catalog`] if
    /// SQLite fails (then nothing changed).
    pub fn publish(&mut self, dataset: &NewDataset<'_>, replace: bool) -> Result<PublishOutcome> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Error::catalog("begin publish", e))?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT content_sha256 FROM datasets WHERE name = ?1",
                [dataset.name.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| Error::catalog("publish", e))?;
        let mut outcome = PublishOutcome::Created;
        if let Some(existing) = existing {
            if existing == dataset.content_sha256 {
                return Ok(PublishOutcome::Unchanged);
            }
            if !replace {
                return Err(Error::DatasetExists {
                    name: dataset.name.to_string(),
                    existing_sha256: existing,
                    new_sha256: dataset.content_sha256.to_string(),
                });
            }
            let old_cases = Self::cases_in(&tx, dataset.name)?;
            tx.execute(
                "DELETE FROM datasets WHERE name = ?1",
                [dataset.name.as_str()],
            )
            .map_err(|e| Error::catalog("publish", e))?;
            outcome = PublishOutcome::Replaced { old_cases };
        }
        tx.execute(
            "INSERT INTO datasets (name, source, created_at, case_count, bytes, content_sha256)
             VALUES (?1, ?2, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), ?3, ?4, ?5)",
            params![
                dataset.name.as_str(),
                dataset.source,
                dataset.cases.len() as i64,
                dataset.bytes as i64,
                dataset.content_sha256
            ],
        )
        .map_err(|e| Error::catalog("publish", e))?;
        {
            let mut stmt = tx
                .prepare(
                    "INSERT INTO cases (dataset, case_id, fixed_key, fixed_sha256, moving_key,
                        moving_sha256, fixed_mask_key, fixed_mask_sha256, moving_mask_key,
                        moving_mask_sha256, keypoints_key, keypoints_sha256, shape, spacing_mm,
                        affine, intensity_min, intensity_max, keypoint_count)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                        ?16, ?17, ?18)",
                )
                .map_err(|e| Error::catalog("publish", e))?;
            for c in dataset.cases {
                let (fmk, fms) = opt_key(&c.fixed_mask);
                let (mmk, mms) = opt_key(&c.moving_mask);
                let (kk, ks) = opt_key(&c.keypoints);
                stmt.execute(params![
                    dataset.name.as_str(),
                    c.case_id.as_str(),
                    c.fixed.key.as_str(),
                    c.fixed.sha256,
                    c.moving.key.as_str(),
                    c.moving.sha256,
                    fmk,
                    fms,
                    mmk,
                    mms,
                    kk,
                    ks,
                    json(&c.shape)?,
                    json(&c.spacing_mm)?,
                    json(&c.affine)?,
                    c.intensity_min,
                    c.intensity_max,
                    c.keypoint_count as i64
                ])
                .map_err(|e| Error::catalog("publish case", e))?;
            }
        }
        tx.commit()
            .map_err(|e| Error::catalog("commit publish", e))?;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn case(id: &str, prefix: &str) -> CaseRecord {
        let f = |k: &str| StoredFile {
            key: ObjectKey::new(format!("{prefix}/{k}/{id}")).unwrap(),
            sha256: "ab".repeat(32),
        };
        CaseRecord {
            case_id: CaseId::new(id).unwrap(),
            fixed: f("scansExp"),
            moving: f("scansInsp"),
            fixed_mask: Some(f("lungMasksExp")),
            moving_mask: None,
            keypoints: Some(f("keypoints")),
            shape: [16, 16, 20],
            spacing_mm: [1.0, 1.0, 1.5],
            affine: [[1.0, 0.0, 0.0, 0.0]; 4],
            intensity_min: -1000.0,
            intensity_max: 300.0,
            keypoint_count: 7,
        }
    }

    #[test]
    fn migrations_are_versioned_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.schema_version().unwrap(), migrations::MIGRATIONS.len());
        drop(c);
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.schema_version().unwrap(), migrations::MIGRATIONS.len());
        let mode: String = c
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode.to_lowercase(), "wal");
    }

    #[test]
    fn publish_is_idempotent_and_refuses_other_content_without_replace() {
        let mut c = Catalog::open_in_memory().unwrap();
        let name = DatasetName::new("d").unwrap();
        let cases = vec![
            case("case_001", "datasets/d"),
            case("case_002", "datasets/d"),
        ];
        let new = NewDataset {
            name: &name,
            source: "test",
            bytes: 10,
            content_sha256: "aaa",
            cases: &cases,
        };
        assert_eq!(c.publish(&new, false).unwrap(), PublishOutcome::Created);
        assert_eq!(c.publish(&new, false).unwrap(), PublishOutcome::Unchanged);
        assert_eq!(c.cases(&name).unwrap(), cases);
        let d = c.dataset(&name).unwrap().unwrap();
        assert_eq!((d.case_count, d.bytes), (2, 10));
        assert!(d.created_at.ends_with('Z'));

        let other = vec![case("case_009", "datasets/d/v-x")];
        let new2 = NewDataset {
            content_sha256: "bbb",
            cases: &other,
            ..new
        };
        assert!(matches!(
            c.publish(&new2, false).unwrap_err(),
            Error::DatasetExists { .. }
        ));
        assert_eq!(c.cases(&name).unwrap(), cases);
        let PublishOutcome::Replaced { old_cases } = c.publish(&new2, true).unwrap() else {
            panic!("expected a replacement");
        };
        assert_eq!(old_cases, cases);
        assert_eq!(c.cases(&name).unwrap(), other);
        assert_eq!(c.datasets().unwrap().len(), 1);
    }

    #[test]
    fn a_failing_case_insert_publishes_nothing() {
        let mut c = Catalog::open_in_memory().unwrap();
        let name = DatasetName::new("d").unwrap();
        // Two cases with the same id violate the primary key half way through.
        let cases = vec![case("case_001", "x"), case("case_001", "x")];
        let new = NewDataset {
            name: &name,
            source: "test",
            bytes: 1,
            content_sha256: "a",
            cases: &cases,
        };
        assert!(c.publish(&new, false).is_err());
        assert!(c.dataset(&name).unwrap().is_none());
        assert!(c.datasets().unwrap().is_empty());
    }
}
