//! Power loss for real processes: a FUSE file system, held in memory, that keeps what every file
//! has been written since its last `fsync` apart from what is durable, so that
//! [`LossyFs::power_loss`] can drop it. A SIGKILL alone never tests fsync: the OS page cache
//! keeps what a killed process wrote, so a store that forgot an `fdatasync` still finds its data
//! after a restart. Here it does not.
//!
//! The model is the one of Jepsen's LazyFS:
//! - a write changes the file at once (reads see it); `fsync` / `fdatasync` of the file makes its
//!   whole current content durable;
//! - a directory change (create, rename, link, unlink, mkdir, rmdir) is visible at once and
//!   durable only once the directory itself is fsynced, as POSIX promises and no more (ext4's
//!   journal often saves a store that forgets that fsync; this model never does);
//! - a power loss puts every directory below a given one back to its durable entries (a file
//!   created since comes out missing, a file deleted or renamed away comes back), then every file
//!   still named there back to its durable content (cut back, overwritten pages restored, unsynced
//!   growth gone);
//! - or, for a [`Unsynced::Torn`] power loss, back to its durable content plus a random part of
//!   what it was written since: each 512-byte sector written since the last fsync reached the
//!   disk or not, on its own, and a file whose length changed has its old or its new length. A
//!   write can survive in part, a later write without an earlier one, and a file that grew can
//!   keep its new length with zeros where its sectors never arrived: the crash states of a disk
//!   that writes back dirty data in any order (ALICE's and CrashMonkey's, at sector
//!   granularity). Directory entries are still reverted whole, since journaled metadata does not
//!   tear.
//!
//! Two more disk faults: a full disk ([`LossyFs::fill`]: writes fail with `ENOSPC`) and a slow
//! one ([`LossyFs::slow_down`]: fsyncs are answered late, by a thread of their own, while every
//! other request is served at once).
//!
//! Files are opened with direct I/O and attributes are never cached by the kernel, so after a
//! power loss the next reader sees exactly the durable content. Everything lives in the memory
//! of the harness process: meant for chaos runs of minutes, not for large data.
//!
//! Its parts:
//! - `content`: one file's bytes, as written and as durable, and what a power loss leaves;
//! - `tree`: the directory tree, its entries as seen and as durable, and the held fsyncs;
//! - `fuse`: the kernel's requests served from the tree, and the late answers of slow disks.

mod content;
mod fuse;
mod tree;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{BackgroundSession, Config, Errno, MountOption};
use rand::rngs::StdRng;
use rand::SeedableRng;

use fuse::Shared;
use tree::{State, ROOT};

/// A mounted lossy file system; unmounted when dropped.
pub struct LossyFs {
    state: Arc<Mutex<State>>,
    /// The FUSE session serving the mount; dropping it unmounts.
    _session: BackgroundSession,
}

impl LossyFs {
    /// Mounts an empty lossy file system at `mountpoint` (an existing, empty directory).
    pub fn mount(mountpoint: &Path) -> anyhow::Result<LossyFs> {
        let (late, late_syncs) = std::sync::mpsc::channel();
        let state = Arc::new(Mutex::new(State::new(late)));
        let weak = Arc::downgrade(&state);
        std::thread::Builder::new()
            .name("lossy-fs-late-syncs".into())
            .spawn(move || fuse::answer_late(weak, late_syncs))
            .map_err(|e| anyhow::anyhow!("start the lossy file system's late-sync thread: {e}"))?;
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("strata-lossy".into()),
            MountOption::NoAtime,
        ];
        let session = fuser::spawn_mount(
            Shared {
                state: state.clone(),
            },
            mountpoint,
            &config,
        )
        .map_err(|e| anyhow::anyhow!("mount the lossy file system at {mountpoint:?}: {e}"))?;
        Ok(LossyFs {
            state,
            _session: session,
        })
    }

    /// Drops every change below `dir` (a path relative to the mount point) that was not
    /// fsynced, as a power cut would: directory entries first, then file data. The files named
    /// in `spared` (paths relative to `dir`) are kept whole, as if they were on another disk: a
    /// node's log, for the report. The processes using those files must be dead already.
    /// `unsynced` says whether every unsynced write is lost or a random part of them survives.
    /// Returns what was lost.
    pub fn power_loss(
        &self,
        dir: &Path,
        spared: &[&Path],
        unsynced: Unsynced,
    ) -> anyhow::Result<Lost> {
        let mut state = self.state.lock().expect("lossy fs poisoned");
        let root = state.resolve(ROOT, dir)?;
        for path in spared {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                anyhow::bail!("power loss: {path:?} names no file");
            };
            let parent = state.resolve(root, parent)?;
            state.make_durable(parent, name)?;
        }
        let mut tear = match unsynced {
            Unsynced::Dropped => None,
            Unsynced::Torn { seed } => Some(StdRng::seed_from_u64(seed)),
        };
        Ok(state.revert_below(root, tear.as_mut()))
    }
}

impl LossyFs {
    /// Fills the disk under `dir` (a path relative to the mount point): from now on every write
    /// to a file below it, and every new name in a directory below it, fails with `ENOSPC`, until
    /// [`free_space`](Self::free_space). Reads, renames, deletions and fsyncs still work, as on
    /// a real full disk. The files named in `spared` (relative to `dir`) are on another disk: a
    /// node's log, so that it can say why it stopped.
    pub fn fill(&self, dir: &Path, spared: &[&Path]) -> anyhow::Result<()> {
        let mut state = self.state.lock().expect("lossy fs poisoned");
        let root = state.resolve(ROOT, dir)?;
        let spared = spared
            .iter()
            .map(|p| state.resolve(root, p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let below: Vec<u64> = state
            .below(root)
            .into_iter()
            .filter(|ino| !spared.contains(ino))
            .collect();
        state.full.extend(below);
        Ok(())
    }

    /// Ends every [`fill`](Self::fill). Returns how many requests the full disks refused.
    pub fn free_space(&self) -> usize {
        let mut state = self.state.lock().expect("lossy fs poisoned");
        state.full.clear();
        std::mem::take(&mut state.refused)
    }

    /// Slows the disk under `dir` (a path relative to the mount point) down: from now on every
    /// fsync of a file or directory below it, or created below it later, is answered `by` late,
    /// until [`restore_speed`](Self::restore_speed). Other requests are served at once, and
    /// other directories' fsyncs too: one slow disk among fast ones, the gray failure that a
    /// wearing SSD or a noisy neighbour causes.
    pub fn slow_down(&self, dir: &Path, by: Duration) -> anyhow::Result<()> {
        let mut state = self.state.lock().expect("lossy fs poisoned");
        let root = state.resolve(ROOT, dir)?;
        let below = state.below(root);
        state.slow.extend(below);
        state.slow_by = by;
        Ok(())
    }

    /// Ends every [`slow_down`](Self::slow_down); fsyncs already waiting are answered when due.
    pub fn restore_speed(&self) {
        self.state.lock().expect("lossy fs poisoned").slow.clear();
    }

    /// How many requests the full disks have refused since the last
    /// [`free_space`](Self::free_space).
    pub fn refused(&self) -> usize {
        self.state.lock().expect("lossy fs poisoned").refused
    }

    /// From now on `fsync` and `fsyncdir` wait unanswered (their callers blocked in the kernel)
    /// until [`fail_held_syncs`](Self::fail_held_syncs) or
    /// [`answer_held_syncs`](Self::answer_held_syncs). A power loss in between finds what an
    /// fsync was about to make durable: the window in which every store has written but not
    /// yet acknowledged. Whoever holds them must not fsync on this file system meanwhile.
    pub fn hold_syncs(&self) {
        let mut state = self.state.lock().expect("lossy fs poisoned");
        if state.held.is_none() {
            state.held = Some(Vec::new());
        }
    }

    /// Fails every held fsync with an I/O error, making nothing durable, and answers fsyncs at
    /// once again. For a power cut: call it once the processes waiting on them are SIGKILLed,
    /// so that they can die (a process cannot exit while its FUSE request is unanswered) and
    /// none sees the error. Returns how many were held.
    pub fn fail_held_syncs(&self) -> usize {
        let held = {
            let mut state = self.state.lock().expect("lossy fs poisoned");
            state.held.take().unwrap_or_default()
        };
        let count = held.len();
        for (_, reply) in held {
            reply.error(Errno::EIO);
        }
        count
    }

    /// Carries out every held fsync, and answers fsyncs at once again.
    pub fn answer_held_syncs(&self) {
        let mut state = self.state.lock().expect("lossy fs poisoned");
        for (ino, reply) in state.held.take().unwrap_or_default() {
            match state.sync(ino) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        }
    }

    /// How many fsyncs are held now.
    pub fn held_syncs(&self) -> usize {
        let state = self.state.lock().expect("lossy fs poisoned");
        state.held.as_ref().map_or(0, Vec::len)
    }
}

/// What of the unsynced writes a power loss leaves on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsynced {
    /// None: every file goes back to what it held at its last fsync. The most that a missing
    /// fsync can lose.
    Dropped,
    /// A random part, drawn from `seed`: each sector written since the file's last fsync reached
    /// the disk or not, and a file whose length changed has its old or its new one. A store
    /// must still recover from what is there: a torn tail, a hole with later data after it, or
    /// zeros in a file that grew.
    Torn {
        /// Seeds the sector-by-sector choices, so that a run can be repeated.
        seed: u64,
    },
}

/// What a power loss dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    /// Files whose content went back to what was last fsynced.
    pub files: usize,
    /// Directory entries that went back to what was there at the directory's last fsync (a
    /// name created since and gone, deleted since and back, or naming another file).
    pub entries: usize,
    /// Sectors written since their file's last fsync that reached the disk anyway (a
    /// [`Unsynced::Torn`] power loss; 0 otherwise).
    pub kept_sectors: usize,
    /// Fsyncs that were waiting, held, when the power went ([`LossyFs::hold_syncs`]).
    pub held_syncs: usize,
}

impl std::ops::AddAssign for Lost {
    fn add_assign(&mut self, other: Lost) {
        self.files += other.files;
        self.entries += other.entries;
        self.kept_sectors += other.kept_sectors;
        self.held_syncs += other.held_syncs;
    }
}

/// Whether a lossy file system can be mounted here; `Err` says why not.
pub fn availability() -> Result<(), String> {
    // One directory per probe: tests may probe from several threads at once.
    static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("strata-lossy-probe-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {dir:?}: {e}"))?;
    let probe = (|| {
        let fs = LossyFs::mount(&dir).map_err(|e| format!("{e:#}"))?;
        std::fs::write(dir.join("probe"), b"x").map_err(|e| format!("write through FUSE: {e}"))?;
        drop(fs);
        Ok(())
    })();
    let _ = std::fs::remove_dir(&dir);
    probe
}

/// Unmounts `dir` if it is a lossy file system whose harness died (every access then fails with
/// "transport endpoint is not connected"), so that a new run can use the directory again.
pub fn detach_if_dead(dir: &Path) {
    if let Err(e) = std::fs::metadata(dir) {
        if e.raw_os_error() == Some(nix::libc::ENOTCONN) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(dir)
                .status();
        }
    }
}
/// Through the kernel: a real mount, written with `std::fs`, as the nodes use it.
#[cfg(test)]
mod mount_tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;

    /// A lossy file system mounted on a new temporary directory, or `None` (said loudly, like
    /// the suite's SKIP lines) where this machine cannot mount FUSE.
    fn mounted() -> Option<(tempfile::TempDir, LossyFs)> {
        if let Err(why) = availability() {
            eprintln!("SKIPPED: FUSE cannot be mounted here: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = LossyFs::mount(dir.path()).unwrap();
        Some((dir, fs))
    }

    #[test]
    fn a_full_disk_refuses_writes_and_new_files_below_its_directory_only() {
        let Some((dir, fs)) = mounted() else { return };
        let node = dir.path().join("node-1");
        std::fs::create_dir_all(node.join("db")).unwrap();
        let mut wal = std::fs::File::create(node.join("db/wal")).unwrap();
        wal.write_all(b"before").unwrap();
        std::fs::write(node.join("node.log"), b"log").unwrap();
        std::fs::create_dir_all(dir.path().join("node-2")).unwrap();

        fs.fill(Path::new("node-1"), &[Path::new("node.log")])
            .unwrap();
        let enospc = |r: std::io::Result<()>| {
            assert_eq!(r.unwrap_err().raw_os_error(), Some(nix::libc::ENOSPC));
        };
        enospc(wal.write_all(b"after").and_then(|()| wal.flush()));
        enospc(std::fs::write(node.join("db/new-sst"), b"x"));
        enospc(std::fs::create_dir(node.join("db/sub")));
        // Reads, fsyncs and deletions still work; the spared log and other nodes' disks too.
        assert_eq!(std::fs::read(node.join("db/wal")).unwrap(), b"before");
        wal.sync_all().unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(node.join("node.log"))
            .unwrap()
            .write_all(b"+stopping")
            .unwrap();
        std::fs::write(dir.path().join("node-2/wal"), b"fine").unwrap();
        assert!(fs.refused() >= 3);

        assert!(fs.free_space() >= 3);
        assert_eq!(fs.refused(), 0);
        wal.write_all(b"+after").unwrap();
        std::fs::write(node.join("db/new-sst"), b"x").unwrap();
        assert_eq!(std::fs::read(node.join("db/wal")).unwrap(), b"before+after");
    }

    #[test]
    fn a_slow_disk_answers_fsyncs_below_its_directory_late_and_nothing_else() {
        let Some((dir, fs)) = mounted() else { return };
        let node = dir.path().join("node-1");
        std::fs::create_dir_all(&node).unwrap();
        std::fs::create_dir_all(dir.path().join("node-2")).unwrap();
        let late = Duration::from_millis(400);
        fs.slow_down(Path::new("node-1"), late).unwrap();

        let timed = |f: &dyn Fn()| {
            let start = std::time::Instant::now();
            f();
            start.elapsed()
        };
        // Created after the slow-down, below it: slow too. Its write is not.
        let wal = node.join("wal");
        let wrote = timed(&|| std::fs::write(&wal, b"data").unwrap());
        assert!(wrote < late, "writes are served at once ({wrote:?})");
        let synced = timed(&|| std::fs::File::open(&wal).unwrap().sync_all().unwrap());
        assert!(synced >= late, "fsync answered after {synced:?}");
        let dir_synced = timed(&|| std::fs::File::open(&node).unwrap().sync_all().unwrap());
        assert!(
            dir_synced >= late,
            "directory fsync answered after {dir_synced:?}"
        );
        // Another node's disk is fast, even while a slow fsync waits.
        let waiting = {
            let wal = wal.clone();
            std::thread::spawn(move || std::fs::File::open(wal).unwrap().sync_all().unwrap())
        };
        let other = dir.path().join("node-2/wal");
        let fast = timed(&|| {
            std::fs::write(&other, b"x").unwrap();
            std::fs::File::open(&other).unwrap().sync_all().unwrap();
        });
        assert!(fast < late, "other disks are fast ({fast:?})");
        waiting.join().unwrap();

        // A slow fsync does make the data durable.
        fs.power_loss(Path::new("node-1"), &[], Unsynced::Dropped)
            .unwrap();
        assert_eq!(std::fs::read(&wal).unwrap(), b"data");
        fs.restore_speed();
        let synced = timed(&|| std::fs::File::open(&wal).unwrap().sync_all().unwrap());
        assert!(synced < late, "fast again ({synced:?})");
        drop(fs);
    }

    #[test]
    fn a_power_loss_drops_exactly_the_unsynced_writes_below_its_directory() {
        let Some((dir, fs)) = mounted() else { return };
        let db = dir.path().join("node-1/db");
        std::fs::create_dir_all(&db).unwrap();

        let sync_dir = |path: &Path| std::fs::File::open(path).unwrap().sync_all().unwrap();

        let mut wal = std::fs::File::create(db.join("wal")).unwrap();
        wal.write_all(b"synced").unwrap();
        wal.sync_data().unwrap();
        std::fs::write(db.join("never-synced"), b"gone").unwrap();
        std::fs::write(db.join("obsolete"), b"old").unwrap();
        std::fs::File::open(db.join("obsolete"))
            .unwrap()
            .sync_all()
            .unwrap();
        sync_dir(&db);
        wal.write_all(b"+unsynced").unwrap();

        // Renamed and its directory fsynced: durable.
        let staged = db.join("current.tmp");
        let mut f = std::fs::File::create(&staged).unwrap();
        f.write_all(b"renamed").unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&staged, db.join("CURRENT")).unwrap();
        sync_dir(&db);
        // Deleted, its directory not fsynced since: it comes back.
        std::fs::remove_file(db.join("obsolete")).unwrap();
        // The file fsynced, its name not: it goes, with the directory made after the last
        // directory fsync.
        let mut lost = std::fs::File::create(db.join("unnamed")).unwrap();
        lost.write_all(b"data").unwrap();
        lost.sync_all().unwrap();
        std::fs::create_dir(db.join("new-dir")).unwrap();
        std::fs::write(db.join("new-dir/inside"), b"x").unwrap();
        let log = dir.path().join("node-1/node.log");
        std::fs::write(&log, b"log line").unwrap();
        drop((wal, f, lost));

        let got = fs
            .power_loss(Path::new("node-1/db"), &[], Unsynced::Dropped)
            .unwrap();
        assert_eq!(
            got,
            Lost {
                files: 2,
                entries: 3,
                kept_sectors: 0,
                held_syncs: 0
            }
        );
        let mut names: Vec<_> = std::fs::read_dir(&db)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["CURRENT", "never-synced", "obsolete", "wal"]);
        assert_eq!(std::fs::read(db.join("wal")).unwrap(), b"synced");
        assert_eq!(std::fs::read(db.join("never-synced")).unwrap(), b"");
        assert_eq!(std::fs::read(db.join("obsolete")).unwrap(), b"old", "back");
        assert_eq!(std::fs::read(db.join("CURRENT")).unwrap(), b"renamed");
        assert_eq!(
            std::fs::read(&log).unwrap(),
            b"log line",
            "outside the directory"
        );
        assert!(fs
            .power_loss(Path::new("node-1/nope"), &[], Unsynced::Dropped)
            .is_err());

        // The whole node directory: `db` was never named durably in it, so it goes; the spared
        // log stays whole.
        std::fs::write(&log, b"log line\nmore").unwrap();
        let got = fs
            .power_loss(
                Path::new("node-1"),
                &[Path::new("node.log")],
                Unsynced::Dropped,
            )
            .unwrap();
        assert_eq!(got.entries, 1, "db");
        assert!(!db.exists());
        assert_eq!(std::fs::read(&log).unwrap(), b"log line\nmore");
        drop(fs);
    }

    #[test]
    fn a_held_fsync_waits_until_it_is_failed_or_carried_out() {
        let Some((dir, fs)) = mounted() else { return };
        let path = dir.path().join("wal");
        let mut wal = std::fs::File::create(&path).unwrap();
        std::fs::File::open(dir.path()).unwrap().sync_all().unwrap();
        wal.write_all(b"synced").unwrap();
        wal.sync_data().unwrap();

        // Starts an fsync of the file on another thread; its result arrives on the channel.
        let fsync_in_background = |wal: &std::fs::File| {
            let wal = wal.try_clone().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let result = wal.sync_data().map_err(|e| e.raw_os_error());
                // Closed before the answer: the test unmounts once it has it.
                drop(wal);
                tx.send(result)
            });
            rx
        };
        let wait = Duration::from_millis(200);

        fs.hold_syncs();
        wal.write_all(b"+in flight").unwrap();
        let done = fsync_in_background(&wal);
        assert!(done.recv_timeout(wait).is_err(), "held: not answered");
        assert_eq!(fs.fail_held_syncs(), 1);
        let failed = done.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(failed, Err(Some(nix::errno::Errno::EIO as i32)));
        fs.power_loss(Path::new(""), &[], Unsynced::Dropped)
            .unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"synced",
            "nothing made durable"
        );

        drop(wal);
        fs.hold_syncs();
        let mut wal = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        wal.write_all(b"+later").unwrap();
        let done = fsync_in_background(&wal);
        assert!(done.recv_timeout(wait).is_err(), "held: not answered");
        fs.answer_held_syncs();
        assert_eq!(done.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(()));
        fs.power_loss(Path::new(""), &[], Unsynced::Dropped)
            .unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"synced+later",
            "carried out"
        );
        // Closed before the unmount, which fails while a file is open.
        drop(wal);
        drop(fs);
    }
}
