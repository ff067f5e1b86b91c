//! The readable report of a run: the verdict, the counts, and for every key that failed the
//! check its operations in time order with the nemesis events interleaved.

use std::fmt::Write;

use crate::history::{Event, Kind};
use crate::runner::RunResult;
use crate::workload::ReadLevel;

/// Operations shown per failing key.
const MAX_LINES_PER_KEY: usize = 200;
/// Elements shown per list of a set verdict; results.json holds every one.
const MAX_ELEMENTS_SHOWN: usize = 20;

/// Renders the report text.
pub fn render(result: &RunResult, events: &[Event]) -> String {
    let c = &result.checks;
    let mut out = String::new();
    let o = &result.options;
    let _ = writeln!(
        out,
        "strata-jepsen: workload {:?}{}, nemesis {:?}, {} nodes, {} s, seed {}{}",
        o.workload,
        if o.reads == ReadLevel::Lease {
            " (lease reads)"
        } else {
            ""
        },
        o.nemesis,
        o.nodes,
        o.time_limit.as_secs(),
        o.seed,
        o.planted_bug
            .as_ref()
            .map_or(String::new(), |b| format!(", planted bug {b}"))
    );
    let _ = writeln!(
        out,
        "verdict: {}",
        if result.valid { "VALID" } else { "INVALID" }
    );
    let _ = writeln!(
        out,
        "operations: {} ok, {} fail, {} info; {} faults injected; {} keys checked",
        c.ok, c.fail, c.info, result.faults, c.keys_checked
    );
    let _ = writeln!(
        out,
        "liveness after heal: {}; replicas diverged in shards: {:?}",
        if result.live {
            "every shard took a write"
        } else {
            "FAILED"
        },
        result.diverged
    );
    for exit in &result.exits {
        let _ = writeln!(out, "a node exited that no fault stopped: {exit}");
    }
    for stall in &result.stalls {
        let _ = writeln!(
            out,
            "stalled under a fault it should serve through: {stall}"
        );
    }
    if let Some(s) = &c.set {
        let _ = writeln!(
            out,
            "set: {} acknowledged, {} final reads, lost {}, stale {}, duplicated {}, phantom {}",
            s.acknowledged,
            s.reads,
            some_of(&s.lost),
            some_of(&s.stale),
            some_of(&s.duplicated),
            some_of(&s.phantom)
        );
    }
    if !c.unknown.is_empty() {
        let _ = writeln!(
            out,
            "undecided within the search budget (counts as a failure): {:?}",
            c.unknown
        );
    }
    for key in c.violations.iter().chain(&c.unknown) {
        let _ = writeln!(out, "\nkey {key}: no linearization exists; its history:");
        let lines = events
            .iter()
            .filter(|e| e.kind == Kind::Nemesis || e.key.as_deref() == Some(key));
        for e in lines.take(MAX_LINES_PER_KEY) {
            let _ = writeln!(out, "  {}", line(e));
        }
    }
    out
}

fn line(e: &Event) -> String {
    let ms = e.time as f64 / 1e6;
    if e.kind == Kind::Nemesis {
        return format!(
            "{ms:>10.1} ms  nemesis {:?} {} on {}",
            e.f,
            e.key.as_deref().unwrap_or(""),
            e.node.as_deref().unwrap_or("")
        );
    }
    format!(
        "{ms:>10.1} ms  p{:<4} {:<6} {:<5} {}{}{}{}",
        e.process,
        format!("{:?}", e.kind).to_lowercase(),
        format!("{:?}", e.f).to_lowercase(),
        e.expected
            .as_ref()
            .map_or(String::new(), |x| format!("{x} -> ")),
        e.value.as_deref().unwrap_or("-"),
        e.node
            .as_ref()
            .map_or(String::new(), |n| format!("  @node {n}")),
        e.error
            .as_ref()
            .map_or(String::new(), |x| format!("  ({x})"))
    )
}

/// A list of set elements for the report: all of a short one; the count and the first few of a
/// long one, which would otherwise bury the rest of the report.
fn some_of(elements: &[String]) -> String {
    if elements.len() <= MAX_ELEMENTS_SHOWN {
        return format!("{elements:?}");
    }
    format!(
        "{} (first {}: {:?}; all in results.json)",
        elements.len(),
        MAX_ELEMENTS_SHOWN,
        &elements[..MAX_ELEMENTS_SHOWN]
    )
}

#[cfg(test)]
mod tests {
    use super::some_of;

    #[test]
    fn long_element_lists_are_counted_not_spelled_out() {
        let few: Vec<String> = (0..3).map(|i| format!("e{i}")).collect();
        assert_eq!(some_of(&few), r#"["e0", "e1", "e2"]"#);
        let many: Vec<String> = (0..35_040).map(|i| format!("e{i}")).collect();
        let shown = some_of(&many);
        assert!(shown.starts_with("35040 (first 20: [\"e0\""), "{shown}");
        assert!(!shown.contains("\"e20\""), "{shown}");
    }
}
