"""safehook's per-step stats, taken from what the features record, for the user's own logs.

Set up for every policy (the registry: src/policy_schema.c FEATURES), it never changes an update and never raises
into the training step: a last pre-step callable reads the step record the features filled
(SafeGrad's cosine, projected and safety loss, the gate's decision, shaping's counts), the
records written through the Context (flag, probe, rollback, gate) are counted as they come,
and a last post-step callable closes the step. Each closed step goes

- to Python ``logging``, logger ``safehook``, at INFO: one record per step, its message
  ``step N: key=value ...`` and the stats as ``record.safehook`` (nothing is printed unless the
  user configured a handler at INFO);
- to ``Accelerator.log(stats, step=N)`` when the training loop runs under an Accelerator that
  has trackers (found once, in the frames that called the optimizer step), unless a Trainer's
  SafehookCallback logs them;
- to every SafehookCallback (integrations/hf.py), which sums them over the Trainer's logging
  interval and logs them through the Trainer's own ``log()``.

Stats (keys as logged; absent when the feature is off):
    safehook/projected     1 when SafeGrad projected the update (its per-layer count otherwise)
    safehook/cosine        cosine of the task and the safety gradients
    safehook/safety_loss   the safety probe's loss at this step's weights
    safehook/gate_skipped, safehook/gate_scaled   1 when the gate skipped / scaled the update
    safehook/gate_scale    the gate's scale factor
    safehook/flagged       training examples shaping stopped at this step (flag records,
                           withdrawals by its stream check left out)
    safehook/shaping_masked_tokens, safehook/shaping_rewritten   shaping's counts of the step
    safehook/probe_score   the monitor's safety score when it measured at this step
    safehook/rollbacks     rollbacks made at this step
"""
import logging
import sys
import weakref

from ..runtime import registry

LOGGER = logging.getLogger("safehook")

_sinks = []  # the consumers (SafehookCallback instances), as logging's handlers are: process-wide


def sinks():
    """The callables that receive each closed step as f(step, stats); SafehookCallback adds its own."""
    return _sinks


def _new():
    return {"counts": {}, "values": {}}


def _count(p, key, n=1):
    p["counts"][key] = p["counts"].get(key, 0) + n


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Tap:
    """The tap of one Runtime: the step being filled, the Accelerator found. Owned by the runtime
    (rt.provide("tap", ...)), gone with it: a new policy starts a new one."""

    def __init__(self, rt):
        self.rt = rt
        self.pending = _new()
        self.accelerator = None
        self.looked = False
        self.closed = False

    def on_record(self, event, fields, step):
        p = self.pending
        if self.closed or not isinstance(fields, dict):
            return
        if event == "flag":
            if fields.get("action") != "none" and not fields.get("revoked"):
                _count(p, "safehook/flagged")  # a withdrawal (action "none") stops nothing
        elif event == "rollback":
            _count(p, "safehook/rollbacks")
        elif event == "probe" and _num(fields.get("score")):
            p["values"]["safehook/probe_score"] = float(fields["score"])

    def pre(self, opt, step, record):
        if self.closed:
            return
        p = self.pending
        try:
            proj = record.get("projected")
            if proj is True or proj is False:
                p["values"]["safehook/projected"] = 1 if proj else 0
            elif _num(proj):
                p["values"]["safehook/projected"] = proj
            for k in ("cosine", "safety_loss"):
                if _num(record.get(k)):
                    p["values"]["safehook/" + k] = float(record[k])
            g = record.get("gate")
            if isinstance(g, dict) and g.get("action"):
                p["values"]["safehook/gate_skipped"] = 1 if g["action"] == "skip" else 0
                p["values"]["safehook/gate_scaled"] = 1 if g["action"] == "scale" else 0
                if _num(g.get("scale")):
                    p["values"]["safehook/gate_scale"] = float(g["scale"])
            sh = record.get("shaping")
            if isinstance(sh, dict):
                for k in ("masked_tokens", "rewritten"):
                    if _num(sh.get(k)):
                        p["values"]["safehook/shaping_" + k] = sh[k]
        except Exception:  # a log tap never breaks the step
            pass

    def post(self, opt, step, record):
        if self.closed:
            return
        p, self.pending = self.pending, _new()
        stats = dict(p["values"])
        stats.update(p["counts"])
        if not stats:
            return
        for f in list(_sinks):
            try:
                f(step, stats)
            except Exception:
                pass
        if LOGGER.isEnabledFor(logging.INFO):
            LOGGER.info("step %d: %s", step, " ".join("%s=%s" % (k[len("safehook/"):], _fmt(v))
                                                      for k, v in sorted(stats.items())),
                        extra={"safehook": dict(stats, step=step)})
        self.accelerate(step, stats)

    def accelerate(self, step, stats):
        if any(getattr(s, "trainer_logging", False) for s in _sinks):
            return  # a Trainer logs these through its own log(): its trackers get them there
        ref = self.accelerator
        acc = ref() if ref is not None else None
        if acc is None and not self.looked:
            self.looked = True
            acc = _find_accelerator()
            self.accelerator = weakref.ref(acc) if acc is not None else None
        if acc is not None and getattr(acc, "trackers", None):
            try:
                acc.log(dict(stats), step=step)
            except Exception:
                pass

    def close(self):
        self.closed, self.pending, self.accelerator, self.rt = True, _new(), None, None


def _fmt(v):
    return "%.6g" % v if isinstance(v, float) else str(v)


def _find_accelerator():
    """The Accelerator of the loop that called this optimizer step: a local of one of the
    calling frames (the user's loop holds it). None when accelerate is not imported."""
    acc_mod = sys.modules.get("accelerate")
    cls = getattr(acc_mod, "Accelerator", None) if acc_mod is not None else None
    if cls is None:
        return None
    f = sys._getframe(1)
    for _ in range(40):
        if f is None:
            break
        for v in list(f.f_locals.values()):
            if isinstance(v, cls):
                return v
        f = f.f_back
    return None


def setup(policy, rt):
    """Feature entry (the registry: src/policy_schema.c FEATURES): the tap, and the Trainer callback's auto-add."""
    try:
        tap = rt.provide("tap", Tap(rt))
        rt.on_record(tap.on_record)
        if any(policy.get(k) for k in ("safegrad", "gate", "shaping")):
            # only where a feature fills the step record: a policy without pre-step callables
            # keeps stepping as it did (no step record dict, no closure wrapper)
            rt.add_pre(tap.pre, order=registry.order("tap"))
        rt.add_post(tap.post, order=registry.order("tap"))
        rt.on_close(tap.close)
        from . import hf
        hf.auto_add()
        rt.on_close(hf.auto_remove)
    except Exception as e:  # logging is never a reason to stop a job
        from ..runtime.context import debug
        debug("integrations: not set up: %r" % (e,))
