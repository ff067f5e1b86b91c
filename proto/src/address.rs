//! Node addresses as the cluster records them (in the layout, the shard map and `--initial-cluster`)
//! and as nodes and clients dial them: `HOST:PORT`, the host an IP address or a DNS name.

/// Checks an address that the cluster records for a node, where other nodes and clients look it
/// up: `HOST:PORT` with an IP address (`[...]` around IPv6) or a DNS name as host, resolved by
/// whoever connects. It must name one host and port — not `0.0.0.0` or `::` (every interface: a node
/// may listen there, but no one can connect to it) and not port 0.
pub fn check_reachable_addr(addr: &str) -> Result<(), String> {
    let malformed = |why: &str| {
        format!(
            "address {addr:?} is not HOST:PORT (an IP address or a DNS name, and a port): {why}"
        )
    };
    let unreachable = || {
        format!(
            "address {addr} is not one other nodes and clients can connect to; give this \
             node's own IP or host name and a port"
        )
    };
    if let Ok(parsed) = addr.parse::<std::net::SocketAddr>() {
        if parsed.ip().is_unspecified() || parsed.port() == 0 {
            return Err(unreachable());
        }
        return Ok(());
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| malformed("no port"))?;
    let port: u16 = port.parse().map_err(|_| malformed("bad port"))?;
    if !is_dns_name(host) {
        return Err(malformed("bad host"));
    }
    if port == 0 {
        return Err(unreachable());
    }
    Ok(())
}

/// A DNS host name (RFC 1123): dot-separated labels of letters, digits and inner hyphens, up to
/// 63 characters each and 253 in all, not all digits (that would be a malformed IPv4 address).
fn is_dns_name(host: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (1..=253).contains(&host.len())
        && host.split('.').all(label_ok)
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_addresses_name_one_host_and_port() {
        for ok in [
            "127.0.0.1:7101",
            "[::1]:7201",
            "10.0.3.7:1",
            "localhost:7101",
            "strata-0.strata.default.svc.cluster.local:7100",
            "node-1.example.com.:65535",
        ] {
            assert_eq!(check_reachable_addr(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("0.0.0.0:7101", "connect to"),
            ("[::]:7201", "connect to"),
            ("127.0.0.1:0", "connect to"),
            ("localhost:0", "connect to"),
            ("localhost", "no port"),
            ("localhost:70000", "bad port"),
            (":7101", "bad host"),
            ("1.2.3:7101", "bad host"),
            ("-node:7101", "bad host"),
            ("node_1:7101", "bad host"),
            ("http://node:7101", "bad host"),
            ("::1:7101", "bad host"),
        ] {
            let err = check_reachable_addr(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
