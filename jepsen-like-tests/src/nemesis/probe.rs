//! Probes: how a nemesis checks that the cluster keeps serving through a fault it must serve
//! through. Probe writes use keys outside the workload's and are not part of the history; a
//! node's own answers are probed with its status call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use strata_client::Client;

/// How long [`serving`] waits for a probe write.
pub(super) const BASELINE_WAIT: Duration = Duration::from_secs(5);

/// Whether the cluster acknowledges a probe write within [`BASELINE_WAIT`]. A stall check is fair
/// only if it does before the fault: after a crash in `mixed`, say, it may still be electing
/// leaders.
pub(super) async fn serving(client: &Client) -> bool {
    let put = client.put("nemesis-probe:before", "probe");
    matches!(tokio::time::timeout(BASELINE_WAIT, put).await, Ok(Ok(_)))
}

/// What [`probe_writes`] saw.
pub(super) struct Probes {
    /// Writes acknowledged within the hold.
    pub served: usize,
    /// The hold ran its whole length (the run did not stop during it).
    pub full_hold: bool,
    /// The longest any probe write waited, acknowledged or not (one still waiting when the hold
    /// ended counts until then).
    pub slowest: Duration,
    /// When the slowest probe write was sent, counted from the start of the probes.
    pub slowest_sent: Duration,
}

/// Writes probe keys one after the other for `hold`, counting those acknowledged in time and
/// timing each.
pub(super) async fn probe_writes(client: &Client, hold: Duration, stop: &AtomicBool) -> Probes {
    let until = tokio::time::Instant::now() + hold;
    let mut served = 0;
    let mut slowest = Duration::ZERO;
    let mut slowest_sent = Duration::ZERO;
    let start = tokio::time::Instant::now();
    let mut n = 0u64;
    while tokio::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
        n += 1;
        let sent = tokio::time::Instant::now();
        let put = client.put(format!("nemesis-probe:{n}"), "probe");
        let outcome = tokio::time::timeout_at(until, put).await;
        if sent.elapsed() > slowest {
            slowest = sent.elapsed();
            slowest_sent = sent.duration_since(start);
        }
        match outcome {
            Ok(Ok(_)) => served += 1,
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => break,
        }
    }
    Probes {
        served,
        full_hold: !stop.load(Ordering::Relaxed),
        slowest,
        slowest_sent,
    }
}

/// How long a node probed by [`longest_silence`] is given between two of its answers.
const ANSWER_PAUSE: Duration = Duration::from_millis(20);

/// Asks the node at `addr` for its status, one call after the other, for `hold`; returns the
/// longest time in which it answered none of them. It serves the call from memory, so only a
/// node whose threads wait (for its disk, say) goes silent for long.
pub(super) async fn longest_silence(
    client: &Client,
    addr: &str,
    hold: Duration,
    stop: &AtomicBool,
) -> Duration {
    let until = tokio::time::Instant::now() + hold;
    let mut last_answer = tokio::time::Instant::now();
    let mut longest = Duration::ZERO;
    while tokio::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
        if let Ok(Ok(_)) = tokio::time::timeout_at(until, client.node_status(addr)).await {
            longest = longest.max(last_answer.elapsed());
            last_answer = tokio::time::Instant::now();
        }
        tokio::time::sleep(ANSWER_PAUSE).await;
    }
    longest.max(last_answer.elapsed().min(hold))
}
