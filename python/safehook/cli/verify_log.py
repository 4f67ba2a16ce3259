"""safehook verify-log LOG...: check safehookd's hash chain. Each line carries "prev", the
SHA-256 of the line before it (without its newline; 64 zeros on the first line of a log), and
"seq", one more than the line before. Exit 0 when every chain holds, 2 at the first broken line
('LOG:LINE: what'), 1 when a log cannot be read.

Logs given in order (a rotated log, then its successor) are one chain: a log that starts with
safehookd's "log_reopened" record must chain on from the last line of the log before it.

What the chain shows: a line changed, removed or inserted anywhere but at the very end. A cut
end, or a whole log rewritten by root, is not visible in the log itself; the journald copy
(safehookd --journal) and the "daemon_stop"/"daemon_start" records are the evidence there."""
import hashlib
import json
import sys

ZERO = "0" * 64


def check_lines(lines, start_prev=None, state=None):
    """Check an iterable of lines (bytes, with or without the newline). Returns
    (None, count) when the chain holds, else ((line_number, message), count_so_far). STATE, a
    dict, receives the last line's "hash" and "seq" (the chain's end)."""
    prev_hash = None
    prev_seq = None
    n = 0
    if state is not None:
        state.update(hash=None, seq=None)
    for n, raw in enumerate(lines, 1):
        if not raw.endswith(b"\n"):
            return (n, "torn line (no newline at the end of the log)"), n - 1
        line = raw[:-1]
        try:
            rec = json.loads(line)
        except ValueError as e:
            return (n, "not JSON: %s" % e), n - 1
        if not isinstance(rec, dict) or not isinstance(rec.get("prev"), str) or not isinstance(rec.get("seq"), int):
            return (n, "no \"prev\"/\"seq\": not a safehookd record"), n - 1
        if prev_hash is None:
            want = start_prev
            if want is None and rec["prev"] != ZERO and rec.get("event") != "log_reopened":
                return (n, "the first line does not start a chain (\"prev\" is %s..., not zeros): "
                           "lines were cut from the start, or pass --start" % rec["prev"][:16]), 0
            if want is not None and rec["prev"] != want:
                return (n, "the chain starts from %s, not the given %s" % (rec["prev"][:16], want[:16])), 0
        else:
            if rec["prev"] != prev_hash:
                return (n, "hash chain broken: \"prev\" is %s..., the line before hashes to %s... "
                           "(line %d or %d was changed, or lines between them removed)"
                        % (rec["prev"][:16], prev_hash[:16], n - 1, n)), n - 1
            if rec["seq"] != prev_seq + 1:
                return (n, "sequence jumps from %d to %d" % (prev_seq, rec["seq"])), n - 1
        prev_hash = hashlib.sha256(line).hexdigest()
        prev_seq = rec["seq"]
        if state is not None:
            state.update(hash=prev_hash, seq=prev_seq)
    return None, n


def _first_record(path):
    with open(path, "rb") as f:
        line = f.readline()
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _run(args):
    bad = 0
    end = None  # the chain's end in the log before, when it was intact
    for path in args.logs:
        start = args.start if end is None else None
        try:
            first = _first_record(path)
            if end is not None and first and first.get("event") == "log_reopened":
                start = end["hash"]  # the log after a rotation chains on from this one
                if first.get("seq") != end["seq"] + 1:
                    print("%s:1: sequence jumps from %d (the log before) to %s" % (path, end["seq"], first.get("seq")))
                    bad += 1
                    end = None
                    continue
            f = open(path, "rb")
        except OSError as e:
            print("%s: cannot read: %s" % (path, e.strerror), file=sys.stderr)
            return 1
        state = {}
        with f:
            err, count = check_lines(f, start_prev=start, state=state)
        end = state if not err and state.get("hash") else None
        if err:
            print("%s:%d: %s" % (path, err[0], err[1]))
            bad += 1
        elif not args.quiet:
            print("%s: %d records, chain intact" % (path, count))
    sys.stdout.flush()
    return 2 if bad else 0


def register(sub):
    s = sub.add_parser("verify-log", help="check the hash chain of safehookd's audit log",
                       description="Check safehookd's hash chain: exit 0 when intact, 2 with 'LOG:LINE: what' "
                                   "at the first broken line, 1 when a log cannot be read.")
    s.add_argument("--start", metavar="HASH",
                   help="the \"prev\" the first line must carry (a rotated log: the hash of the old log's last line; "
                        "a new log: %s)" % ("0" * 8 + "..."))
    s.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    s.add_argument("logs", nargs="+", metavar="LOG")
    s.set_defaults(func=_run)
