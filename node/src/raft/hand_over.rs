//! Handing a group's leadership to another replica before a planned stop.
//!
//! A leader that hands over stops proposing and stops sending heartbeats until someone else
//! leads, so the successor has to be one that can take over at once. The stopping leader picks,
//! among the group's voters, one that acknowledged it recently (it is up) and is furthest along
//! the log (it wins the election without catching up first). It then waits for leadership to
//! move, but gives up as soon as the successor's peer link breaks: a successor that stopped
//! meanwhile — as when a whole cluster is stopped at once — would otherwise hold the stop up for
//! the whole timeout.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use openraft::type_config::async_runtime::watch::WatchReceiver;
use openraft::Instant as _;

use super::group::Group;
use crate::layout::group_name;

/// How often a hand-over checks whether its successor is still reachable.
const TARGET_CHECK_INTERVAL: Duration = Duration::from_millis(20);

/// A voter the leader could hand over to, as the leader's metrics see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// Node id.
    pub id: u64,
    /// Time since it last acknowledged the leader (`None`: never, in this term).
    pub ack_age: Option<Duration>,
    /// The last log index known to be replicated to it.
    pub matched: Option<u64>,
}

/// The best successor among `candidates`: heard from within `fresh`, then furthest along the log,
/// then most recently heard from. `None` when nobody was heard from within `fresh`.
pub(crate) fn choose_successor(candidates: &[Candidate], fresh: Duration) -> Option<u64> {
    candidates
        .iter()
        .filter(|c| c.ack_age.is_some_and(|age| age <= fresh))
        .max_by_key(|c| (c.matched, Reverse(c.ack_age)))
        .map(|c| c.id)
}

/// How far behind the leader's log a voter may be and still be handed the leadership when an
/// operator or the placement driver names it: further behind, it would have to catch up before
/// it could win, while the leader, having handed over, no longer sends heartbeats — the group
/// would sit out an election instead.
pub(crate) const MAX_SUCCESSOR_LAG: u64 = 100;

/// Whether `c` can take over at once from a leader whose log ends at `last_log`: heard from
/// within `fresh` and at most [`MAX_SUCCESSOR_LAG`] entries behind.
pub(crate) fn ready_to_lead(c: &Candidate, last_log: u64, fresh: Duration) -> bool {
    c.ack_age.is_some_and(|age| age <= fresh)
        && close_enough_to_lead(c.matched.unwrap_or(0), last_log)
}

/// Whether a replica whose log reaches `log` is at most [`MAX_SUCCESSOR_LAG`] entries behind a
/// leader whose log ends at `leader_log`. Shared by the leader's check and the placement driver's.
pub(crate) fn close_enough_to_lead(log: u64, leader_log: u64) -> bool {
    log.saturating_add(MAX_SUCCESSOR_LAG) >= leader_log
}

/// How a hand-over ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// This node did not lead the group: nothing to do.
    NotLeader,
    /// No voter was heard from recently: the group is left to elect a leader.
    NoSuccessor,
    /// Another node leads the group now.
    Moved(u64),
    /// The successor's peer link broke while waiting.
    SuccessorLost(u64),
    /// Leadership had not moved when the time was up.
    TimedOut(u64),
    /// The named successor was not heard from recently or is too far behind: nothing was done.
    NotReady(u64),
    /// The group's Raft instance stopped.
    Stopped,
}

impl Group {
    /// This group's candidates for a hand-over, from the leader's metrics (empty when this node
    /// does not lead).
    fn hand_over_candidates(&self) -> Vec<Candidate> {
        let metrics = self.raft().metrics();
        let m = metrics.borrow_watched();
        let (Some(heartbeat), Some(replication)) = (&m.heartbeat, &m.replication) else {
            return Vec::new();
        };
        m.membership_config
            .membership()
            .voter_ids()
            .filter(|id| *id != m.id)
            .map(|id| Candidate {
                id,
                ack_age: heartbeat.get(&id).copied().flatten().map(|t| t.elapsed()),
                matched: replication.get(&id).cloned().flatten().map(|l| l.index()),
            })
            .collect()
    }

    /// If this node leads the group, hands leadership to the best successor heard from within
    /// `fresh` and waits up to `timeout` for it to move; `successor_lost` says whether a node's
    /// peer link is broken. Used before a planned stop, so clients see a hand-over instead of an
    /// election.
    pub async fn hand_over_to_successor(
        &self,
        fresh: Duration,
        timeout: Duration,
        successor_lost: impl Fn(u64) -> bool,
    ) -> HandOver {
        if !self.is_leader() {
            return HandOver::NotLeader;
        }
        match choose_successor(&self.hand_over_candidates(), fresh) {
            Some(to) => self.move_leadership(to, timeout, successor_lost).await,
            None => HandOver::NoSuccessor,
        }
    }

    /// If this node leads the group, hands leadership to `to` — provided `to` can take over at
    /// once (heard from within `fresh`, at most `MAX_SUCCESSOR_LAG` entries behind) — and waits
    /// up to `timeout` for it to move. `Ok` when another node leads (or this one did not), else
    /// why not. For moves the operator or the placement driver asked for.
    pub async fn hand_over_leadership(
        &self,
        to: u64,
        fresh: Duration,
        timeout: Duration,
    ) -> Result<(), String> {
        let ready = || {
            let last_log = self.raft().metrics().borrow_watched().last_log_index;
            self.hand_over_candidates()
                .iter()
                .any(|c| c.id == to && ready_to_lead(c, last_log.unwrap_or(0), fresh))
        };
        let outcome = if !self.is_leader() {
            HandOver::NotLeader
        } else if !ready() {
            HandOver::NotReady(to)
        } else {
            self.move_leadership(to, timeout, |_| false).await
        };
        match outcome {
            HandOver::NotLeader | HandOver::Moved(_) => Ok(()),
            HandOver::NotReady(_) => Err(format!(
                "node {to} is not ready to lead {}: not heard from within {fresh:?}, or more than {MAX_SUCCESSOR_LAG} entries behind",
                group_name(self.id)
            )),
            other => Err(format!(
                "leadership of {} did not move to node {to} ({other:?})",
                group_name(self.id)
            )),
        }
    }

    /// Asks openraft to transfer leadership to `to`, then waits for another leader to be known,
    /// for `successor_lost(to)`, or for `timeout`.
    async fn move_leadership(
        &self,
        to: u64,
        timeout: Duration,
        successor_lost: impl Fn(u64) -> bool,
    ) -> HandOver {
        if !self.is_leader() {
            return HandOver::NotLeader;
        }
        if self.raft().trigger().transfer_leader(to).await.is_err() {
            return HandOver::Stopped;
        }
        let me = *self.raft().node_id();
        let deadline = Instant::now() + timeout;
        let mut metrics = self.raft().metrics();
        loop {
            if let Some(leader) = metrics.borrow_watched().current_leader {
                if leader != me {
                    return HandOver::Moved(leader);
                }
            }
            if successor_lost(to) {
                return HandOver::SuccessorLost(to);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return HandOver::TimedOut(to);
            }
            // Wake on a metrics change or for the next reachability check; a closed metrics
            // channel means the group's Raft stopped.
            if tokio::time::timeout(left.min(TARGET_CHECK_INTERVAL), metrics.changed())
                .await
                .is_ok_and(|changed| changed.is_err())
            {
                return HandOver::Stopped;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: Duration = Duration::from_millis(300);

    fn candidate(id: u64, ack_ms: Option<u64>, matched: Option<u64>) -> Candidate {
        Candidate {
            id,
            ack_age: ack_ms.map(Duration::from_millis),
            matched,
        }
    }

    #[test]
    fn a_voter_not_heard_from_recently_is_never_chosen() {
        let silent = candidate(2, Some(5_000), Some(100));
        let never = candidate(3, None, Some(100));
        assert_eq!(choose_successor(&[silent, never], FRESH), None);
        let live = candidate(4, Some(10), Some(40));
        assert_eq!(choose_successor(&[silent, never, live], FRESH), Some(4));
    }

    #[test]
    fn the_most_caught_up_live_voter_wins_then_the_most_recently_heard() {
        let behind = candidate(2, Some(1), Some(90));
        let ahead = candidate(3, Some(200), Some(100));
        assert_eq!(choose_successor(&[behind, ahead], FRESH), Some(3));
        let ahead_too = candidate(4, Some(5), Some(100));
        assert_eq!(
            choose_successor(&[behind, ahead, ahead_too], FRESH),
            Some(4)
        );
    }

    #[test]
    fn a_named_successor_must_be_live_and_nearly_caught_up() {
        let last_log = 1_000;
        let live_close = candidate(2, Some(10), Some(last_log - MAX_SUCCESSOR_LAG));
        assert!(ready_to_lead(&live_close, last_log, FRESH));
        let live_far = candidate(2, Some(10), Some(last_log - MAX_SUCCESSOR_LAG - 1));
        assert!(!ready_to_lead(&live_far, last_log, FRESH));
        let silent_caught_up = candidate(2, Some(5_000), Some(last_log));
        assert!(!ready_to_lead(&silent_caught_up, last_log, FRESH));
        let never_replicated = candidate(2, Some(10), None);
        assert!(!ready_to_lead(&never_replicated, last_log, FRESH));
        assert!(ready_to_lead(&never_replicated, 50, FRESH));
    }

    #[test]
    fn no_candidates_no_successor() {
        assert_eq!(choose_successor(&[], FRESH), None);
    }
}
