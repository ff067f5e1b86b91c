//! One peer's AppendEntries of every group, multiplexed onto one gRPC stream.
//!
//! Each group's replication to a peer sends one AppendEntries at a time; with one unary gRPC call
//! each, every round of every group paid for an HTTP/2 request of its own (headers both ways, a
//! server task, trailers) — the largest share of a round's cost after the fsync. A [`PeerLink`]
//! keeps one bidirectional stream open to its peer instead: a request is one item in a message,
//! the requests that are ready together (typically those of the groups whose log writes one
//! group-commit fsync just made durable) go out in one message, and the peer answers in the
//! same way. Raft's safety does not depend on the transport: an item lost with a broken stream
//! is a lost message, which openraft retries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use strata_proto::v1::{AppendBatch, AppendBatchReply, AppendItem};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;

use super::network::PeerClient;
use crate::layout::GroupId;

/// Longest wait for a peer to accept a new stream; the requests waiting for it fail after it.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// A message stops taking queued requests once it holds this many payload bytes: it stays far
/// below the peer message limit (one request may be large, two large ones never share a message),
/// and a catch-up request does not delay the others by much.
const BATCH_BYTES: usize = 1 << 20;

/// Above this many unanswered requests, those whose callers gave up are forgotten.
const SWEEP_ABOVE: usize = 4096;

/// One request waiting for its answer: the bincode of a `Result<Response, String>`, or why the
/// stream could not carry it.
struct Call {
    group: GroupId,
    payload: Bytes,
    answer: oneshot::Sender<Result<Bytes, String>>,
}

/// The sending side of one peer's stream. Cheap to clone; the stream task ends when the last
/// clone is dropped.
#[derive(Clone)]
pub struct PeerLink {
    calls: mpsc::UnboundedSender<Call>,
    /// Whether the last attempt to reach the peer failed (see [`PeerLink::is_down`]).
    down: Arc<AtomicBool>,
}

impl PeerLink {
    /// A link to node `peer`, reached through `client`. The stream is opened on the first
    /// request and reopened on the next request after it breaks.
    pub fn spawn(peer: u64, client: PeerClient) -> PeerLink {
        let (calls, queue) = mpsc::unbounded_channel();
        let down = Arc::new(AtomicBool::new(false));
        let reachability = Reachability {
            peer,
            down: down.clone(),
        };
        tokio::spawn(run(reachability, client, queue));
        PeerLink { calls, down }
    }

    /// Whether the peer's stream broke (or could not be opened) and has not been reopened since.
    /// False until the stream was first tried.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Sends one AppendEntries payload for `group` and waits up to `timeout` for its answer.
    pub async fn call(
        &self,
        group: GroupId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, String> {
        let (answer, answered) = oneshot::channel();
        self.calls
            .send(Call {
                group,
                payload,
                answer,
            })
            .map_err(|_| "peer link closed".to_string())?;
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("peer link dropped the request".to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }
}

/// Whether a peer's stream could be opened, logged once per change. openraft warns about every
/// failed heartbeat and AppendEntries instead — dozens of lines a second per peer that is down —
/// so its warnings are off by default (see `main.rs`) and this is what the log says instead.
struct Reachability {
    peer: u64,
    /// Shared with the link's handles.
    down: Arc<AtomicBool>,
}

impl Reachability {
    /// Records a failed stream; returns whether that was news (and so was logged).
    fn failed(&mut self, why: &str) -> bool {
        let news = !self.down.swap(true, Ordering::Relaxed);
        if news {
            tracing::warn!(peer = self.peer, "peer unreachable: {why}; retrying");
        }
        news
    }

    /// Records an opened stream; returns whether that was news (and so was logged).
    fn opened(&mut self) -> bool {
        let news = self.down.swap(false, Ordering::Relaxed);
        if news {
            tracing::info!(peer = self.peer, "peer reachable again");
        }
        news
    }
}

/// The link's task: opens the stream when there is something to send, then forwards batches and
/// routes answers until the stream breaks, then waits for the next request.
async fn run(
    mut reachability: Reachability,
    client: PeerClient,
    mut queue: mpsc::UnboundedReceiver<Call>,
) {
    while let Some(first) = queue.recv().await {
        let mut stream = Stream::default();
        let batch = stream.batch(first, &mut queue);
        if batch.items.is_empty() {
            continue;
        }
        let (out, out_queue) = mpsc::unbounded_channel();
        out.send(batch).expect("receiver held here");
        let mut client = client.clone();
        let opened = tokio::time::timeout(
            OPEN_TIMEOUT,
            client.append_entries(UnboundedReceiverStream::new(out_queue)),
        )
        .await;
        let why = match opened {
            Ok(Ok(response)) => {
                reachability.opened();
                match stream
                    .serve(&mut queue, &out, &mut response.into_inner())
                    .await
                {
                    Some(why) => format!("stream broken: {why}"),
                    None => return,
                }
            }
            Ok(Err(status)) => format!("stream not opened: {status}"),
            Err(_) => format!("stream not accepted within {OPEN_TIMEOUT:?}"),
        };
        reachability.failed(&why);
        stream.fail_all(&why);
    }
}

/// The state of one open stream: requests sent and not yet answered.
#[derive(Default)]
struct Stream {
    next_seq: u64,
    waiting: HashMap<u64, oneshot::Sender<Result<Bytes, String>>>,
}

impl Stream {
    /// `first` and every request queued behind it, as one message.
    fn batch(&mut self, first: Call, queue: &mut mpsc::UnboundedReceiver<Call>) -> AppendBatch {
        let mut items = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(call) = next {
            // A caller that gave up (timed out) needs no message.
            if !call.answer.is_closed() {
                bytes += call.payload.len();
                self.next_seq += 1;
                items.push(AppendItem {
                    seq: self.next_seq,
                    group_id: call.group,
                    payload: call.payload,
                });
                self.waiting.insert(self.next_seq, call.answer);
            }
            next = (bytes < BATCH_BYTES)
                .then(|| queue.try_recv().ok())
                .flatten();
        }
        if self.waiting.len() > SWEEP_ABOVE {
            self.waiting.retain(|_, answer| !answer.is_closed());
        }
        AppendBatch { items }
    }

    /// Forwards requests and routes answers until the stream breaks (`Some(reason)`) or every
    /// [`PeerLink`] is gone (`None`).
    async fn serve(
        &mut self,
        queue: &mut mpsc::UnboundedReceiver<Call>,
        out: &mpsc::UnboundedSender<AppendBatch>,
        answers: &mut Streaming<AppendBatchReply>,
    ) -> Option<String> {
        loop {
            tokio::select! {
                reply = answers.message() => match reply {
                    Ok(Some(reply)) => self.answer(reply),
                    Ok(None) => return Some("closed by the peer".to_string()),
                    Err(status) => return Some(status.to_string()),
                },
                call = queue.recv() => {
                    let call = call?;
                    let batch = self.batch(call, queue);
                    if !batch.items.is_empty() && out.send(batch).is_err() {
                        return Some("request stream closed".to_string());
                    }
                }
            }
        }
    }

    fn answer(&mut self, reply: AppendBatchReply) {
        for answer in reply.answers {
            if let Some(waiter) = self.waiting.remove(&answer.seq) {
                let _ = waiter.send(Ok(answer.payload));
            }
        }
    }

    /// Fails every unanswered request of a broken stream with `why`.
    fn fail_all(&mut self, why: &str) {
        for (_, waiter) in self.waiting.drain() {
            let _ = waiter.send(Err(why.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_proto::v1::AppendAnswer;

    fn call(group: GroupId) -> (Call, oneshot::Receiver<Result<Bytes, String>>) {
        let (answer, answered) = oneshot::channel();
        let payload = Bytes::from(format!("g{group}"));
        (
            Call {
                group,
                payload,
                answer,
            },
            answered,
        )
    }

    #[tokio::test]
    async fn queued_requests_travel_together_and_answers_find_their_callers() {
        let (tx, mut queue) = mpsc::unbounded_channel();
        let (first, first_answered) = call(1);
        let (second, second_answered) = call(2);
        let (gave_up, gave_up_answered) = call(3);
        drop(gave_up_answered);
        tx.send(second).unwrap();
        tx.send(gave_up).unwrap();

        let mut stream = Stream::default();
        let batch = stream.batch(first, &mut queue);
        let sent: Vec<(u64, GroupId)> = batch.items.iter().map(|i| (i.seq, i.group_id)).collect();
        assert_eq!(
            sent,
            vec![(1, 1), (2, 2)],
            "one message, the abandoned request left out"
        );

        // Answers come in completion order.
        stream.answer(AppendBatchReply {
            answers: vec![
                AppendAnswer {
                    seq: 2,
                    payload: Bytes::from_static(b"two"),
                },
                AppendAnswer {
                    seq: 1,
                    payload: Bytes::from_static(b"one"),
                },
            ],
        });
        assert_eq!(second_answered.await.unwrap().unwrap(), "two");
        assert_eq!(first_answered.await.unwrap().unwrap(), "one");
        assert!(stream.waiting.is_empty());
    }

    #[tokio::test]
    async fn a_full_message_leaves_the_rest_queued() {
        let (tx, mut queue) = mpsc::unbounded_channel();
        let (big, _big_answered) = call(1);
        let big = Call {
            payload: Bytes::from(vec![0; BATCH_BYTES]),
            ..big
        };
        let (small, _small_answered) = call(2);
        tx.send(small).unwrap();
        let mut stream = Stream::default();
        assert_eq!(stream.batch(big, &mut queue).items.len(), 1);
        let next = queue.try_recv().expect("still queued");
        assert_eq!(stream.batch(next, &mut queue).items[0].group_id, 2);
    }

    #[tokio::test]
    async fn a_broken_stream_fails_what_it_carried() {
        let (_tx, mut queue) = mpsc::unbounded_channel();
        let (first, answered) = call(7);
        let mut stream = Stream::default();
        stream.batch(first, &mut queue);
        // An answer for an unknown sequence number is ignored.
        stream.answer(AppendBatchReply {
            answers: vec![AppendAnswer {
                seq: 99,
                payload: Bytes::new(),
            }],
        });
        stream.fail_all("connection reset");
        assert_eq!(answered.await.unwrap().unwrap_err(), "connection reset");
    }

    #[test]
    fn reachability_is_logged_once_per_change() {
        let down = Arc::new(AtomicBool::new(false));
        let mut r = Reachability {
            peer: 3,
            down: down.clone(),
        };
        assert!(!r.opened(), "a first stream is not news");
        assert!(r.failed("refused"));
        assert!(
            down.load(Ordering::Relaxed),
            "the link's handles see it down"
        );
        assert!(!r.failed("refused"), "every retry while down stays quiet");
        assert!(r.opened());
        assert!(!down.load(Ordering::Relaxed));
        assert!(!r.opened());
        assert!(r.failed("broken"));
    }
}
