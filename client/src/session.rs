//! Request ids. A [`Client`](crate::Client) picks a random 64-bit client id; every write takes
//! the next sequence number, kept for all its retries. The smallest sequence still in flight is
//! sent as `acked_below`: everything below it is finished, so servers may forget those outcomes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use strata_proto::v1::RequestId;

/// The write session of one client.
#[derive(Debug)]
pub struct Session {
    client_id: u64,
    next: AtomicU64,
    /// Sequences not yet finished. A `std` mutex: held for an insert or a remove, never across
    /// an await.
    in_flight: Mutex<BTreeSet<u64>>,
}

/// One write's sequence; finishes it when dropped (whatever the outcome). Owns a handle on its
/// session so that a write can be retried from a task of its own.
#[derive(Debug)]
pub struct Ticket {
    session: Arc<Session>,
    sequence: u64,
}

impl Session {
    /// A session with a fresh random client id.
    pub fn new() -> Session {
        Session::with_client_id(rand::random::<u64>().max(2))
    }

    /// A session with a given client id (ids 0 and 1 are reserved).
    pub fn with_client_id(client_id: u64) -> Session {
        Session {
            client_id,
            next: AtomicU64::new(1),
            in_flight: Mutex::new(BTreeSet::new()),
        }
    }

    /// The client id.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Starts a write: takes the next sequence and marks it in flight.
    pub fn begin(self: &Arc<Self>) -> Ticket {
        let sequence = self.next.fetch_add(1, Ordering::Relaxed);
        self.in_flight
            .lock()
            .expect("session poisoned")
            .insert(sequence);
        Ticket {
            session: Arc::clone(self),
            sequence,
        }
    }
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

impl Ticket {
    /// The request id to send now (the floor moves as other writes finish).
    pub fn request_id(&self) -> RequestId {
        let floor = self
            .session
            .in_flight
            .lock()
            .expect("session poisoned")
            .first()
            .copied()
            .unwrap_or(self.sequence);
        RequestId {
            client_id: self.session.client_id,
            sequence: self.sequence,
            acked_below: floor.min(self.sequence),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.session
            .in_flight
            .lock()
            .expect("session poisoned")
            .remove(&self.sequence);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_is_the_oldest_write_in_flight() {
        let s = Arc::new(Session::with_client_id(9));
        let a = s.begin();
        let b = s.begin();
        assert_eq!(b.request_id().acked_below, a.request_id().sequence);
        drop(a);
        let id = b.request_id();
        assert_eq!((id.client_id, id.sequence, id.acked_below), (9, 2, 2));
        // Retries of the same ticket keep the sequence.
        assert_eq!(b.request_id().sequence, 2);
        drop(b);
        assert_eq!(s.begin().request_id().acked_below, 3);
    }
}
