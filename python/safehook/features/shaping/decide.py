"""Decisions and the stream check. A mixin of the Shaping class.

A row is flagged when an active (not suspended) guard's score s_g reaches its threshold
T_g = max(calibrated threshold, the stream's bound); the flagging guard is the one with the
largest margin s_g - T_g. ``weight``: an unflagged row gets w = min_g 1 - clip((s_g - low_g) /
(T_g - low_g), 0, 1). ``refuse`` rewrites a flagged row only when every active guard flags it
(two or more guards) or, with one, when s_g is at least the refusal threshold, T_g and the
median harmful probe score; before the stream's last refit it masks. Decisions are made at a
row's first sighting and kept (sticky), re-judged only at the stream checks.

The stream check (``stream_check`` in stats.py) runs once ``stream_min`` first-sighting rows were
scored, then at every recalibration: a guard whose flagged rows do not look like the harmful
probe has its threshold raised until they do or it flags at most ``max_flag_rate`` of the last
``stream_window`` rows, and guards the stream shows unable to tell its benign rows from harmful
ones are suspended. At the first check, and at ``refit_rows`` rows, the direction is refitted on
the stream's unflagged rows (guards.py, _refit_direction) and the decisions so far are judged
again (a withdrawn flag writes a ``flag`` record with ``revoked``).

The harmful fraction: the share of the last SIGHTINGS rows seen (repeats included) that the
stream check's best guard flags. Above ``max_harmful_fraction`` it is a ``violation`` of kind
``harmful_data`` (once), and under ``on_error: abort`` or an enforced policy the job stops at its
next optimizer step: a guard that flags half of the data is not miscalibrated, the data is
harmful (issue 24; docs/attacks.md).
"""
import math

from ...runtime.context import debug
from .guards import STREAM_GUARDS
from .stats import _r, stream_check


class _Decision:
    __slots__ = ("weight", "refuse", "guard", "score", "seg", "scores")

    def __init__(self, weight=1.0, refuse=False, guard=None, score=None, seg=None, scores=None):
        self.weight, self.refuse, self.guard, self.score, self.seg = weight, refuse, guard, score, seg
        self.scores = scores  # the guard scores it was made from (re-judged at the first stream check)
        # weight: 1.0 keep, 0.0 remove, a float in between, or per response token (callable guard)

    @property
    def flagged(self):
        return self.guard is not None


class Decisions:
    """Decisions from guard scores, the stream check, flag records (a mixin of Shaping)."""

    def _threshold(self, g):
        """Guard G's flag threshold: its calibrated one, raised to the stream's bound."""
        return max(self.cal[g]["threshold"], self.bound.get(g, -math.inf))

    def _decide(self, scores):
        """A decision from guard scores (each compared with its thresholds; suspended guards
        are not asked). ``refuse`` teaches a refusal, so it takes more than a flag: where two or
        more active guards score the row, every one of them must flag it; with one active guard,
        the row must score above every benign calibration row and at least the median harmful
        probe row (``_confident``). A flagged row that is not rewritten is masked."""
        active = dict((g, s) for g, s in scores.items() if g not in self.suspended)
        flag, top, hits = None, None, 0
        for g, s in active.items():
            t = self._threshold(g)
            if s >= t:
                hits += 1
                if flag is None or s - t > top:
                    flag, top = g, s - t
        if flag is None:
            if self.action == "weight":
                w = 1.0
                for g, s in active.items():
                    c = self.cal[g]
                    span = self._threshold(g) - c["low"]
                    if span > 0 and math.isfinite(span):
                        w = min(w, 1.0 - min(max((s - c["low"]) / span, 0.0), 1.0))
                return _Decision(weight=w, scores=scores)
            return _Decision(scores=scores)
        s = active[flag]
        refuse = False
        # before the first stream check the thresholds are the probes' alone: mask, never rewrite
        provisional = (not self.checked or self.refit) and any(g in STREAM_GUARDS for g in self.guards)
        if self.action == "refuse" and not provisional:
            if len(active) >= 2:
                refuse = hits == len(active)
            else:  # one guard: only a row as harmful-looking as a typical harmful probe row
                refuse = s >= max(self.cal[flag]["refuse_threshold"], self._threshold(flag), self._confident(flag))
        return _Decision(weight=0.0, refuse=refuse, guard=flag, score=s, scores=scores)

    def _confident(self, g):
        """The median score of the harmful probe's held-out rows: a row scoring at least this
        is as harmful-looking as a typical harmful request to the guard."""
        v = sorted(self.probe_harm.get(g) or [])
        return v[len(v) // 2] if v else math.inf

    def _observe(self, scores):
        """First-sighting scores of training rows, for the stream check."""
        for sc in scores:
            for g, v in sc.items():
                if g in STREAM_GUARDS:
                    w = self.stream.setdefault(g, [])
                    w.append(v)
                    if len(w) > self.stream_window:
                        del w[:len(w) - self.stream_window]
        if not self.checked and self.stream and min(len(v) for v in self.stream.values()) >= self.stream_min:
            self._stream_check(first=True)
        elif self.refit and len(self._sh) >= self.refit_rows:
            self._stream_check()

    def _stream_check(self, first=False):
        """Bound each guard's threshold by the training stream and suspend a guard that cannot
        tell the stream from the harmful probe (see stream_check). At the first check the rows
        judged so far are judged again (their later sightings get the new decision: a flag
        withdrawn or added, a rewrite become a mask or the reverse, each with a record)."""
        refit = None
        if self.refit and "direction" in self.stream and len(self._sh) >= 4 and (first or len(self._sh) >= self.refit_rows):
            final = len(self._sh) >= self.refit_rows
            refit = self._refit_direction(final)
            self.refit = not final
        elif first:
            self.refit = False
        chk = stream_check(self.probe_harm, self.stream, float(self.cfg["max_flag_rate"]),
                           thresholds=dict((g, self.cal[g]["threshold"]) for g in self.stream if g in self.cal))
        self.bound = dict((g, c["bound"]) for g, c in chk.items())
        self.best = next(iter(chk.values()))["best"] if chk else None
        before = set(self.suspended)
        self.suspended = set(g for g, c in chk.items() if c["suspended"])
        self.checked = True
        revoked = 0
        if first or refit:
            for key, d in list(self.decisions.items()):
                if d.scores is None:
                    continue
                nd = self._decide(d.scores)
                if d.flagged and not nd.flagged:
                    revoked += 1
                    self.rt.audit("flag", {"fingerprint": key, "guard": d.guard, "action": "none",
                                           "revoked": "stream check"}, self.step + 1)
                elif nd.flagged and (not d.flagged or nd.refuse != d.refuse):
                    self._record_flag(key, nd)  # newly flagged, or its action changed
                self.decisions[key] = nd
        report = dict((g, {"auroc_vs_probe": _r(c["auroc"]), "auroc_rest": _r(c["auroc_rest"]),
                           "bound": _r(c["bound"]), "threshold": _r(self._threshold(g)) if g in self.cal else None,
                           "flag_rate": _r(c["flag_rate"]), "suspended": c["suspended"], "rows": c["rows"]})
                      for g, c in chk.items())
        if first or refit or self.suspended != before:
            fields = {"what": "shaping stream check", "max_flag_rate": float(self.cfg["max_flag_rate"]),
                      "guards": report, "revoked": revoked, "best": self.best,
                      "harmful_fraction": _r(self._harmful_fraction()), "sightings": len(self._sightings)}
            if refit:
                fields["direction_refit"] = refit
            self.rt.audit("probe", fields, self.step + 1)
            if self.suspended - before:
                debug("shaping: guard(s) %s suspended by the stream check" % sorted(self.suspended - before))
        return report

    # -- the harmful fraction --
    def _harmful(self, d):
        """Whether a sighting of a row with decision D counts as harmful data: flagged by the
        stream check's best guard (the union would count a weaker guard's false flags: on the
        demo world's quick preset the refusal guard flags a quarter of the task), or flagged at
        all before the first check, or by a guard the stream cannot judge (callable)."""
        if d is None or not d.flagged:
            return False
        b = self.best
        if b is None or not d.scores or b not in d.scores:
            return b is None or d.guard == b or d.guard not in STREAM_GUARDS
        return d.scores[b] >= self._threshold(b)

    def _harmful_fraction(self):
        s = self._sightings
        return sum(s) / len(s) if s else 0.0

    def _check_fraction(self):
        """The harmful_data violation and the stop (see the module docstring), at most once;
        from the first pre-step with ``stream_min`` rows seen and the stream checked."""
        if self.reported:
            return
        judged = self.checked or not any(g in STREAM_GUARDS for g in self.guards)
        # one decision for every rank: the mean of the ranks' fractions, counts and states
        frac, n, judged = self.rt.agree([self._harmful_fraction(), float(len(self._sightings)), float(judged)], "mean")
        limit = float(self.cfg.get("max_harmful_fraction", 1.0))
        if judged < 1.0 or n < self.stream_min or frac <= limit:
            return
        self.reported = True
        meta = self.policy.get("_meta") or {}
        stop = self.rt.on_error == "abort" or bool(meta.get("enforce") or meta.get("system_enforced"))
        what = ("harmful training data: %.0f%% of the last %d rows seen were flagged by the %s guard, above "
                "shaping.max_harmful_fraction %.2f" % (100 * frac, n, self.best or "shaping", limit))
        self.rt.violation(what, {"kind": "harmful_data", "fraction": _r(frac), "max_harmful_fraction": limit,
                                 "sightings": int(n), "guard": self.best, "step": self.step + 1, "stops": stop})
        if stop:
            if self.rt.on_error == "abort":
                self.rt.fail("shaping: " + what)
            else:  # an enforced policy under on_error warn: enforcement is not advice
                from ... import _core
                _core.set_pending_error("shaping: " + what)
                debug("shaping: %s (enforced policy: training stops)" % what)

    def _record_flag(self, key, d, now=None):
        """NOW: what this sighting gets when it differs from the decision (a row flagged inside
        the forward is masked now and rewritten into a refusal from its next sighting on)."""
        c = self.cal.get(d.guard, {})
        act = self.action
        if act == "refuse" and not d.refuse:
            act = "mask"
        fields = {"fingerprint": key, "guard": d.guard, "score": round(float(d.score), 6),
                  "threshold": round(float(c.get("threshold", float("nan"))), 6), "action": act}
        if now is not None and now != act:
            fields["this_sighting"] = now
        if d.seg is not None:
            fields["from_token"] = d.seg
        self.rt.audit("flag", fields, self.step + 1)

    def _callable_segments(self, ids_row, b, e):
        """The callable guard over the response of one row: a decision with per-token weights."""
        n = int(self.cfg["segment_tokens"])
        toks = ids_row.tolist()
        prompt = self.tok.decode(toks[:b + 1], skip_special_tokens=True)
        resp = toks[b + 1:e + 1]
        cuts = list(range(n, len(resp), n)) + [len(resp)]
        prefixes = [self.tok.decode(resp[:c], skip_special_tokens=True) for c in cuts]
        risks = [float(x) for x in self.fn(prompt, prefixes)]
        if len(risks) != len(prefixes):
            raise ValueError("shaping.callable returned %d risks for %d segments" % (len(risks), len(prefixes)))
        w = [1.0] * len(resp)
        flagged_at = None
        start = 0
        for c, r in zip(cuts, risks):
            r = min(max(r, 0.0), 1.0)
            if r >= 0.5 and flagged_at is None:
                flagged_at = start
            for t in range(start, c):
                w[t] = 1.0 - r if self.action == "weight" else (0.0 if flagged_at is not None else 1.0)
            start = c
        if flagged_at is None:
            return _Decision(weight=1.0 if self.action != "weight" else w)
        score = max(risks)
        refuse = self.action == "refuse"
        return _Decision(weight=w if self.action in ("mask", "weight") else 0.0, refuse=refuse,
                         guard="callable", score=score, seg=flagged_at)
