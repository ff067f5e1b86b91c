//! Storage: one RocksDB per node, shared by every Raft group on it.
//!
//! - [`keys`]: the key encodings of the column families.
//! - [`dirs`]: creating, syncing and deleting directory entries durably.
//! - [`engine`]: opening RocksDB with the memory budget, and the group-commit syncer.
//! - [`log_store`]: openraft's log storage for one group.
//! - [`state_machine`]: the KV state machine of one group (data, applied id, membership).
//! - [`sessions`]: the de-duplication table of one group (client sessions, bounded).
//! - [`install`]: installing a snapshot (delete-range plus SST ingest), finished after a crash.
//! - [`snapshot`]: the current-snapshot file, staged files, and the snapshot builder.
//! - [`snapshot_format`]: the streamed snapshot file format (writer and checking reader).
//!
//! Column families:
//!
//! | CF | key | value |
//! |---|---|---|
//! | `raft_log` | group ‖ index (big-endian) | bincode `Entry` |
//! | `raft_state` | group ‖ tag | vote, last purged log id; node-wide: the layout |
//! | `data` | group ‖ user key | version (8 bytes BE) ‖ value |
//! | `sm_meta` | group ‖ tag ‖ … | last applied log id, membership, client sessions |
//!
//! Durability rules: a log append is acknowledged only after the WAL is fsynced (the syncer); the
//! vote returns only once the syncer's next fsync covers it ([`Engine::write_durable`]); apply
//! writes data and `sm_meta` in one `WriteBatch` without fsync (after a crash the group replays
//! committed entries from its durable last-applied).
//!
//! Threads: the async runtime's workers call RocksDB only for writes into its memtables and WAL
//! buffer and for reads; every fsync is the syncer's, and every other file system call (snapshot
//! files, staged files, directories) runs on a blocking thread (`on_blocking_thread`).

pub mod dirs;
pub mod engine;
pub mod install;
pub mod keys;
pub mod log_store;
pub mod sessions;
pub mod snapshot;
pub mod snapshot_format;
pub mod state_machine;

pub use engine::Engine;
pub use log_store::LogStore;
pub use state_machine::StateMachine;

/// Runs `work` — file system calls that may wait for the disk — on a blocking thread. A runtime
/// worker that waits for a slow disk holds up every group's work queued on it: heartbeats,
/// answers to its AppendEntries, applies (found with the chaos suite's `slow-disk` nemesis).
pub(crate) async fn on_blocking_thread<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(std::io::Error::other)?
}

/// Wraps a RocksDB error as an `io::Error`, the error type openraft's storage traits use.
pub(crate) fn io_err(e: rocksdb::Error) -> std::io::Error {
    std::io::Error::other(e)
}
