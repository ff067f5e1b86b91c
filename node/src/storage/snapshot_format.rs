//! The snapshot file format: written and read as a stream, so neither building, sending nor
//! receiving a snapshot holds the shard in memory.
//!
//! ```text
//! file    := MAGIC frame(meta) frame(sessions) { frame(key) frame(record) }* END count crc
//! frame   := length (u32 LE, < END) ‖ bytes
//! END     := u32::MAX;  count := u64 LE, the number of records;  crc := u32 LE, CRC-32C of all before
//! ```
//!
//! `meta` is the bincode of openraft's `SnapshotMeta` (last applied log id and membership),
//! `sessions` the bincode of the group's client sessions, `key` a user key and `record` the stored
//! record (version ‖ value). The same bytes are the file on disk and what travels to a follower:
//! the count and CRC at the end catch a stream cut short or a corrupted one before any of it is
//! installed.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use crc::{Crc, Digest, CRC_32_ISCSI};
use openraft::type_config::alias::SnapshotMetaOf;

use super::sessions::ClientSession;
use crate::raft::codec::{decode, encode};
use crate::raft::TypeConfig;

/// The first bytes of every snapshot file (format version 2; version 1 was one bincode blob).
pub const MAGIC: &[u8; 8] = b"STRSNAP2";

/// The length field that ends the records.
const END: u32 = u32::MAX;

/// Largest frame a reader accepts: far above any key, value or session table the limits allow,
/// and small enough that a corrupt length cannot make it allocate without bound.
const MAX_FRAME: usize = 256 << 20;

static CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// The client sessions of a snapshot: `(client id, session)`.
pub type Sessions = Vec<(u64, ClientSession)>;

/// One data record of a snapshot: `(user key, stored record)`.
pub type KeyRecord = (Vec<u8>, Vec<u8>);

pub(super) fn invalid(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("snapshot file: {what}"),
    )
}

/// Writes a snapshot file record by record.
pub struct SnapshotWriter {
    out: BufWriter<File>,
    crc: Digest<'static, u32>,
    count: u64,
}

impl SnapshotWriter {
    /// Creates (or truncates) `path` and writes the header: magic, meta and sessions.
    pub fn create(
        path: &Path,
        meta: &SnapshotMetaOf<TypeConfig>,
        sessions: &Sessions,
    ) -> std::io::Result<SnapshotWriter> {
        let mut w = SnapshotWriter {
            out: BufWriter::with_capacity(1 << 20, File::create(path)?),
            crc: CRC32C.digest(),
            count: 0,
        };
        w.bytes(MAGIC)?;
        w.frame(&encode(meta))?;
        w.frame(&encode(sessions))?;
        Ok(w)
    }

    /// Appends one `(user key, stored record)`; keys must come in key order.
    pub fn record(&mut self, key: &[u8], record: &[u8]) -> std::io::Result<()> {
        self.frame(key)?;
        self.frame(record)?;
        self.count += 1;
        Ok(())
    }

    /// Writes the end marker, count and CRC, and fsyncs the file.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.bytes(&END.to_le_bytes())?;
        self.bytes(&self.count.to_le_bytes())?;
        let crc = self.crc.finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
    }

    fn frame(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|l| (*l as usize) <= MAX_FRAME)
            .ok_or_else(|| invalid(format!("a frame of {} bytes is too long", bytes.len())))?;
        self.bytes(&len.to_le_bytes())?;
        self.bytes(bytes)
    }

    fn bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }
}

/// Reads a snapshot file from its start, checking it as it goes.
pub struct SnapshotReader {
    inp: BufReader<File>,
    crc: Digest<'static, u32>,
    count: u64,
    meta: SnapshotMetaOf<TypeConfig>,
    sessions: Option<Sessions>,
}

impl SnapshotReader {
    /// Reads the header of `file` (positioned at its start): magic, meta and sessions.
    pub fn open(file: File) -> std::io::Result<SnapshotReader> {
        let mut r = SnapshotReader::header(file)?;
        let sessions = r.frame()?.ok_or_else(|| invalid("no sessions"))?;
        r.sessions = Some(decode(&sessions)?);
        Ok(r)
    }

    /// Reads only the meta of `file` (positioned at its start).
    pub fn read_meta(file: File) -> std::io::Result<SnapshotMetaOf<TypeConfig>> {
        Ok(SnapshotReader::header(file)?.meta)
    }

    fn header(file: File) -> std::io::Result<SnapshotReader> {
        let mut r = SnapshotReader {
            inp: BufReader::with_capacity(1 << 20, file),
            crc: CRC32C.digest(),
            count: 0,
            meta: Default::default(),
            sessions: None,
        };
        let mut magic = [0u8; 8];
        r.exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(invalid("not a snapshot file of this format"));
        }
        let meta = r.frame()?.ok_or_else(|| invalid("no meta"))?;
        r.meta = decode(&meta)?;
        Ok(r)
    }

    /// The snapshot's meta.
    pub fn meta(&self) -> &SnapshotMetaOf<TypeConfig> {
        &self.meta
    }

    /// The snapshot's client sessions (taken once).
    pub fn take_sessions(&mut self) -> Sessions {
        self.sessions.take().unwrap_or_default()
    }

    /// The next `(user key, stored record)`, or `None` after the last one once the count and
    /// CRC at the end matched. Any error means the file is not a whole, intact snapshot.
    pub fn next_record(&mut self) -> std::io::Result<Option<KeyRecord>> {
        let Some(key) = self.frame()? else {
            self.check_end()?;
            return Ok(None);
        };
        let record = self
            .frame()?
            .ok_or_else(|| invalid("end marker after a key"))?;
        self.count += 1;
        Ok(Some((key, record)))
    }

    fn check_end(&mut self) -> std::io::Result<()> {
        let mut count = [0u8; 8];
        self.exact(&mut count)?;
        let expected_crc = self.crc.clone().finalize();
        let mut crc = [0u8; 4];
        self.inp.read_exact(&mut crc).map_err(truncated)?;
        if u64::from_le_bytes(count) != self.count {
            return Err(invalid(format!(
                "{} records read, {} written",
                self.count,
                u64::from_le_bytes(count)
            )));
        }
        if u32::from_le_bytes(crc) != expected_crc {
            return Err(invalid("checksum mismatch"));
        }
        if self.inp.read(&mut [0u8; 1])? != 0 {
            return Err(invalid("bytes after the end"));
        }
        Ok(())
    }

    /// The next frame, or `None` at the end marker.
    fn frame(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut len = [0u8; 4];
        self.exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        if len == END {
            return Ok(None);
        }
        if len as usize > MAX_FRAME {
            return Err(invalid(format!("a frame claims {len} bytes")));
        }
        let mut bytes = vec![0u8; len as usize];
        self.exact(&mut bytes)?;
        Ok(Some(bytes))
    }

    fn exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.inp.read_exact(buf).map_err(truncated)?;
        self.crc.update(buf);
        Ok(())
    }
}

fn truncated(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        invalid("cut short")
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    fn meta() -> SnapshotMetaOf<TypeConfig> {
        openraft::SnapshotMeta {
            last_log_id: Some(openraft::testing::log_id::<TypeConfig>(3, 1, 42)),
            ..Default::default()
        }
    }

    /// Writes a snapshot of `n` records to a temporary file and returns its bytes.
    fn written(dir: &Path, n: u64) -> Vec<u8> {
        let path = dir.join("s");
        let sessions = vec![(7, ClientSession::default())];
        let mut w = SnapshotWriter::create(&path, &meta(), &sessions).unwrap();
        for i in 0..n {
            w.record(format!("k{i:04}").as_bytes(), &i.to_be_bytes())
                .unwrap();
        }
        w.finish().unwrap();
        std::fs::read(path).unwrap()
    }

    fn read_all(dir: &Path, bytes: &[u8]) -> std::io::Result<(Sessions, Vec<KeyRecord>)> {
        let path = dir.join("r");
        std::fs::write(&path, bytes).unwrap();
        let mut r = SnapshotReader::open(File::open(&path)?)?;
        assert_eq!(r.meta(), &meta());
        let sessions = r.take_sessions();
        let mut records = Vec::new();
        while let Some(rec) = r.next_record()? {
            records.push(rec);
        }
        Ok((sessions, records))
    }

    #[test]
    fn round_trips_header_and_records_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = written(dir.path(), 1000);
        let (sessions, records) = read_all(dir.path(), &bytes).unwrap();
        assert_eq!(sessions, vec![(7, ClientSession::default())]);
        assert_eq!(records.len(), 1000);
        assert_eq!(
            records[999],
            (b"k0999".to_vec(), 999u64.to_be_bytes().to_vec())
        );
        let mut f = File::open(dir.path().join("s")).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        assert_eq!(SnapshotReader::read_meta(f).unwrap(), meta());
    }

    #[test]
    fn an_empty_group_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (_, records) = read_all(dir.path(), &written(dir.path(), 0)).unwrap();
        assert!(records.is_empty());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = written(dir.path(), 3);
        for len in 0..bytes.len() {
            let err = read_all(dir.path(), &bytes[..len]).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "cut at {len}");
        }
    }

    #[test]
    fn a_flipped_bit_or_trailing_bytes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = written(dir.path(), 3);
        // Flip a bit inside the last record's value: only the CRC can tell.
        let mut flipped = bytes.clone();
        let at = bytes.len() - 4 - 8 - 4 - 1;
        flipped[at] ^= 1;
        let err = read_all(dir.path(), &flipped).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let mut longer = bytes;
        longer.push(0);
        let err = read_all(dir.path(), &longer).unwrap_err();
        assert!(err.to_string().contains("after the end"), "{err}");
    }

    #[test]
    fn another_file_is_refused_by_its_magic() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_all(dir.path(), b"STRSNAP1 and more bytes").unwrap_err();
        assert!(err.to_string().contains("format"), "{err}");
    }
}
