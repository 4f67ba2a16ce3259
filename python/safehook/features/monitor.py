"""The monitor: measure a probe's safety score during training and act when it drops.

* Baseline: the score at the first optimizer pre-step, before any update; the state then is
  the first safe snapshot.
* Every ``every`` steps (after the step), the score again. It passes when
  ``score >= baseline - (1 - threshold) * |baseline|`` (that is ``threshold * baseline`` for a
  positive baseline; for the negated-loss score, whose baseline is negative, it allows the
  loss to rise by ``1 - threshold`` of itself). A pass replaces the snapshot.
* A failure acts: ``rollback`` (weights and optimizer state of the last passing state, bit for
  bit), ``reduce_lr`` (lr of every param group times ``lr_factor``, LR schedulers' base lrs
  too), ``both``, or ``stop``. Rollbacks and LR cuts count as interventions; one more drop
  after ``max_rollbacks`` of them aborts.
* ``stop`` and the abort end training by raising, from inside ``optimizer.step()`` once the
  step is complete, ``SafetyStop`` or ``SafetyAbort`` (both ``safehook.SafehookError``); any
  later step raises ``PolicyError``, so that a caught exception cannot train on unprotected.
* Batch fingerprints: a forward pre-hook on the model's root module (and nowhere else) hashes
  each training batch's ``input_ids`` row by row, on the batch's device and without a sync;
  the steps since the last passing evaluation and their row fingerprints go into the
  ``rollback`` record (and the failing ``probe`` record). ``fingerprint(input_ids,
  attention_mask)`` computes the same strings offline, to find the rows in a dataset; they are
  safehook.probes.batch's, the ones shaping's ``flag`` records carry.

Records: ``probe`` (each evaluation, the baseline at step 0), ``rollback``. One progress line
on stderr per evaluation unless ``monitor.progress`` is false.
"""
import collections
import os
import time

from .. import _core, probes
from ..probes import gradient
from ..probes.batch import fingerprints, hexdigest, row_hashes
from . import snapshot as _snapshot
from ..runtime import registry
from ..runtime.context import ZERO_HINT, Refusal, agree, debug
from ..runtime.stacks import fsdp1_refusal


class SafetyStop(_core.SafehookError):
    """The monitor's action 'stop': the safety score fell below the threshold."""


class SafetyAbort(_core.SafehookError):
    """The monitor gave up: the score kept falling after max_rollbacks interventions."""



# -- batch fingerprints: the one row fingerprint of safehook.probes.batch --
fingerprint = fingerprints


class _Fingerprints:
    """Row hashes of the training batches, kept on device until a drop needs them."""
    MAX_STEPS = 4096
    MAX_PER_STEP = 64

    def __init__(self):
        self.pending = []
        self.steps = collections.deque(maxlen=self.MAX_STEPS)

    def hook(self, module, args, kwargs):
        import torch
        if not module.training or not torch.is_grad_enabled() or len(self.pending) >= self.MAX_PER_STEP:
            return None
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = next((a for a in args if torch.is_tensor(a)), None)
        if ids is None or not torch.is_tensor(ids) or ids.is_floating_point() or ids.dim() == 0:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.shape != ids.shape):
            mask = None
        with torch.no_grad():
            h = row_hashes(ids, mask)
            n = mask.reshape(h.shape[0], -1).sum(1) if mask is not None else \
                torch.full_like(h, ids.numel() // h.shape[0])
        self.pending.append((h, n))
        return None

    def end_step(self, step):
        if self.pending:
            self.steps.append((step, self.pending))
        self.pending = []

    def since(self, step, limit=512):
        """[{"step": s, "rows": [fingerprint...]}] for the steps after STEP, the most recent
        LIMIT rows at most; and the number of rows left out."""
        import torch
        sel = [(s, b) for s, b in self.steps if s > step]
        if not sel:
            return [], 0
        flat = [t for _, b in sel for pair in b for t in pair]
        vals = torch.cat([t.reshape(-1).cpu() for t in flat]).tolist()  # one sync here, not per step
        out, k = [], 0
        for s, b in sel:
            rows = []
            for h, n in b:
                cnt = h.numel()
                rows += [hexdigest(hv, int(nv)) for hv, nv in zip(vals[k:k + cnt], vals[k + cnt:k + 2 * cnt])]
                k += 2 * cnt
            out.append({"step": s, "rows": rows})
        total = sum(len(e["rows"]) for e in out)
        dropped = 0
        while out and total - len(out[0]["rows"]) >= limit and len(out) > 1:
            total -= len(out[0]["rows"])
            dropped += len(out.pop(0)["rows"])
        return out, dropped

    def clear(self):
        self.steps.clear()
        self.pending = []


def scale_lr(opt, factor):
    """Multiply every param group's lr by FACTOR, and the base lrs of LR schedulers attached to
    OPT (found through the garbage collector's referrers), so that a schedule that recomputes
    lr from its base (LambdaLR, warmup schedules) keeps the cut. Returns the new lrs."""
    import gc
    import torch
    for g in opt.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            v = g.get(key)
            if torch.is_tensor(v):
                v.mul_(factor)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                g[key] = v * factor
    try:
        from torch.optim.lr_scheduler import LRScheduler
    except ImportError:
        LRScheduler = ()
    seen = set()
    for r in gc.get_referrers(opt):
        cands = [r]
        if isinstance(r, dict):
            cands = [rr for rr in gc.get_referrers(r) if getattr(rr, "__dict__", None) is r]
        for s in cands:
            if LRScheduler and isinstance(s, LRScheduler) and getattr(s, "optimizer", None) is opt \
                    and id(s) not in seen:
                seen.add(id(s))
                s.base_lrs = [b * factor for b in s.base_lrs]
                if hasattr(s, "_last_lr"):
                    s._last_lr = [float(g["lr"]) for g in opt.param_groups]
    return [float(g["lr"]) for g in opt.param_groups]


def _progress(msg):
    os.write(2, ("safehook: " + msg + "\n").encode("utf-8", "replace"))


class Monitor:
    def __init__(self, policy, rt):
        cfg = registry.section(policy, "monitor")
        self.cfg = cfg
        self.rt = rt
        if not cfg.get("probe"):
            raise ValueError("monitor needs 'probe'")
        if cfg["action"] not in ("rollback", "reduce_lr", "both", "stop"):
            raise ValueError("unknown monitor action %r" % cfg["action"])
        self.probe = probes.get(rt, cfg["probe"], policy)
        self.snaps = (_snapshot.DiskSnapshots(cfg["snapshot_dir"]) if cfg["snapshot"] == "disk"
                      else _snapshot.MemorySnapshots())
        self.info = None
        self.fp = _Fingerprints()
        self.fp_handle = None
        self.optimizers = []    # weakrefs, in order of first step
        self.primary = None     # id of the optimizer whose steps schedule evaluations
        self.baseline = None
        self.limit = None
        self.last_pass = 0      # step of the snapshot
        self.interventions = 0
        self.dead = False       # stopped, aborted, or unusable under on_error=warn

    def _label(self):
        return {"loss": "score (-loss)", "refusal_rate": "refusal rate",
                "over_refusal": "score (1 - over-refusal)"}.get(self.probe.cfg["score"], "score")

    # -- wiring --
    def on_model(self, info):
        msg = fsdp1_refusal(info, "the probe cannot call its inner module without the wrapper gathering the "
                            "flat shards, and a snapshot of them cannot be restored")
        if msg is not None:
            if not self.dead:  # said once, however many models are bound
                self.rt.fail("monitor: " + msg)
            self.dead = True
            return
        self.info = info
        if self.fp_handle is not None:  # the fingerprints follow the model measured: the last bound
            self.fp_handle.remove()
        self.fp_handle = self.rt.register_hook("forward_pre", info.root, self.fp.hook, with_kwargs=True)

    def _opts(self):
        out = []
        for r in self.optimizers:
            o = r()
            if o is not None:
                out.append(o)
        return out

    def _check_start(self, opt):
        """Raises Refusal where the monitor cannot watch this job."""
        if self.info is None:
            raise Refusal("no forward of a model was seen before the first optimizer step, so there is "
                          "nothing to measure")
        if self.cfg["action"] in ("rollback", "both") and self.rt.zero_partitions(
                [p for g in opt.param_groups for p in g["params"] if p.grad is not None]):
            raise Refusal("action %r: the optimizer steps DeepSpeed ZeRO's flat partitions, which a snapshot of "
                          "the model does not hold, so a rollback would be undone at the next step; use action "
                          "'reduce_lr' or 'stop', or %s" % (self.cfg["action"], ZERO_HINT.replace("this feature", "rollback")))

    # -- hooks --
    def pre(self, opt, step, record):
        import weakref
        if self.dead:
            return
        if all(r() is not opt for r in self.optimizers):
            self.optimizers.append(weakref.ref(opt))
        if self.baseline is not None:
            return
        ok, _ = self.rt.together("monitor", self._check_start, opt)
        if not ok:
            self.dead = True
            return
        self.primary = id(opt)
        t0 = time.perf_counter()
        res = self._evaluate()
        if res is None:
            return
        self.baseline = res["score"]
        self.limit = self.baseline - (1.0 - self.cfg["threshold"]) * abs(self.baseline)
        if not self._save(0, self.baseline):
            return
        dt = time.perf_counter() - t0
        self.rt.audit("probe", dict(res, probe=self.probe.name, baseline=self.baseline, limit=self.limit,
                                    passed=True, action="baseline", snapshot=self.snaps.where,
                                    elapsed_s=round(dt, 4)), step=0)
        if self.cfg["progress"]:
            _progress("monitor baseline: %s %.4f on probe '%s' (limit %.4f) [%.2fs]%s"
                      % (self._label(), self.baseline, self.probe.name, self.limit, dt,
                         "; a baseline of 0 cannot fall: this probe detects nothing" if self.baseline == 0 else ""))

    def post(self, opt, step, record):
        if self.dead or self.baseline is None or id(opt) != self.primary:
            return
        self.fp.end_step(step)
        if step % self.cfg["every"] != 0:
            return
        t0 = time.perf_counter()
        res = self._evaluate()
        if res is None:
            return
        score = res["score"]
        rec = dict(res, probe=self.probe.name, baseline=self.baseline, limit=self.limit,
                   ratio=(score / self.baseline if self.baseline > 0 else None))
        if score >= self.limit:
            if not self._save(step, score):
                return
            self.last_pass = step
            self.fp.clear()
            dt = time.perf_counter() - t0
            self.rt.audit("probe", dict(rec, passed=True, action="snapshot", elapsed_s=round(dt, 4)))
            if self.cfg["progress"]:
                _progress("monitor step %d: %s %.4f (baseline %.4f, limit %.4f) ok, snapshot saved [%.2fs]"
                          % (step, self._label(), score, self.baseline, self.limit, dt))
            return
        self._act(step, score, rec, t0)

    def _save(self, step, score):
        # without a safe state there is nothing to roll back to: a failure (a full disk on one
        # node) is agreed, and every rank stops here
        ok, _ = self.rt.together("monitor: cannot save the safe-state snapshot (%s) at step %d" % (self.snaps.where, step),
                                 self.snaps.save, self.info.root, self._opts(), step, score)
        self.dead = self.dead or not ok
        return ok

    def _evaluate(self):
        # a probe that cannot run (its file missing on one node) leaves training unmonitored:
        # agreed before the agree() of the score
        ok, res = self.rt.together("monitor: probe '%s' failed" % self.probe.name, self.probe.evaluate, self.info.root)
        if not ok:
            self.dead = True
            return None
        # one decision for all ranks: the lowest score, so that every rank saves, rolls back
        # or stops at the same step and replicas stay identical
        res["score"] = agree(res["score"], "min")
        return res

    # -- acting on a drop --
    def _act(self, step, score, rec, t0):
        action = self.cfg["action"]
        suspects, dropped = self.fp.since(self.last_pass)
        what = "%s %.4f < limit %.4f (baseline %.4f)" % (self._label(), score, self.limit, self.baseline)
        opts = self._opts()
        if action == "stop":
            rec.update(passed=False, action="stop", suspects=suspects, suspects_dropped=dropped)
            return self._end(SafetyStop, step, rec, t0,
                             "safety score fell at step %d: %s; training stopped (monitor.action=stop). "
                             "The last safe state is from step %d." % (step, what, self.last_pass))
        if self.interventions >= self.cfg["max_rollbacks"]:
            restored = action in ("rollback", "both")
            if restored:
                self.snaps.restore(self.info.root, opts)
                gradient.of(self.rt).invalidate("rollback")
            rec.update(passed=False, action="abort", restored_to=self.last_pass if restored else None,
                       suspects=suspects, suspects_dropped=dropped)
            return self._end(SafetyAbort, step, rec, t0,
                             "safety score fell at step %d: %s, after %d interventions (max_rollbacks=%d); "
                             "training aborted%s." % (step, what, self.interventions, self.cfg["max_rollbacks"],
                                                      "; weights restored to the last safe state (step %d)"
                                                      % self.last_pass if restored else ""))
        self.interventions += 1
        lrs = None
        if action in ("rollback", "both"):
            self.snaps.restore(self.info.root, opts)
            # the weights went back: no cached safety gradient (SafeGrad's, the gate's) holds
            gradient.of(self.rt).invalidate("rollback")
        if action in ("reduce_lr", "both"):
            lrs = [scale_lr(o, self.cfg["lr_factor"]) for o in opts]
        dt = time.perf_counter() - t0
        rec.update(passed=False, action=action, interventions=self.interventions, elapsed_s=round(dt, 4))
        if lrs is not None:
            rec["lr"] = lrs
        if action in ("rollback", "both"):
            rec["restored_to"] = self.last_pass
            self.rt.audit("probe", rec)
            self.rt.audit("rollback", {"to_step": self.last_pass, "score": score, "baseline": self.baseline,
                                       "limit": self.limit, "snapshot": self.snaps.where,
                                       "rollbacks": self.interventions, "lr": lrs,
                                       "suspect_steps": [e["step"] for e in suspects],
                                       "suspects": suspects, "suspects_dropped": dropped})
            self.fp.clear()
        else:
            rec.update(suspects=suspects, suspects_dropped=dropped)
            self.rt.audit("probe", rec)
        if self.cfg["progress"]:
            _progress("monitor step %d: %s -> %s%s%s [%.2fs]"
                      % (step, what, action,
                         " to step %d" % self.last_pass if action in ("rollback", "both") else "",
                         ", lr %s" % ",".join("%.3g" % l for l in lrs[0]) if lrs else "", dt))

    def _end(self, exc, step, rec, t0, msg):
        self.dead = True
        rec["elapsed_s"] = round(time.perf_counter() - t0, 4)
        self.rt.audit("probe", rec)
        self.rt.audit("error", {"message": msg, "what": rec["action"]})
        _core.set_pending_error("training was ended by the safety monitor: " + msg)
        if self.cfg["progress"] or exc is SafetyAbort:
            _progress("monitor: " + msg)
        raise exc(msg)


def setup(policy, rt):
    m = rt.provide("monitor", Monitor(policy, rt))
    rt.on_model(m.on_model)
    rt.add_pre(m.pre, order=registry.order("monitor"))
    rt.add_post(m.post, order=registry.order("monitor"))
    debug("monitor: probe %s every %d steps, action %s, snapshots in %s"
          % (m.probe.name, m.cfg["every"], m.cfg["action"], m.snaps.where))


# Helpers for users after a crash: load the disk snapshot and put it back.
load_snapshot = _snapshot.load


def restore_snapshot(path_or_snapshot, model, optimizers=()):
    """Restore MODEL (and OPTIMIZERS, in the order they first stepped) from a monitor snapshot."""
    snap = _snapshot.load(path_or_snapshot) if isinstance(path_or_snapshot, (str, os.PathLike)) else path_or_snapshot
    _snapshot.restore(snap, model, list(optimizers))
    return snap["step"]
