//! The error table: every error a request can end with, its `tonic::Code`, and the
//! [`ErrorDetails`] the client reads to decide whether to retry and whether a write may still
//! apply. Stable codes (`ErrorDetails::code`) are the variant names.
//!
//! | variant | tonic code | retryable | may have applied |
//! |---|---|---|---|
//! | `InvalidArgument` | InvalidArgument | no | no |
//! | `NotLeader` | FailedPrecondition | yes (at the hinted leader) | no |
//! | `WrongShard` | FailedPrecondition | yes (after refreshing the map) | no |
//! | `Unavailable` | Unavailable | yes | no |
//! | `OutcomeUnknown` | Unknown | yes, with the same request id | **yes** |
//! | `StaleRequest` | FailedPrecondition | no | yes (it was acknowledged before) |
//! | `Internal` | Internal | no | yes, for writes (conservative) |
//! | `NotFound` | NotFound | no | — (admin requests) |
//! | `AlreadyExists` | AlreadyExists | no | — (admin requests) |
//! | `Refused` | FailedPrecondition | no | — (admin requests) |
//! | `ReplyFull` | ResourceExhausted | yes, as its own `Get` | — (one read of a `MultiGet`) |

use prost::Message;
use strata_proto::v1::ErrorDetails;
use tonic::{Code, Status};

use crate::layout::GroupId;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The request broke a limit or is malformed. Nothing was proposed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// This node does not lead the shard. Nothing was proposed; retry at the leader.
    #[error("node does not lead shard {shard}; leader is {}", leader_text(.leader))]
    NotLeader {
        /// The shard asked for.
        shard: GroupId,
        /// Leader hint: node id and client address, when known.
        leader: Option<(u64, String)>,
    },
    /// This node holds no replica of the shard. Nothing was proposed; refresh the shard map.
    #[error("shard {shard} has no replica on this node (map epoch {epoch})")]
    WrongShard {
        /// The shard asked for.
        shard: GroupId,
        /// The epoch of the map this node routed with.
        epoch: u64,
    },
    /// The shard cannot serve right now (no quorum, shutting down). Nothing was proposed.
    #[error("shard {shard} unavailable: {reason}")]
    Unavailable {
        /// The shard asked for.
        shard: GroupId,
        /// What went wrong.
        reason: String,
    },
    /// The write was proposed but its fate is unknown: it may still commit. Retry with the same
    /// request id to learn the outcome; never report it as failed.
    #[error("write to shard {shard} has an unknown outcome: {reason}")]
    OutcomeUnknown {
        /// The shard written to.
        shard: GroupId,
        /// What went wrong.
        reason: String,
    },
    /// The request id is older than what the client already acknowledged: a late duplicate.
    #[error("request sequence {sequence} was already acknowledged by client {client_id}")]
    StaleRequest {
        /// The client.
        client_id: u64,
        /// The late sequence.
        sequence: u64,
    },
    /// A bug or a storage failure.
    #[error("internal error: {0}")]
    Internal(String),
    /// An admin request names something that does not exist (an unknown node id).
    #[error("not found: {0}")]
    NotFound(String),
    /// An admin request would create something that exists (a node added twice).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// An admin request is valid but unsafe now (it would leave a shard below quorum or the
    /// cluster below the replication factor). Nothing was changed.
    #[error("refused: {0}")]
    Refused(String),
    /// One read of a `MultiGet` was not served: the answer's size budget was spent by the reads
    /// before it. Send it on its own.
    #[error("the MultiGet answer is full; send this read on its own")]
    ReplyFull,
}

fn leader_text(leader: &Option<(u64, String)>) -> String {
    match leader {
        Some((id, addr)) => format!("node {id} at {addr}"),
        None => "unknown".to_string(),
    }
}

impl KvError {
    /// The stable code, the tonic code, and the details for this error.
    pub fn details(&self) -> (Code, ErrorDetails) {
        let mut d = ErrorDetails::default();
        let code = match self {
            KvError::InvalidArgument(_) => {
                d.code = "InvalidArgument".into();
                Code::InvalidArgument
            }
            KvError::NotLeader { shard, leader } => {
                d.code = "NotLeader".into();
                d.retryable = true;
                d.shard_id = *shard;
                if let Some((id, addr)) = leader {
                    d.leader_id = *id;
                    d.leader_addr = addr.clone();
                }
                Code::FailedPrecondition
            }
            KvError::WrongShard { shard, epoch } => {
                d.code = "WrongShard".into();
                d.retryable = true;
                d.shard_id = *shard;
                d.epoch = *epoch;
                Code::FailedPrecondition
            }
            KvError::Unavailable { shard, .. } => {
                d.code = "Unavailable".into();
                d.retryable = true;
                d.shard_id = *shard;
                Code::Unavailable
            }
            KvError::OutcomeUnknown { shard, .. } => {
                d.code = "OutcomeUnknown".into();
                d.retryable = true;
                d.may_have_applied = true;
                d.shard_id = *shard;
                Code::Unknown
            }
            KvError::StaleRequest { .. } => {
                d.code = "StaleRequest".into();
                d.may_have_applied = true;
                Code::FailedPrecondition
            }
            KvError::Internal(_) => {
                d.code = "Internal".into();
                d.may_have_applied = true;
                Code::Internal
            }
            KvError::NotFound(_) => {
                d.code = "NotFound".into();
                Code::NotFound
            }
            KvError::AlreadyExists(_) => {
                d.code = "AlreadyExists".into();
                Code::AlreadyExists
            }
            KvError::Refused(_) => {
                d.code = "Refused".into();
                Code::FailedPrecondition
            }
            KvError::ReplyFull => {
                d.code = "ReplyFull".into();
                d.retryable = true;
                Code::ResourceExhausted
            }
        };
        (code, d)
    }
}

impl From<KvError> for Status {
    fn from(e: KvError) -> Status {
        let (code, details) = e.details();
        Status::with_details(code, e.to_string(), details.encode_to_vec().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_decodable_details() {
        let s: Status = KvError::NotLeader {
            shard: 3,
            leader: Some((2, "127.0.0.1:7102".into())),
        }
        .into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        let d = ErrorDetails::decode(s.details()).unwrap();
        assert_eq!(d.code, "NotLeader");
        assert_eq!(
            (d.leader_id, d.leader_addr.as_str(), d.shard_id),
            (2, "127.0.0.1:7102", 3)
        );
        assert!(d.retryable && !d.may_have_applied);

        let s: Status = KvError::OutcomeUnknown {
            shard: 1,
            reason: "leader changed".into(),
        }
        .into();
        let d = ErrorDetails::decode(s.details()).unwrap();
        assert!(d.may_have_applied && d.retryable);

        let s: Status = KvError::InvalidArgument("key is empty".into()).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("key is empty"));
    }
}
