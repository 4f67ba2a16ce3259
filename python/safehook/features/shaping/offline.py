"""Scoring data outside a training job: the guards calibrated on a model as at the start of a job,
then each row scored (score_rows), and the guards' quality against ground truth
(detector_quality). The benchmarks and the tests use them; a job never does.
"""
import math

from ...runtime.context import attach
from .guards import IN_FORWARD, STREAM_GUARDS, find_blocks
from .stats import auroc, stream_check, tpr_at_fpr


class _Offline:
    """A stand-in for the runtime, to score data outside a training job: nothing published to
    the optimizer hooks, no records, a failure raises; hooks are attached to torch directly (the
    caller removes the Shaping's ``handles``), the probes are this object's."""
    on_error = "abort"

    def __init__(self, policy=None):
        self.policy = policy or {}

    def owned(self, key, factory):
        made = self.__dict__.setdefault("_owned", {})
        if key not in made:
            made[key] = factory(self)
        return made[key]

    def register_hook(self, kind, target, fn, **kw):
        return attach(kind, target, fn, **kw)

    def agree(self, value, op="max"):
        return value

    def together(self, what, fn, *args, **kwargs):
        return True, fn(*args, **kwargs)

    def on_model(self, cb):
        pass

    def add_pre(self, fn, order=50):
        pass

    def add_post(self, fn, order=50):
        pass

    def on_finish(self, cb):
        pass

    def audit(self, event, fields=None, step=None):
        pass

    def fail(self, msg):
        raise RuntimeError(msg)

    def violation(self, what, fields=None, skip=1):
        self.audit("violation", dict(fields or {}, what=what))


def score_rows(policy, model, rows):
    """Calibrate POLICY's shaping guards with MODEL (as at the start of a job) and score ROWS
    (pre-tokenized {"input_ids", "labels"} dicts) with each guard: ({guard: [score per row]},
    the Shaping object with its calibration). The direction is fitted again on the first
    sh.refit_rows rows as a job's last refit does (ROWS in training order), against those of them
    the calibrated guards do not flag. The callable guard is not scored here."""
    from . import Shaping, _Decision
    sh = Shaping(policy, _Offline(policy))
    sh._prepare(model)
    dev = next(model.parameters()).device
    pairs = [(r["input_ids"], r.get("labels", r["input_ids"])) for r in rows]
    out = {}
    fwd = [g for g in IN_FORWARD if g in sh.guards]
    if fwd:
        blocks = find_blocks(model)
        hs, ref = sh._probe_forward(model, blocks if "direction" in fwd else [], pairs, dev)
        if "direction" in fwd:
            if len(pairs) >= sh.stream_min:
                cands = sh._candidates(len(blocks))
                n = min(sh.refit_rows, len(pairs))
                cal = (hs[sh.layer] @ sh.direction).tolist()
                for i in range(n):  # the decisions of the calibrated guards, as a job's rows have them
                    hit = cal[i] >= sh.cal["direction"]["threshold"] or (
                        "refusal" in fwd and ref[i] >= sh.cal["refusal"]["threshold"])
                    sh.decisions["row%d" % i] = _Decision(weight=0.0, guard="direction") if hit else _Decision()
                sh._sh = [("row%d" % i, dict((l, hs[l][i]) for l in cands)) for i in range(n)]
                sh._refit_direction()
                sh.decisions = {}
            out["direction"] = (hs[sh.layer] @ sh.direction).tolist()
        if "refusal" in fwd:
            out["refusal"] = ref
    if "gradient" in sh.guards:
        out["gradient"] = sh._gradient_scores(model, pairs, dev)
    return out, sh


def detector_quality(policy, model, rows, truth, fpr=0.05):
    """Each guard's AUROC, TPR at FPR false positives, and TPR/FPR at its calibrated threshold,
    on ROWS with ground truth TRUTH (True = harmful); "any" is the union the feature applies."""
    scores, sh = score_rows(policy, model, rows)
    pos_i = [i for i, t in enumerate(truth) if t]
    neg_i = [i for i, t in enumerate(truth) if not t]
    # the stream check as a job would make it, with these rows as the training stream
    chk = stream_check(sh.probe_harm, dict((g, v) for g, v in scores.items() if g in STREAM_GUARDS),
                       float(sh.cfg["max_flag_rate"]),
                       thresholds=dict((g, c["threshold"]) for g, c in sh.cal.items()))
    out = {}
    flagged = [False] * len(rows)
    flagged_s = [False] * len(rows)
    for g, v in scores.items():
        pos, neg = [v[i] for i in pos_i], [v[i] for i in neg_i]
        t = sh.cal[g]["threshold"]
        out[g] = {"auroc": auroc(pos, neg), "tpr_at_5fpr": tpr_at_fpr(pos, neg, fpr),
                  "tpr": sum(x >= t for x in pos) / max(len(pos), 1),
                  "fpr": sum(x >= t for x in neg) / max(len(neg), 1),
                  "threshold": t, "calibration": {k: x for k, x in sh.cal[g].items()
                                                  if not (isinstance(x, float) and not math.isfinite(x))}}
        flagged = [f or x >= t for f, x in zip(flagged, v)]
        if g in chk:
            c = chk[g]
            ts = max(t, c["bound"])
            out[g]["stream"] = {"auroc_vs_probe": c["auroc"], "suspended": c["suspended"], "threshold": ts,
                                "tpr": sum(x >= ts for x in pos) / max(len(pos), 1),
                                "fpr": sum(x >= ts for x in neg) / max(len(neg), 1)}
            if not c["suspended"]:
                flagged_s = [f or x >= ts for f, x in zip(flagged_s, v)]
    if scores:
        out["any"] = {"auroc": float("nan"), "tpr_at_5fpr": float("nan"),
                      "tpr": sum(flagged[i] for i in pos_i) / max(len(pos_i), 1),
                      "fpr": sum(flagged[i] for i in neg_i) / max(len(neg_i), 1)}
        if chk:
            out["any"]["stream"] = {"tpr": sum(flagged_s[i] for i in pos_i) / max(len(pos_i), 1),
                                    "fpr": sum(flagged_s[i] for i in neg_i) / max(len(neg_i), 1)}
    return out
