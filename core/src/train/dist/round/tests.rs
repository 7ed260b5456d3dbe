//! The round against every point at which one or all replicas can be lost.

use std::collections::HashMap;

use super::*;
use crate::train::dist::shard;

const CHUNKS: [usize; 2] = [3, 2];
const BN_LEN: usize = 2;

/// The gradient replica `member` computes for global case `case`: distinct per case.
fn grad_of_case(case: usize, len: usize, chunk: usize) -> Vec<f64> {
    (0..len)
        .map(|i| (case * 10 + chunk * 3 + i) as f64 + 0.5)
        .collect()
}

/// A replica's shard: the gradient summed over its cases, chunk by chunk, and one
/// micro-batch statistic per case (micro-batches of one) whose values name the case.
fn shard_of(cases: &[usize]) -> (Vec<Vec<f64>>, ShardReport) {
    let chunks = CHUNKS
        .iter()
        .enumerate()
        .map(|(k, &len)| {
            let mut sum = vec![0f64; len];
            for &c in cases {
                for (m, v) in sum.iter_mut().zip(grad_of_case(c, len, k)) {
                    *m += v;
                }
            }
            sum
        })
        .collect();
    let report = ShardReport {
        samples: cases.len(),
        held_step: 0,
        sums: (cases.len() as f64, 0.0, 0.0),
        compute_ms: 1.0,
        bn_batches: cases.iter().map(|&c| vec![c as f32; BN_LEN]).collect(),
    };
    (chunks, report)
}

/// The events of one round with no loss, in one of several interleavings.
fn script(members: &[(MemberId, Vec<usize>)], order: usize, step: u64) -> Vec<RoundEvent> {
    let mut per_member: Vec<Vec<RoundEvent>> = members
        .iter()
        .map(|(m, cases)| {
            let (chunks, mut report) = shard_of(cases);
            report.held_step = step - 1;
            let mut ev: Vec<RoundEvent> = if cases.is_empty() {
                Vec::new()
            } else {
                chunks
                    .into_iter()
                    .enumerate()
                    .map(|(index, values)| RoundEvent::Grad {
                        member: *m,
                        index,
                        values,
                    })
                    .collect()
            };
            let done = RoundEvent::Done { member: *m, report };
            if order.is_multiple_of(2) {
                ev.push(done);
            } else {
                ev.insert(0, done);
            }
            ev
        })
        .collect();
    if order >= 2 {
        per_member.reverse();
    }
    let mut out = Vec::new();
    if order >= 4 {
        // Round-robin across members.
        let longest = per_member.iter().map(Vec::len).max().unwrap_or(0);
        for i in 0..longest {
            for ev in &per_member {
                if let Some(e) = ev.get(i) {
                    out.push(e.clone());
                }
            }
        }
    } else {
        out = per_member.concat();
    }
    for (m, _) in members {
        out.push(RoundEvent::Arrived { member: *m });
    }
    out
}

/// A replica as far as exactly-once is concerned: the step it holds and how often each step
/// was applied.
#[derive(Debug, Default)]
struct Replica {
    held: u64,
    applied: HashMap<u64, usize>,
    bn: Vec<Vec<f32>>,
}

impl Replica {
    fn commit(&mut self, step: u64, bn: &[Vec<f32>]) {
        if commit_check(self.held, step).expect("never a gap") {
            self.held = step;
            *self.applied.entry(step).or_default() += 1;
            self.bn.extend(bn.iter().cloned());
        }
    }
}

/// Runs one optimizer step over `alive` until it commits, losing the replicas in `lose`
/// at event `at` of the first round (`at == len`: during the commit, with `delivered`
/// telling whether each lost replica got the commit before it went). Returns the replicas
/// left and the step's outcome.
fn run_step(
    replicas: &mut HashMap<MemberId, Replica>,
    batch: &[usize],
    order: usize,
    lose: &[MemberId],
    at: usize,
    delivered: bool,
) -> Option<Vec<Vec<f32>>> {
    let step = 1;
    let mut alive: Vec<MemberId> = {
        let mut v: Vec<MemberId> = replicas.keys().copied().collect();
        v.sort_unstable();
        v
    };
    let mut round_no = 0;
    loop {
        if alive.is_empty() {
            return None;
        }
        round_no += 1;
        let shards = shard(batch, alive.len());
        let members: Vec<(MemberId, Vec<usize>)> = alive.iter().copied().zip(shards).collect();
        let mut round = StepRound::new(RoundSpec {
            id: StepId {
                epoch: 1,
                step,
                round: round_no,
            },
            shards: members.iter().map(|(m, c)| (*m, c.len())).collect(),
            chunk_lengths: CHUNKS.to_vec(),
            micro_batch: 1,
            bn_batch_len: BN_LEN,
        });
        let events = script(&members, order, step);
        let mut committed: Option<Vec<Vec<f32>>> = None;
        let mut reduced: HashMap<usize, Vec<f32>> = HashMap::new();
        let first = round_no == 1;
        for (i, ev) in events.into_iter().enumerate() {
            if first && i == at {
                for &m in lose {
                    for a in round.handle(RoundEvent::Lost { member: m }) {
                        assert_eq!(a, RoundAction::Abort);
                    }
                    alive.retain(|x| *x != m);
                }
            }
            // A lost member's messages never arrive.
            let from = match &ev {
                RoundEvent::Grad { member, .. }
                | RoundEvent::Done { member, .. }
                | RoundEvent::Arrived { member }
                | RoundEvent::Lost { member } => *member,
            };
            if !alive.contains(&from) {
                continue;
            }
            for a in round.handle(ev) {
                match a {
                    RoundAction::Reduced { index, values } => {
                        assert!(
                            reduced.insert(index, values).is_none(),
                            "chunk {index} reduced twice"
                        );
                    }
                    RoundAction::Commit { bn_batches } => {
                        assert!(committed.is_none(), "committed twice");
                        committed = Some(bn_batches);
                    }
                    RoundAction::Abort => {}
                    RoundAction::Evict { member, reason } => {
                        panic!("member {member} evicted: {reason}")
                    }
                }
            }
        }
        match round.outcome() {
            Some(Outcome::Committed) => {
                let bn = committed.expect("a commit action");
                // The averaged chunks are the mean over the whole global batch.
                for (k, &len) in CHUNKS.iter().enumerate() {
                    let mut want = vec![0f64; len];
                    for &c in batch {
                        for (w, v) in want.iter_mut().zip(grad_of_case(c, len, k)) {
                            *w += v;
                        }
                    }
                    // Exactly the mean over the global batch, whatever the partition.
                    assert_eq!(
                        reduced[&k],
                        crate::train::replica::mean_of(&want, batch.len()),
                        "chunk {k}"
                    );
                }
                let mut lost_during_commit: Vec<MemberId> = Vec::new();
                if first && at >= script(&members, order, step).len() {
                    // Lost during the commit: the round is decided, the loss changes nothing.
                    for &m in lose {
                        assert!(round.handle(RoundEvent::Lost { member: m }).is_empty());
                        lost_during_commit.push(m);
                    }
                }
                for (m, r) in replicas.iter_mut() {
                    let lost = lost_during_commit.contains(m);
                    if alive.contains(m) && (!lost || delivered) {
                        r.commit(step, &bn);
                    }
                }
                // The coordinator sends the same commit again (e.g. a retried send): no
                // replica applies it twice.
                for r in replicas.values_mut() {
                    if r.held == step {
                        r.commit(step, &bn);
                    }
                }
                replicas.retain(|m, _| alive.contains(m) && !lost_during_commit.contains(m));
                return Some(bn);
            }
            Some(Outcome::Aborted) => {
                assert!(committed.is_none(), "aborted after a commit");
                assert!(
                    replicas.values().all(|r| r.held == 0),
                    "an aborted round applied something"
                );
                replicas.retain(|m, _| alive.contains(m));
            }
            None => panic!("round {round_no} ended undecided"),
        }
    }
}

#[test]
fn every_loss_point_ends_in_one_commit_applied_once_with_global_order() {
    let mut cases_run = 0;
    for n in 1..=3u64 {
        let ids: Vec<MemberId> = (10..10 + n).collect();
        for batch in [vec![4usize, 1], vec![2, 0, 5]] {
            for order in 0..6 {
                let len = script(
                    &ids.iter()
                        .copied()
                        .zip(shard(&batch, ids.len()))
                        .collect::<Vec<_>>(),
                    order,
                    1,
                )
                .len();
                // One replica (each of them), or all of them.
                let mut losses: Vec<Vec<MemberId>> = ids.iter().map(|&m| vec![m]).collect();
                losses.push(ids.clone());
                for lose in &losses {
                    for at in 0..=len {
                        for delivered in [false, true] {
                            let mut replicas: HashMap<MemberId, Replica> =
                                ids.iter().map(|&m| (m, Replica::default())).collect();
                            let outcome =
                                run_step(&mut replicas, &batch, order, lose, at, delivered);
                            cases_run += 1;
                            match outcome {
                                None => {
                                    // Every replica lost before the commit: nothing applied,
                                    // the coordinator rolls back to its checkpoint.
                                    assert_eq!(lose.len(), ids.len());
                                    assert!(at < len, "lost during a commit yet no commit");
                                }
                                Some(bn) => {
                                    // Micro-batch statistics in the global batch's order,
                                    // whatever the partition.
                                    let want: Vec<Vec<f32>> =
                                        batch.iter().map(|&c| vec![c as f32; BN_LEN]).collect();
                                    assert_eq!(bn, want);
                                    for (m, r) in &replicas {
                                        assert_eq!(r.held, 1, "member {m}");
                                        assert_eq!(r.applied.get(&1), Some(&1), "member {m}");
                                        assert_eq!(r.bn, want, "member {m}");
                                    }
                                    if at < len {
                                        assert!(
                                            replicas.keys().all(|m| !lose.contains(m)),
                                            "a lost replica stayed"
                                        );
                                    }
                                    assert!(
                                        !replicas.is_empty() || at == len,
                                        "committed with no replica"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(cases_run > 500, "{cases_run}");
}

fn spec(shards: Vec<(MemberId, usize)>) -> RoundSpec {
    RoundSpec {
        id: StepId {
            epoch: 2,
            step: 5,
            round: 9,
        },
        shards,
        chunk_lengths: vec![2],
        micro_batch: 0,
        bn_batch_len: 1,
    }
}

fn report(samples: usize, held: u64, batches: usize) -> ShardReport {
    ShardReport {
        samples,
        held_step: held,
        bn_batches: vec![vec![0.0]; batches],
        ..ShardReport::default()
    }
}

#[test]
fn protocol_breaches_evict_the_member_and_abort() {
    let evicted = |actions: Vec<RoundAction>| -> String {
        match actions.as_slice() {
            [RoundAction::Evict { reason, .. }, RoundAction::Abort] => reason.clone(),
            other => panic!("expected an eviction, got {other:?}"),
        }
    };
    // A replica at the wrong step.
    let mut r = StepRound::new(spec(vec![(1, 1), (2, 1)]));
    let e = evicted(r.handle(RoundEvent::Done {
        member: 1,
        report: report(1, 3, 1),
    }));
    assert!(e.contains("holds step 3"), "{e}");
    assert_eq!(r.outcome(), Some(Outcome::Aborted));
    // A gradient from an empty shard, a chunk twice, a wrong length.
    let mut r = StepRound::new(spec(vec![(1, 1), (2, 0)]));
    let grad = |member, values: Vec<f64>| RoundEvent::Grad {
        member,
        index: 0,
        values,
    };
    assert!(evicted(r.handle(grad(2, vec![0.0; 2]))).contains("empty shard"));
    let mut r = StepRound::new(spec(vec![(1, 1), (2, 1)]));
    assert!(r.handle(grad(1, vec![1.0; 2])).is_empty());
    assert!(evicted(r.handle(grad(1, vec![1.0; 2]))).contains("twice"));
    let mut r = StepRound::new(spec(vec![(1, 1), (2, 1)]));
    assert!(evicted(r.handle(grad(1, vec![1.0; 3]))).contains("3 values"));
    // A report with the wrong micro-batch count, or the wrong number of cases.
    let mut r = StepRound::new(spec(vec![(1, 2)]));
    assert!(evicted(r.handle(RoundEvent::Done {
        member: 1,
        report: report(2, 4, 2),
    }))
    .contains("micro-batches"));
    let mut r = StepRound::new(spec(vec![(1, 2)]));
    assert!(evicted(r.handle(RoundEvent::Done {
        member: 1,
        report: report(1, 4, 1),
    }))
    .contains("shard of 2"));
    // Confirming chunks before they were sent.
    let mut r = StepRound::new(spec(vec![(1, 1)]));
    assert!(evicted(r.handle(RoundEvent::Arrived { member: 1 })).contains("not sent yet"));
    // Strangers are ignored or refused, never counted.
    let mut r = StepRound::new(spec(vec![(1, 1)]));
    assert!(r.handle(RoundEvent::Lost { member: 7 }).is_empty());
    assert!(r.handle(RoundEvent::Arrived { member: 7 }).is_empty());
    assert_eq!(r.outcome(), None);
}

#[test]
fn the_round_waits_on_exactly_the_members_behind() {
    let mut r = StepRound::new(spec(vec![(1, 1), (2, 0)]));
    assert_eq!(r.waiting_on(), vec![1, 2]);
    r.handle(RoundEvent::Done {
        member: 2,
        report: report(0, 4, 0),
    });
    assert_eq!(r.waiting_on(), vec![1]);
    r.handle(RoundEvent::Grad {
        member: 1,
        index: 0,
        values: vec![1.0, 2.0],
    });
    r.handle(RoundEvent::Done {
        member: 1,
        report: report(1, 4, 1),
    });
    // Every chunk reduced: now both must confirm.
    assert_eq!(r.waiting_on(), vec![1, 2]);
    r.handle(RoundEvent::Arrived { member: 2 });
    let a = r.handle(RoundEvent::Arrived { member: 1 });
    assert!(
        matches!(a.as_slice(), [RoundAction::Commit { .. }]),
        "{a:?}"
    );
    assert!(r.waiting_on().is_empty());
}

#[test]
fn a_replica_applies_each_step_once_and_never_skips_one() {
    assert_eq!(commit_check(4, 5), Ok(true));
    assert_eq!(commit_check(5, 5), Ok(false));
    assert_eq!(commit_check(6, 5), Ok(false));
    let e = commit_check(4, 6).unwrap_err();
    assert!(e.contains("step 6 cannot follow step 4"), "{e}");
}
