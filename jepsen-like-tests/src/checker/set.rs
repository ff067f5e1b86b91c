//! The set check for long histories: unique elements are added; after the run every node's view
//! of the set is read. Every acknowledged add must be in every final read (else **lost**); an
//! element seen in one read must not be missing from a later one (**stale**); no element may be
//! seen twice in one read (**duplicated**); nothing may appear that was never added
//! (**phantom**). Adds whose outcome is unknown may or may not be present.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

/// What the set check found.
#[derive(Serialize, Debug, Default, PartialEq, Eq)]
pub struct SetReport {
    /// Acknowledged adds.
    pub acknowledged: usize,
    /// Acknowledged adds missing from a final read.
    pub lost: Vec<String>,
    /// Elements present in a read and missing from a later one.
    pub stale: Vec<String>,
    /// Elements seen twice in one read.
    pub duplicated: Vec<String>,
    /// Elements never added.
    pub phantom: Vec<String>,
    /// Number of final reads checked.
    pub reads: usize,
}

impl SetReport {
    /// Whether nothing is wrong (at least one final read is required).
    pub fn valid(&self) -> bool {
        self.reads > 0
            && self.lost.is_empty()
            && self.stale.is_empty()
            && self.duplicated.is_empty()
            && self.phantom.is_empty()
    }
}

/// Checks adds (`element -> acknowledged?`, unknown adds as `false`) against final reads in the
/// order they were taken.
pub fn check(adds: &HashMap<String, bool>, reads: &[Vec<String>]) -> SetReport {
    let mut report = SetReport {
        acknowledged: adds.values().filter(|a| **a).count(),
        reads: reads.len(),
        ..Default::default()
    };
    let mut lost = BTreeSet::new();
    let mut stale = BTreeSet::new();
    let mut dup = BTreeSet::new();
    let mut phantom = BTreeSet::new();
    let mut seen_before: BTreeSet<&String> = BTreeSet::new();
    for read in reads {
        let mut here: BTreeSet<&String> = BTreeSet::new();
        for e in read {
            if !here.insert(e) {
                dup.insert(e.clone());
            }
            if !adds.contains_key(e) {
                phantom.insert(e.clone());
            }
        }
        for (e, acked) in adds {
            if *acked && !here.contains(e) {
                lost.insert(e.clone());
            }
        }
        for e in &seen_before {
            if !here.contains(*e) && !lost.contains(*e) {
                stale.insert((*e).clone());
            }
        }
        seen_before.extend(here);
    }
    report.lost = lost.into_iter().collect();
    report.stale = stale.into_iter().collect();
    report.duplicated = dup.into_iter().collect();
    report.phantom = phantom.into_iter().collect();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adds(items: &[(&str, bool)]) -> HashMap<String, bool> {
        items.iter().map(|(e, a)| (e.to_string(), *a)).collect()
    }
    fn read(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_complete_read_is_valid_and_unknown_adds_are_optional() {
        let a = adds(&[("1", true), ("2", true), ("3", false)]);
        // The unknown add took effect late: fine.
        assert!(check(&a, &[read(&["1", "2"]), read(&["1", "2", "3"])]).valid());
        assert!(check(&a, &[read(&["1", "2"]), read(&["2", "1"])]).valid());
        assert!(check(&a, &[read(&["1", "2", "3"]), read(&["1", "2", "3"])]).valid());
        assert!(!check(&a, &[]).valid(), "no final read proves nothing");
    }

    #[test]
    fn lost_stale_duplicated_and_phantom_elements_are_reported() {
        let a = adds(&[("1", true), ("2", true), ("3", false)]);
        let r = check(&a, &[read(&["1"])]);
        assert_eq!(r.lost, vec!["2"]);
        let r = check(&a, &[read(&["1", "2", "3"]), read(&["1", "2"])]);
        assert_eq!(r.stale, vec!["3"]);
        let r = check(&a, &[read(&["1", "2", "2"])]);
        assert_eq!(r.duplicated, vec!["2"]);
        let r = check(&a, &[read(&["1", "2", "9"])]);
        assert_eq!(r.phantom, vec!["9"]);
    }
}
