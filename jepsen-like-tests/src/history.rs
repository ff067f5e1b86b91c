//! The history: every client operation as `invoke` then exactly one of `ok` / `fail` / `info`,
//! and every nemesis action, one JSON object per line, written as the run goes so a crashed run
//! still leaves a checkable file. Times are nanoseconds from one monotonic clock started with the
//! run.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What an event records.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An operation starts.
    Invoke,
    /// It happened, with this result.
    Ok,
    /// It definitely did not happen.
    Fail,
    /// Unknown: it may take effect at any later time, or never.
    Info,
    /// A fault injected or healed by the nemesis.
    Nemesis,
}

/// The operation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum F {
    /// Linearizable read of a register.
    Read,
    /// Put of a unique value.
    Write,
    /// Compare-and-set from `expected` (a value, `None` = absent) to `value`.
    Cas,
    /// Set workload: add a unique element.
    Add,
    /// Set workload: read every element (after the run).
    ReadAll,
    /// Nemesis start / stop.
    Start,
    /// See [`F::Start`].
    Stop,
}

/// One line of `history.jsonl`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Position in the file.
    pub index: u64,
    /// Invoke / ok / fail / info / nemesis.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Logical client process; a process whose op ended `info` is retired.
    pub process: u64,
    /// Nanoseconds since the run started (one monotonic clock).
    pub time: u64,
    /// The operation.
    pub f: F,
    /// Key operated on (nemesis: the fault's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Value written / read (read of an absent key: `None` on `ok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Compare-and-set: the value expected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// Set reads: the elements seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    /// Version returned by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Node the request went to (when pinned), or the nemesis' targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Shard of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u64>,
    /// Error text of fail / info.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Event {
    /// An event with only the required fields set.
    pub fn new(kind: Kind, process: u64, f: F) -> Event {
        Event {
            index: 0,
            kind,
            process,
            time: 0,
            f,
            key: None,
            value: None,
            expected: None,
            values: None,
            version: None,
            node: None,
            shard: None,
            error: None,
        }
    }
}

/// Appends events to `history.jsonl` (and keeps them for the checkers).
pub struct Recorder {
    start: Instant,
    inner: Mutex<RecorderInner>,
}

struct RecorderInner {
    out: BufWriter<std::fs::File>,
    events: Vec<Event>,
}

impl Recorder {
    /// Creates `path`; the run's clock starts now.
    pub fn create(path: &Path) -> std::io::Result<Recorder> {
        Ok(Recorder {
            start: Instant::now(),
            inner: Mutex::new(RecorderInner {
                out: BufWriter::new(std::fs::File::create(path)?),
                events: Vec::new(),
            }),
        })
    }

    /// Stamps `e` with its index and time, writes it, and returns the stamped copy.
    pub fn record(&self, mut e: Event) -> Event {
        let mut inner = self.inner.lock().expect("recorder poisoned");
        // Stamped under the lock, so times never go backwards along the file.
        e.time = self.start.elapsed().as_nanos() as u64;
        e.index = inner.events.len() as u64;
        let line = serde_json::to_string(&e).expect("event serializes");
        // A failed write loses history: better to stop the run loudly.
        writeln!(inner.out, "{line}").expect("write history");
        inner.events.push(e.clone());
        e
    }

    /// Flushes the file and returns every event recorded.
    pub fn finish(&self) -> std::io::Result<Vec<Event>> {
        let mut inner = self.inner.lock().expect("recorder poisoned");
        inner.out.flush()?;
        Ok(inner.events.clone())
    }

    /// Flushes what was written so far (called periodically so a crash loses little).
    pub fn flush(&self) {
        let _ = self.inner.lock().expect("recorder poisoned").out.flush();
    }
}

/// Reads a stored history.
pub fn load(path: &Path) -> anyhow::Result<Vec<Event>> {
    let file = std::fs::File::open(path)?;
    let mut events = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let e: Event = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?;
        events.push(e);
    }
    Ok(events)
}
