//! The client's error type.

use prost::Message;
use strata_proto::v1::ErrorDetails;

/// Why an operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request was invalid (empty or oversized key or value, cross-shard batch, unknown
    /// shard…). Nothing was written.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The write may or may not have applied: it was sent and then the deadline passed, the
    /// connection broke, or leadership changed after it was proposed. Read the key to find out.
    #[error("write outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The cluster could not serve the request before the deadline, and it was never proposed
    /// (or it is a read). Nothing was written.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// No endpoint answered, so the shard map could not be loaded.
    #[error("cannot reach the cluster: {0}")]
    Connect(String),
    /// The server reported a bug or storage failure.
    #[error("server error: {0}")]
    Server(String),
    /// The cluster refused an admin request (unknown node, node added twice, a removal that
    /// would leave a shard below quorum…). Nothing was changed.
    #[error("{0}")]
    Rejected(String),
}

impl Error {
    /// Whether a write that failed with this error may still have been applied.
    pub fn may_have_applied(&self) -> bool {
        matches!(self, Error::OutcomeUnknown(_) | Error::Server(_))
    }
}

/// How the retry loop should treat a failed attempt.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Retry at this leader — nothing was proposed.
    NotLeader(Option<LeaderHint>),
    /// Refresh the shard map and retry — nothing was proposed.
    WrongShard,
    /// Retry later, maybe elsewhere; `may_have_applied` when the write may have been proposed,
    /// `node_failed` when the node did not answer (transport error or timeout).
    Retry {
        may_have_applied: bool,
        node_failed: bool,
        reason: String,
    },
    /// Stop: the error is final.
    Fail(Error),
}

/// The leader a `NotLeader` answer names.
#[derive(Debug)]
pub(crate) struct LeaderHint {
    /// Node id.
    pub id: u64,
    /// Its client address as the answering node knows it (empty if unknown): when it differs
    /// from the client's map, one of the two is stale — the node moved (`node update`).
    pub addr: String,
}

/// Classifies a failed attempt from its status and the details the node attached.
pub(crate) fn classify(status: &tonic::Status, is_write: bool) -> Verdict {
    let details = ErrorDetails::decode(status.details())
        .ok()
        .filter(|d| !d.code.is_empty());
    let reason = format!("{}: {}", status.code(), status.message());
    match details {
        Some(d) => match d.code.as_str() {
            "NotLeader" => Verdict::NotLeader((d.leader_id != 0).then_some(LeaderHint {
                id: d.leader_id,
                addr: d.leader_addr,
            })),
            "WrongShard" => Verdict::WrongShard,
            "Unavailable" => Verdict::Retry {
                may_have_applied: false,
                node_failed: false,
                reason,
            },
            "OutcomeUnknown" => Verdict::Retry {
                may_have_applied: true,
                node_failed: false,
                reason,
            },
            "InvalidArgument" => Verdict::Fail(Error::InvalidArgument(
                // The node's message names the kind already; the client's Display adds it again.
                status
                    .message()
                    .strip_prefix("invalid argument: ")
                    .unwrap_or(status.message())
                    .to_string(),
            )),
            "StaleRequest" => Verdict::Fail(Error::OutcomeUnknown(status.message().to_string())),
            "NotFound" | "AlreadyExists" | "Refused" => {
                Verdict::Fail(Error::Rejected(status.message().to_string()))
            }
            _ => Verdict::Fail(Error::Server(status.message().to_string())),
        },
        // No details: the status came from the transport (connection refused or broken,
        // timeout) or from tonic itself (message too large).
        None => match status.code() {
            tonic::Code::InvalidArgument
            | tonic::Code::OutOfRange
            | tonic::Code::ResourceExhausted => {
                Verdict::Fail(Error::InvalidArgument(transport_refusal(status.message())))
            }
            // A refused connection never delivered the request.
            tonic::Code::Unavailable if is_connect_error(status) => Verdict::Retry {
                may_have_applied: false,
                node_failed: true,
                reason,
            },
            _ => Verdict::Retry {
                may_have_applied: is_write,
                node_failed: true,
                reason,
            },
        },
    }
}

/// Words a refusal that tonic made before the request reached the node's handler. The one a
/// caller meets is a request over the node's message limit (a value of several MiB), which tonic
/// words as "Error, decoded message length too large: found N bytes, the limit is: M bytes";
/// said in the terms of the node's limits instead. Any other message is kept as it is.
fn transport_refusal(message: &str) -> String {
    let sizes = message
        .split_once("decoded message length too large: found ")
        .and_then(|(_, rest)| rest.split_once(" bytes, the limit is: "))
        .and_then(|(found, rest)| Some((found, rest.strip_suffix(" bytes")?)));
    match sizes {
        Some((found, limit)) => format!(
            "request is {found} bytes, over the node's message limit of {limit} bytes \
             (--max-message-bytes); nothing was written. A value may be at most the node's \
             --max-value-bytes (1 MiB by default)"
        ),
        None => message.to_string(),
    }
}

/// Whether `status` is a `MultiGet` read left unserved because the answer was full.
pub(crate) fn is_reply_full(status: &tonic::Status) -> bool {
    ErrorDetails::decode(status.details()).is_ok_and(|d| d.code == "ReplyFull")
}

/// Whether the transport failed before the request could be sent (connect error).
fn is_connect_error(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        if e.to_string().contains("tcp connect error") {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_status(code: &str, message: &str) -> tonic::Status {
        let details = ErrorDetails {
            code: code.into(),
            ..Default::default()
        };
        tonic::Status::with_details(
            tonic::Code::InvalidArgument,
            message,
            details.encode_to_vec().into(),
        )
    }

    #[test]
    fn a_node_invalid_argument_names_its_kind_once() {
        let status = node_status("InvalidArgument", "invalid argument: key is empty");
        match classify(&status, true) {
            Verdict::Fail(e) => assert_eq!(e.to_string(), "invalid argument: key is empty"),
            other => panic!("expected a final error, got {other:?}"),
        }
    }

    #[test]
    fn a_request_over_the_message_limit_is_named_in_the_nodes_terms() {
        // What tonic answers, with no details, when a request exceeds the decoding limit.
        let status = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5000026 bytes, the limit is: 4194304 bytes",
        );
        match classify(&status, true) {
            Verdict::Fail(Error::InvalidArgument(message)) => {
                assert!(
                    message.starts_with(
                        "request is 5000026 bytes, over the node's message limit of 4194304 bytes"
                    ),
                    "{message}"
                );
                assert!(message.contains("nothing was written"), "{message}");
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        // Any other transport refusal keeps its words.
        let status = tonic::Status::resource_exhausted("too many streams");
        match classify(&status, true) {
            Verdict::Fail(Error::InvalidArgument(message)) => {
                assert_eq!(message, "too many streams")
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }
}
