#!/usr/bin/env python3
"""An independent re-check of a strata-jepsen history.jsonl (no code shared with the Rust
checker): per-key linearizability of the register workload, by a plain depth-first search over
linearization orders with memoization on (set of linearized ops, register value).

Usage: check_history.py RUN_DIR/history.jsonl   -> prints VALID or the violating keys; exit 1 if any.

Semantics, as in docs/testing.md: an invoke is completed by the next ok/fail/info of its process;
fail never happened; an info write/cas may take effect at any time after its call, or never;
reads that did not return ok constrain nothing; a cas compares against `expected`.
"""
import json
import sys
from collections import defaultdict

INF = float("inf")


def ops_by_key(path):
    pending, by_key = {}, defaultdict(list)
    for line in open(path):
        e = json.loads(line)
        if e["type"] == "nemesis":
            continue
        if e["type"] == "invoke":
            pending[e["process"]] = e
            continue
        inv = pending.pop(e["process"], None)
        if inv is None or inv["f"] not in ("read", "write", "cas"):
            continue
        if e["type"] == "fail" or (inv["f"] == "read" and e["type"] != "ok"):
            continue
        ret = e["time"] if e["type"] == "ok" else INF
        if inv["f"] == "read":
            op = ("read", e.get("value"), None)
        else:
            op = (inv["f"], inv.get("value"), inv.get("expected"))
        by_key[inv["key"]].append((inv["time"], ret, op))
    for inv in pending.values():  # never completed: unknown
        if inv["f"] in ("write", "cas"):
            by_key[inv["key"]].append((inv["time"], INF, (inv["f"], inv.get("value"), inv.get("expected"))))
    return by_key


def linearizable(ops):
    n = len(ops)
    seen = set()
    sys.setrecursionlimit(10000 + 4 * n)

    def step(op, state, unknown):
        kind, value, expected = op
        if kind == "read":
            return state if state == value else "NO"
        if kind == "write":
            return value
        if state == expected:
            return value
        return state if unknown else "NO"

    def search(done, state):
        if all(done >> i & 1 or ops[i][1] == INF for i in range(n)):
            return True
        if (done, state) in seen:
            return False
        seen.add((done, state))
        bound = min((ops[i][1] for i in range(n) if not done >> i & 1), default=INF)
        for i in range(n):
            if done >> i & 1 or ops[i][0] > bound:
                continue
            nxt = step(ops[i][2], state, ops[i][1] == INF)
            if nxt != "NO" and search(done | 1 << i, nxt):
                return True
        return False

    return search(0, None)


def main():
    bad = [k for k, ops in sorted(ops_by_key(sys.argv[1]).items()) if not linearizable(ops)]
    if bad:
        print("INVALID: no linearization for keys", ", ".join(bad))
        sys.exit(1)
    print("VALID")


if __name__ == "__main__":
    main()
