//! Planted bugs, for proving that the chaos suite can fail (`jepsen-like-tests`). They exist only
//! in builds with the `planted-bugs` feature, which is off by default and never part of a release
//! binary; such a build enables one of them when started with `STRATA_PLANTED_BUG` set to its
//! name. In every other build [`active`] is a constant `false`.

/// A known bug the suite must catch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// `stale-reads`: linearizable reads are served from local state on any replica, skipping
    /// leadership confirmation (ReadIndex) — a lagging follower or deposed leader answers.
    StaleReads,
    /// `skip-dedup`: request ids are ignored, so a retried or duplicated write applies again.
    SkipDedup,
    /// `ack-before-fsync`: a log append is reported durable at once, without waiting for the WAL
    /// flush and fsync of group commit. Its records stay in RocksDB's in-process WAL buffer until
    /// some later write flushes it, so a SIGKILL loses acknowledged entries — as a power loss
    /// would lose un-fsynced ones.
    AckBeforeFsync,
    /// `skip-fsync`: group commit writes the WAL to the OS but never fsyncs it, so appends are
    /// acknowledged while they sit in the page cache. A SIGKILL keeps them; only a power loss
    /// (the chaos suite's lossy file system) drops them.
    SkipFsync,
    /// `skip-dir-fsync`: the node never fsyncs a directory, so the entries it creates, renames
    /// or deletes (its database's directory among them) are not durable. Only a power loss that
    /// also drops directory entries (the lossy file system) finds it.
    SkipDirFsync,
    /// `short-append-timeout`: an AppendEntries waits for its answer only as long as openraft
    /// asks — one heartbeat interval — so a round trip slower than a heartbeat fails every
    /// append and replication stops while the network is slow. Only the latency nemesis' slow
    /// links find it (as a stall, not as lost data).
    ShortAppendTimeout,
    /// `strict-wal-recovery`: the node opens its database with RocksDB's `AbsoluteConsistency`
    /// WAL recovery, which takes an incomplete record at the end of the WAL for corruption. A
    /// power cut while a WAL write is on its way to the disk leaves exactly that, so the node
    /// cannot restart. Only a torn power loss (some unsynced sectors on the disk) finds it; a
    /// loss of every unsynced write leaves a clean WAL end.
    StrictWalRecovery,
    /// `no-fail-stop`: a Raft group that stops on a storage error (a full disk) leaves its node
    /// running, as it did before fail-stop was built: the node keeps answering peers and clients
    /// with groups that no longer append, vote or apply. Only the full-disk nemesis finds it.
    NoFailStop,
    /// `blocking-synced-writes`: a Raft vote and the layout are stored with a synced RocksDB
    /// write on the calling thread, as before [`crate::storage::Engine::write_durable`]: the
    /// write holds RocksDB's write queue for its fsync, so on a slow disk every apply and append
    /// behind it, and the async runtime's threads they run on, wait too. Only the slow-disk
    /// nemesis finds it (as a stall).
    BlockingSyncedWrites,
    /// `no-incarnation-check`: peer requests are not checked against the incarnations of the
    /// data directories they name (see [`crate::raft::identity`]), as before that check was
    /// built: a node restarted with a wiped data directory takes part under its old id, voting
    /// and acknowledging appends with an empty log. Only the wipe nemesis finds it (the node runs
    /// on where it must stop).
    NoIncarnationCheck,
}

#[cfg(feature = "planted-bugs")]
impl Bug {
    fn name(self) -> &'static str {
        match self {
            Bug::StaleReads => "stale-reads",
            Bug::SkipDedup => "skip-dedup",
            Bug::AckBeforeFsync => "ack-before-fsync",
            Bug::SkipFsync => "skip-fsync",
            Bug::SkipDirFsync => "skip-dir-fsync",
            Bug::ShortAppendTimeout => "short-append-timeout",
            Bug::StrictWalRecovery => "strict-wal-recovery",
            Bug::NoFailStop => "no-fail-stop",
            Bug::BlockingSyncedWrites => "blocking-synced-writes",
            Bug::NoIncarnationCheck => "no-incarnation-check",
        }
    }
}

/// Whether `bug` is switched on in this process.
#[cfg(feature = "planted-bugs")]
pub fn active(bug: Bug) -> bool {
    static CHOSEN: std::sync::LazyLock<Option<String>> = std::sync::LazyLock::new(|| {
        let chosen = std::env::var("STRATA_PLANTED_BUG").ok();
        if let Some(name) = &chosen {
            tracing::warn!("PLANTED BUG {name} IS ACTIVE: this node is deliberately incorrect");
        }
        chosen
    });
    CHOSEN.as_deref() == Some(bug.name())
}

/// Whether `bug` is switched on in this process: never, in this build.
#[cfg(not(feature = "planted-bugs"))]
#[inline(always)]
pub fn active(_bug: Bug) -> bool {
    false
}
