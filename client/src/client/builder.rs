//! [`ClientBuilder`]: endpoints, timeouts and coalescing, checked before connecting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::{Client, Inner};
use crate::coalesce::{GetCoalescer, PutCoalescer};
use crate::error::Error;
use crate::route::LeaderCache;
use crate::session::Session;

/// Builds a [`Client`] with custom timeouts.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    pub(super) endpoints: Vec<String>,
    pub(crate) attempt_timeout: Duration,
    pub(crate) deadline: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) coalesce_puts: bool,
    pub(super) coalesce_gets: bool,
}

impl ClientBuilder {
    /// A builder for the cluster reachable at `endpoints` (`host:port`, any node).
    pub fn new<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            attempt_timeout: Duration::from_secs(3),
            deadline: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(1),
            coalesce_puts: true,
            coalesce_gets: true,
        }
    }

    /// Whether concurrent puts may share requests: one atomic batch per shard, one call per node
    /// (default: yes).
    pub fn coalesce_puts(mut self, on: bool) -> Self {
        self.coalesce_puts = on;
        self
    }

    /// Whether concurrent gets to one node may share one `MultiGet` call (default: yes).
    pub fn coalesce_gets(mut self, on: bool) -> Self {
        self.coalesce_gets = on;
        self
    }

    /// How long one attempt may take before it is abandoned and retried.
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = d;
        self
    }

    /// How long an operation may take, retries included.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    /// TCP connect timeout.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Connects: loads the shard map from the first endpoint that answers. An endpoint that is
    /// not `host:port` (a missing or non-numeric port, a scheme such as `http://`) is an
    /// [`Error::InvalidArgument`] naming it, before anything is sent.
    pub async fn connect(self) -> Result<Client, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::InvalidArgument("no endpoints given".into()));
        }
        for e in &self.endpoints {
            check_endpoint(e)?;
        }
        let client = Client {
            inner: Arc::new(Inner {
                config: self,
                session: Arc::new(Session::new()),
                puts: PutCoalescer::default(),
                gets: GetCoalescer::default(),
                channels: Mutex::new(HashMap::new()),
                table: RwLock::new(None),
                leaders: Mutex::new(LeaderCache::default()),
            }),
        };
        client.refresh_map().await?;
        Ok(client)
    }
}

/// An endpoint is `host:port` (`[::1]:7101` for IPv6), without a scheme: checked up front so a
/// typo is named as such instead of surfacing later as a DNS or connection error.
fn check_endpoint(endpoint: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "bad endpoint {endpoint:?}: {why}"
        )))
    };
    if endpoint.trim().is_empty() {
        return Err(Error::InvalidArgument("empty endpoint".into()));
    }
    if endpoint.contains("://") {
        return bad("give host:port, without a scheme");
    }
    match endpoint.rsplit_once(':') {
        None => bad("missing :port"),
        Some(("", _)) => bad("missing host"),
        Some((_, port)) => match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok(()),
            _ => bad("the port must be a number from 1 to 65535"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::check_endpoint;

    #[test]
    fn endpoints_are_host_and_port() {
        for good in [
            "127.0.0.1:7101",
            "localhost:1",
            "[::1]:7101",
            "node-1.internal:65535",
        ] {
            assert!(check_endpoint(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty endpoint"),
            ("  ", "empty endpoint"),
            ("127.0.0.1", "missing :port"),
            (":7101", "missing host"),
            ("host:port", "number from 1 to 65535"),
            ("host:0", "number from 1 to 65535"),
            ("host:70000", "number from 1 to 65535"),
            ("http://127.0.0.1:7101", "without a scheme"),
        ] {
            let e = check_endpoint(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
