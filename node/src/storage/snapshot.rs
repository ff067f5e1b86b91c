//! Snapshots of one group: format, build, and the current-snapshot file.
//!
//! A snapshot is the bincode of [`SnapshotBody`] — every data record of the group's range plus the
//! client sessions — and travels with openraft's `SnapshotMeta` (last applied log id and
//! membership). The current snapshot is kept as one file per group, written to a temporary name,
//! fsynced and renamed, so a crash leaves the old file or the new one.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use openraft::storage::RaftSnapshotBuilder;
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use serde::{Deserialize, Serialize};

use super::keys::{group_range, CF_DATA};
use super::sessions::ClientSession;
use super::Engine;
use crate::layout::GroupId;
use crate::raft::codec::{decode, encode};
use crate::raft::TypeConfig;

/// The data of a snapshot.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct SnapshotBody {
    /// `(user key, stored record)` for every key of the group, in key order.
    pub data: Vec<(Vec<u8>, Vec<u8>)>,
    /// Client sessions: `(client id, session)`.
    pub sessions: Vec<(u64, ClientSession)>,
}

/// The current-snapshot file of one group.
#[derive(Clone, Debug)]
pub struct SnapshotFile {
    path: PathBuf,
}

impl SnapshotFile {
    /// The snapshot file of `group` under `dir`.
    pub fn new(dir: PathBuf, group: GroupId) -> SnapshotFile {
        SnapshotFile {
            path: dir.join(format!("group-{group}.snap")),
        }
    }

    /// Saves `(meta, data)` atomically (temp file, fsync, rename, fsync dir).
    pub fn save(&self, meta: &SnapshotMetaOf<TypeConfig>, data: &[u8]) -> std::io::Result<()> {
        let dir = self.path.parent().expect("snapshot file has a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode(&(meta, data)))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// Deletes the snapshot file (the group left this node).
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Loads the saved snapshot, if any.
    pub fn load(&self) -> std::io::Result<Option<SnapshotOf<TypeConfig, Vec<u8>>>> {
        let raw = match std::fs::read(&self.path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let (meta, snapshot): (SnapshotMetaOf<TypeConfig>, Vec<u8>) = decode(&raw)?;
        Ok(Some(openraft::Snapshot { meta, snapshot }))
    }
}

/// Builds a snapshot from a copy of the group's state taken when the builder was created.
pub struct SnapshotBuilder {
    meta: SnapshotMetaOf<TypeConfig>,
    body: Result<SnapshotBody, String>,
    file: SnapshotFile,
}

impl SnapshotBuilder {
    /// Copies the group's state now. Must run where no apply is in progress (the state machine
    /// task), so the copy matches `applied`.
    pub fn capture(
        engine: &Engine,
        group: GroupId,
        applied: Option<LogIdOf<TypeConfig>>,
        membership: StoredMembershipOf<TypeConfig>,
        sessions: &HashMap<u64, ClientSession>,
        file: SnapshotFile,
    ) -> SnapshotBuilder {
        let body = read_group(engine, group).map(|data| SnapshotBody {
            data,
            sessions: sessions.iter().map(|(c, s)| (*c, s.clone())).collect(),
        });
        SnapshotBuilder {
            meta: openraft::SnapshotMeta {
                last_log_id: applied,
                last_membership: membership,
            },
            body: body.map_err(|e| e.to_string()),
            file,
        }
    }
}

fn read_group(engine: &Engine, group: GroupId) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let (lo, hi) = group_range(group);
    engine
        .range(CF_DATA, &lo, &hi)
        .map(|item| {
            let (k, v) = item?;
            Ok((k[8..].to_vec(), v.to_vec()))
        })
        .collect()
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> std::io::Result<SnapshotOf<TypeConfig, Vec<u8>>> {
        let body = self
            .body
            .as_ref()
            .map_err(|e| std::io::Error::other(e.clone()))?;
        let data = encode(body);
        self.file.save(&self.meta, &data)?;
        Ok(openraft::Snapshot {
            meta: self.meta.clone(),
            snapshot: data,
        })
    }
}
