//! Per-key linearizability of a register with read, write and compare-and-set: the Wing & Gong
//! search with Lowe's memoization (the algorithm of Knossos and Porcupine).
//!
//! Operations become a call entry and a return entry, sorted by time, in a doubly linked list.
//! The search walks the list: at a call it tries to linearize the operation now (if the model
//! allows it and the resulting `(linearized set, state)` was not seen before), removing it from
//! the list; at a return of an operation not yet linearized it backtracks. An `info` operation
//! returns at +∞: it may take effect at any point after its call, or never — the search succeeds as
//! soon as only such operations remain. A search that exceeds its step budget is `Unknown`, which
//! the suite treats as a failure.

use std::collections::{HashMap, HashSet};

/// What an operation did, as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A read that returned this value (`None`: absent).
    Read(Option<String>),
    /// A write of a value.
    Write(String),
    /// A compare-and-set that succeeded (or, for `info`, may have).
    Cas {
        /// Expected current value.
        expected: Option<String>,
        /// New value.
        new: String,
    },
}

/// One completed (ok) or unknown (info) operation on the key.
#[derive(Clone, Debug)]
pub struct Op {
    /// Call time.
    pub call: u64,
    /// Return time; `None` = unknown outcome (returns at +∞).
    pub ret: Option<u64>,
    /// What it did.
    pub action: Action,
    /// Where it came from in the history (for reports).
    pub index: u64,
}

/// The verdict for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization exists.
    Linearizable,
    /// No linearization exists.
    Violation,
    /// The step budget ran out.
    Unknown,
}

#[derive(Clone, Copy)]
struct Entry {
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

/// Checks `ops` (all on one register, initially absent) within `budget` search steps.
pub fn check(ops: &[Op], budget: u64) -> Verdict {
    // Values become small ids so the memo key is cheap; 0 = absent.
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut id = |v: &Option<String>| -> u32 {
        match v {
            None => 0,
            Some(s) => {
                let n = ids.len() as u32 + 1;
                *ids.entry(s.clone()).or_insert(n)
            }
        }
    };
    let model: Vec<(u8, u32, u32, bool)> = ops
        .iter()
        .map(|o| match &o.action {
            Action::Read(v) => (0, id(v), 0, o.ret.is_none()),
            Action::Write(v) => (1, id(&Some(v.clone())), 0, o.ret.is_none()),
            Action::Cas { expected, new } => {
                (2, id(expected), id(&Some(new.clone())), o.ret.is_none())
            }
        })
        .collect();
    // state after applying op `i` to `s`, if allowed.
    let step = |i: usize, s: u32| -> Option<u32> {
        let (kind, a, b, unknown) = model[i];
        match kind {
            0 => (s == a).then_some(s),
            1 => Some(a),
            _ if s == a => Some(b),
            // An unknown CAS whose comparison fails is a no-op.
            _ if unknown => Some(s),
            _ => None,
        }
    };

    // Entries sorted by time; calls before returns at equal times (the permissive order).
    let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, o) in ops.iter().enumerate() {
        order.push((o.call, 0, i));
        order.push((o.ret.unwrap_or(u64::MAX), 1, i));
    }
    order.sort();
    let n = order.len();
    // Index 0 is a sentinel head.
    let mut list: Vec<Entry> = Vec::with_capacity(n + 1);
    list.push(Entry {
        op: NIL,
        is_call: false,
        prev: NIL,
        next: if n > 0 { 1 } else { NIL },
    });
    let mut ret_of = vec![0usize; ops.len()];
    for (k, (_, r, i)) in order.iter().enumerate() {
        let pos = k + 1;
        if *r == 1 {
            ret_of[*i] = pos;
        }
        list.push(Entry {
            op: *i,
            is_call: *r == 0,
            prev: pos - 1,
            next: if pos < n { pos + 1 } else { NIL },
        });
    }
    let unlink = |list: &mut Vec<Entry>, e: usize| {
        let (p, nx) = (list[e].prev, list[e].next);
        list[p].next = nx;
        if nx != NIL {
            list[nx].prev = p;
        }
    };
    let relink = |list: &mut Vec<Entry>, e: usize| {
        let (p, nx) = (list[e].prev, list[e].next);
        list[p].next = e;
        if nx != NIL {
            list[nx].prev = e;
        }
    };

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, u32)> = HashSet::new();
    let mut stack: Vec<(usize, u32)> = Vec::new();
    let mut state = 0u32;
    let mut entry = list[0].next;
    let mut steps = 0u64;
    while list[0].next != NIL {
        steps += 1;
        if steps > budget {
            return Verdict::Unknown;
        }
        let e = list[entry];
        if e.is_call {
            let i = e.op;
            if let Some(next_state) = step(i, state) {
                linearized[i / 64] |= 1 << (i % 64);
                if seen.insert((linearized.clone(), next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    unlink(&mut list, entry);
                    unlink(&mut list, ret_of[i]);
                    entry = list[0].next;
                    continue;
                }
                linearized[i / 64] &= !(1 << (i % 64));
            }
            entry = e.next;
        } else {
            if ops[e.op].ret.is_none() {
                // Only unknown operations remain: they may never have taken effect.
                return Verdict::Linearizable;
            }
            let Some((call, prior)) = stack.pop() else {
                return Verdict::Violation;
            };
            let i = list[call].op;
            linearized[i / 64] &= !(1 << (i % 64));
            state = prior;
            relink(&mut list, ret_of[i]);
            relink(&mut list, call);
            entry = list[call].next;
        }
    }
    Verdict::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: Option<u64>, action: Action) -> Op {
        Op {
            call,
            ret,
            action,
            index: 0,
        }
    }
    fn w(v: &str) -> Action {
        Action::Write(v.into())
    }
    fn r(v: Option<&str>) -> Action {
        Action::Read(v.map(Into::into))
    }
    fn cas(e: Option<&str>, n: &str) -> Action {
        Action::Cas {
            expected: e.map(Into::into),
            new: n.into(),
        }
    }

    const B: u64 = 1_000_000;

    #[test]
    fn sequential_and_overlapping_histories() {
        let ok = [
            op(0, Some(1), w("a")),
            op(2, Some(3), r(Some("a"))),
            op(4, Some(5), cas(Some("a"), "b")),
            op(6, Some(7), r(Some("b"))),
        ];
        assert_eq!(check(&ok, B), Verdict::Linearizable);
        // A read overlapping a write may see either value.
        let overlap = [
            op(0, Some(10), w("a")),
            op(1, Some(2), r(None)),
            op(3, Some(4), r(Some("a"))),
        ];
        assert_eq!(check(&overlap, B), Verdict::Linearizable);
    }

    #[test]
    fn stale_reads_and_lost_writes_are_violations() {
        let stale = [
            op(0, Some(1), w("a")),
            op(2, Some(3), w("b")),
            op(4, Some(5), r(Some("a"))),
        ];
        assert_eq!(check(&stale, B), Verdict::Violation);
        let lost = [op(0, Some(1), w("a")), op(2, Some(3), r(None))];
        assert_eq!(check(&lost, B), Verdict::Violation);
        // Once a new value was read, the old one must not come back.
        let flicker = [
            op(0, Some(10), w("a")),
            op(1, Some(2), r(Some("a"))),
            op(3, Some(4), r(None)),
        ];
        assert_eq!(check(&flicker, B), Verdict::Violation);
        let bad_cas = [op(0, Some(1), w("a")), op(2, Some(3), cas(Some("x"), "b"))];
        assert_eq!(check(&bad_cas, B), Verdict::Violation);
    }

    #[test]
    fn an_unknown_write_may_take_effect_late_or_never() {
        // Needed: the read of "a" is explained only by the unknown write.
        let late = [op(0, None, w("a")), op(5, Some(6), r(Some("a")))];
        assert_eq!(check(&late, B), Verdict::Linearizable);
        // Never: a read of absent after it is fine too.
        let never = [op(0, None, w("a")), op(5, Some(6), r(None))];
        assert_eq!(check(&never, B), Verdict::Linearizable);
        // But it cannot take effect before its call.
        let early = [op(0, Some(1), r(Some("a"))), op(5, None, w("a"))];
        assert_eq!(check(&early, B), Verdict::Violation);
        // And it takes effect at most once: "a" cannot reappear after "b" overwrote it.
        let twice = [
            op(0, None, w("a")),
            op(1, Some(2), r(Some("a"))),
            op(3, Some(4), w("b")),
            op(5, Some(6), r(Some("a"))),
        ];
        assert_eq!(check(&twice, B), Verdict::Violation);
    }

    #[test]
    fn an_exhausted_budget_is_unknown() {
        let ops: Vec<Op> = (0..40)
            .map(|i| op(0, Some(100), w(&format!("v{i}"))))
            .chain([op(200, Some(201), r(Some("nope")))])
            .collect();
        assert_eq!(check(&ops, 1000), Verdict::Unknown);
    }

    /// Brute force: some order of all ok ops and a subset of info ops, respecting real time,
    /// that the model accepts.
    fn brute(ops: &[Op]) -> bool {
        fn rec(ops: &[Op], done: &mut Vec<bool>, state: Option<String>) -> bool {
            if ops
                .iter()
                .zip(done.iter())
                .all(|(o, d)| *d || o.ret.is_none())
            {
                return true;
            }
            // The earliest return among pending ok ops bounds which op may go next.
            let min_ret = ops
                .iter()
                .zip(done.iter())
                .filter(|(o, d)| !**d && o.ret.is_some())
                .map(|(o, _)| o.ret.unwrap())
                .min()
                .unwrap_or(u64::MAX);
            for i in 0..ops.len() {
                if done[i] || ops[i].call > min_ret {
                    continue;
                }
                let next = match &ops[i].action {
                    Action::Read(v) => (state == *v).then(|| state.clone()),
                    Action::Write(v) => Some(Some(v.clone())),
                    Action::Cas { expected, new } => {
                        if state == *expected {
                            Some(Some(new.clone()))
                        } else if ops[i].ret.is_none() {
                            Some(state.clone())
                        } else {
                            None
                        }
                    }
                };
                if let Some(s) = next {
                    done[i] = true;
                    if rec(ops, done, s) {
                        return true;
                    }
                    done[i] = false;
                }
            }
            false
        }
        rec(ops, &mut vec![false; ops.len()], None)
    }

    #[test]
    fn random_small_histories_agree_with_brute_force() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut violations = 0;
        for _ in 0..3000 {
            let n = rng.random_range(1..=6);
            let mut written = vec![None];
            let ops: Vec<Op> = (0..n)
                .map(|i| {
                    let call = rng.random_range(0..20u64);
                    let ret = if rng.random_bool(0.2) {
                        None
                    } else {
                        Some(call + rng.random_range(1..10u64))
                    };
                    let action = match rng.random_range(0..3) {
                        0 => {
                            let v = written[rng.random_range(0..written.len())].clone();
                            r(v.as_deref())
                        }
                        1 => {
                            let v = format!("v{i}");
                            written.push(Some(v.clone()));
                            w(&v)
                        }
                        _ => {
                            let e = written[rng.random_range(0..written.len())].clone();
                            let v = format!("c{i}");
                            written.push(Some(v.clone()));
                            cas(e.as_deref(), &v)
                        }
                    };
                    op(call, ret, action)
                })
                .collect();
            let want = brute(&ops);
            let got = check(&ops, B);
            assert_eq!(
                got == Verdict::Linearizable,
                want,
                "checker and brute force disagree on {ops:#?}"
            );
            violations += usize::from(!want);
        }
        assert!(
            violations > 100,
            "the generator makes violations too: {violations}"
        );
    }
}
