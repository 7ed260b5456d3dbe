//! Moving inference outputs written before the dataset was part of their key.
//!
//! Outputs used to live under `results/<model>/<version>/<case>_...`, so two datasets with
//! the same case ids inferred with one model version wrote the same objects, and both rows
//! pointed at whichever ran last. They now live under `results/<dataset>/<model>/<version>/`
//! ([`super::results_prefix`]). [`key_outputs_by_dataset`] moves what an older head wrote:
//! for each old key that rows name, it copies the object to each naming row's dataset
//! folder (the case picture too), points those rows at the copies in one transaction, and
//! then deletes the old object. A crash part way leaves every row pointing at an object
//! that exists; running it again finishes the work (it runs at every head start).
//!
//! An old object two datasets shared holds the outputs of the one that ran last; after the
//! move each dataset has its own copy of it, which for the other dataset is not its own
//! result. That was lost before this layout; the row's metrics are its own.

use std::collections::BTreeMap;

use rusqlite::{params, TransactionBehavior};

use super::{IMAGE_SUFFIX, PNG_SUFFIX};
use crate::catalog::Catalog;
use crate::stage::{ObjectKey, Stage};
use crate::{Error, Result};

/// The result columns that hold output keys.
const KEY_COLUMNS: [&str; 3] = ["output_image", "output_label", "output_ddf"];

/// Whether `key` is in the old layout: `results/<model>/<version>/<file>` (one folder
/// fewer than `results/<dataset>/<model>/<version>/<file>`).
fn is_old(key: &str) -> bool {
    key.starts_with("results/") && key.split('/').count() == 4
}

/// The new key of an old one, for `dataset`.
fn new_key(dataset: &str, old: &str) -> String {
    format!(
        "results/{dataset}/{}",
        old.strip_prefix("results/").unwrap_or(old)
    )
}

/// The case picture stored next to a registered image, if the key is one.
fn picture_of(image_key: &str) -> Option<String> {
    image_key
        .strip_suffix(IMAGE_SUFFIX)
        .map(|p| format!("{p}{PNG_SUFFIX}"))
}

/// Moves every output an older head wrote into its dataset's folder; the number of old
/// objects moved.
///
/// # Errors
/// Stage or catalog errors naming the key or the statement; what was done before stays
/// consistent.
pub async fn key_outputs_by_dataset(stage: &Stage, catalog: &mut Catalog) -> Result<usize> {
    let err = |e| Error::catalog("moving result outputs", e);
    // Each old key, and the datasets of the rows that name it.
    let mut old: BTreeMap<String, Vec<String>> = BTreeMap::new();
    {
        let mut stmt = catalog
            .conn()
            .prepare("SELECT dataset, output_image, output_label, output_ddf FROM results")
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    [
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ],
                ))
            })
            .map_err(err)?;
        for row in rows {
            let (dataset, keys) = row.map_err(err)?;
            for key in keys.into_iter().flatten().filter(|k| is_old(k)) {
                let datasets = old.entry(key).or_default();
                if !datasets.contains(&dataset) {
                    datasets.push(dataset.clone());
                }
            }
        }
    }
    for (key, datasets) in &old {
        let from = ObjectKey::new(key.clone())?;
        let picture = picture_of(key).map(ObjectKey::new).transpose()?;
        let bytes = if stage.exists(&from).await? {
            Some(stage.get(&from).await?)
        } else {
            None
        };
        let picture_bytes = match &picture {
            Some(p) if stage.exists(p).await? => Some(stage.get(p).await?),
            _ => None,
        };
        for dataset in datasets {
            if let Some(bytes) = &bytes {
                stage
                    .put(&ObjectKey::new(new_key(dataset, key))?, bytes)
                    .await?;
            }
            if let (Some(p), Some(b)) = (&picture, &picture_bytes) {
                stage
                    .put(&ObjectKey::new(new_key(dataset, p.as_str()))?, b)
                    .await?;
            }
        }
        // The rows follow their copies, all at once.
        let tx = catalog
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        for column in KEY_COLUMNS {
            tx.execute(
                &format!(
                    "UPDATE results SET {column} = 'results/' || dataset || '/' || substr({column}, 9)
                     WHERE {column} = ?1"
                ),
                params![key],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        if bytes.is_some() {
            stage.delete(&from).await?;
        }
        if let (Some(p), Some(_)) = (&picture, &picture_bytes) {
            stage.delete(p).await?;
        }
    }
    Ok(old.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::results::{list_results, record_results, ResultFilter, ResultRow, DDF_SUFFIX};

    /// Issue 18 item 3: rows of two datasets that share case ids, written by an older head,
    /// pointed at one set of objects. After the move each dataset's rows point at their own
    /// copies under `results/<dataset>/`, the old objects are gone, and a second run changes
    /// nothing.
    #[tokio::test]
    async fn old_outputs_move_into_their_datasets_folders() {
        let dir = tempfile::tempdir().unwrap();
        let stage = Stage::open(
            crate::stage::StageLocation::Local(dir.path().join("stage")),
            None,
        )
        .unwrap();
        let mut catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let old_image = format!("results/m/v1/case_001{IMAGE_SUFFIX}");
        let old_ddf = format!("results/m/v1/case_001{DDF_SUFFIX}");
        let old_png = format!("results/m/v1/case_001{PNG_SUFFIX}");
        for (key, bytes) in [
            (&old_image, b"image".as_slice()),
            (&old_ddf, b"ddf"),
            (&old_png, b"png"),
        ] {
            stage
                .put(&ObjectKey::new(key.clone()).unwrap(), bytes)
                .await
                .unwrap();
        }
        let rows: Vec<ResultRow> = ["a", "b"]
            .into_iter()
            .map(|dataset| {
                let mut r = super::super::tests::row("case_001", "v1", 0.5, "job-1");
                r.dataset = crate::catalog::DatasetName::new(dataset).unwrap();
                r.output_image = Some(old_image.clone());
                r.output_ddf = Some(old_ddf.clone());
                r.output_label = None;
                r
            })
            .collect();
        record_results(&mut catalog, &rows).unwrap();

        assert_eq!(
            key_outputs_by_dataset(&stage, &mut catalog).await.unwrap(),
            2
        );
        for dataset in ["a", "b"] {
            let rows = list_results(
                &catalog,
                &ResultFilter {
                    dataset: Some(dataset.into()),
                    ..ResultFilter::default()
                },
            )
            .unwrap();
            let image = rows[0].output_image.clone().unwrap();
            assert_eq!(
                image,
                format!("results/{dataset}/m/v1/case_001{IMAGE_SUFFIX}")
            );
            let image = ObjectKey::new(image).unwrap();
            assert_eq!(stage.get(&image).await.unwrap(), b"image");
            let png =
                ObjectKey::new(format!("results/{dataset}/m/v1/case_001{PNG_SUFFIX}")).unwrap();
            assert_eq!(stage.get(&png).await.unwrap(), b"png");
        }
        for key in [&old_image, &old_ddf, &old_png] {
            assert!(!stage
                .exists(&ObjectKey::new(key.clone()).unwrap())
                .await
                .unwrap());
        }
        assert_eq!(
            key_outputs_by_dataset(&stage, &mut catalog).await.unwrap(),
            0
        );
    }
}
