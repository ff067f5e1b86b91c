//! Slow links between nodes: every peer connection runs through a TCP proxy inside the harness,
//! which holds each chunk of bytes for the delay its link has at that moment.
//!
//! `tc netem` is not available in every kernel, so the delay is applied in user space. Inside the
//! harness' network namespace (see [`crate::net`]) one iptables `nat` rule redirects every TCP
//! connection a node opens from its own address (any source but the harness' `127.0.0.1`) to the
//! proxy. The proxy reads the original destination off the socket (`SO_ORIGINAL_DST`) and
//! connects to it from the **same source address**, so partition rules still cut the link. Its
//! own connections carry a firewall mark (`PROXY_MARK`) that the rule skips, or they would be
//! redirected to the proxy again.
//!
//! A link is one direction between two node addresses. Each chunk read from a link is released
//! `base + a random share of jitter` after it was read, but never before the chunk read ahead of
//! it: bytes within a connection stay in order, as TCP keeps them on a real network, while
//! messages on different connections can overtake each other. Changing a link's delay affects the
//! chunks read from then on; connections are never cut. The jitter is drawn from the thread's
//! random generator, not from the run's seed: like every timing, it is not reproduced.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The firewall mark on the proxy's own connections, which the redirect rule skips.
const PROXY_MARK: u32 = 0x5354;

/// How long the proxy waits for the real destination to accept a connection. A partitioned
/// destination never answers; the node then sees its connection closed, as after its own connect
/// timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Largest chunk forwarded at once.
const CHUNK: usize = 64 * 1024;

/// Chunks in flight per direction of a connection before the proxy stops reading (backpressure,
/// as a full TCP window would apply).
const IN_FLIGHT: usize = 256;

/// The delay of one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delay {
    /// Added to every chunk.
    pub base: Duration,
    /// Up to this much more, drawn per chunk.
    pub jitter: Duration,
}

impl Delay {
    fn sample(self) -> Duration {
        if self.jitter.is_zero() {
            return self.base;
        }
        self.base + self.jitter.mul_f64(rand::rng().random::<f64>())
    }
}

impl std::fmt::Display for Delay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ms", self.base.as_millis())?;
        if !self.jitter.is_zero() {
            write!(f, " + up to {} ms", self.jitter.as_millis())?;
        }
        Ok(())
    }
}

/// Delays per link, `(from, to)`; a link not listed has none.
type Links = Arc<Mutex<HashMap<(Ipv4Addr, Ipv4Addr), Delay>>>;

/// The running proxy. Dropping it stops accepting connections and removes the redirect rule.
pub struct SlowNet {
    links: Links,
    accept: JoinHandle<()>,
}

impl SlowNet {
    /// Starts the proxy and redirects node connections to it. Only inside the harness' own
    /// network namespace; start it before the nodes, so that all their connections go through it.
    pub async fn start() -> anyhow::Result<SlowNet> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port().to_string();
        let mark = PROXY_MARK.to_string();
        crate::net::iptables(&[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "!",
            "-s",
            "127.0.0.1",
            "-d",
            "127.0.0.0/8",
            "-m",
            "mark",
            "!",
            "--mark",
            &mark,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ])?;
        let links = Links::default();
        let accept = tokio::spawn(accept_loop(listener, links.clone()));
        Ok(SlowNet { links, accept })
    }

    /// Sets the delay of the link `from` → `to` (node addresses).
    pub fn set(&self, from: Ipv4Addr, to: Ipv4Addr, delay: Delay) {
        self.links
            .lock()
            .expect("links poisoned")
            .insert((from, to), delay);
    }

    /// Removes every delay.
    pub fn clear(&self) {
        self.links.lock().expect("links poisoned").clear();
    }
}

impl Drop for SlowNet {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = crate::net::iptables(&["-t", "nat", "-F", "OUTPUT"]);
    }
}

async fn accept_loop(listener: TcpListener, links: Links) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let links = links.clone();
        tokio::spawn(async move {
            // A connection that fails is closed on both sides, as a broken network would.
            let _ = forward(inbound, links).await;
        });
    }
}

/// Connects `inbound` to where it was headed, from the same address, and relays it.
async fn forward(inbound: TcpStream, links: Links) -> std::io::Result<()> {
    let SocketAddr::V4(from) = inbound.peer_addr()? else {
        return Ok(());
    };
    let to = original_destination(&inbound)?;
    let socket = TcpSocket::new_v4()?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &PROXY_MARK)?;
    socket.bind(SocketAddr::V4(SocketAddrV4::new(*from.ip(), 0)))?;
    let outbound = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(SocketAddr::V4(to)))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    relay(inbound, outbound, links).await
}

/// Forwards both directions between `inbound` and `outbound`, each with the delay of its link
/// (the links are named by the two peers' addresses). Returns when both directions have ended.
async fn relay(inbound: TcpStream, outbound: TcpStream, links: Links) -> std::io::Result<()> {
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (inbound.peer_addr()?, outbound.peer_addr()?)
    else {
        return Ok(());
    };
    inbound.set_nodelay(true)?;
    outbound.set_nodelay(true)?;
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::join!(
        pipe(in_read, out_write, links.clone(), (*from.ip(), *to.ip())),
        pipe(out_read, in_write, links, (*to.ip(), *from.ip())),
    );
    Ok(())
}

/// The address a redirected connection was opened to.
fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddrV4> {
    let addr = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// Copies one direction, releasing each chunk at its time. The chunks go through one queue and
/// are written in the order they were read, so a chunk whose jitter came out shorter waits for
/// the one ahead of it. Ends at end of stream or on an error of either side, then closes the
/// write side.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    links: Links,
    link: (Ipv4Addr, Ipv4Addr),
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let read = async move {
        let mut buf = vec![0; CHUNK];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let delay = links
                .lock()
                .expect("links poisoned")
                .get(&link)
                .copied()
                .unwrap_or_default();
            let at = Instant::now() + delay.sample();
            if tx.send((at, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay between two fresh loopback connections: `client` → (relay) → `server`.
    async fn relayed(links: Links) -> (TcpStream, TcpStream) {
        let client_ip = Ipv4Addr::new(127, 0, 0, 21);
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = TcpListener::bind("127.0.0.22:0").await.unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(client_ip.into(), 0)).unwrap();
        let client = socket.connect(proxy.local_addr().unwrap()).await.unwrap();
        let (inbound, _) = proxy.accept().await.unwrap();
        let outbound = TcpStream::connect(server.local_addr().unwrap())
            .await
            .unwrap();
        let (served, _) = server.accept().await.unwrap();
        tokio::spawn(relay(inbound, outbound, links));
        (client, served)
    }

    #[tokio::test]
    async fn a_slow_link_delays_one_direction_and_keeps_the_bytes_in_order() {
        let links = Links::default();
        let (client_ip, server_ip) = (Ipv4Addr::new(127, 0, 0, 21), Ipv4Addr::new(127, 0, 0, 22));
        let delay = Delay {
            base: Duration::from_millis(300),
            jitter: Duration::from_millis(200),
        };
        links.lock().unwrap().insert((client_ip, server_ip), delay);
        let (mut client, mut server) = relayed(links).await;

        // 200 small writes, each its own chunk with its own jitter: they must arrive whole and in
        // order, and none before the base delay.
        let started = Instant::now();
        let mut sent = Vec::new();
        for i in 0..200u32 {
            let bytes = i.to_be_bytes();
            client.write_all(&bytes).await.unwrap();
            sent.extend_from_slice(&bytes);
        }
        let mut first = [0u8; 4];
        server.read_exact(&mut first).await.unwrap();
        assert!(
            started.elapsed() >= delay.base,
            "the first bytes came after {:?}, before the link's delay",
            started.elapsed()
        );
        let mut rest = vec![0u8; sent.len() - 4];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!([&first[..], &rest[..]].concat(), sent);

        // The other direction has no delay: the answer is not held for the base delay.
        let before = Instant::now();
        server.write_all(b"pong").await.unwrap();
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
        assert!(before.elapsed() < delay.base);
    }

    #[tokio::test]
    async fn an_end_of_stream_reaches_the_other_side() {
        let (mut client, mut server) = relayed(Links::default()).await;
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }
}
