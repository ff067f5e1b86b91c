//! The README's tour, automated on the built binaries: `strata dev up` starts 3 nodes, the CLI
//! writes, reads, scans and reports status from another process, one node is SIGKILLed and the
//! cluster keeps serving every acknowledged write, Ctrl-C stops every node, and running
//! `dev up` again brings the data back.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use strata_cluster::launcher::{free_ports, ClusterFile};

const STRATA: &str = env!("CARGO_BIN_EXE_strata");

/// `strata-node` sits next to `strata` when the workspace is built.
fn node_bin() -> PathBuf {
    let p = Path::new(STRATA).with_file_name("strata-node");
    assert!(
        p.exists(),
        "{} missing: build the workspace (cargo build --release) first",
        p.display()
    );
    p
}

/// A running `strata dev up`; killed (with its nodes) if the test fails.
struct DevUp {
    child: Child,
    dir: PathBuf,
}

impl DevUp {
    fn start(dir: &Path, base: u16) -> DevUp {
        Self::start_with(dir, base, Stdio::inherit(), true)
    }

    /// Starts `dev up` with its stderr going to `stderr`, and returns once it is ready. With
    /// `keep_reading` false, its output pipes are closed then, as when the `tee` or `grep` it was
    /// piped into is gone.
    fn start_with(dir: &Path, base: u16, stderr: Stdio, keep_reading: bool) -> DevUp {
        let mut child = Command::new(STRATA)
            .args([
                "dev",
                "up",
                "--nodes",
                "3",
                "--shards",
                "8",
                "--base-port",
                &base.to_string(),
            ])
            .arg("--data-dir")
            .arg(dir)
            .env("STRATA_NODE_BIN", node_bin())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn strata dev up");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let until = Instant::now() + Duration::from_secs(90);
        loop {
            assert!(Instant::now() < until, "dev up did not report ready");
            match lines.next() {
                Some(Ok(line)) => {
                    eprintln!("dev up: {line}");
                    if line.contains("press Ctrl-C") {
                        break;
                    }
                }
                _ => panic!("dev up exited before it was ready"),
            }
        }
        if keep_reading {
            // Keep draining stdout so the process never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
        } else {
            drop(lines);
            drop(child.stderr.take());
        }
        DevUp {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn ctrl_c(mut self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT).unwrap();
        // Its nodes get 10 s to stop after SIGTERM; past that dev up itself is stuck.
        let until = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < until,
                "dev up did not exit within 30 s of Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "dev up exit status {status}");
        std::mem::forget(self);
    }
}

impl Drop for DevUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(Some(f)) = ClusterFile::load(&self.dir) {
            for n in f.nodes.iter().filter_map(|n| n.pid) {
                let _ = kill(Pid::from_raw(n as i32), Signal::SIGKILL);
            }
        }
    }
}

fn strata(dir: &Path, args: &[&str]) -> Output {
    strata_command(dir, args).output().expect("run strata")
}

/// Runs `strata` with `input` on its standard input.
fn strata_with_input(dir: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut child = strata_command(dir, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run strata");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().expect("run strata")
}

fn strata_command(dir: &Path, args: &[&str]) -> Command {
    let file = ClusterFile::load(dir).unwrap().unwrap();
    let mut command = Command::new(STRATA);
    command
        .arg("--endpoints")
        .arg(file.endpoints().join(","))
        .args(args);
    command
}

fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "strata failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Base ports already given to a test of this process. The tests run in parallel, and each one's
/// ports are only probed here, not held, until its nodes bind them: two tests must never get
/// overlapping ranges.
static TAKEN_BASES: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A base port whose client (base+1..3) and peer (base+101..103) ports are free and not given to
/// another test of this process.
fn free_base() -> u16 {
    let mut taken = TAKEN_BASES.lock().unwrap();
    loop {
        // free_ports picks at random below the ephemeral range, so base+103 stays below it too.
        let base = free_ports("127.0.0.1", 1).unwrap()[0] - 200;
        if taken.iter().any(|t| t.abs_diff(base) <= 103) {
            continue;
        }
        let wanted = [1, 2, 3, 101, 102, 103].map(|d| base + d);
        if wanted
            .iter()
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        {
            taken.push(base);
            return base;
        }
    }
}

#[test]
fn dev_up_stops_every_node_even_when_its_output_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("strata-data");
    eprintln!("--- dev up piped into a reader that goes away, then Ctrl-C");
    let dev = DevUp::start_with(&dir, free_base(), Stdio::piped(), false);
    dev.ctrl_c();
    let file = ClusterFile::load(&dir).unwrap().unwrap();
    for n in &file.nodes {
        assert!(
            n.pid.is_none(),
            "node {} left running (pid {:?})",
            n.id,
            n.pid
        );
        assert!(
            std::net::TcpStream::connect(&n.client_addr).is_err(),
            "node {} still listening",
            n.id
        );
    }
}

#[test]
fn dev_up_serves_the_cli_survives_a_kill_and_restarts_with_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("strata-data");
    let base = free_base();

    eprintln!("--- first start");
    let dev = DevUp::start(&dir, base);
    ok(strata(&dir, &["put", "greeting", "hello"]));
    for i in 0..30 {
        ok(strata(
            &dir,
            &["put", &format!("user:{i}"), &format!("u{i}")],
        ));
    }
    let got = ok(strata(&dir, &["get", "greeting"]));
    assert!(got.contains("hello"), "{got}");
    let scan = ok(strata(
        &dir,
        &["scan", "--prefix", "user:", "--limit", "100", "-o", "json"],
    ));
    let items: serde_json::Value = serde_json::from_str(&scan).unwrap();
    assert_eq!(items.as_array().unwrap().len(), 30);
    let status = ok(strata(&dir, &["status"]));
    assert!(
        status.contains("LEADER") && !status.contains("NONE"),
        "{status}"
    );

    eprintln!("--- SIGKILL node 2: every acknowledged write stays readable, writes continue");
    let file = ClusterFile::load(&dir).unwrap().unwrap();
    let pid2 = file.nodes[1].pid.unwrap();
    kill(Pid::from_raw(pid2 as i32), Signal::SIGKILL).unwrap();
    ok(strata(&dir, &["put", "after-kill", "still-serving"]));
    for i in 0..30 {
        let v = ok(strata(&dir, &["get", &format!("user:{i}")]));
        assert!(v.contains(&format!("u{i}")), "{v}");
    }
    let bad = strata(&dir, &["put", "", "v"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("key is empty"));

    eprintln!("--- binary values: put from standard input, get --raw gives the same bytes");
    let binary = b"\0\xff\n\tbytes\r\n".to_vec();
    ok(strata_with_input(&dir, &["put", "blob"], &binary));
    let raw = strata(&dir, &["get", "blob", "--raw"]);
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    assert_eq!(raw.stdout, binary);
    let missing = strata(&dir, &["get", "no-such-key", "--raw"]);
    assert!(!missing.status.success());
    assert!(missing.stdout.is_empty());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("key no-such-key not found"));
    let too_big = strata_with_input(&dir, &["put", "blob"], &vec![b'x'; (1 << 20) + 1]);
    assert!(!too_big.status.success());
    assert!(String::from_utf8_lossy(&too_big.stderr).contains("the limit is 1048576"));
    assert_eq!(
        strata(&dir, &["get", "blob", "--raw"]).stdout,
        binary,
        "a refused put changed it"
    );

    eprintln!("--- Ctrl-C stops every node");
    dev.ctrl_c();
    let file = ClusterFile::load(&dir).unwrap().unwrap();
    let pids: Vec<u32> = ClusterFile::load(&dir)
        .unwrap()
        .unwrap()
        .nodes
        .iter()
        .filter_map(|n| n.pid)
        .collect();
    assert!(pids.is_empty(), "pids left in cluster.json: {pids:?}");
    for n in &file.nodes {
        assert!(
            std::net::TcpStream::connect(&n.client_addr).is_err(),
            "node {} still listening",
            n.id
        );
    }

    eprintln!("--- running dev up again brings the data back");
    let dev = DevUp::start(&dir, base);
    let got = ok(strata(&dir, &["get", "greeting", "-o", "json"]));
    assert!(got.contains("\"hello\""), "{got}");
    let got = ok(strata(&dir, &["get", "after-kill"]));
    assert!(got.contains("still-serving"), "{got}");

    eprintln!("--- strata bench reports figures, and says why when every operation fails");
    let report = ok(strata(
        &dir,
        &[
            "-o",
            "json",
            "bench",
            "--workload",
            "mixed",
            "--clients",
            "4",
            "--duration",
            "1s",
            "--keys",
            "50",
            "--consistency",
            "lease",
        ],
    ));
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["consistency"], "lease", "{report}");
    let etcd_lease = strata(
        &dir,
        &["bench", "--target", "etcd", "--consistency", "lease"],
    );
    let stderr = String::from_utf8_lossy(&etcd_lease.stderr);
    assert!(!etcd_lease.status.success(), "{stderr}");
    assert!(stderr.contains("etcd has no lease reads"), "{stderr}");
    let bad = strata(
        &dir,
        &[
            "bench",
            "--clients",
            "2",
            "--duration",
            "1s",
            "--value-size",
            "2000000",
        ],
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{stderr}");
    assert!(
        stderr.contains("operations failed, for example") && stderr.contains("the limit is"),
        "{stderr}"
    );

    eprintln!("--- a clean stop logs no error, and the logs are plain text");
    let logs = node_logs(&dir);
    let before: Vec<usize> = logs.iter().map(|l| read_log(l).len()).collect();
    dev.ctrl_c();
    for (log, from) in logs.iter().zip(before) {
        let text = read_log(log);
        assert!(
            !text.contains('\x1b'),
            "{}: colour codes in a log file",
            log.display()
        );
        let stop = &text[from..];
        assert!(
            !stop.contains("ERROR"),
            "{}: error at a clean stop:\n{stop}",
            log.display()
        );
    }
}

/// Every node's log file in the cluster directory `dir`.
/// `strata status -o json`, parsed.
fn status_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(strata(dir, &["status", "-o", "json"]))).unwrap()
}

/// Waits (up to 10 s) until a freshly started node listens on `addr`.
fn wait_listening(addr: &str) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the new node never listened on {addr}");
}

/// The `nodes` of `strata status -o json`.
fn status_nodes(status: &serde_json::Value) -> &Vec<serde_json::Value> {
    status["nodes"].as_array().expect("status lists nodes")
}

/// The ids of the nodes `cluster.json` lists.
fn cluster_file_ids(dir: &Path) -> Vec<u64> {
    let file = ClusterFile::load(dir).unwrap().expect("cluster.json");
    file.nodes.iter().map(|n| n.id).collect()
}

/// Node `id`'s entry in `cluster.json`.
fn cluster_file_node(dir: &Path, id: u64) -> strata_cluster::launcher::NodeEntry {
    let file = ClusterFile::load(dir).unwrap().expect("cluster.json");
    let entry = file.nodes.into_iter().find(|n| n.id == id);
    entry.unwrap_or_else(|| panic!("node {id} in cluster.json"))
}

fn node_logs(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path().join("node.log"))
        .filter(|p| p.is_file())
        .collect();
    logs.sort();
    assert!(!logs.is_empty(), "no node logs in {}", dir.display());
    logs
}

fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned()
}

#[test]
fn dev_cluster_grows_and_shrinks_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("strata-data");
    let base = free_base();
    let dev = DevUp::start(&dir, base);
    for i in 0..20 {
        ok(strata(&dir, &["put", &format!("k{i}"), &format!("v{i}")]));
    }

    eprintln!("--- dev add-node starts an empty node; node add --wait spreads replicas to it");
    let out = Command::new(STRATA)
        .args(["dev", "add-node", "--data-dir"])
        .arg(&dir)
        .env("STRATA_NODE_BIN", node_bin())
        .output()
        .unwrap();
    let text = ok(out);
    let addr = text
        .split("--addr ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {text}"))
        .to_string();
    wait_listening(&addr);
    let added = ok(strata(
        &dir,
        &["node", "add", "--addr", &addr, "--wait", "-o", "json"],
    ));
    let added: serde_json::Value = serde_json::from_str(&added).unwrap();
    assert_eq!(added["node"], 4);
    assert_eq!(added["done"], true);
    let status = status_json(&dir);
    let node4 = status_nodes(&status)
        .iter()
        .find(|n| n["id"] == 4)
        .expect("node 4 in status");
    assert_eq!(node4["replicas"], 6, "{status:#}");

    eprintln!("--- node remove --wait drains node 1 and removes it; dev up then stops it");
    let node1_pid = cluster_file_node(&dir, 1).pid.expect("node 1 pid");
    ok(strata(&dir, &["node", "remove", "--id", "1", "--wait"]));
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while cluster_file_ids(&dir).contains(&1) || strata_cluster::launcher::process_alive(node1_pid)
    {
        assert!(
            std::time::Instant::now() < until,
            "dev up kept the removed node 1: {:?}",
            cluster_file_ids(&dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = status_json(&dir);
    assert!(
        status_nodes(&status).iter().all(|n| n["id"] != 1),
        "{status:#}"
    );
    let bad = strata(&dir, &["node", "remove", "--id", "1"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not in the cluster"));
    for i in 0..20 {
        let v = ok(strata(&dir, &["get", &format!("k{i}")]));
        assert!(v.contains(&format!("v{i}")), "{v}");
    }

    eprintln!("--- node 2 dies with three nodes left; a new node at its addresses replaces it");
    let node2 = cluster_file_node(&dir, 2);
    let pid = node2.pid.expect("node 2 pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // `dev add-node --replaces` refuses while the process still exists.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while strata_cluster::launcher::process_alive(pid as u32) {
        assert!(std::time::Instant::now() < until, "node 2 outlived SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
    let node2_addr = node2.client_addr.clone();
    let started = Command::new(STRATA)
        .args(["dev", "add-node", "--replaces", "2", "--data-dir"])
        .arg(&dir)
        .env("STRATA_NODE_BIN", node_bin())
        .output()
        .unwrap();
    let text = ok(started);
    assert!(
        text.contains(&format!("--addr {node2_addr} --replaces 2")),
        "{text}"
    );
    wait_listening(&node2_addr);
    let replaced = ok(strata(
        &dir,
        &[
            "node",
            "add",
            "--addr",
            &node2_addr,
            "--replaces",
            "2",
            "--wait",
            "-o",
            "json",
        ],
    ));
    let replaced: serde_json::Value = serde_json::from_str(&replaced).unwrap();
    assert_eq!(
        (&replaced["node"], &replaced["done"]),
        (&5.into(), &true.into())
    );
    let status = status_json(&dir);
    let nodes = status_nodes(&status);
    let ids: Vec<_> = nodes.iter().map(|n| n["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [3, 4, 5], "{status:#}");
    let node5 = &nodes[2];
    assert_eq!(
        (
            node5["client_addr"].as_str(),
            &node5["up"],
            &node5["replicas"]
        ),
        (Some(node2_addr.as_str()), &true.into(), &8.into()),
        "{status:#}"
    );
    for i in 0..20 {
        let v = ok(strata(&dir, &["get", &format!("k{i}")]));
        assert!(v.contains(&format!("v{i}")), "{v}");
    }

    eprintln!("--- Ctrl-C stops every node, the added ones too; dev up brings them all back");
    dev.ctrl_c();
    for a in [&addr, &node2_addr] {
        assert!(
            std::net::TcpStream::connect(a).is_err(),
            "{a} still listening"
        );
    }
    let dev = DevUp::start(&dir, base);
    let v = ok(strata(&dir, &["get", "k7"]));
    assert!(v.contains("v7"), "{v}");
    let status = status_json(&dir);
    assert!(
        status_nodes(&status).iter().all(|n| n["up"] == true),
        "{status:#}"
    );
    dev.ctrl_c();
}
