//! What the launcher needs from the host: whether a process lives, free ports for a node's
//! listeners, and where the `strata-node` binary is.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::{bail, Context};
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Whether process `pid` exists (and is not a zombie we could reap).
pub fn process_alive(pid: u32) -> bool {
    if kill(Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    // A zombie still answers signal 0; its /proc state is `Z`.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Lowest port a node's listeners may get from [`free_ports`].
const FIRST_TEST_PORT: u16 = 10_000;

/// `n` distinct free TCP ports on `ip` (each probed by binding it, then released).
///
/// They are picked below the kernel's ephemeral range: a port the kernel hands out for `:0` can be
/// taken by any outgoing connection between the probe and the node's own bind — seen in CI, where
/// one starting node's connection to another took the third node's peer port. The kernel never
/// gives ports below that range to outgoing connections, so only an explicit bind elsewhere could
/// collide. Falls back to kernel-chosen ports when the range leaves no room below it.
pub fn free_ports(ip: &str, n: usize) -> anyhow::Result<Vec<u16>> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(FIRST_TEST_PORT);
    if (span as usize) < n * 64 {
        return kernel_chosen_ports(ip, n);
    }
    // A random start spreads concurrent launchers over the range.
    let start = rand::random_range(0..span);
    let mut held = Vec::with_capacity(n);
    for step in 0..span {
        let port = FIRST_TEST_PORT + (start + step) % span;
        if let Ok(listener) = TcpListener::bind((ip, port)) {
            held.push(listener);
            if held.len() == n {
                break;
            }
        }
    }
    if held.len() < n {
        bail!("found only {} of {n} free ports on {ip}", held.len());
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// `n` distinct ports the kernel picks for `ip:0` (bound and released).
fn kernel_chosen_ports(ip: &str, n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind(format!("{ip}:0")))
        .collect::<Result<_, _>>()
        .with_context(|| format!("find free ports on {ip}"))?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Finds the `strata-node` binary: `$STRATA_NODE_BIN`, else next to the running executable,
/// else on `PATH`.
pub fn find_node_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("STRATA_NODE_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("strata-node");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("strata-node");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("strata-node binary not found: build it (cargo build --release) or set STRATA_NODE_BIN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports = free_ports("127.0.0.1", 6).expect("free ports");
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), 6, "{ports:?}");
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("port range")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        for p in ports {
            assert!(
                (FIRST_TEST_PORT..low).contains(&p),
                "port {p} outside 10000..{low}"
            );
            TcpListener::bind(("127.0.0.1", p)).expect("still free");
        }
    }
}
