//! What a training job trains: its config from the spec, a new job's state and case split,
//! and the checkpointed state a job continues from.

use super::*;

/// The training config a spec asks for (empty fields take the quickstart's defaults): the
/// conversion of `medray_proto::convert`, its errors as the head reports a bad request field.
///
/// # Errors
/// [`HeadError::InvalidArgument`] naming the field.
pub fn train_config(spec: &TrainSpec) -> Result<TrainConfig> {
    TrainConfig::try_from(spec).map_err(HeadError::request_field)
}

/// Stage keys of a job's training state.
pub(super) fn job_key(job: &JobId, rest: &str) -> Result<ObjectKey> {
    Ok(ObjectKey::new(format!("jobs/{}/{rest}", job.as_str()))?)
}

/// The stage key of a job's checkpoint commit point.
///
/// # Errors
/// [`HeadError::Core`] for an invalid job id.
pub fn state_key(job: &JobId) -> Result<ObjectKey> {
    job_key(job, "state.json")
}

/// The state of a new job: its config and case split.
pub(super) fn fresh_state(ctx: &HeadContext, spec: &TrainSpec) -> Result<DistState> {
    let config = train_config(spec)?;
    if spec.dataset.is_empty() {
        return Err(HeadError::invalid("spec.train.dataset", "missing"));
    }
    let dataset = DatasetName::new(spec.dataset.clone())
        .map_err(|e| HeadError::invalid("spec.train.dataset", e.to_string()))?;
    let records = ctx.catalog()?.cases(&dataset)?;
    if records.is_empty() {
        return Err(HeadError::NotFound {
            what: "dataset (or it has no case)",
            id: dataset.as_str().to_string(),
        });
    }
    let n_train = medray_core::dataset::train_count(records.len(), config.val_fraction)
        .map_err(|e| HeadError::invalid("spec.train.val_fraction", e.to_string()))?;
    let ids: Vec<String> = records
        .iter()
        .map(|r| r.case_id.as_str().to_string())
        .collect();
    Ok(DistState {
        lr: config.lr,
        scheduler: ReduceLrOnPlateau::new(medray_core::train::plateau_mode(
            records[n_train..]
                .iter()
                .filter(|r| r.fixed_mask.is_some() && r.moving_mask.is_some())
                .count(),
        )),
        config,
        dataset: dataset.as_str().to_string(),
        train_cases: ids[..n_train].to_vec(),
        val_cases: ids[n_train..].to_vec(),
        epochs_done: 0,
        step: 0,
        best_val: None,
        best_epoch: None,
        checkpoint: String::new(),
        best_weights: None,
        state_sha256: None,
        history: Vec::new(),
    })
}

/// A job's committed state (`state.json`) alone, if it has one.
pub(crate) async fn load_committed_state(
    ctx: &HeadContext,
    job: &JobId,
) -> Result<Option<DistState>> {
    let key = state_key(job)?;
    if !ctx.stage.exists(&key).await? {
        return Ok(None);
    }
    let bytes = ctx.stage.get(&key).await?;
    let state = serde_json::from_slice(&bytes).map_err(|e| {
        HeadError::invalid(
            "checkpoint",
            format!("{} is not a training state: {e}", key.as_str()),
        )
    })?;
    Ok(Some(state))
}

/// The weights of the checkpoint `state` names.
pub(crate) async fn checkpoint_weights(
    ctx: &HeadContext,
    job: &JobId,
    state: &DistState,
) -> Result<Vec<u8>> {
    ctx.stage
        .get(&job_key(
            job,
            &format!("{}/weights.safetensors", state.checkpoint),
        )?)
        .await
        .map_err(Into::into)
}

/// A job's last checkpoint: its state and the weights and optimizer state it points at.
pub(crate) async fn load_state(
    ctx: &HeadContext,
    job: &JobId,
) -> Result<Option<(DistState, Vec<u8>, Vec<u8>)>> {
    let Some(state) = load_committed_state(ctx, job).await? else {
        return Ok(None);
    };
    let weights = checkpoint_weights(ctx, job, &state).await?;
    let optimizer = ctx
        .stage
        .get(&job_key(
            job,
            &format!("{}/optimizer.safetensors", state.checkpoint),
        )?)
        .await?;
    Ok(Some((state, weights, optimizer)))
}
