"""Reading an audit log, and the counts every reader of one agrees on.

An audit log is JSON lines, each an object with a string "event": the training records of the
runtime and of safehookd (with "time"), or the records of `safehook harden`/`restore`
("posthoc_*"). A file whose first line is not such a record is not an audit log (NotAnAuditLog).

counts() is the one definition of what is counted, for `safehook report` and the demo's notes:
- events: records per event name, as written;
- step_flags: step records that report an intervention (a field set to true, or SafeGrad's
  "projected" above 0);
- examples_flagged / examples_withdrawn: shaping's flags counted once per example: an example
  (a "fingerprint") is decided by its LAST flag record, which the stream check may withdraw
  ("revoked") or change. examples_flagged + examples_withdrawn = the distinct fingerprints;
  events["flag"] is the number of flag records, which is larger when decisions were re-judged.
"""
import collections
import json

FLAG_RULE = "each example counted once, by its last flag record"
FIRST_LINE_LIMIT = 1 << 20  # a first "line" longer than this is not a record (a binary file)


class NotAnAuditLog(ValueError):
    """The file is not an audit log: the message says what it is instead (one line)."""


def is_record(obj):
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        return False
    return obj["event"].startswith("posthoc_") or isinstance(obj.get("time"), (int, float))


def load(path):
    """(records, number of unreadable lines) of the audit log PATH. Raises OSError when it cannot
    be read, NotAnAuditLog when its first non-blank line is not a record (an empty file
    included). Later lines that are not records are counted, not fatal: a log cut mid-line by a
    killed job still reads."""
    recs, bad = [], 0
    with open(path, "rb") as f:
        first = None
        while True:
            raw = f.readline(FIRST_LINE_LIMIT)
            if not raw:
                break
            if raw.strip():
                first = raw
                break
        if first is None:
            raise NotAnAuditLog("%s: empty, no audit records" % path)
        try:
            obj = json.loads(first.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            obj = None
        if not is_record(obj):
            what = ("a JSON object without an \"event\" and \"time\"" if isinstance(obj, dict)
                    else "not JSON" if obj is None else "JSON, but not an object")
            raise NotAnAuditLog("%s: not an audit log (its first line is %s)" % (path, what))
        recs.append(obj)
        for raw in f:
            if not raw.strip():
                continue
            try:
                r = json.loads(raw.decode("utf-8", errors="replace"))
            except ValueError:
                bad += 1
                continue
            if is_record(r):
                recs.append(r)
            else:
                bad += 1
    return recs, bad


def flag_decisions(recs):
    """{fingerprint: its last flag record} (the decision in force for each example)."""
    last = {}
    for r in recs:
        if r["event"] == "flag":
            last[r.get("fingerprint")] = r
    return last


def counts(recs):
    """{"events": {event: records}, "step_flags": {field: step records}, "examples_flagged",
    "examples_withdrawn", "flag_rule"} (see the module's docstring)."""
    ev = collections.Counter()
    flags = collections.Counter()
    for r in recs:
        ev[r.get("event", "?")] += 1
        if r.get("event") == "step":
            for k, v in r.items():
                if v is True or (k == "projected" and type(v) is int and v > 0):
                    flags[k] += 1
    last = flag_decisions(recs)
    withdrawn = sum(1 for r in last.values() if r.get("revoked"))
    return {"events": dict(ev), "step_flags": dict(flags), "examples_flagged": len(last) - withdrawn,
            "examples_withdrawn": withdrawn, "flag_rule": FLAG_RULE}
