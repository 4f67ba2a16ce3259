"""The gate (safety-aware probing): before each update is applied, predict how it changes the
probe's safety loss, and let it through, shrink it, scale it or skip it.

The limit: an update may raise the safety loss by at most ``tolerance + ratio * gain``, where
``gain`` is the task's own predicted gain, -<g_task, update> (the first-order fall of the
training loss; 0 when the update does not lower it). Both losses are token-mean cross-entropies,
so ``ratio`` (default 0.1) reads "at most a tenth of what the task gains is paid in safety".
``ratio: 0`` with ``tolerance: 0`` is the strict gate of before: no predicted rise at all.

Modes (how the rise ``delta`` is measured):
* ``first_order``: delta = <g_safety, update>, where g_safety is the probe loss's gradient at
  the current weights (``safehook.probes.gradient``: the one safety gradient of the step, shared
  with SafeGrad) and ``update`` is what the optimizer is about to add to the weights. The
  update is not the gradient: for ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (exact classes,
  fused and foreach included) it is computed with the optimizer's own formula from its state
  (momentum, moments, bias correction, weight decay, amsgrad, maximize), one tensor at a time,
  without changing anything; for any other optimizer it is measured by a tentative step
  (parameters and state copied, the optimizer's step run without hooks, the difference taken,
  everything copied back). The record says which (``estimate``: ``formula:adam`` ... or
  ``tentative``).
* ``exact``: delta = probe loss after a tentative step minus before it; the step is then undone
  exactly (parameters and optimizer state copied back, bit-identical).

Actions when delta > limit:
* ``shrink`` (the default): the update goes through, minus just enough of the safety gradient's
  direction to bring the predicted rise down to the limit: after the optimizer's step the
  weights get ``-c * g_safety`` with c = (delta - limit) / |g_safety|^2 (never more than the
  update's own norm). Everything of the update orthogonal to g_safety is kept, so training keeps
  moving; the optimizer's state is that of the full gradient.
* ``scale``: this step's lr of every param group is multiplied by s = limit / delta (and put
  back after the step). For SGD, Adam and AdamW the displacement is linear in lr, so the
  update is scaled by exactly s and the predicted rise becomes the limit; the moments are those
  of the full gradient.
* ``skip``: the gradients of the optimizer's parameters are set aside (p.grad = None) for this
  step and put back after it. Optimizers skip parameters without a gradient entirely, so the
  weights, moments and per-parameter step counters stay as they were (LR schedulers still
  advance). A skip leaves the momentum as it was: when it points against the probe, every
  later update is skipped as well and training stands still. Gate records then say ``stalled``
  (at 32 consecutive skips, then at 64, 128...), and ``safehook report`` shows the longest
  streak.

GradScaler: an optimizer that unscales inside its own step (fused Adam/AdamW/SGD) sees the
scaled gradients with ``grad_scale`` and ``found_inf`` set on it. The gate divides the
gradients by the scale before it predicts the update (the optimizer's state is unscaled), and
when ``found_inf`` is set it does nothing (the optimizer skips the step itself) and says so in
the step record (``found_inf: true``).

Each gated step carries ``gate`` in its step record (delta, gain, limit, action, ...); a ``gate``
record is written when the gate shrinks, scales or skips, with ``streak`` (consecutive skips).
"""
import torch

from .. import _core, probes
from ..probes import gradient
from ..runtime import registry
from ..runtime.context import ZERO_HINT, Refusal, agree, debug
from ..runtime.stacks import fsdp1_refusal

MODES = ("first_order", "exact")
ACTIONS = ("shrink", "scale", "skip")
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
    # torch's own sequence (lerp, mul + addcmul, sqrt / sqrt(bc2) + eps), on fresh temporaries
    # changed in place: a third of the memory passes of the textbook expression
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
    m = g.mul(1 - b1) if m is None else torch.lerp(m, g, 1 - b1)
    v = g.mul(g).mul_(1 - b2) if v is None else v.mul(b2).addcmul_(g, g, value=1 - b2)
    if group.get("amsgrad", False):
        vm = state.get("max_exp_avg_sq")
        if vm is not None:
            torch.maximum(vm, v, out=v)
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    den = v.sqrt_().div_(bc2 ** 0.5).add_(eps)
    upd = m.div_(den).mul_(-(lr / bc1))
    if wd and decoupled:
        upd.add_(p, alpha=-lr * wd)
    return upd


def update_formula(opt):
    """(name, f) with f(p, group, g) -> the update the optimizer will add to p given the
    (unscaled) gradient g, for the optimizers whose formula the gate knows; None otherwise."""
    cls = type(opt)
    if cls is torch.optim.SGD:
        return "formula:sgd", lambda p, grp, g: _sgd_update(p.detach(), g, grp, opt.state.get(p) or {})
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        def adam(p, grp, g):
            dec = grp.get("decoupled_weight_decay", cls is torch.optim.AdamW)
            return _adam_update(p.detach(), g, grp, opt.state.get(p) or {}, dec)
        return "formula:" + cls.__name__.lower(), adam
    return None


def grad_unscale(opt):
    """1 / GradScaler's scale when the optimizer is about to unscale its gradients itself (fused
    optimizers under GradScaler), else 1.0."""
    scale = getattr(opt, "grad_scale", None)
    if isinstance(scale, torch.Tensor):
        s = float(scale)
        return 1.0 / s if s > 0 else 1.0
    return 1.0


def found_inf(opt):
    """True when GradScaler found inf/NaN gradients and the (fused) optimizer will skip this step."""
    fi = getattr(opt, "found_inf", None)
    return isinstance(fi, torch.Tensor) and float(fi) > 0


def _dot3(a, b):
    """(a.b, b.b, a.a) as floats, summed in float64: the projection kernel's pass where it takes
    the tensors (contiguous CPU float32/bfloat16/float16), else torch in float64."""
    if a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == b.dtype and a.is_contiguous() \
            and b.is_contiguous() and not hasattr(a, "device_mesh") and not hasattr(b, "device_mesh"):
        dots, skipped = _core.safegrad_dots([a], [b], None, 1)
        if not skipped:
            return dots[0], dots[1], dots[2]
    a64, b64 = a.double(), b.double()
    out = [(a64 * b64).sum(), (b64 * b64).sum(), (a64 * a64).sum()]
    return tuple(float(x.full_tensor() if hasattr(x, "full_tensor") else x) for x in out)  # DTensor: reduced


def _gram(dirs):
    """The Gram matrix (nested lists) of K directions, each a dict param -> tensor."""
    k = len(dirs)
    G = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            v = 0.0
            for p, a in dirs[i].items():
                b = dirs[j].get(p)
                if b is not None:
                    v += _dot3(a, b)[0]
            G[i][j] = G[j][i] = v
    return G


def _grad(p, inv):
    return p.grad if inv == 1.0 else p.grad * inv


def predicted_updates(opt):
    """(estimate, {param: update tensor}) for the step about to be taken. Tests compare it with
    the real step; the gate itself streams the updates instead of keeping them all."""
    f = update_formula(opt)
    out = {}
    if f is not None:
        inv = grad_unscale(opt)
        with torch.no_grad():
            for grp in opt.param_groups:
                for p in grp["params"]:
                    if p.grad is not None:
                        out[p] = f[1](p, grp, _grad(p, inv))
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
        cfg = registry.section(policy, "gate")
        if not cfg.get("probe"):
            raise ValueError("gate needs 'probe'")
        if cfg["mode"] not in MODES or cfg["action"] not in ACTIONS:
            raise ValueError("gate: unknown mode %r or action %r" % (cfg["mode"], cfg["action"]))
        if not cfg["ratio"] >= 0 or not cfg["tolerance"] >= 0:
            raise ValueError("gate: ratio and tolerance must be >= 0")
        self.cfg, self.rt = cfg, rt
        self.probe = probes.get(rt, cfg["probe"], policy)
        self.info = None
        self.stashed = None   # grads set aside by a skip
        self.lrs = None       # lrs changed by a scale
        self.shrink = None    # (coef, [(param, safety gradient)]) of a shrink, applied after the step
        self.counts = {a: 0 for a in ("allow",) + ACTIONS}
        self.streak = 0       # consecutive skipped steps
        self.dead = False

    def on_model(self, info):
        msg = fsdp1_refusal(info, "the probe cannot call its inner module without the wrapper gathering the "
                            "flat shards, and its updates are flat shards of several tensors")
        if msg is None:
            self.info = info
        elif not self.dead:  # said once, however many models are bound
            self.dead = True
            self.rt.fail("gate: " + msg)

    def _params(self, opt):
        return [p for g in opt.param_groups for p in g["params"] if p.grad is not None]

    def _safety(self, opt, params, step):
        """(loss, [safety gradient or None per param], how, Use or None): the safety signal
        SafeGrad decided for this step when it names the same probe ("shared" when computed at
        this step, "cached" when older: probes.gradient.Signal), else the step's safety gradient
        ("computed" by this call, or "shared" with another feature at these weights)."""
        cache = gradient.of(self.rt)
        use = cache.current(self.probe, self.info.root, step)
        if use is not None and use.params == [id(p) for p in params]:
            return use.loss, use.grads, ("shared" if use.fresh else "cached"), use
        before = cache.stats()["computed"]
        loss, sgrads = cache.get(self.probe, self.info.root, params, step)
        return loss, sgrads, ("computed" if cache.stats()["computed"] > before else "shared"), None

    def _measure(self, opt, step):
        """{"delta", "gain", "loss", "estimate", "ss" (|g_safety|^2), "uu" (|update|^2),
        "gradient" (how the safety gradient came), "deltas" (per direction of a cached subspace)},
        the safety gradients by param, and the Use of the step's signal (or None)."""
        params = self._params(opt)
        inv = grad_unscale(opt)
        exact = self.cfg["mode"] == "exact"
        sg, loss, how, use = {}, None, None, None
        if not exact or self.cfg["action"] == "shrink":  # exact mode needs it only to shrink
            loss, sgrads, how, use = self._safety(opt, params, step)
            sg = {p: s for p, s in zip(params, sgrads) if s is not None}
        dirs = None
        if use is not None and use.directions is not None and self.cfg["action"] == "shrink" and not exact:
            dirs = [{p: d[i] for i, p in enumerate(params) if d[i] is not None} for d in use.directions]
        acc = [0.0, 0.0, 0.0, 0.0]  # delta, gain, ss, uu
        accd = [0.0] * (len(dirs) if dirs else 0)

        def add(p, u):
            s = sg.get(p)
            if s is not None:
                us, ss, uu = _dot3(u, s)
                acc[0] += us
                acc[2] += ss
            else:
                uu = _dot3(u, u)[0]
            acc[1] -= _dot3(_grad(p, inv), u)[0]
            acc[3] += uu
            for j, d in enumerate(dirs or ()):
                sj = d.get(p)
                if sj is not None:
                    accd[j] += _dot3(u, sj)[0]

        before = None
        with torch.no_grad():
            if exact:
                before = self.probe.loss_value(self.info.root)
                tent = Tentative(opt)
                try:
                    _raw_step(opt)
                    after = self.probe.loss_value(self.info.root)
                    for p, d in zip(tent.params, tent.data):
                        if p.grad is not None:
                            add(p, p.detach() - d)
                finally:
                    tent.undo()
                est = "tentative"
            else:
                f = update_formula(opt)
                if f is not None:
                    est = f[0]
                    for grp in opt.param_groups:
                        for p in grp["params"]:
                            if p.grad is not None:
                                add(p, f[1](p, grp, _grad(p, inv)))
                else:
                    est, upd = predicted_updates(opt)
                    for p, u in upd.items():
                        add(p, u)
        delta, gain, ss, uu = acc
        if before is not None:
            delta, loss = after - before, before
        m = {"delta": delta, "gain": gain, "loss": loss, "estimate": est, "ss": ss, "uu": uu, "gradient": how}
        if dirs:
            m["deltas"], m["dirs"] = accd, dirs
        return m, sg, use

    def _checked_measure(self, opt, step):
        """_measure's result, None (no gradient this step) or "found_inf"; raises Refusal where
        the updates cannot be checked."""
        if self.info is None:
            raise Refusal("no forward of a model was seen before the first optimizer step, so updates "
                          "cannot be checked")
        if not any(p.grad is not None for g in opt.param_groups for p in g["params"]):
            return None
        if self.rt.zero_partitions(self._params(opt)):
            # the probe's backward would not reach the partitions (delta 0: every update let
            # through unchecked) and would break ZeRO's gradient reduction: refuse
            raise Refusal("the optimizer steps DeepSpeed ZeRO's flat partitions, which the probe's gradient "
                          "cannot reach: updates cannot be checked; " + ZERO_HINT)
        if found_inf(opt):
            return "found_inf"
        try:
            return self._measure(opt, step)
        except Exception as e:  # updates would go through unchecked: say so
            raise Refusal("probe '%s' failed: %s: %s" % (self.probe.name, type(e).__name__, e)) from e

    def pre(self, opt, step, record):
        if self.stashed is not None or self.lrs is not None or self.shrink is not None:
            self.shrink = None  # the last step raised before its post hook: nothing to correct
            self.post(opt, step, record)  # put the gradients and lrs back
        if self.dead or step % self.cfg["every"] != 0:
            return
        # what may fail on one rank (the probe's data) is agreed before the agree() of the
        # decision: every rank stops here, or none does
        ok, got = self.rt.together("gate", self._checked_measure, opt, step)
        if not ok:
            self.dead = True
            return
        if got is None:
            return
        if got == "found_inf":  # GradScaler found inf/NaN: the fused optimizer skips this step itself
            record["gate"] = {"found_inf": True, "action": "none"}
            return
        m, sg, use = got
        tol, ratio = self.cfg["tolerance"], self.cfg["ratio"]
        # One decision for all ranks: the largest rise against the smallest gain.
        delta, gain = agree(m["delta"], "max"), agree(m["gain"], "min")
        limit = tol + ratio * max(gain, 0.0)
        decision = "allow"
        info = {"delta": delta, "gain": gain, "limit": limit, "loss": m["loss"], "mode": self.cfg["mode"],
                "estimate": m["estimate"]}
        if m["gradient"] is not None:
            info["gradient"] = m["gradient"]
        if use is not None:
            info["age"] = use.age
        over = delta > limit
        if "deltas" in m:
            # a cached subspace of K directions: each slice of the probe may rise by its share of
            # the limit (so their sum, the probe's loss, by at most the limit)
            deltas = agree(list(m["deltas"]), "max")
            lim_j = limit / len(deltas)
            over = over or any(d > lim_j for d in deltas)
        if over:
            decision = self.cfg["action"]
            if decision == "shrink" and not m["ss"] > 0:
                decision = "scale"  # no safety direction to take out (exact mode only)
            if decision == "shrink" and "deltas" in m:
                G = use.gram.get("gate")
                if G is None:
                    G = use.gram["gate"] = _gram(m["dirs"])
                G = agree([x for row in G for x in row], "mean")  # the same coefficients on every rank
                k = len(deltas)
                G = [G[i * k:(i + 1) * k] for i in range(k)]
                cs = gradient.cone(G, [lim_j - d for d in deltas])
                info["coefs"] = cs
                info["active"] = sum(1 for c in cs if c > 0)
                nn = sum(cs[i] * cs[j] * G[i][j] for i in range(k) for j in range(k))
                info["norm_ratio"] = (max(nn, 0.0) ** 0.5) / m["uu"] ** 0.5 if m["uu"] > 0 else None
                self.shrink = [(c, list(d.items())) for c, d in zip(cs, m["dirs"]) if c > 0]
            elif decision == "shrink":
                m["ss"] = agree(m["ss"], "mean")  # the same coefficient on every rank
                c = (delta - limit) / m["ss"]
                info["coef"] = c
                info["norm_ratio"] = c * m["ss"] ** 0.5 / m["uu"] ** 0.5 if m["uu"] > 0 else None
                self.shrink = [(c, list(sg.items()))]
            elif decision == "skip":
                self.stashed = []
                for g in opt.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            self.stashed.append((p, p.grad))
                            p.grad = None
            else:
                s = max(0.0, limit / delta)
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
            extra = {"tolerance": tol, "ratio": ratio, "probe": self.probe.name, "streak": self.streak}
            if self.streak >= STALL and self.streak & (self.streak - 1) == 0:
                # Skipping leaves the optimizer's momentum as it was: when that momentum points
                # against the probe, every later update is skipped too and training stands still.
                extra["stalled"] = True
                debug("gate: %d updates in a row skipped: training is not moving" % self.streak)
            self.rt.audit("gate", dict(info, **extra), step=step)
            debug("gate: step %d %s (delta %.3g > limit %.3g)" % (step, decision, delta, limit))

    def post(self, opt, step, record):
        if self.shrink is not None:
            parts = self.shrink
            self.shrink = None
            with torch.no_grad():
                for c, pairs in parts:
                    for p, s in pairs:
                        if s.dtype == p.dtype:
                            p.add_(s, alpha=-c)
                        else:
                            p.add_((s.double() * -c).to(p.dtype))
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
    rt.add_pre(g.pre, order=registry.order("gate"))
    rt.add_post(g.post, order=registry.order("gate"))
