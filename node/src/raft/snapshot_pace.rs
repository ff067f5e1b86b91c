//! The pace of outgoing snapshot bytes: one budget per node, shared by every snapshot stream of
//! every group, so that a follower catching up by snapshot (or several at once) cannot take all
//! of the leader's disk and network from the writes it serves (TiKV's
//! `snap-io-max-bytes-per-sec`).
//!
//! A virtual clock rather than a token bucket: each chunk reserves the time its bytes take at the
//! configured rate, after the chunks reserved before it, and its stream waits for the start of
//! that slot. An idle budget saves nothing up, so a stream that starts never bursts above the
//! rate.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The rate a snapshot's time allowance assumes when sending is not capped: a slow disk's.
pub const UNLIMITED_FLOOR_BYTES_PER_SEC: u64 = 50 << 20;

/// The shared budget of snapshot bytes per second (see the module docs).
#[derive(Debug)]
pub struct SnapshotPace {
    /// Bytes per second; `None`: unlimited.
    bytes_per_sec: Option<u64>,
    /// When the next chunk may start. A `std` mutex: held only to reserve a slot.
    next: Mutex<Instant>,
}

impl SnapshotPace {
    /// A budget of `bytes_per_sec` (0: unlimited).
    pub fn new(bytes_per_sec: u64) -> SnapshotPace {
        SnapshotPace {
            bytes_per_sec: (bytes_per_sec > 0).then_some(bytes_per_sec),
            next: Mutex::new(Instant::now()),
        }
    }

    /// How long a snapshot of `bytes` may take to send and install, beyond a fixed base: twice
    /// its time at the budget's rate (or at [`UNLIMITED_FLOOR_BYTES_PER_SEC`] without a budget),
    /// for the follower's pass that turns it into an SST file. A fixed timeout would fail, and
    /// retry forever, every snapshot larger than the rate allows for in that time.
    pub fn allowance(&self, bytes: u64) -> Duration {
        2 * time_at(
            bytes,
            self.bytes_per_sec.unwrap_or(UNLIMITED_FLOOR_BYTES_PER_SEC),
        )
    }

    /// Waits until a chunk of `bytes` may be sent, and reserves its share of the budget.
    pub async fn wait(&self, bytes: usize) {
        let Some(rate) = self.bytes_per_sec else {
            return;
        };
        let start = {
            let mut next = self.next.lock().expect("snapshot pace poisoned");
            let start = (*next).max(Instant::now());
            *next = start + time_at(bytes as u64, rate);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// How long `bytes` take at `bytes_per_sec`.
fn time_at(bytes: u64, bytes_per_sec: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / bytes_per_sec as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const KIB: usize = 1024;

    /// Sends `chunks` chunks of `bytes` on each of `streams` concurrent streams; returns the
    /// (virtual) time it took.
    async fn send(
        pace: Arc<SnapshotPace>,
        streams: usize,
        chunks: usize,
        bytes: usize,
    ) -> Duration {
        let started = Instant::now();
        let tasks: Vec<_> = (0..streams)
            .map(|_| {
                let pace = pace.clone();
                tokio::spawn(async move {
                    for _ in 0..chunks {
                        pace.wait(bytes).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        started.elapsed()
    }

    // Real time, but only lower bounds are checked: a sleep never ends early, so these cannot
    // flake on a loaded machine.

    #[tokio::test]
    async fn concurrent_streams_share_one_budget() {
        // 8 MiB/s; two streams of four 256 KiB chunks: 2 MiB in all. The first chunk goes at
        // once, each of the other seven 1/32 s after the one before.
        let pace = Arc::new(SnapshotPace::new(8 << 20));
        let took = send(pace, 2, 4, 256 * KIB).await;
        assert!(took >= Duration::from_micros(7 * 31_250), "{took:?}");
    }

    #[tokio::test]
    async fn an_idle_budget_saves_nothing_up() {
        let pace = Arc::new(SnapshotPace::new(8 << 20));
        tokio::time::sleep(Duration::from_millis(300)).await;
        // After 0.3 idle seconds, four 256 KiB chunks still take 3/32 s, not 0.
        let took = send(pace, 1, 4, 256 * KIB).await;
        assert!(took >= Duration::from_micros(3 * 31_250), "{took:?}");
    }

    #[test]
    fn a_large_snapshot_gets_time_in_proportion_to_its_size() {
        let gib = 1u64 << 30;
        // 10 GiB at 100 MiB/s: 102.4 s to send, as long again to install.
        let capped = SnapshotPace::new(100 << 20).allowance(10 * gib);
        assert_eq!(capped.as_secs(), 204);
        let unlimited = SnapshotPace::new(0).allowance(10 * gib);
        assert_eq!(unlimited.as_secs(), 409);
    }

    #[tokio::test]
    async fn zero_means_unlimited() {
        // Were 0 a rate, this would never end.
        let took = send(Arc::new(SnapshotPace::new(0)), 2, 100, 1024 * KIB).await;
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
}
