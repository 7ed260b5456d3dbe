//! The job's end: the best weights registered (once, whatever restarts) and the replicas
//! told to finish.

use super::*;

impl Coordinator {
    /// What the job trained on, for the registry: the cases the replicas loaded (ids and
    /// image sha256) and the dataset's content version, which is recorded only while the
    /// catalog still holds those very images (a dataset replaced meanwhile has none).
    /// `None` if a case lacks an image reference (never the case for cases from the
    /// catalog): results of the version then say "unknown", never a guess.
    pub(super) fn training_data(&self) -> Result<Option<medray_core::models::TrainingData>> {
        use medray_core::models::provenance::TrainedCase;
        let trained = |cases: &[TrainCase]| -> Option<Vec<TrainedCase>> {
            cases
                .iter()
                .map(|c| {
                    Some(TrainedCase {
                        case_id: c.id.clone(),
                        fixed_sha256: c.fixed.as_ref()?.sha256.clone(),
                        moving_sha256: c.moving.as_ref()?.sha256.clone(),
                    })
                })
                .collect()
        };
        let (Some(train), Some(validation)) =
            (trained(&self.train_cases), trained(&self.val_cases))
        else {
            return Ok(None);
        };
        let name = DatasetName::new(self.dataset.clone())?;
        let catalog = self.ctx.catalog()?;
        let now: HashMap<String, TrainedCase> = catalog
            .cases(&name)?
            .iter()
            .map(|r| (r.case_id.to_string(), TrainedCase::of(r)))
            .collect();
        let unchanged = train
            .iter()
            .chain(&validation)
            .all(|c| now.get(&c.case_id) == Some(c));
        let dataset_sha256 = if unchanged {
            catalog.dataset(&name)?.map(|d| d.content_sha256)
        } else {
            None
        };
        Ok(Some(medray_core::models::TrainingData {
            dataset: self.dataset.clone(),
            dataset_sha256,
            train,
            validation,
        }))
    }

    /// Registers `weights` as the job's model version (and points the alias at it);
    /// returns `name:version`. Idempotent: when this job already registered a version (a
    /// head that restarted after registering but before the job's end was recorded), that
    /// version is the result and nothing is registered again.
    pub(super) async fn register(&self, weights: Vec<u8>) -> Phase<String> {
        use medray_core::models::{
            list_models, register_model, set_alias, ModelName, ModelSource, NewModelVersion,
        };
        let name = ModelName::new(self.spec.model.clone())?;
        let existing = list_models(&self.ctx.catalog()?)?
            .into_iter()
            .find(|v| v.name == name && v.job_id.as_deref() == Some(self.job_id.as_str()));
        if let Some(v) = existing {
            self.log(format!(
                "this job already registered {}:{}; not registering again",
                name.as_str(),
                v.version
            ));
            if !self.spec.alias.is_empty() {
                set_alias(
                    &mut self.ctx.catalog()?,
                    &name,
                    &self.spec.alias,
                    &v.version,
                )?;
            }
            return Ok(format!("{}:{}", name.as_str(), v.version));
        }
        let last = self.state.history.last();
        let final_losses = serde_json::json!({
            "total_loss": last.map(|h| h.total_loss),
            "similarity_loss": last.map(|h| h.similarity_loss),
            "regularisation_loss": last.map(|h| h.regularisation_loss),
            "val_dice": last.and_then(|h| h.val_dice),
            "val_soft_dice": last.and_then(|h| h.val_soft_dice),
            "val_folding_pct": last.and_then(|h| h.val_folding_pct),
            "best_epoch": self.state.best_epoch,
        });
        let new = NewModelVersion {
            name: name.clone(),
            version: (!self.spec.version.is_empty()).then(|| self.spec.version.clone()),
            model_config: self.state.config.model_config(),
            weights,
            train_config_json: serde_json::to_string(&self.state.config)
                .map_err(|e| Interrupt::Fatal(format!("config: {e}")))?,
            dataset: self.dataset.clone(),
            train_cases: self.state.train_cases.clone(),
            val_cases: self.state.val_cases.clone(),
            job_id: Some(self.job_id.to_string()),
            epochs: self.state.epochs_done as u32,
            best_val_dice: self.state.best_val,
            final_losses_json: final_losses.to_string(),
            source: ModelSource::Trained,
            training_data: self.training_data()?,
        };
        let mut catalog = self.ctx.catalog()?;
        let version = register_model(&self.ctx.stage, &mut catalog, new).await?;
        if !self.spec.alias.is_empty() {
            set_alias(&mut catalog, &name, &self.spec.alias, &version.version)?;
            self.log(format!(
                "alias {} now points at {}:{}",
                self.spec.alias,
                name.as_str(),
                version.version
            ));
        }
        Ok(format!("{}:{}", name.as_str(), version.version))
    }

    /// Registers the best weights and ends the replicas' tasks.
    pub(super) async fn finish(&mut self) -> Phase<String> {
        let best = self.best_weights().await?;
        let registered = self.register(best).await?;
        fault_delay("train-registered").await;
        self.log(format!("registered model {registered}"));
        self.finishing = true;
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        for id in &ids {
            let _ = self.send(*id, Down::Finish(registered.clone())).await;
        }
        fault_delay("train-finish-sent").await;
        // Give the replicas a moment to end their tasks (their streams close). A stream that
        // closes is handled inside `recv`, which then waits on: look again every 100 ms, so
        // the job ends as soon as the last replica has gone (it used to wait the whole 10 s).
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.members.iter().any(|m| ids.contains(&m.id)) && Instant::now() < deadline {
            let look_again = deadline.min(Instant::now() + Duration::from_millis(100));
            match self.recv(look_again).await {
                Ok(_) | Err(Interrupt::Lost) => {}
                Err(e) => return Err(e),
            }
        }
        let last = self.state.history.last();
        Ok(serde_json::json!({
            "model": registered,
            "dataset": self.dataset,
            "epochs": self.state.epochs_done,
            "steps": self.state.step,
            "best_val_dice": self.state.best_val,
            "best_epoch": self.state.best_epoch,
            "final_total_loss": last.map(|h| h.total_loss),
            "final_val_dice": last.and_then(|h| h.val_dice),
            "replica_failures": self.failures,
        })
        .to_string())
    }
}
