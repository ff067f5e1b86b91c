//! Network faults: the cluster runs inside a private network namespace (`unshare -n`) where node
//! *i* owns the loopback address `127.0.0.(10+i)` for both its listeners and its outgoing peer
//! connections; a partition is a set of iptables `DROP` rules between exact node addresses. The
//! harness' own client traffic comes from `127.0.0.1` and is never cut. Slow links use the same
//! namespace (see [`crate::slow_net`]).
//!
//! Where namespaces or iptables are missing, [`availability`] says why and the partition nemesis
//! is skipped loudly; nothing is installed silently (`./dev.sh test` installs iptables with
//! apt-get and says so).

use std::process::Command;

/// Set in the environment of the harness re-executed inside its network namespace.
const NETNS_ENV: &str = "STRATA_JEPSEN_NETNS";

/// Whether this process runs inside the harness' private network namespace.
pub fn in_private_netns() -> bool {
    std::env::var_os(NETNS_ENV).is_some()
}

/// Re-executes this program with the same arguments inside a new network namespace with
/// loopback up. Returns only on failure (with the reason).
pub fn reexec_in_netns() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return e.into(),
    };
    let err = Command::new("unshare")
        .args([
            "-n",
            "--",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(NETNS_ENV, "1")
        .exec();
    anyhow::anyhow!("cannot enter a private network namespace (unshare -n): {err}")
}

/// Whether partitions can run here; `Err` says why not.
pub fn availability() -> Result<(), String> {
    let ok = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ok("unshare", &["-n", "true"]) {
        return Err("network namespaces are not available (unshare -n failed; needs root)".into());
    }
    if !ok("iptables", &["-L", "-n"]) {
        return Err("iptables is not installed (apt-get install -y iptables)".into());
    }
    Ok(())
}

/// Cuts every link between two addresses that `connected` does not allow, both directions.
/// Returns the cut pairs.
pub fn partition(
    ips: &[String],
    connected: impl Fn(usize, usize) -> bool,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut cut = Vec::new();
    for (i, a) in ips.iter().enumerate() {
        for (j, b) in ips.iter().enumerate() {
            if i < j && !connected(i, j) {
                drop_between(a, b)?;
                drop_between(b, a)?;
                cut.push((a.clone(), b.clone()));
            }
        }
    }
    Ok(cut)
}

/// Drops a random share (`percent`) of the packets between every two node addresses.
pub fn lossy(ips: &[String], percent: u32) -> anyhow::Result<()> {
    let probability = format!("{:.2}", f64::from(percent) / 100.0);
    for a in ips {
        for b in ips.iter().filter(|b| *b != a) {
            iptables(&[
                "-A",
                "INPUT",
                "-s",
                a,
                "-d",
                b,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &probability,
                "-j",
                "DROP",
            ])?;
        }
    }
    Ok(())
}

fn drop_between(from: &str, to: &str) -> anyhow::Result<()> {
    iptables(&["-A", "INPUT", "-s", from, "-d", to, "-j", "DROP"])
}

/// Removes every partition rule.
pub fn heal() -> anyhow::Result<()> {
    iptables(&["-F", "INPUT"])
}

/// Runs `iptables` with `args`. Firewall rules are only ever changed inside the harness' own
/// namespace, never the host's.
pub(crate) fn iptables(args: &[&str]) -> anyhow::Result<()> {
    anyhow::ensure!(
        in_private_netns(),
        "refusing to change iptables outside the harness' private network namespace"
    );
    let out = Command::new("iptables").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "iptables {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
