//! What a worker may read and write through the head: the objects of the task attempts it
//! holds, and only the outputs of those attempts (issue 18: a worker must not read every
//! decrypted object, nor overwrite another job's state).

use medray_core::catalog::DatasetName;
use medray_core::results::OUTPUT_SUFFIXES;
use medray_proto::v1::task_assignment::Kind;
use medray_proto::v1::{StageRef, TaskAssignment};

/// Whether attempt `a` may read stage object `key` (an already validated key):
/// - a selftest its case's two images;
/// - an inference task its case's files and its model's weights;
/// - a training replica the objects of the dataset it trains on (its coordinator sends the
///   case list; every version of the dataset lives under `datasets/<name>/`).
#[must_use]
pub fn may_read(a: &TaskAssignment, key: &str) -> bool {
    let named = |r: &Option<StageRef>| {
        r.as_ref()
            .is_some_and(|r| !r.key.is_empty() && r.key == key)
    };
    match &a.kind {
        Some(Kind::Selftest(t)) => key == t.fixed_key || key == t.moving_key,
        Some(Kind::Infer(t)) => [
            &t.fixed,
            &t.moving,
            &t.fixed_mask,
            &t.moving_mask,
            &t.keypoints,
            &t.weights,
        ]
        .into_iter()
        .any(named),
        Some(Kind::Train(t)) => {
            DatasetName::new(t.dataset.clone()).is_ok()
                && key
                    .strip_prefix("datasets/")
                    .and_then(|rest| rest.strip_prefix(t.dataset.as_str()))
                    .is_some_and(|rest| rest.starts_with('/'))
        }
        None => false,
    }
}

/// Whether attempt `a` may write stage object `key`: an inference task its own case's
/// outputs (`<output_prefix><case><suffix>` for the suffixes in
/// [`OUTPUT_SUFFIXES`]); nothing else writes through `PutObject`.
#[must_use]
pub fn may_write(a: &TaskAssignment, key: &str) -> bool {
    match &a.kind {
        Some(Kind::Infer(t)) => {
            !t.output_prefix.is_empty()
                && !t.case_id.is_empty()
                && key
                    .strip_prefix(t.output_prefix.as_str())
                    .and_then(|rest| rest.strip_prefix(t.case_id.as_str()))
                    .is_some_and(|suffix| OUTPUT_SUFFIXES.contains(&suffix))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medray_proto::v1::{InferTask, SelftestTask, TrainTask};

    fn stage_ref(key: &str) -> Option<StageRef> {
        Some(StageRef {
            key: key.into(),
            ..StageRef::default()
        })
    }

    fn infer() -> TaskAssignment {
        TaskAssignment {
            kind: Some(Kind::Infer(Box::new(InferTask {
                dataset: "d".into(),
                case_id: "case_001".into(),
                fixed: stage_ref("datasets/d/scansExp/case_001_exp.nii.gz"),
                moving: stage_ref("datasets/d/scansInsp/case_001_insp.nii.gz"),
                weights: stage_ref("models/m/v1/weights.safetensors"),
                output_prefix: "results/d/m/v1/".into(),
                ..InferTask::default()
            }))),
            ..TaskAssignment::default()
        }
    }

    #[test]
    fn an_inference_task_reads_its_case_and_model_and_writes_its_own_outputs() {
        let a = infer();
        assert!(may_read(&a, "datasets/d/scansExp/case_001_exp.nii.gz"));
        assert!(may_read(&a, "models/m/v1/weights.safetensors"));
        assert!(!may_read(&a, "datasets/d/scansExp/case_002_exp.nii.gz"));
        assert!(!may_read(&a, "jobs/job-000001/state.json"));
        assert!(!may_read(&a, ""), "an absent mask names no key");
        assert!(may_write(&a, "results/d/m/v1/case_001_ddf.nii.gz"));
        assert!(may_write(&a, "results/d/m/v1/case_001_overview.png"));
        assert!(!may_write(&a, "results/d/m/v1/case_002_ddf.nii.gz"));
        assert!(!may_write(&a, "results/d/m/v1/case_001_ddf.nii.gz.bak"));
        assert!(!may_write(&a, "results/e/m/v1/case_001_ddf.nii.gz"));
        assert!(!may_write(&a, "jobs/job-000001/state.json"));
    }

    #[test]
    fn a_replica_reads_its_dataset_only_and_writes_nothing() {
        let a = TaskAssignment {
            kind: Some(Kind::Train(TrainTask {
                dataset: "lung".into(),
            })),
            ..TaskAssignment::default()
        };
        assert!(may_read(&a, "datasets/lung/scansExp/case_001_exp.nii.gz"));
        assert!(may_read(
            &a,
            "datasets/lung/v-0123456789ab/keypoints/case_001.csv"
        ));
        assert!(!may_read(&a, "datasets/lung2/scansExp/case_001_exp.nii.gz"));
        assert!(!may_read(&a, "models/m/v1/weights.safetensors"));
        assert!(!may_write(&a, "datasets/lung/scansExp/case_001_exp.nii.gz"));
        assert!(!may_write(&a, "results/lung/m/v1/case_001_ddf.nii.gz"));
    }

    #[test]
    fn a_selftest_reads_its_two_images() {
        let a = TaskAssignment {
            kind: Some(Kind::Selftest(SelftestTask {
                fixed_key: "datasets/s/a.nii.gz".into(),
                moving_key: "datasets/s/b.nii.gz".into(),
                ..SelftestTask::default()
            })),
            ..TaskAssignment::default()
        };
        assert!(may_read(&a, "datasets/s/a.nii.gz"));
        assert!(!may_read(&a, "datasets/s/c.nii.gz"));
        assert!(!may_read(&TaskAssignment::default(), "datasets/s/a.nii.gz"));
    }
}
