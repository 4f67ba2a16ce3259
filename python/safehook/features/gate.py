"""The gate (safety-aware probing): before each update is applied, estimate how it changes the
probe's safety loss, and skip or scale it when the rise exceeds ``tolerance``.

Modes:
* ``first_order``: delta = <g_safety, update>, where g_safety is the probe loss's gradient at
  the current weights and ``update`` is what the optimizer is about to add to the weights. The
  update is not the gradient: for ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (exact classes)
  it is computed with the optimizer's own formula from its state (momentum, moments, bias
  correction, weight decay, amsgrad, maximize), one tensor at a time, without changing
  anything; for any other optimizer it is measured by a tentative step (parameters and state
  copied, the optimizer's step run without hooks, the difference taken, everything copied
  back). The record says which (``estimate``: ``formula:adam`` ... or ``tentative``).
* ``exact``: delta = probe loss after a tentative step minus before it; the step is then undone
  exactly (parameters and optimizer state copied back, bit-identical).

Actions when delta > tolerance:
* ``skip``: the gradients of the optimizer's parameters are set aside (p.grad = None) for this
  step and put back after it. Optimizers skip parameters without a gradient entirely, so the
  weights, moments and per-parameter step counters stay as they were (the step is as if it
  had not happened; LR schedulers still advance).
* ``scale``: this step's lr of every param group is multiplied by s = tolerance / delta (and
  put back after the step). For SGD, Adam and AdamW the displacement is linear in lr, so the
  update is scaled by exactly s and the predicted rise becomes the tolerance; the moments are
  those of the full gradient.

Each gated step carries ``gate`` in its step record; a ``gate`` record is written when the gate
skips or scales, with ``streak`` (consecutive skips). A skip leaves the optimizer's state as it
was, momentum included: when that momentum points against the probe, every later update is
skipped as well and training stands still. Gate records then say ``stalled`` (at 32
consecutive skips, then at 64, 128...), and ``safehook report`` shows the longest streak; the
``scale`` action or a tolerance above 0 avoids it.
"""
import torch

from .. import _core, probes
from ..runtime.context import debug

DEFAULTS = {"mode": "first_order", "tolerance": 0.0, "action": "skip", "every": 1}
STALL = 32  # consecutive skips after which gate records say "stalled" (then at each power of two)


def _raw_step(opt):
    """The optimizer's step without torch's step hooks (so safehook does not see it)."""
    f = type(opt).step
    if getattr(f, "hooked", False) and hasattr(f, "__wrapped__"):
        f = f.__wrapped__
    return f(opt)


class Tentative:
    """Copies of the parameters and optimizer state, to undo a step bit for bit."""

    def __init__(self, opt):
        self.opt = opt
        self.params = [p for g in opt.param_groups for p in g["params"]]
        with torch.no_grad():
            self.data = [p.detach().clone() for p in self.params]
        self.state = {}
        for p in self.params:
            st = opt.state.get(p)
            if st:
                self.state[p] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}

    def undo(self):
        with torch.no_grad():
            for p, d in zip(self.params, self.data):
                p.copy_(d)
        for p in self.params:
            saved = self.state.get(p)
            if saved is None:
                self.opt.state.pop(p, None)
                continue
            cur = self.opt.state.get(p) or {}
            for k, v in saved.items():
                c = cur.get(k)
                if torch.is_tensor(v) and torch.is_tensor(c) and c.shape == v.shape and c.dtype == v.dtype:
                    with torch.no_grad():
                        c.copy_(v)
                else:
                    cur[k] = v
            for k in [k for k in cur if k not in saved]:
                del cur[k]
            self.opt.state[p] = cur


def _lr(group):
    lr = group["lr"]
    return float(lr) if torch.is_tensor(lr) else lr


def _sgd_update(p, g, group, state):
    wd, mom, damp, nest = group.get("weight_decay", 0), group.get("momentum", 0), group.get("dampening", 0), \
        group.get("nesterov", False)
    if group.get("maximize", False):
        g = -g
    if wd:
        g = g + wd * p
    if mom:
        buf = state.get("momentum_buffer")
        buf = g.clone() if buf is None else buf * mom + (1 - damp) * g
        g = g + mom * buf if nest else buf
    return -_lr(group) * g


def _adam_update(p, g, group, state, decoupled):
    b1, b2 = group["betas"]
    b1, b2 = float(b1), float(b2)
    eps, wd, lr = group["eps"], group.get("weight_decay", 0), _lr(group)
    if group.get("maximize", False):
        g = -g
    if wd and not decoupled:
        g = g + wd * p
    t = float(state["step"]) + 1 if "step" in state else 1.0
    m = state.get("exp_avg")
    v = state.get("exp_avg_sq")
    m = (1 - b1) * g if m is None else m * b1 + (1 - b1) * g
    v = (1 - b2) * g * g if v is None else v * b2 + (1 - b2) * g * g
    if group.get("amsgrad", False):
        vm = state.get("max_exp_avg_sq")
        v = v if vm is None else torch.maximum(vm, v)
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    upd = -(lr / bc1) * m / (v.sqrt() / (bc2 ** 0.5) + eps)
    if wd and decoupled:
        upd = upd - lr * wd * p
    return upd


def update_formula(opt):
    """A function (p, group) -> the update the optimizer will add to p, for the optimizers whose
    formula the gate knows; None otherwise."""
    cls = type(opt)
    if cls is torch.optim.SGD:
        return "formula:sgd", lambda p, grp: _sgd_update(p.detach(), p.grad, grp, opt.state.get(p) or {})
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        def adam(p, grp):
            dec = grp.get("decoupled_weight_decay", cls is torch.optim.AdamW)
            return _adam_update(p.detach(), p.grad, grp, opt.state.get(p) or {}, dec)
        return "formula:" + cls.__name__.lower(), adam
    return None


def predicted_updates(opt):
    """(estimate, {param: update tensor}) for the step about to be taken. Tests compare it with
    the real step; the gate itself streams the updates instead of keeping them all."""
    f = update_formula(opt)
    out = {}
    if f is not None:
        with torch.no_grad():
            for grp in opt.param_groups:
                for p in grp["params"]:
                    if p.grad is not None:
                        out[p] = f[1](p, grp)
        return f[0], out
    tent = Tentative(opt)
    _raw_step(opt)
    with torch.no_grad():
        for p, d in zip(tent.params, tent.data):
            if p.grad is not None:
                out[p] = p.detach() - d
    tent.undo()
    return "tentative", out


class Gate:
    def __init__(self, policy, rt):
        cfg = dict(DEFAULTS)
        cfg.update(policy.get("gate") or {})
        if not cfg.get("probe"):
            raise ValueError("gate needs 'probe'")
        if cfg["mode"] not in ("first_order", "exact") or cfg["action"] not in ("skip", "scale"):
            raise ValueError("gate: unknown mode %r or action %r" % (cfg["mode"], cfg["action"]))
        self.cfg, self.rt = cfg, rt
        self.probe = probes.get(policy, cfg["probe"])
        self.info = None
        self.stashed = None   # grads set aside by a skip
        self.lrs = None       # lrs changed by a scale
        self.counts = {"allow": 0, "skip": 0, "scale": 0}
        self.streak = 0       # consecutive skipped steps
        self.dead = False
        self.on_error = rt.on_error

    def on_model(self, info):
        self.info = info

    def _delta_first_order(self, opt):
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        loss, sgrads = self.probe.loss_and_grad(self.info.root, params)
        f = update_formula(opt)
        dot = torch.zeros((), dtype=torch.float64, device=params[0].device)
        with torch.no_grad():
            if f is not None:
                est = f[0]
                idx = {p: i for i, p in enumerate(params)}
                for grp in opt.param_groups:
                    for p in grp["params"]:
                        i = idx.get(p)
                        if i is not None and sgrads[i] is not None:
                            dot += (sgrads[i].double() * f[1](p, grp).double()).sum()
            else:
                est, upd = predicted_updates(opt)
                for p, sg in zip(params, sgrads):
                    if sg is not None and p in upd:
                        dot += (sg.double() * upd[p].double()).sum()
        return float(dot), loss, est

    def _delta_exact(self, opt):
        root = self.info.root
        before = self.probe.loss_value(root)
        tent = Tentative(opt)
        try:
            _raw_step(opt)
            after = self.probe.loss_value(root)
        finally:
            tent.undo()
        return after - before, before, "tentative"

    def pre(self, opt, step, record):
        if self.stashed is not None or self.lrs is not None:
            self.post(opt, step, record)  # the last step raised before its post hook: put things back
        if self.dead or step % self.cfg["every"] != 0:
            return
        if self.info is None:
            self.dead = True
            self.rt.fail("gate: no forward of a model was seen before the first optimizer step, "
                         "so updates cannot be checked")
            if self.on_error == "abort":
                raise _core.PolicyError("safehook: gate: no model seen before the first optimizer step")
            return
        if not any(p.grad is not None for g in opt.param_groups for p in g["params"]):
            return
        try:
            delta, loss, est = (self._delta_exact if self.cfg["mode"] == "exact" else self._delta_first_order)(opt)
        except Exception as e:  # updates would go through unchecked: say so
            self.dead = True
            msg = "gate: probe '%s' failed: %s: %s" % (self.probe.name, type(e).__name__, e)
            self.rt.fail(msg)
            if self.on_error == "abort":
                raise _core.PolicyError("safehook: " + msg) from e
            return
        tol = self.cfg["tolerance"]
        decision = "allow"
        info = {"delta": delta, "loss": loss, "mode": self.cfg["mode"], "estimate": est}
        if delta > tol:
            decision = self.cfg["action"]
            if decision == "skip":
                self.stashed = []
                for g in opt.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            self.stashed.append((p, p.grad))
                            p.grad = None
            else:
                s = max(0.0, tol / delta)
                info["scale"] = s
                self.lrs = []
                for g in opt.param_groups:
                    lr = g["lr"]
                    if torch.is_tensor(lr):
                        self.lrs.append((g, lr.clone()))
                        lr.mul_(s)
                    else:
                        self.lrs.append((g, lr))
                        g["lr"] = lr * s
        info["action"] = decision
        self.counts[decision] += 1
        self.streak = self.streak + 1 if decision == "skip" else 0
        record["gate"] = info
        if decision != "allow":
            extra = {"tolerance": tol, "probe": self.probe.name, "streak": self.streak}
            if self.streak >= STALL and self.streak & (self.streak - 1) == 0:
                # Skipping leaves the optimizer's momentum as it was: when that momentum points
                # against the probe, every later update is skipped too and training stands still.
                extra["stalled"] = True
                debug("gate: %d updates in a row skipped: training is not moving" % self.streak)
            self.rt.audit("gate", dict(info, **extra), step=step)
            debug("gate: step %d %s (delta %.3g > tolerance %.3g)" % (step, decision, delta, tol))

    def post(self, opt, step, record):
        if self.stashed is not None:
            for p, g in self.stashed:
                if p.grad is None:
                    p.grad = g
            self.stashed = None
        if self.lrs is not None:
            for g, lr in self.lrs:
                if torch.is_tensor(lr):
                    g["lr"].copy_(lr)
                else:
                    g["lr"] = lr
            self.lrs = None


def setup(policy, rt):
    g = Gate(policy, rt)
    rt.on_model(g.on_model)
    rt.add_pre(g.pre, order=30)
    rt.add_post(g.post, order=30)
