//! Why a node must stop on its own (fail-stop), as the first of possibly several reports.

use tokio::sync::watch;

/// The first reason reported, and a way to wait for one. Cheap to clone; clones share it.
#[derive(Clone)]
pub struct StopReason(watch::Sender<Option<String>>);

impl Default for StopReason {
    fn default() -> Self {
        StopReason(watch::Sender::new(None))
    }
}

impl StopReason {
    /// Records `why` unless a reason was recorded before (the first one wins).
    pub fn report(&self, why: String) {
        self.0
            .send_if_modified(|reason| reason.is_none() && reason.replace(why).is_none());
    }

    /// Resolves with the first reason, once there is one.
    pub async fn wait(&self) -> String {
        let mut reason = self.0.subscribe();
        // Bound to a local so the borrow of `reason` ends before it is dropped.
        let why = match reason.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            // The sender lives as long as `self`.
            Err(_) => std::future::pending().await,
        };
        why
    }
}
