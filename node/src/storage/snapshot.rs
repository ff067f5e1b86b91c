//! Snapshots of one group: the current-snapshot file, the data handle openraft passes around,
//! and the builder.
//!
//! A snapshot is a file in the format of [`super::snapshot_format`]: every data record of the
//! group's range plus the client sessions, headed by openraft's `SnapshotMeta`. Nothing holds a
//! whole snapshot in memory:
//!
//! - **Build**: on the state machine task (so it matches the applied index) the builder only pins
//!   a RocksDB snapshot and copies the sessions; a blocking thread then streams the range from that
//!   point-in-time view into a staged file while applies go on.
//! - **Send**: the file is read and sent in chunks (`raft::network`).
//! - **Receive**: the chunks are written to a staged file (`service::transport`).
//! - **Install** (`state_machine`): the staged file is checked whole, renamed to the group's
//!   installing file, read record by record into RocksDB in bounded batches, and then becomes
//!   the current snapshot. A crash midway is finished from the installing file at the next start.
//!
//! A staged file becomes the current one by rename (after its fsync), so a crash leaves the old
//! file or the new one; staged files left by a crash are deleted at start ([`remove_staged`]).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftSnapshotBuilder;
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use tokio::task::JoinHandle;

use super::dirs::{create_dir_durable, remove_file_durable, sync_dir};
use super::keys::{group_range, CF_DATA};
use super::snapshot_format::{Sessions, SnapshotReader, SnapshotWriter, MAGIC};
use super::{on_blocking_thread, Engine};
use crate::layout::GroupId;
use crate::raft::TypeConfig;

/// Suffix of staged files: snapshots being built or received.
const STAGED_SUFFIX: &str = ".staged";

/// A snapshot's bytes as openraft passes them around: an open snapshot file, read from its start.
pub struct SnapshotData {
    file: File,
    /// Set when the file is a staged one (built or received) that may become the current one.
    staged: Option<StagedFile>,
}

impl SnapshotData {
    /// A received snapshot in staged file `staged`.
    pub fn staged(staged: StagedFile) -> std::io::Result<SnapshotData> {
        Ok(SnapshotData {
            file: File::open(&staged.path)?,
            staged: Some(staged),
        })
    }

    /// The open file, positioned at its start.
    pub fn into_file(self) -> File {
        self.file
    }

    /// The open file and, if it is staged, its staged name.
    pub fn into_parts(self) -> (File, Option<StagedFile>) {
        (self.file, self.staged)
    }
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotData")
            .field("staged", &self.staged.as_ref().map(|s| &s.path))
            .finish()
    }
}

/// A staged snapshot file; deleted when dropped unless it became the current snapshot.
#[derive(Debug)]
pub struct StagedFile {
    path: PathBuf,
}

impl StagedFile {
    /// Where the staged file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        // After a rename into place the name is gone and this is a no-op. An unlink may wait for
        // the disk: dropped on the async runtime, it runs on a blocking thread.
        let path = std::mem::take(&mut self.path);
        let remove = move || drop(std::fs::remove_file(path));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// Deletes the staged files under `dir`: snapshots a crashed process was building or receiving.
pub fn remove_staged(dir: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    for entry in entries {
        let path = entry?.path();
        let name = path.to_string_lossy();
        // `.tmp`: the staged name of nodes before 2026-12-03.
        if name.ends_with(STAGED_SUFFIX) || name.ends_with(".tmp") {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// The current-snapshot file of one group.
#[derive(Clone, Debug)]
pub struct SnapshotFile {
    dir: PathBuf,
    group: GroupId,
    path: PathBuf,
    /// Serializes publishing, so a build that finishes late cannot replace a newer snapshot
    /// installed meanwhile.
    publishing: Arc<Mutex<()>>,
}

impl SnapshotFile {
    /// The snapshot file of `group` under `dir`.
    pub fn new(dir: PathBuf, group: GroupId) -> SnapshotFile {
        SnapshotFile {
            path: dir.join(format!("group-{group}.snap")),
            dir,
            group,
            publishing: Arc::default(),
        }
    }

    /// A new, unique staged name for a snapshot of this group (the file is not created).
    pub fn stage(&self) -> std::io::Result<StagedFile> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        create_dir_durable(&self.dir)?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Ok(StagedFile {
            path: self
                .dir
                .join(format!("group-{}.{n}{STAGED_SUFFIX}", self.group)),
        })
    }

    /// Makes the fsynced staged file the current snapshot, unless the current one is at least
    /// as new as `meta` (then the staged file is dropped).
    pub fn publish(
        &self,
        staged: StagedFile,
        meta: &SnapshotMetaOf<TypeConfig>,
    ) -> std::io::Result<()> {
        let _one_at_a_time = self.publishing.lock().expect("publishing lock poisoned");
        if let Some(current) = self.current_meta()? {
            if current.last_log_id >= meta.last_log_id {
                return Ok(());
            }
        }
        std::fs::rename(&staged.path, &self.path)?;
        sync_dir(&self.dir)
    }

    /// Copies the snapshot in `file` (from its start) to a new staged file, fsynced.
    pub fn copy_to_stage(&self, mut file: File) -> std::io::Result<StagedFile> {
        let staged = self.stage()?;
        let mut out = File::create(&staged.path)?;
        file.seek(SeekFrom::Start(0))?;
        std::io::copy(&mut file, &mut out)?;
        out.sync_all()?;
        Ok(staged)
    }

    /// Deletes the snapshot files (the group left this node).
    pub fn remove(&self) -> std::io::Result<()> {
        remove_file_durable(&self.path)?;
        remove_file_durable(&self.installing_path())
    }

    /// Where the snapshot being installed is kept until the install is complete: a crash midway
    /// is finished from it at the next start.
    fn installing_path(&self) -> PathBuf {
        self.dir.join(format!("group-{}.installing", self.group))
    }

    /// Makes the fsynced staged file the snapshot being installed.
    pub fn begin_install(&self, staged: StagedFile) -> std::io::Result<()> {
        std::fs::rename(&staged.path, self.installing_path())?;
        sync_dir(&self.dir)
    }

    /// The snapshot being installed, opened at its start.
    pub fn open_installing(&self) -> std::io::Result<File> {
        File::open(self.installing_path())
    }

    /// The meta of the snapshot being installed, if there is one.
    pub fn installing_meta(&self) -> std::io::Result<Option<SnapshotMetaOf<TypeConfig>>> {
        open_if_there(&self.installing_path())?
            .map(SnapshotReader::read_meta)
            .transpose()
    }

    /// The installed snapshot becomes the current one (see [`publish`](Self::publish)).
    pub fn finish_install(&self, meta: &SnapshotMetaOf<TypeConfig>) -> std::io::Result<()> {
        let installed = StagedFile {
            path: self.installing_path(),
        };
        self.publish(installed, meta)
    }

    /// Deletes a snapshot whose install never began.
    pub fn discard_install(&self) -> std::io::Result<()> {
        remove_file_durable(&self.installing_path())
    }

    /// The current snapshot, if any.
    pub fn load(&self) -> std::io::Result<Option<SnapshotOf<TypeConfig, SnapshotData>>> {
        let Some(mut file) = open_if_there(&self.path)? else {
            return Ok(None);
        };
        let meta = SnapshotReader::read_meta(file.try_clone()?)?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Some(openraft::Snapshot {
            meta,
            snapshot: SnapshotData { file, staged: None },
        }))
    }

    /// The meta of the current snapshot file, if there is one.
    fn current_meta(&self) -> std::io::Result<Option<SnapshotMetaOf<TypeConfig>>> {
        open_if_there(&self.path)?
            .map(SnapshotReader::read_meta)
            .transpose()
    }

    /// Rewrites a current snapshot file of the earlier format in the current one (at open, once).
    pub fn convert_legacy(&self) -> std::io::Result<()> {
        let Some(file) = open_if_there(&self.path)? else {
            return Ok(());
        };
        if legacy::has_magic(file)? {
            return Ok(());
        }
        legacy::convert(self)
    }
}

fn open_if_there(path: &Path) -> std::io::Result<Option<File>> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Builds a snapshot from the point-in-time view pinned when the builder was created.
pub struct SnapshotBuilder {
    meta: SnapshotMetaOf<TypeConfig>,
    /// The thread writing the staged file; taken by the first build.
    writing: Option<JoinHandle<std::io::Result<StagedFile>>>,
    file: SnapshotFile,
}

impl SnapshotBuilder {
    /// Pins the group's state as of now and starts writing it to a staged file. Must run where no
    /// apply is in progress (the state machine task): it returns once the view is pinned, so the
    /// view matches `applied`, and the writing goes on while applies continue.
    pub async fn capture(
        engine: Arc<Engine>,
        group: GroupId,
        applied: Option<LogIdOf<TypeConfig>>,
        membership: StoredMembershipOf<TypeConfig>,
        sessions: Sessions,
        file: SnapshotFile,
    ) -> SnapshotBuilder {
        let meta = openraft::SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
        };
        let (pinned_tx, pinned) = tokio::sync::oneshot::channel();
        let (job_meta, job_file) = (meta.clone(), file.clone());
        // The RocksDB snapshot borrows the database, so it is taken and used on one thread.
        let writing = tokio::task::spawn_blocking(move || {
            let view = engine.db().snapshot();
            let _ = pinned_tx.send(());
            let staged = job_file.stage()?;
            let mut w = SnapshotWriter::create(&staged.path, &job_meta, &sessions)?;
            let (lo, hi) = group_range(group);
            for item in engine.range_at(Some(&view), CF_DATA, &lo, &hi) {
                let (key, record) = item?;
                w.record(&key[8..], &record)?;
            }
            w.finish()?;
            Ok(staged)
        });
        // Wait until the view is pinned (or the job failed before, which the build reports).
        let _ = pinned.await;
        SnapshotBuilder {
            meta,
            writing: Some(writing),
            file,
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> std::io::Result<SnapshotOf<TypeConfig, SnapshotData>> {
        let writing = self
            .writing
            .take()
            .ok_or_else(|| std::io::Error::other("snapshot builder used twice"))?;
        let staged = writing.await.map_err(std::io::Error::other)??;
        // Publishing renames the file and fsyncs its directory: on a blocking thread too, so
        // that a slow disk holds up this build only, not a runtime worker (and every group's
        // work on it).
        let (files, meta) = (self.file.clone(), self.meta.clone());
        let file = on_blocking_thread(move || {
            // Opened before publishing: the handle stays valid whether the file is renamed into
            // place or dropped because a newer snapshot was installed meanwhile.
            let file = File::open(&staged.path)?;
            files.publish(staged, &meta)?;
            Ok(file)
        })
        .await?;
        Ok(openraft::Snapshot {
            meta: self.meta.clone(),
            snapshot: SnapshotData { file, staged: None },
        })
    }
}

/// Snapshot files as nodes before 2026-12-03 wrote them: the bincode of `(meta, body)`, the
/// body the bincode of every record and the sessions. Converted once, when the group's state
/// machine opens ([`SnapshotFile::convert_legacy`]); this module can go once no such data dir is
/// left.
mod legacy {
    use std::io::Read;

    use serde::Deserialize;

    use super::*;
    use crate::raft::codec::decode;

    #[derive(Deserialize)]
    struct Body {
        data: Vec<(Vec<u8>, Vec<u8>)>,
        sessions: Sessions,
    }

    /// Whether `file` starts with the current format's magic.
    pub(super) fn has_magic(mut file: File) -> std::io::Result<bool> {
        let mut magic = [0u8; 8];
        let n = file.read(&mut magic)?;
        Ok(n == magic.len() && &magic == MAGIC)
    }

    /// Rewrites the current snapshot file of `snap` in the current format.
    pub(super) fn convert(snap: &SnapshotFile) -> std::io::Result<()> {
        let raw = std::fs::read(&snap.path)?;
        let (meta, body): (SnapshotMetaOf<TypeConfig>, Vec<u8>) = decode(&raw)?;
        let body: Body = decode(&body)?;
        let staged = snap.stage()?;
        let mut w = SnapshotWriter::create(&staged.path, &meta, &body.sessions)?;
        for (key, record) in &body.data {
            w.record(key, record)?;
        }
        w.finish()?;
        std::fs::rename(&staged.path, &snap.path)?;
        sync_dir(&snap.dir)?;
        tracing::info!(
            group = snap.group,
            "converted a snapshot file to the current format"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::codec::encode;

    fn meta(index: u64) -> SnapshotMetaOf<TypeConfig> {
        openraft::SnapshotMeta {
            last_log_id: Some(openraft::testing::log_id::<TypeConfig>(1, 1, index)),
            ..Default::default()
        }
    }

    fn staged_snapshot(snap: &SnapshotFile, index: u64) -> StagedFile {
        let staged = snap.stage().unwrap();
        let w = SnapshotWriter::create(staged.path(), &meta(index), &Vec::new()).unwrap();
        w.finish().unwrap();
        staged
    }

    #[test]
    fn publishing_never_replaces_a_newer_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let snap = SnapshotFile::new(dir.path().to_path_buf(), 5);
        assert!(snap.load().unwrap().is_none());
        snap.publish(staged_snapshot(&snap, 50), &meta(50)).unwrap();
        snap.publish(staged_snapshot(&snap, 20), &meta(20)).unwrap();
        assert_eq!(snap.load().unwrap().unwrap().meta, meta(50));
        snap.publish(staged_snapshot(&snap, 60), &meta(60)).unwrap();
        assert_eq!(snap.load().unwrap().unwrap().meta, meta(60));
        // The refused and the published staged names are both gone.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn staged_files_are_removed_when_dropped_or_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let snap = SnapshotFile::new(dir.path().to_path_buf(), 5);
        drop(staged_snapshot(&snap, 1));
        let kept = staged_snapshot(&snap, 2);
        std::mem::forget(kept); // as if the process had crashed while staging it
        snap.publish(staged_snapshot(&snap, 3), &meta(3)).unwrap();
        remove_staged(dir.path()).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("group-5.snap")]);
    }

    #[test]
    fn a_file_of_the_earlier_format_is_converted_at_open() {
        #[derive(serde::Serialize)]
        struct Body {
            data: Vec<(Vec<u8>, Vec<u8>)>,
            sessions: Sessions,
        }
        let dir = tempfile::tempdir().unwrap();
        let snap = SnapshotFile::new(dir.path().to_path_buf(), 5);
        let body = Body {
            data: vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec()),
            ],
            sessions: vec![(9, Default::default())],
        };
        std::fs::write(&snap.path, encode(&(meta(7), encode(&body)))).unwrap();
        snap.convert_legacy().unwrap();
        let loaded = snap.load().unwrap().unwrap();
        assert_eq!(loaded.meta, meta(7));
        let mut r = SnapshotReader::open(loaded.snapshot.into_file()).unwrap();
        assert_eq!(r.take_sessions(), body.sessions);
        let mut records = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            records.push(rec);
        }
        assert_eq!(records, body.data);
    }
}
