//! One epoch: its steps, the validation, and the epoch's end (every replica must hold the
//! same state; one replica's state becomes the checkpoint).

use medray_proto::v1::TrainProgress;

use super::*;

impl Coordinator {
    /// One epoch: steps, validation, epoch end, checkpoint.
    pub(super) async fn epoch(&mut self, epoch: usize) -> Phase<()> {
        // Fault injection (`panic(MSG)`): the coordinator crashes here.
        fail::fail_point!("train-epoch-start");
        // Joiners come in at the boundary, with the checkpoint's state.
        self.admit().await?;
        self.ensure_members().await?;
        let started = Instant::now();
        let config = self.state.config.clone();
        let lr = self.state.lr;
        let batches = epoch_batches(
            self.train_cases.len(),
            config.seed,
            epoch,
            config.batch_size,
        );
        let steps = batches.len();
        let mut step = self.state.step;
        self.live_step = step;
        let mut sums = (0.0, 0.0, 0.0);
        let mut times = StepTimes::default();
        for (k, batch) in batches.iter().enumerate() {
            let (losses, t) = loop {
                if self.members.is_empty() {
                    return Err(Interrupt::Lost);
                }
                match self.step(epoch, step + 1, batch, lr).await {
                    Ok(r) => break r,
                    Err(Interrupt::Lost) => {
                        self.log(format!(
                            "step {} runs again on {} replica(s)",
                            step + 1,
                            self.members.len()
                        ));
                    }
                    Err(e) => return Err(e),
                }
            };
            step += 1;
            let n = batch.len() as f64;
            let mean = (losses.0 / n, losses.1 / n, losses.2 / n);
            sums = (sums.0 + mean.0, sums.1 + mean.1, sums.2 + mean.2);
            times.compute_ms += t.compute_ms;
            times.allreduce_ms += t.allreduce_ms;
            times.step_ms += t.step_ms;
            let progress = TrainProgress {
                epoch: epoch as u32,
                epochs: config.epochs as u32,
                step_in_epoch: k as u64 + 1,
                steps_in_epoch: steps as u64,
                step,
                loss: mean.0,
                replicas: self.members.len() as u32,
            };
            self.ctx.logs.progress(&self.job_id, format!(
                "step {}/{steps} of epoch {epoch}/{}: loss {:.4} (similarity {:.4}, regularisation {:.4}) on {} replica(s), compute {:.0} ms, all-reduce {:.0} ms",
                k + 1,
                config.epochs,
                mean.0,
                mean.1,
                mean.2,
                self.members.len(),
                t.compute_ms,
                t.allreduce_ms
            ), &progress);
        }
        let val = loop {
            if self.members.is_empty() {
                return Err(Interrupt::Lost);
            }
            match self.validate(epoch).await {
                Ok(v) => break v,
                Err(Interrupt::Lost) => self.log("validation runs again on the replicas left"),
                Err(e) => return Err(e),
            }
        };
        let (weights, optimizer) = loop {
            if self.members.is_empty() {
                return Err(Interrupt::Lost);
            }
            match self.epoch_end(epoch, step).await {
                Ok(v) => break v,
                Err(Interrupt::Lost) => self.log("the epoch's end runs again on the replicas left"),
                Err(e) => return Err(e),
            }
        };
        let n = steps.max(1) as f64;
        let mean = |f: &dyn Fn(&ValCase) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = val.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let summary = EpochSummary {
            epoch,
            total_loss: sums.0 / n,
            similarity_loss: sums.1 / n,
            regularisation_loss: sums.2 / n,
            val_soft_dice: mean(&|c| c.soft_dice),
            val_dice: mean(&|c| c.dice),
            val_dice_before: mean(&|c| c.dice_before),
            val_mi_loss: mean(&|c| Some(c.mi_loss)),
            val_folding_pct: mean(&|c| Some(c.folding_pct)),
            lr,
            seconds: started.elapsed().as_secs_f64(),
        };
        let score = summary.val_dice.or(summary.val_soft_dice);
        let monitored = score.unwrap_or(summary.total_loss);
        let next_lr = self.state.scheduler.step(monitored, lr);
        let improved = match (score, self.state.best_val) {
            (Some(v), Some(b)) => v > b,
            (Some(_), None) | (None, _) => true,
        };
        self.checkpoint_epoch(
            epoch, step, next_lr, improved, score, &summary, weights, optimizer,
        )
        .await?;
        self.log(summary.line());
        self.log(format!(
            "epoch {epoch}: per step {:.0} ms compute, {:.0} ms all-reduce, {:.0} ms in all ({} replica(s))",
            times.compute_ms / n,
            times.allreduce_ms / n,
            times.step_ms / n,
            self.members.len()
        ));
        if next_lr != lr {
            self.log(format!("learning rate reduced to {next_lr:e}"));
        }
        Ok(())
    }

    /// Registers the validation cases on the replicas; metrics by case.
    pub(super) async fn validate(&mut self, epoch: usize) -> Phase<Vec<ValCase>> {
        let all: Vec<usize> = (0..self.val_cases.len()).collect();
        if all.is_empty() {
            return Ok(Vec::new());
        }
        self.round += 1;
        let round = self.round;
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        let shards = shard(&all, ids.len());
        let mut pending = HashSet::new();
        for (&id, cases) in ids.iter().zip(&shards) {
            if cases.is_empty() {
                continue;
            }
            pending.insert(id);
            self.send(
                id,
                Down::Validate(ValidateCmd {
                    round,
                    epoch: epoch as u32,
                    cases: cases.iter().map(|&i| i as u32).collect(),
                }),
            )
            .await?;
        }
        let mut out: HashMap<u32, ValCase> = HashMap::new();
        let deadline = Instant::now() + self.step_timeout;
        while !pending.is_empty() {
            match self.recv(deadline).await? {
                Event::Msg(id, Up::Val(v)) if v.round == round && pending.remove(&id) => {
                    for c in v.cases {
                        if (c.index as usize) < all.len() {
                            out.insert(c.index, c);
                        }
                    }
                }
                Event::Msg(..) => {}
                Event::Timeout => {
                    self.time_out(&pending, &format!("validation of epoch {epoch}"))?
                }
            }
        }
        if out.len() != all.len() {
            return Err(Interrupt::Fatal(format!(
                "validation of epoch {epoch} returned {} of {} cases",
                out.len(),
                all.len()
            )));
        }
        Ok(out.into_values().collect())
    }

    /// Checks that every replica holds the same state (the step, parameters, BatchNorm
    /// statistics and Adam's moments) and fetches one replica's state (weights, optimizer).
    pub(super) async fn epoch_end(&mut self, epoch: usize, step: u64) -> Phase<(Vec<u8>, Vec<u8>)> {
        self.broadcast(Down::EpochEnd(epoch as u32)).await?;
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        let mut pending: HashSet<u64> = ids.iter().copied().collect();
        let mut reports: Vec<(u64, String)> = Vec::new();
        let deadline = Instant::now() + self.step_timeout;
        while !pending.is_empty() {
            match self.recv(deadline).await? {
                Event::Msg(id, Up::Epoch(r))
                    if r.epoch as usize == epoch && pending.remove(&id) =>
                {
                    if r.step != step {
                        return self.protocol_error(
                            id,
                            &format!(
                                "holds step {} at the end of epoch {epoch}, expected {step}",
                                r.step
                            ),
                        );
                    }
                    reports.push((id, r.state_sha256));
                }
                Event::Msg(..) => {}
                Event::Timeout => self.time_out(&pending, &format!("the end of epoch {epoch}"))?,
            }
        }
        reports.retain(|(id, _)| self.is_member(*id));
        let Some((_, sha)) = reports.first().cloned() else {
            return Err(Interrupt::Lost);
        };
        if let Some((id, other)) = reports.iter().find(|(_, s)| *s != sha) {
            let worker = |i: u64| {
                self.members
                    .iter()
                    .find(|m| m.id == i)
                    .map(|m| m.worker_id.to_string())
                    .unwrap_or_default()
            };
            return Err(Interrupt::Fatal(format!(
                "replicas diverged at the end of epoch {epoch}: worker {} has state {sha}, worker {} has {other}",
                worker(reports[0].0),
                worker(*id)
            )));
        }
        self.state_sha = Some(sha);
        // One replica's state for the checkpoint.
        let leader = self.members[0].id;
        self.send(leader, Down::SendState(true)).await?;
        let mut weights: Option<Vec<u8>> = None;
        let mut optimizer: Option<Vec<u8>> = None;
        let (mut w_buf, mut o_buf) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + self.step_timeout;
        while weights.is_none() || optimizer.is_none() {
            match self.recv(deadline).await? {
                Event::Msg(id, Up::State(chunk)) if id == leader => {
                    let (buf, slot) = match StateKind::try_from(chunk.kind) {
                        Ok(StateKind::Weights) => (&mut w_buf, &mut weights),
                        Ok(StateKind::Optimizer) => (&mut o_buf, &mut optimizer),
                        _ => return self.protocol_error(id, "sent a state chunk of no known kind"),
                    };
                    let cap = self.ctx.config.max_state_bytes;
                    if chunk.total > cap {
                        return self.protocol_error(
                            id,
                            &format!(
                                "announced a state of {} bytes, more than the head's --max-state-bytes of {cap}",
                                chunk.total
                            ),
                        );
                    }
                    if buf.len() + chunk.data.len() > chunk.total as usize {
                        return self.protocol_error(id, "sent more state than it announced");
                    }
                    buf.extend_from_slice(&chunk.data);
                    if buf.len() == chunk.total as usize {
                        *slot = Some(std::mem::take(buf));
                    }
                }
                Event::Msg(..) => {}
                Event::Timeout => {
                    self.time_out(&HashSet::from([leader]), "the state request")?;
                }
            }
        }
        Ok((weights.unwrap_or_default(), optimizer.unwrap_or_default()))
    }
}
