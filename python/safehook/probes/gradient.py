"""The one safety gradient of a step: the gradient of a probe's safety loss at the current
weights, computed at most once per optimizer step and shared by every feature that asks for it
(SafeGrad's ``probe`` source, the gate, shaping's ``gradient`` guard).

    from safehook.probes import gradient
    loss, grads = gradient.of(rt).get(probe, model, params, step, loss="ce")

* ``probe``: a ``safehook.probes.Probe``; ``model``: the unwrapped root module (the context's
  ``ModelInfo.root``); ``params``: the tensors whose gradient you need (for a pre-step feature,
  the optimizer's parameters that have a ``.grad``); ``step``: the optimizer step the gradient
  is for (the pre-step hooks' ``step``), or None when the caller does not know it (a forward
  hook): then the cached entry is used if the weights have not moved since it was computed.
* ``loss``: ``"ce"`` (the probe's own loss: token-mean cross-entropy of its responses, or the
  contrastive loss when the probe says so, or its callable) or ``"kl"`` (KL(p0 || p) on the
  probe's response positions, p0 the model's distribution at the first call, kept as
  log-probabilities, no second model).
* Returns ``(loss as float, [tensor or None per param])``. The tensors are fresh (contiguous,
  the gradients' dtype and device; DTensor shards under FSDP2) and belong to the caller as much
  as to the cache: read them, never write them. None: the loss does not reach that tensor.

The cache (a ``SafetyGradients``, one per runtime: ``of(rt)``; it goes with the runtime, its
tensors and the models it saw with it) keeps one entry per (probe, loss kind, model): the last
computed one. A call hits it
when the weights are those the entry was computed at: no optimizer step has completed since
(the C core's step count; a pre-step hook's ``step`` is the step about to run, so a pre-step
call and a forward-time call before that step agree), the same step number when both calls
give one, the parameters all in the entry (same objects), and their version counters unmoved
(torch bumps a tensor's version on every in-place change except in fused optimizer kernels,
hence the step count as well). Anything else computes anew and replaces the entry. ``stats()``
counts computations and hits; ``set_sharing(False)`` turns every cache off (a setting of the
process, holding nothing: benchmarks compare both; features never call it).

How it is computed: the task gradients in ``.grad`` are set aside (copied, the tensors kept:
DDP's bucket views stay valid), the model runs in eval mode, and the safety loss is
backpropagated batch by batch into ``.grad`` (so memory holds the graph of one probe batch, not
of the whole probe; FSDP2 reduce-scatters each backward and sums into the sharded grads, and a
DDP model is run through its inner module, so nothing is all-reduced); the safety gradients are
copied out and the task gradients copied back. The loss is divided by the probe's total count of
scored tokens, so the sum over batches is the loss of the whole set.

For the shaping helper's ``gradient`` guard (GradShield-style <g_i, g_safety>): call
``of(rt).get(probe, info.root, params, step=None)`` where you score examples (a forward
pre-hook on the model, at an example's first sighting), with ``params`` the trainable
parameters. If a pre-step feature already computed it at these weights you get that one; if you
compute it, SafeGrad and the gate of the next step reuse it. It runs a backward of its own, so
never call it from inside a backward or a gradient hook; ``.grad`` is left as it was.
"""
import contextlib

from .. import _core
from .probe import at_least_float32, eval_mode

_sharing = [True]

LOSSES = ("ce", "kl")


class _Entry:
    __slots__ = ("step", "done", "grads", "versions", "loss", "refs")

    def __init__(self, step, done, loss, params, grads, refs):
        self.step, self.done, self.loss, self.refs = step, done, loss, refs
        self.grads = {id(p): (p, g) for p, g in zip(params, grads)}
        self.versions = {id(p): p._version for p in params}

    def serves(self, params, step, done):
        if done != self.done or (step is not None and self.step is not None and step != self.step):
            return False
        for p in params:
            hit = self.grads.get(id(p))
            if hit is None or hit[0] is not p or self.versions[id(p)] != p._version:
                return False
        return True


class SafetyGradients:
    """The safety gradients of one runtime: the cache of the last one per (probe, loss, model),
    the step-0 log-probabilities of the KL loss, and the buffers the task gradients are set
    aside in (see the module's docstring)."""

    def __init__(self, rt=None):
        self.cache = {}   # (id(probe), loss kind, id(model)) -> _Entry
        self.kl_ref = {}  # (id(probe), id(model)) -> (probe, model, [log-probabilities per batch at step 0])
        self.stash = {}   # id(param) -> (param, buffer): task gradients set aside, reused across calls
        self.counts = {"computed": 0, "shared": 0}

    def get(self, probe, model, params, step=None, loss="ce"):
        """(loss, grads): see the module's docstring."""
        if loss not in LOSSES:
            raise ValueError("safety loss must be one of %s, got %r" % (", ".join(LOSSES), loss))
        params = list(params)
        key = (id(probe), loss, id(model))
        done = _steps_done(step)
        e = self.cache.get(key)
        if _sharing[0] and e is not None and e.refs[0] is probe and e.refs[1] is model \
                and e.serves(params, step, done):
            self.counts["shared"] += 1
            return e.loss, [e.grads[id(p)][1] for p in params]
        self.cache.pop(key, None)  # its tensors go before new ones are made
        value, grads = self._compute(probe, model, params, loss)
        self.counts["computed"] += 1
        if _sharing[0]:
            self.cache[key] = _Entry(step, done, value, params, grads, (probe, model))
        return value, grads

    def invalidate(self):
        """Drop every cached gradient (the weights moved in a way the step number does not show)."""
        self.cache.clear()

    def stats(self):
        """{"computed": n, "shared": m}: safety gradients computed, and requests served from the cache."""
        return dict(self.counts)

    def loss_terms(self, probe, model, loss="ce"):
        """Yield differentiable terms whose sum is the safety loss, one probe batch each (a
        callable probe: one term)."""
        if loss == "ce":
            yield from probe.loss_terms(model)
            return
        import torch
        batches, ntok = probe.safe_batches(next(model.parameters()).device)
        rkey = (id(probe), id(model))
        held = self.kl_ref.get(rkey)
        refs = held[2] if held is not None and held[0] is probe and held[1] is model else None
        first = refs is None
        if first:  # the first call runs before the first update: the step-0 distribution
            refs = []
        for i, (ids, labels, mask) in enumerate(batches):
            out = model(input_ids=ids, attention_mask=mask)
            logits = out.logits if hasattr(out, "logits") else out[0]
            pos = labels[:, 1:] != -100
            logp = torch.log_softmax(at_least_float32(logits[:, :-1][pos]), dim=-1)
            if first:
                refs.append(logp.detach().clone())
                if i == len(batches) - 1:
                    self.kl_ref[rkey] = (probe, model, refs)
            ref = refs[i]
            yield (ref.exp() * (ref - logp)).sum() / max(ntok, 1)

    def _compute(self, probe, model, params, loss):
        import torch
        every = [p for p in model.parameters() if p.requires_grad]
        known = {id(q) for q in every}
        every += [p for p in params if id(p) not in known]  # optimizer params outside the model
        had = set()
        for p in every:
            if p.grad is None:
                continue
            had.add(id(p))
            st = self.stash.get(id(p))
            if st is None or st[0] is not p or st[1].shape != p.grad.shape or st[1].dtype != p.grad.dtype \
                    or st[1].device != p.grad.device:
                st = self.stash[id(p)] = (p, _empty_like(p.grad))
            st[1].copy_(p.grad)
            p.grad.zero_()
        total = 0.0
        try:
            with eval_mode(model), torch.enable_grad():
                for term in self.loss_terms(probe, model, loss):
                    term.backward()
                    total += float(term.detach())
            out = []
            with torch.no_grad():
                for p in params:
                    if p.grad is None:
                        out.append(None)
                        continue
                    g = _empty_like(p.grad)
                    g.copy_(p.grad)
                    out.append(g)
        finally:
            for p in every:
                if id(p) in had:
                    p.grad.copy_(self.stash[id(p)][1])
                elif p.grad is not None:
                    p.grad = None  # it had none before the safety backward: back to none
        return total, out


def of(rt):
    """The SafetyGradients of runtime RT (made at the first call, dropped with RT)."""
    return rt.owned("safety_gradient", SafetyGradients)


def _steps_done(step):
    """Optimizer steps completed so far: inside a step's pre hook (STEP given) the C core has
    already counted the running one."""
    n = _core.stats()["steps"]
    return n - 1 if step is not None and n > 0 else n


def set_sharing(on):
    """Share (the default) or compute every request anew: for benchmarks that measure the cache."""
    _sharing[0] = bool(on)


def _empty_like(t):
    import torch
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@contextlib.contextmanager
def no_sharing():
    """Within the block, every request computes anew (benchmarks and tests)."""
    old = _sharing[0]
    set_sharing(False)
    try:
        yield
    finally:
        set_sharing(old)
