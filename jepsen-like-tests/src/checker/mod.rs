//! Checkers over a recorded history.
//!
//! - [`linear`]: per-key linearizability of the register workload (read / write / CAS).
//! - [`set`]: lost / stale / duplicated / phantom elements of the set workload.
//!
//! [`check`] splits a history into both and returns one verdict. Operations are paired by
//! process: each process has at most one operation in flight, so an invoke is completed by the
//! next `ok`/`fail`/`info` of its process; an invoke never completed counts as `info`.

pub mod linear;
pub mod set;

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::history::{Event, Kind, F};
use linear::{Action, Op, Verdict};
use set::SetReport;

/// Search steps allowed per key before the verdict is `Unknown`.
pub const DEFAULT_BUDGET: u64 = 5_000_000;

/// The verdict of a whole history.
#[derive(Serialize, Debug)]
pub struct Results {
    /// True when every check passed (an unknown verdict is not a pass).
    pub valid: bool,
    /// Operations by outcome.
    pub ok: usize,
    /// See `ok`.
    pub fail: usize,
    /// See `ok`.
    pub info: usize,
    /// Register keys checked.
    pub keys_checked: usize,
    /// Keys with no linearization.
    pub violations: Vec<String>,
    /// Keys the search could not decide within its budget.
    pub unknown: Vec<String>,
    /// The set check, when the history has set operations.
    pub set: Option<SetReport>,
}

/// An operation with its completion.
struct Completed<'a> {
    invoke: &'a Event,
    done: Option<&'a Event>,
}

fn pair(events: &[Event]) -> Vec<Completed<'_>> {
    let mut open: HashMap<u64, usize> = HashMap::new();
    let mut out: Vec<Completed> = Vec::new();
    for e in events {
        match e.kind {
            Kind::Invoke => {
                open.insert(e.process, out.len());
                out.push(Completed {
                    invoke: e,
                    done: None,
                });
            }
            Kind::Ok | Kind::Fail | Kind::Info => {
                if let Some(i) = open.remove(&e.process) {
                    out[i].done = Some(e);
                }
            }
            Kind::Nemesis => {}
        }
    }
    out
}

/// The register operations of every key, as the linearizability checker takes them.
pub fn register_ops(events: &[Event]) -> BTreeMap<String, Vec<Op>> {
    let mut keys: BTreeMap<String, Vec<Op>> = BTreeMap::new();
    for c in pair(events) {
        let Some(key) = &c.invoke.key else { continue };
        let kind = c.done.map_or(Kind::Info, |d| d.kind);
        let ret = match kind {
            Kind::Ok => c.done.map(|d| d.time),
            Kind::Info => None,
            _ => continue,
        };
        let action = match c.invoke.f {
            F::Read if kind == Kind::Ok => Action::Read(c.done.and_then(|d| d.value.clone())),
            F::Write => Action::Write(c.invoke.value.clone().unwrap_or_default()),
            F::Cas => Action::Cas {
                expected: c.invoke.expected.clone(),
                new: c.invoke.value.clone().unwrap_or_default(),
            },
            _ => continue,
        };
        keys.entry(key.clone()).or_default().push(Op {
            call: c.invoke.time,
            ret,
            action,
            index: c.invoke.index,
        });
    }
    keys
}

/// Checks a whole history.
pub fn check(events: &[Event], budget: u64) -> Results {
    let pairs = pair(events);
    let count = |k: Kind| {
        pairs
            .iter()
            .filter(|c| c.done.map_or(Kind::Info, |d| d.kind) == k)
            .count()
    };
    let (ok, fail, info) = (count(Kind::Ok), count(Kind::Fail), count(Kind::Info));

    let keys = register_ops(events);
    let mut violations = Vec::new();
    let mut unknown = Vec::new();
    for (key, ops) in &keys {
        match linear::check(ops, budget) {
            Verdict::Linearizable => {}
            Verdict::Violation => violations.push(key.clone()),
            Verdict::Unknown => unknown.push(key.clone()),
        }
    }

    let mut adds: HashMap<String, bool> = HashMap::new();
    let mut reads: Vec<Vec<String>> = Vec::new();
    for c in &pairs {
        let kind = c.done.map_or(Kind::Info, |d| d.kind);
        match (c.invoke.f, kind) {
            (F::Add, Kind::Ok | Kind::Info) => {
                let e = c.invoke.value.clone().unwrap_or_default();
                adds.insert(e, kind == Kind::Ok);
            }
            (F::ReadAll, Kind::Ok) => {
                reads.push(c.done.and_then(|d| d.values.clone()).unwrap_or_default())
            }
            _ => {}
        }
    }
    let has_set = pairs
        .iter()
        .any(|c| matches!(c.invoke.f, F::Add | F::ReadAll));
    let set = has_set.then(|| set::check(&adds, &reads));
    let valid =
        violations.is_empty() && unknown.is_empty() && set.as_ref().is_none_or(SetReport::valid);
    Results {
        valid,
        ok,
        fail,
        info,
        keys_checked: keys.len(),
        violations,
        unknown,
        set,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(
        index: u64,
        kind: Kind,
        process: u64,
        time: u64,
        f: F,
        key: &str,
        value: Option<&str>,
    ) -> Event {
        let mut e = Event::new(kind, process, f);
        e.index = index;
        e.time = time;
        e.key = Some(key.into());
        e.value = value.map(Into::into);
        e
    }

    #[test]
    fn a_history_is_split_by_key_and_paired_by_process() {
        use Kind::*;
        let h = vec![
            ev(0, Invoke, 1, 0, F::Write, "a", Some("1")),
            ev(1, Invoke, 2, 1, F::Write, "b", Some("2")),
            ev(2, Ok, 1, 2, F::Write, "a", Some("1")),
            ev(3, Info, 2, 3, F::Write, "b", Some("2")),
            ev(4, Invoke, 3, 4, F::Read, "a", None),
            ev(5, Ok, 3, 5, F::Read, "a", Some("1")),
            ev(6, Invoke, 4, 6, F::Read, "b", None),
            ev(7, Ok, 4, 7, F::Read, "b", Some("2")),
        ];
        let r = check(&h, DEFAULT_BUDGET);
        assert!(r.valid, "{r:?}");
        assert_eq!((r.ok, r.fail, r.info, r.keys_checked), (3, 0, 1, 2));
        // Key "a" read back an older state: a violation on "a" only.
        let mut bad = h.clone();
        bad.push(ev(8, Invoke, 5, 8, F::Read, "a", None));
        bad.push(ev(9, Ok, 5, 9, F::Read, "a", None));
        let r = check(&bad, DEFAULT_BUDGET);
        assert_eq!(r.violations, vec!["a"]);
        assert!(!r.valid);
    }

    #[test]
    fn a_failed_write_never_happened() {
        use Kind::*;
        let h = vec![
            ev(0, Invoke, 1, 0, F::Write, "a", Some("1")),
            ev(1, Fail, 1, 1, F::Write, "a", Some("1")),
            ev(2, Invoke, 2, 2, F::Read, "a", None),
            ev(3, Ok, 2, 3, F::Read, "a", Some("1")),
        ];
        assert_eq!(check(&h, DEFAULT_BUDGET).violations, vec!["a"]);
    }
}
