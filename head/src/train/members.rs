//! The replicas of a training job as the coordinator holds them: joining (gang start and
//! admission with the checkpoint's state), messages in and out, losses and time-outs.

use super::*;

impl Coordinator {
    /// Waits until `replicas` replicas have joined (or the gang timeout passed with at least
    /// one), then admits them.
    pub(super) async fn wait_for_gang(&mut self) -> Phase<()> {
        let timeout = Duration::from_secs(u64::from(if self.spec.gang_timeout_s == 0 {
            60
        } else {
            self.spec.gang_timeout_s
        }));
        let started = Instant::now();
        let mut said = 0;
        loop {
            let joined = self.joining.len();
            if joined >= self.replicas || (joined > 0 && started.elapsed() >= timeout) {
                break;
            }
            if joined != said {
                self.log(format!("{joined} of {} replica(s) joined", self.replicas));
                said = joined;
            }
            let deadline = Instant::now() + Duration::from_millis(500);
            if let Event::Msg(..) = self.recv(deadline).await? {}
        }
        if self.joining.len() < self.replicas {
            self.log(format!(
                "starting with {} of {} replica(s) after waiting {:.0} s",
                self.joining.len(),
                self.replicas,
                timeout.as_secs_f64()
            ));
        }
        self.admit().await
    }

    /// Receives the next relevant event before `deadline`. Joins are queued for the next
    /// admission; a lost member is removed and reported as [`Interrupt::Lost`].
    pub(super) async fn recv(&mut self, deadline: Instant) -> Phase<Event> {
        loop {
            let event = match tokio::time::timeout_at(deadline.into(), self.inbox.recv()).await {
                Err(_) => return Ok(Event::Timeout),
                Ok(None) => return Err(Interrupt::Fatal("the coordinator's inbox closed".into())),
                Ok(Some(e)) => e,
            };
            match event {
                CoordEvent::Join(m) => {
                    self.log(format!(
                        "replica {} joined on worker {}",
                        m.task_id, m.worker_id
                    ));
                    self.joining.push(m);
                }
                CoordEvent::Up { member, msg, .. } => {
                    if let Up::Error(reason) = &msg {
                        if self.is_member(member) || self.joining.iter().any(|m| m.id == member) {
                            let reason = format!("it reported: {reason}");
                            if self.lose(member, &reason)? {
                                return Err(Interrupt::Lost);
                            }
                        }
                        continue;
                    }
                    if self.is_member(member) || self.joining.iter().any(|m| m.id == member) {
                        return Ok(Event::Msg(member, msg));
                    }
                }
                CoordEvent::Gone { member, reason } => {
                    if self.lose(member, &reason)? {
                        return Err(Interrupt::Lost);
                    }
                }
                CoordEvent::TaskLost { task_id, reason } => {
                    let ids: Vec<u64> = self
                        .members
                        .iter()
                        .chain(&self.joining)
                        .filter(|m| m.task_id == task_id)
                        .map(|m| m.id)
                        .collect();
                    let mut lost = false;
                    for id in ids {
                        lost |= self.lose(id, &reason)?;
                    }
                    if lost {
                        return Err(Interrupt::Lost);
                    }
                }
            }
        }
    }

    pub(super) fn is_member(&self, id: u64) -> bool {
        self.members.iter().any(|m| m.id == id)
    }

    /// Drops a replica. True when it was an active member (the phase must stop); counts
    /// the failure and fails the job past `max_failures`.
    pub(super) fn lose(&mut self, id: u64, reason: &str) -> Phase<bool> {
        if let Some(i) = self.joining.iter().position(|m| m.id == id) {
            let m = self.joining.remove(i);
            self.log(format!(
                "replica {} on worker {} left before it was admitted: {reason}",
                m.task_id, m.worker_id
            ));
            return Ok(false);
        }
        let Some(i) = self.members.iter().position(|m| m.id == id) else {
            return Ok(false);
        };
        let m = self.members.remove(i);
        if self.finishing {
            return Ok(false);
        }
        self.lost_now.push(id);
        self.failures += 1;
        self.log(format!(
            "replica {} on worker {} evicted at epoch {}, step {}: {reason} ({} replica(s) left; failure {} of at most {})",
            m.task_id,
            m.worker_id,
            self.state.epochs_done + 1,
            self.live_step + 1,
            self.members.len(),
            self.failures,
            self.max_failures
        ));
        self.ctx.metrics.train_replicas_lost.inc();
        if self.failures > self.max_failures {
            return Err(Interrupt::Fatal(format!(
                "gave up after {} replica failures (max_failures {}); the last: worker {}: {reason}",
                self.failures, self.max_failures, m.worker_id
            )));
        }
        Ok(true)
    }

    /// Sends to one member; a member that cannot take it within the step timeout is lost.
    pub(super) async fn send(&mut self, id: u64, msg: Down) -> Phase<()> {
        let Some(m) = self
            .members
            .iter()
            .chain(&self.joining)
            .find(|m| m.id == id)
        else {
            return Ok(());
        };
        let down = m.down.clone();
        let sent = down
            .send_timeout(Ok(TrainDown { msg: Some(msg) }), self.step_timeout)
            .await;
        if let Err(e) = sent {
            let reason = match e {
                mpsc::error::SendTimeoutError::Timeout(_) => format!(
                    "did not read its stream for {:.0} s",
                    self.step_timeout.as_secs_f64()
                ),
                mpsc::error::SendTimeoutError::Closed(_) => "its stream closed".to_string(),
            };
            if self.lose(id, &reason)? {
                return Err(Interrupt::Lost);
            }
        }
        Ok(())
    }

    pub(super) async fn broadcast(&mut self, msg: Down) -> Phase<()> {
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        for id in ids {
            self.send(id, msg.clone()).await?;
        }
        Ok(())
    }

    /// Sends `msg` to every member, each on its own: a member that cannot take it is lost,
    /// the others still get it.
    pub(super) async fn send_each(&mut self, msg: Down) -> Phase<()> {
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        for id in ids {
            match self.send(id, msg.clone()).await {
                Ok(()) | Err(Interrupt::Lost) => {}
                Err(fatal) => return Err(fatal),
            }
        }
        Ok(())
    }

    /// Drops the members in `pending` that did not answer before the deadline.
    pub(super) fn time_out(&mut self, pending: &HashSet<u64>, what: &str) -> Phase<()> {
        let secs = self.step_timeout.as_secs_f64();
        let mut lost = false;
        for id in pending.clone() {
            lost |= self.lose(id, &format!("no answer to {what} within {secs:.0} s"))?;
        }
        if lost {
            Err(Interrupt::Lost)
        } else {
            Ok(())
        }
    }

    /// A replica broke the protocol: it is dropped.
    pub(super) fn protocol_error<T>(&mut self, id: u64, reason: &str) -> Phase<T> {
        self.lose(id, &format!("protocol error: it {reason}"))?;
        Err(Interrupt::Lost)
    }

    /// Brings the replicas that joined into the job: config and cases, the current state,
    /// then each must report the expected parameter checksum.
    pub(super) async fn admit(&mut self) -> Phase<()> {
        if self.joining.is_empty() {
            return Ok(());
        }
        let config_json = serde_json::to_string(&self.state.config)
            .map_err(|e| Interrupt::Fatal(format!("config: {e}")))?;
        let init = TrainInit {
            config_json,
            train: self.train_cases.clone(),
            val: self.val_cases.clone(),
            chunk_floats: self.chunk_floats as u32,
            encoding: match self.encoding {
                GradEncoding::F32 => medray_proto::v1::GradEncoding::F32,
                GradEncoding::F16 => medray_proto::v1::GradEncoding::F16,
                GradEncoding::Bf16 => medray_proto::v1::GradEncoding::Bf16,
            } as i32,
            with_state: self.checkpoint.is_some(),
            step: self.state.step,
            micro_batch: self.spec.micro_batch,
            state_chunk_bytes: self.state_chunk_bytes as u32,
        };
        let newcomers: Vec<u64> = self.joining.iter().map(|m| m.id).collect();
        for &id in &newcomers {
            self.send(id, Down::Init(init.clone())).await?;
            if let Some((weights, optimizer)) = self.checkpoint.clone() {
                for (kind, bytes) in [
                    (StateKind::Weights, weights),
                    (StateKind::Optimizer, optimizer),
                ] {
                    for piece in bytes.chunks(self.state_chunk_bytes) {
                        self.send(
                            id,
                            Down::State(StateChunk {
                                kind: kind as i32,
                                total: bytes.len() as u64,
                                data: piece.to_vec(),
                            }),
                        )
                        .await?;
                    }
                }
            }
        }
        let mut pending: HashSet<u64> = newcomers.iter().copied().collect();
        let deadline = Instant::now() + self.step_timeout;
        while !pending.is_empty() {
            match self.recv(deadline).await {
                Ok(Event::Msg(id, Up::Ready(ready))) if pending.remove(&id) => {
                    let n = ready.num_params as usize;
                    if *self.num_params.get_or_insert(n) != n {
                        self.lose_joiner(
                            id,
                            &format!(
                                "it has {n} parameters, expected {}",
                                self.num_params.unwrap_or(0)
                            ),
                        );
                        continue;
                    }
                    if ready.step != self.state.step {
                        self.lose_joiner(
                            id,
                            &format!("it holds step {}, expected {}", ready.step, self.state.step),
                        );
                        continue;
                    }
                    let bn = ready.bn_batch_len as usize;
                    if *self.bn_batch_len.get_or_insert(bn) != bn {
                        self.lose_joiner(
                            id,
                            &format!(
                                "its batch-norm statistics have {bn} values, expected {}",
                                self.bn_batch_len.unwrap_or(0)
                            ),
                        );
                        continue;
                    }
                    let expected = self.state_sha.get_or_insert(ready.state_sha256.clone());
                    if *expected != ready.state_sha256 {
                        let expected = expected.clone();
                        self.lose_joiner(
                            id,
                            &format!(
                                "its state's checksum {} differs from the job's {expected}",
                                ready.state_sha256
                            ),
                        );
                        continue;
                    }
                    if let Some(i) = self.joining.iter().position(|m| m.id == id) {
                        let m = self.joining.remove(i);
                        self.log(format!(
                            "replica {} on worker {} ({}) admitted: {} parameters, cases loaded in {:.1} s",
                            m.task_id,
                            m.worker_id,
                            ready.device,
                            ready.num_params,
                            ready.load_ms / 1e3
                        ));
                        self.members.push(m);
                    }
                }
                Ok(Event::Msg(..)) => {}
                Ok(Event::Timeout) => {
                    for id in pending.drain() {
                        self.lose_joiner(id, "it did not load its cases in time");
                    }
                }
                // A member lost while admitting others: the epoch has not started yet.
                Err(Interrupt::Lost) => {}
                Err(e) => return Err(e),
            }
            pending.retain(|id| self.joining.iter().any(|m| m.id == *id));
        }
        // Replicas that joined during the admission wait for the next one.
        Ok(())
    }

    pub(super) fn lose_joiner(&mut self, id: u64, reason: &str) {
        if let Some(i) = self.joining.iter().position(|m| m.id == id) {
            let m = self.joining.remove(i);
            self.log(format!(
                "replica {} on worker {} refused: {reason}",
                m.task_id, m.worker_id
            ));
        }
    }

    /// Waits until at least one replica is active, admitting joiners (the job shows
    /// PENDING with the reason meanwhile).
    pub(super) async fn ensure_members(&mut self) -> Phase<()> {
        if !self.members.is_empty() {
            return Ok(());
        }
        let reason = "waiting for a worker: no training replica is left";
        self.set_state(medray_proto::v1::JobState::Pending, reason);
        self.log(reason);
        while self.members.is_empty() {
            if self.joining.is_empty() {
                let deadline = Instant::now() + Duration::from_millis(500);
                let _ = self.recv(deadline).await?;
            } else {
                self.admit().await?;
            }
        }
        self.set_state(medray_proto::v1::JobState::Running, "");
        Ok(())
    }
}
