//! The epoch's checkpoint: files first, `state.json` (the one commit point) last.

use super::*;

impl Coordinator {
    /// Writes the epoch's checkpoint: its files first, then `state.json`, the one commit
    /// point, last. The best weights are the best epoch's checkpoint weights, named in
    /// `state.json`, so a crash never leaves a "best" that the state does not know of.
    /// Files no committed state names any more are deleted after the commit.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn checkpoint_epoch(
        &mut self,
        epoch: usize,
        step: u64,
        next_lr: f64,
        improved: bool,
        score: Option<f64>,
        summary: &EpochSummary,
        weights: Vec<u8>,
        optimizer: Vec<u8>,
    ) -> Phase<()> {
        let stage = self.ctx.stage.clone();
        let prefix = format!("checkpoints/epoch-{epoch:04}");
        let weights_key = job_key(&self.job_id, &format!("{prefix}/weights.safetensors"))?;
        stage.put(&weights_key, &weights).await?;
        stage
            .put(
                &job_key(&self.job_id, &format!("{prefix}/optimizer.safetensors"))?,
                &optimizer,
            )
            .await?;
        let mut next = self.state.clone();
        if improved {
            next.best_val = score.or(next.best_val);
            next.best_epoch = Some(epoch);
            next.best_weights = Some(weights_key.as_str().to_string());
        }
        next.checkpoint = prefix;
        next.epochs_done = epoch;
        next.step = step;
        next.lr = next_lr;
        next.state_sha256 = self.state_sha.clone();
        next.history.push(summary.clone());
        // Reports derived from the history, then the commit point.
        stage
            .put(
                &job_key(&self.job_id, "history.csv")?,
                history_csv(&next.history).as_bytes(),
            )
            .await?;
        let curves = medray_core::viz::curves_png(&next.history)?;
        stage
            .put(&job_key(&self.job_id, "curves.png")?, &curves)
            .await?;
        let json = serde_json::to_vec_pretty(&next)
            .map_err(|e| Interrupt::Fatal(format!("state: {e}")))?;
        fault_delay("train-before-commit-point").await;
        stage.put(&state_key(&self.job_id)?, &json).await?;
        let previous = std::mem::replace(&mut self.state, next);
        self.checkpoint = Some((weights, optimizer));
        // Numbered checkpoints: keep every `checkpoint_every`-th, the current one and the
        // best one; drop the others once no committed state names them.
        let every = self.state.config.checkpoint_every.max(1);
        let own = format!("jobs/{}/", self.job_id.as_str());
        let keep = |p: &str| -> bool {
            p == self.state.checkpoint
                || self
                    .state
                    .best_weights
                    .as_deref()
                    .is_some_and(|b| b == format!("{own}{p}/weights.safetensors"))
                || p.strip_prefix("checkpoints/epoch-")
                    .and_then(|e| e.parse::<usize>().ok())
                    .is_none_or(|e| e % every == 0)
        };
        let old_best = previous
            .best_weights
            .as_deref()
            .and_then(|b| b.strip_prefix(&own))
            .and_then(|b| b.strip_suffix("/weights.safetensors"));
        let mut stale: Vec<&str> = vec![previous.checkpoint.as_str()];
        stale.extend(old_best);
        stale.retain(|p| !p.is_empty() && !keep(p));
        stale.dedup();
        for p in stale {
            for name in ["weights.safetensors", "optimizer.safetensors"] {
                let _ = stage
                    .delete(&job_key(&self.job_id, &format!("{p}/{name}"))?)
                    .await;
            }
        }
        Ok(())
    }

    /// The best weights so far: those `state.json` names, else (a state written before it
    /// named them) the job's `best/weights.safetensors`.
    pub(super) async fn best_weights(&self) -> Result<Vec<u8>> {
        match &self.state.best_weights {
            Some(key) => Ok(self.ctx.stage.get(&ObjectKey::new(key.clone())?).await?),
            None => Ok(self
                .ctx
                .stage
                .get(&job_key(&self.job_id, BEST_WEIGHTS)?)
                .await?),
        }
    }
}
