//! One all-reduce round of a data-parallel optimizer step, as a plain state machine.
//!
//! The coordinator (the head) owns the networking; this type owns the decisions. It is fed
//! [`RoundEvent`]s (a gradient chunk, a replica's report, a replica saying every averaged
//! chunk arrived, a replica lost) and answers with [`RoundAction`]s (send an averaged chunk,
//! commit, abort, evict a replica that broke the protocol). The rules that make a step
//! exactly-once live here:
//!
//! - the round commits only when every averaged chunk went out and every member reported
//!   its shard and confirmed it holds every averaged chunk; the commit is decided once and is
//!   final: a member lost afterwards (even while the commit is being sent) does not undo it,
//!   so the step is never run a second time on the members that applied it;
//! - a member lost before that aborts the round: nothing was applied anywhere (computing a
//!   gradient changes no replica state), and the step runs again in a new round;
//! - every commit and abort names its [`StepId`], and a replica applies step `n` only when it
//!   holds `n - 1` ([`commit_check`]), so a repeated commit is recognised, never re-applied.

use std::collections::{HashMap, HashSet};

/// A member of the round (the coordinator's id of a replica's stream).
pub type MemberId = u64;

/// Which step a round attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepId {
    /// Epoch, 1-based.
    pub epoch: u32,
    /// Optimizer step, 1-based: the step the replicas hold once it is committed.
    pub step: u64,
    /// Attempt of the step, unique within the job: late messages of an aborted round are
    /// recognised by it.
    pub round: u64,
}

/// What a replica reports when its shard's gradient is sent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardReport {
    /// Cases it computed.
    pub samples: usize,
    /// The step it holds (must be the round's step minus one).
    pub held_step: u64,
    /// Sums over its cases of (total, similarity, regularisation) loss.
    pub sums: (f64, f64, f64),
    /// Forward and backward time, milliseconds.
    pub compute_ms: f64,
    /// Its micro-batches' BatchNorm statistics, in its shard's order.
    pub bn_batches: Vec<Vec<f32>>,
}

/// An input to the round.
#[derive(Clone, Debug)]
pub enum RoundEvent {
    /// Chunk `index` of a member's gradient, summed over its cases.
    Grad {
        /// Who sent it.
        member: MemberId,
        /// Chunk index.
        index: usize,
        /// The decoded sums.
        values: Vec<f64>,
    },
    /// A member finished its shard.
    Done {
        /// Who.
        member: MemberId,
        /// Its report.
        report: ShardReport,
    },
    /// A member has every averaged chunk.
    Arrived {
        /// Who.
        member: MemberId,
    },
    /// A member is gone (stream closed, timed out, reported an error).
    Lost {
        /// Who.
        member: MemberId,
    },
}

/// What the coordinator must do.
#[derive(Clone, Debug, PartialEq)]
pub enum RoundAction {
    /// Send averaged chunk `index` to every member.
    Reduced {
        /// Chunk index.
        index: usize,
        /// The mean over the global batch's cases: the members' sums added in f64, divided
        /// by the number of cases, rounded to f32.
        values: Vec<f32>,
    },
    /// The step is decided: send the commit to every member (each send on its own; a failed
    /// send loses that member but not the step). `bn_batches` are every micro-batch's
    /// BatchNorm statistics in the global batch's order.
    Commit {
        /// Micro-batch statistics to apply, in order.
        bn_batches: Vec<Vec<f32>>,
    },
    /// The round is dropped: send the abort to the members left; the step runs again.
    Abort,
    /// A member broke the protocol: drop it (an [`RoundAction::Abort`] follows).
    Evict {
        /// Who.
        member: MemberId,
        /// What it did, completing "it ...".
        reason: String,
    },
}

/// How the round ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Committed: every member left applies the step.
    Committed,
    /// Aborted: nobody applies it.
    Aborted,
}

/// The parameters of a round.
#[derive(Clone, Debug)]
pub struct RoundSpec {
    /// The step.
    pub id: StepId,
    /// Members in shard order, each with the number of cases of its shard (may be 0).
    pub shards: Vec<(MemberId, usize)>,
    /// Values per gradient chunk, in chunk order.
    pub chunk_lengths: Vec<usize>,
    /// Cases per micro-batch inside a shard (0: the whole shard).
    pub micro_batch: usize,
    /// Values in one micro-batch's BatchNorm statistics.
    pub bn_batch_len: usize,
}

/// One round's state.
#[derive(Debug)]
pub struct StepRound {
    spec: RoundSpec,
    total_cases: usize,
    acc: Vec<Option<Vec<f64>>>,
    got: Vec<HashSet<MemberId>>,
    reduced: usize,
    reports: HashMap<MemberId, ShardReport>,
    arrived: HashSet<MemberId>,
    outcome: Option<Outcome>,
}

impl StepRound {
    /// A round in which nothing has arrived yet.
    pub fn new(spec: RoundSpec) -> Self {
        let total_cases = spec.shards.iter().map(|(_, n)| *n).sum();
        let chunks = spec.chunk_lengths.len();
        Self {
            spec,
            total_cases,
            acc: vec![None; chunks],
            got: vec![HashSet::new(); chunks],
            reduced: 0,
            reports: HashMap::new(),
            arrived: HashSet::new(),
            outcome: None,
        }
    }

    /// The step this round attempts.
    pub fn id(&self) -> StepId {
        self.spec.id
    }

    /// How it ended, if it has.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    /// The members' reports (losses, timings), once committed.
    pub fn reports(&self) -> impl Iterator<Item = &ShardReport> {
        self.reports.values()
    }

    /// True when every averaged chunk has been sent (the all-reduce proper is over once
    /// every member confirmed them).
    pub fn all_reduced(&self) -> bool {
        self.reduced == self.spec.chunk_lengths.len()
    }

    /// Members with a non-empty shard.
    pub fn contributors(&self) -> usize {
        self.spec.shards.iter().filter(|(_, n)| *n > 0).count()
    }

    /// Aborts a round that is not decided yet (the coordinator gave up on it); a decided
    /// round keeps its outcome.
    pub fn abort(&mut self) {
        self.outcome.get_or_insert(Outcome::Aborted);
    }

    fn is_member(&self, member: MemberId) -> bool {
        self.spec.shards.iter().any(|(m, _)| *m == member)
    }

    fn cases_of(&self, member: MemberId) -> usize {
        self.spec
            .shards
            .iter()
            .find(|(m, _)| *m == member)
            .map_or(0, |(_, n)| *n)
    }

    /// Members the round still waits on (for a time-out): those that have not reported,
    /// not sent a chunk the reduction needs, or not confirmed the averaged chunks.
    pub fn waiting_on(&self) -> Vec<MemberId> {
        if self.outcome.is_some() {
            return Vec::new();
        }
        self.spec
            .shards
            .iter()
            .filter(|(m, n)| {
                !self.reports.contains_key(m)
                    || (*n > 0 && self.got.iter().any(|g| !g.contains(m)))
                    || (self.all_reduced() && !self.arrived.contains(m))
            })
            .map(|(m, _)| *m)
            .collect()
    }

    /// Feeds one event; returns what to do, in order.
    pub fn handle(&mut self, event: RoundEvent) -> Vec<RoundAction> {
        if self.outcome.is_some() {
            // Decided: late messages and losses change nothing (a loss after the commit does
            // not undo it; the coordinator just drops the member).
            return Vec::new();
        }
        let mut out = Vec::new();
        match event {
            RoundEvent::Lost { member } => {
                if self.is_member(member) {
                    self.outcome = Some(Outcome::Aborted);
                    out.push(RoundAction::Abort);
                }
                return out;
            }
            RoundEvent::Grad {
                member,
                index,
                values,
            } => {
                if let Err(reason) = self.add_grad(member, index, values, &mut out) {
                    return self.evict(member, reason);
                }
            }
            RoundEvent::Done { member, report } => {
                if let Err(reason) = self.add_report(member, report) {
                    return self.evict(member, reason);
                }
            }
            RoundEvent::Arrived { member } => {
                if !self.is_member(member) {
                    return out;
                }
                if !self.all_reduced() {
                    return self.evict(member, "confirmed averaged chunks not sent yet".into());
                }
                self.arrived.insert(member);
            }
        }
        if self.all_reduced()
            && self.reports.len() == self.spec.shards.len()
            && self.arrived.len() == self.spec.shards.len()
        {
            self.outcome = Some(Outcome::Committed);
            let bn_batches = self
                .spec
                .shards
                .iter()
                .flat_map(|(m, _)| self.reports[m].bn_batches.iter().cloned())
                .collect();
            out.push(RoundAction::Commit { bn_batches });
        }
        out
    }

    fn evict(&mut self, member: MemberId, reason: String) -> Vec<RoundAction> {
        self.outcome = Some(Outcome::Aborted);
        vec![RoundAction::Evict { member, reason }, RoundAction::Abort]
    }

    fn add_grad(
        &mut self,
        member: MemberId,
        index: usize,
        values: Vec<f64>,
        out: &mut Vec<RoundAction>,
    ) -> Result<(), String> {
        let cases = self.cases_of(member);
        if cases == 0 {
            return Err(if self.is_member(member) {
                "sent a gradient for an empty shard".into()
            } else {
                "sent a gradient for a round it is not in".into()
            });
        }
        let Some(&len) = self.spec.chunk_lengths.get(index) else {
            return Err(format!("sent chunk {index}, out of range"));
        };
        if values.len() != len {
            return Err(format!(
                "sent chunk {index} with {} values, expected {len}",
                values.len()
            ));
        }
        if !self.got[index].insert(member) {
            return Err(format!("sent chunk {index} twice"));
        }
        let sum = self.acc[index].get_or_insert_with(|| vec![0.0; len]);
        for (s, v) in sum.iter_mut().zip(values) {
            *s += v;
        }
        if self.got[index].len() == self.contributors() {
            let sum = self.acc[index].take().unwrap_or_default();
            let values = crate::train::replica::mean_of(&sum, self.total_cases);
            self.reduced += 1;
            out.push(RoundAction::Reduced { index, values });
        }
        Ok(())
    }

    fn add_report(&mut self, member: MemberId, report: ShardReport) -> Result<(), String> {
        if !self.is_member(member) {
            return Err("reported a shard of a round it is not in".into());
        }
        let cases = self.cases_of(member);
        if report.samples != cases {
            return Err(format!(
                "reported {} cases for a shard of {cases}",
                report.samples
            ));
        }
        let expected_step = self.spec.id.step - 1;
        if report.held_step != expected_step {
            return Err(format!(
                "holds step {}, but step {} needs step {expected_step}",
                report.held_step, self.spec.id.step
            ));
        }
        let micro = if self.spec.micro_batch == 0 {
            cases.max(1)
        } else {
            self.spec.micro_batch
        };
        let batches = cases.div_ceil(micro);
        if report.bn_batches.len() != batches {
            return Err(format!(
                "sent batch-norm statistics of {} micro-batches, expected {batches}",
                report.bn_batches.len()
            ));
        }
        if let Some(b) = report
            .bn_batches
            .iter()
            .find(|b| b.len() != self.spec.bn_batch_len)
        {
            return Err(format!(
                "sent batch-norm statistics of {} values, expected {}",
                b.len(),
                self.spec.bn_batch_len
            ));
        }
        if self.reports.insert(member, report).is_some() {
            return Err("reported its shard twice".into());
        }
        Ok(())
    }
}

/// The replica's side of exactly-once: whether a replica holding step `held` applies a
/// commit of `step` (`Ok(true)`), already holds it (`Ok(false)`, nothing to do), or cannot
/// (`Err`, it missed a step).
pub fn commit_check(held: u64, step: u64) -> Result<bool, String> {
    if step <= held {
        Ok(false)
    } else if step == held + 1 {
        Ok(true)
    } else {
        Err(format!(
            "step {step} cannot follow step {held}, which this replica holds"
        ))
    }
}

#[cfg(test)]
mod tests;
