//! One optimizer step: a [`StepRound`] decides, the coordinator carries out its actions
//! (averaged chunks, the commit to every replica, the abort).

use super::*;

impl Coordinator {
    /// One optimizer step of the global `batch`, decided by a [`StepRound`]; returns the
    /// loss sums over its cases. When the round aborts (a replica lost before the commit),
    /// the replicas left are told to drop it and it runs again; once it commits, the step
    /// stands whatever happens to the commit's sends.
    pub(super) async fn step(
        &mut self,
        epoch: usize,
        step: u64,
        batch: &[usize],
        lr: f64,
    ) -> Phase<((f64, f64, f64), StepTimes)> {
        self.round += 1;
        let id = StepId {
            epoch: epoch as u32,
            step,
            round: self.round,
        };
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        let shards = shard(batch, ids.len());
        let mut round = StepRound::new(RoundSpec {
            id,
            shards: ids
                .iter()
                .copied()
                .zip(shards.iter().map(Vec::len))
                .collect(),
            chunk_lengths: chunk_lengths(self.num_params.unwrap_or(0), self.chunk_floats),
            micro_batch: self.spec.micro_batch as usize,
            bn_batch_len: self.bn_batch_len.unwrap_or(0),
        });
        self.lost_now.clear();
        let started = Instant::now();
        let result = self.try_step(&mut round, &ids, &shards, lr).await;
        // Losses seen while the round ran go to the round: before its decision they abort it,
        // after it they change nothing.
        let lost: Vec<u64> = self.lost_now.drain(..).collect();
        for member in lost {
            let actions = round.handle(RoundEvent::Lost { member });
            self.act_on_round(&round, actions).await?;
        }
        let allreduce_ms = match result {
            Err(Interrupt::Fatal(e)) => return Err(Interrupt::Fatal(e)),
            Ok(ms) => ms,
            Err(Interrupt::Lost) => 0.0,
        };
        match round.outcome() {
            Some(Outcome::Committed) => {
                let sums = round.reports().fold((0.0, 0.0, 0.0), |s, d| {
                    (s.0 + d.sums.0, s.1 + d.sums.1, s.2 + d.sums.2)
                });
                let compute_ms = round.reports().map(|d| d.compute_ms).fold(0.0, f64::max);
                Ok((
                    sums,
                    StepTimes {
                        compute_ms,
                        allreduce_ms,
                        step_ms: started.elapsed().as_secs_f64() * 1e3,
                    },
                ))
            }
            Some(Outcome::Aborted) | None => {
                // Stopped without a decision (a time-out dropped members): abort it.
                round.abort();
                let abort = Down::Abort(StepAbort {
                    epoch: id.epoch,
                    step: id.step,
                    round: id.round,
                });
                // A replica lost while aborting is handled by the step's next attempt.
                self.send_each(abort).await?;
                Err(Interrupt::Lost)
            }
        }
    }

    /// Carries out a round's actions: averaged chunks and the commit go to every member.
    pub(super) async fn act_on_round(
        &mut self,
        round: &StepRound,
        actions: Vec<RoundAction>,
    ) -> Phase<()> {
        for action in actions {
            match action {
                RoundAction::Reduced { index, values } => {
                    let data = self.encoding.encode(&values);
                    let contributors = round.contributors();
                    self.ctx
                        .metrics
                        .allreduce_bytes
                        .inc_by((data.len() * (self.members.len() + contributors)) as u64);
                    self.broadcast(Down::Reduced(GradChunk {
                        round: round.id().round,
                        index: index as u32,
                        data,
                    }))
                    .await?;
                }
                RoundAction::Commit { bn_batches } => {
                    let id = round.id();
                    let commit = Down::Commit(StepCommit {
                        epoch: id.epoch,
                        step: id.step,
                        round: id.round,
                        bn_batch_count: bn_batches.len() as u32,
                        bn_batches: GradEncoding::F32.encode(&bn_batches.concat()),
                    });
                    // Every member gets the commit, each send on its own: a replica lost now
                    // is dropped, the others still apply the step, and it is not run again.
                    fault_delay("train-commit-sending").await;
                    self.send_each(commit).await?;
                    self.live_step = id.step;
                    self.ctx.metrics.train_steps.inc();
                }
                RoundAction::Abort => {}
                RoundAction::Evict { member, reason } => {
                    self.lose(member, &format!("protocol error: it {reason}"))?;
                }
            }
        }
        Ok(())
    }

    /// Runs a round until it is decided or interrupted; returns the all-reduce time, ms.
    pub(super) async fn try_step(
        &mut self,
        round: &mut StepRound,
        ids: &[u64],
        shards: &[Vec<usize>],
        lr: f64,
    ) -> Phase<f64> {
        let id = round.id();
        for (&member, cases) in ids.iter().zip(shards) {
            self.send(
                member,
                Down::Step(TrainStep {
                    step: id.step,
                    round: id.round,
                    epoch: id.epoch,
                    cases: cases.iter().map(|&i| i as u32).collect(),
                    lr,
                }),
            )
            .await?;
        }
        // The all-reduce proper starts when the last contributor starts sending (before
        // that, the head waits for compute).
        let mut first_chunk: HashMap<u64, Instant> = HashMap::new();
        let mut allreduce_ms = 0.0;
        let deadline = Instant::now() + self.step_timeout;
        let lengths = chunk_lengths(self.num_params.unwrap_or(0), self.chunk_floats);
        let bn_len = self.bn_batch_len.unwrap_or(0);
        while round.outcome().is_none() {
            let event = match self.recv(deadline).await? {
                Event::Msg(member, Up::Grad(chunk)) if chunk.round == id.round => {
                    let k = chunk.index as usize;
                    let Some(&n) = lengths.get(k) else {
                        return self
                            .protocol_error(member, &format!("sent chunk {k}, out of range"));
                    };
                    let values = match self.encoding.decode_sum(&chunk.data, n) {
                        Ok(v) => v,
                        Err(e) => return self.protocol_error(member, &e.to_string()),
                    };
                    first_chunk.entry(member).or_insert_with(Instant::now);
                    RoundEvent::Grad {
                        member,
                        index: k,
                        values,
                    }
                }
                Event::Msg(member, Up::Reduced(r)) if r == id.round => {
                    RoundEvent::Arrived { member }
                }
                Event::Msg(member, Up::StepDone(d)) if d.round == id.round => {
                    let count = d.bn_batch_count as usize;
                    let bn = match GradEncoding::F32.decode(&d.bn_batches, count * bn_len) {
                        Ok(v) => v,
                        Err(e) => {
                            return self.protocol_error(
                                member,
                                &format!("sent batch-norm statistics: {e}"),
                            )
                        }
                    };
                    RoundEvent::Done {
                        member,
                        report: ShardReport {
                            samples: d.samples as usize,
                            held_step: d.held_step,
                            sums: (d.total, d.similarity, d.regularisation),
                            compute_ms: d.compute_ms,
                            bn_batches: if bn_len == 0 {
                                vec![Vec::new(); count]
                            } else {
                                bn.chunks(bn_len).map(<[f32]>::to_vec).collect()
                            },
                        },
                    }
                }
                Event::Msg(..) => continue,
                Event::Timeout => {
                    let pending: HashSet<u64> = round.waiting_on().into_iter().collect();
                    self.time_out(&pending, &format!("step {}", id.step))?;
                    return Err(Interrupt::Lost);
                }
            };
            let arrived = matches!(event, RoundEvent::Arrived { .. });
            let actions = round.handle(event);
            if arrived && round.outcome() == Some(Outcome::Committed) {
                allreduce_ms = first_chunk
                    .values()
                    .max()
                    .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
            }
            self.act_on_round(round, actions).await?;
        }
        Ok(allreduce_ms)
    }
}
