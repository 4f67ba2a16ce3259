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
        self.signals = {}  # (id(probe), loss kind, id(model)) -> Signal: the cached signal across steps
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

    def invalidate(self, reason="invalidated"):
        """Drop every cached gradient (the weights moved in a way the step number does not show:
        a rollback, a state dict loaded by hand): the per-step entries go, and every cached
        signal refreshes at its next step, its record saying REASON."""
        self.cache.clear()
        for sig in self.signals.values():
            sig.invalidate(reason)

    def signal(self, probe, model, loss="ce", every=1, drift=None, drift_rows=8, directions=1, rows=None):
        """The cached safety signal of (PROBE, LOSS, MODEL) across steps (see Signal), made at
        the first call; later calls return the same one with the settings given."""
        if loss not in LOSSES:
            raise ValueError("safety loss must be one of %s, got %r" % (", ".join(LOSSES), loss))
        key = (id(probe), loss, id(model))
        sig = self.signals.get(key)
        if sig is None or sig.probe is not probe or sig.model is not model:
            sig = self.signals[key] = Signal(self, probe, model, loss)
        sig.configure(every, drift, drift_rows, directions, rows)
        return sig

    def current(self, probe, model, step, loss="ce"):
        """The Use that the signal of (PROBE, LOSS, MODEL) decided for STEP (fresh or cached),
        or None when no feature asked for a signal at this step: the gate follows SafeGrad's."""
        sig = self.signals.get((id(probe), loss, id(model)))
        if sig is None or sig.probe is not probe or sig.model is not model:
            return None
        return sig.decided(step)

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

    def _compute(self, probe, model, params, loss, slices=1, terms=None):
        """(loss, [grad or None per param]); with SLICES > 1, (loss, total, [slice gradients]):
        the probe's batch terms dealt round-robin into SLICES parts, each part's gradient
        (a tensor of zeros where a part does not reach a tensor that another does), and their
        sum. Fewer parts come back when the probe has fewer terms."""
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
        parts = [[None] * len(params) for _ in range(max(1, slices))]
        used = 0
        try:
            with eval_mode(model), torch.enable_grad():
                for i, term in enumerate(terms() if terms is not None else self.loss_terms(probe, model, loss)):
                    term.backward()
                    total += float(term.detach())
                    if slices > 1:
                        j = i % slices
                        used = max(used, j + 1)
                        with torch.no_grad():
                            for n, p in enumerate(params):
                                if p.grad is None:
                                    continue
                                if parts[j][n] is None:
                                    parts[j][n] = _empty_like(p.grad)
                                    parts[j][n].copy_(p.grad)
                                else:
                                    parts[j][n].add_(p.grad)
                                p.grad.zero_()
            out = []
            with torch.no_grad():
                if slices <= 1:
                    for p in params:
                        if p.grad is None:
                            out.append(None)
                            continue
                        g = _empty_like(p.grad)
                        g.copy_(p.grad)
                        out.append(g)
                else:
                    parts = parts[:max(used, 1)]
                    for n in range(len(params)):
                        have = [q[n] for q in parts if q[n] is not None]
                        if not have:
                            out.append(None)
                            continue
                        g = _empty_like(have[0])
                        g.zero_()
                        for q in parts:
                            if q[n] is None:
                                q[n] = torch.zeros_like(have[0], memory_format=torch.contiguous_format)
                            g.add_(q[n])
                        out.append(g)
        finally:
            for p in every:
                if id(p) in had:
                    p.grad.copy_(self.stash[id(p)][1])
                elif p.grad is not None:
                    p.grad = None  # it had none before the safety backward: back to none
        if slices <= 1:
            return total, out
        return total, out, parts

    def slice_terms(self, probe, model, lo, n):
        """Yield differentiable terms whose sum is the probe's token-mean cross-entropy on N of its
        rows from row LO on (wrapping around; for a contrastive probe, safe minus harmful on
        those rows), one batch of ``batch_size`` rows each."""
        from .batch import pad_batch
        dev = next(model.parameters()).device
        sets = probe._sets()
        total = len(sets[0][1])
        idx = [(lo + i) % total for i in range(min(n, total))]
        bs = probe.cfg["batch_size"]
        for sign, seqs in sets:
            sub = [seqs[i] for i in idx]
            ntok = sum(len([l for l in q[1][1:] if l != -100]) for q in sub)
            for i in range(0, len(sub), bs):
                ids, mask, labels = pad_batch(sub[i:i + bs], 0, dev)
                yield probe._summed_ce(model, (ids, labels, mask)) * (sign / max(ntok, 1))

    def drift_loss(self, probe, model, rows, loss="ce"):
        """The probe's token-mean cross-entropy on its first ROWS rows (a callable probe: its
        loss), no gradients, eval mode: the signal's drift check."""
        import torch
        import torch.nn.functional as F
        with eval_mode(model), torch.no_grad():
            if probe.cfg.get("callable"):
                return float(probe.loss(model))
            batches, _ = probe.safe_batches(next(model.parameters()).device)
            tot, ntok, left = 0.0, 0, rows
            for ids, labels, mask in batches:
                if left <= 0:
                    break
                ids, labels, mask = ids[:left], labels[:left], mask[:left]
                left -= ids.shape[0]
                out = model(input_ids=ids, attention_mask=mask)
                logits = out.logits if hasattr(out, "logits") else out[0]
                lb = labels[:, 1:].reshape(-1)
                tot += float(F.cross_entropy(at_least_float32(logits[:, :-1].reshape(-1, logits.size(-1))), lb,
                                             ignore_index=-100, reduction="sum"))
                ntok += int((lb != -100).sum())
            return tot / max(ntok, 1)


class Use:
    """What the signal gave one step: ``grads`` (the probe loss's gradient, one tensor or None
    per parameter), ``directions`` (K lists of slice gradients whose sum is ``grads``; None
    when K is 1), ``fresh`` (computed at this step), ``age`` (steps since it was computed),
    ``reason`` (why it was computed: "first", "every", "drift", "params", "rollback",
    "invalidated", "agreed": another rank's reason), ``loss`` (the probe loss where it was
    computed), ``drift`` (the drift check's rise, when it ran), and ``gram`` (a dict the
    projection keeps its Gram matrices in, one per set of directions)."""
    __slots__ = ("step", "done", "grads", "directions", "fresh", "age", "oldest", "reason", "loss", "drift", "gram",
                 "params")

    def record(self):
        """The step record's ``safety`` field: which gradient the projection and the gate used."""
        r = {"fresh": self.fresh, "age": self.age, "directions": 1 if self.directions is None else len(self.directions)}
        if self.oldest != self.age:
            r["oldest"] = self.oldest
        if self.reason:
            r["reason"] = self.reason
        if self.drift is not None:
            r["drift"] = self.drift
        return r


FULL = ("first", "params", "rollback", "invalidated", "moved_without_step", "drift")


class Signal:
    """The safety signal of one (probe, loss, model) across steps: the probe loss's gradient
    (optionally as K directions: the cached safety subspace) computed at one step and used by
    SafeGrad's projection and the gate until a refresh is due:

    * ``every`` K steps after the last computation (K = 1: every step, as before);
    * earlier when ``drift`` is set and the drift check fires: the probe's cross-entropy on its
      first ``drift_rows`` rows (one no-grad forward of those rows at each step in between)
      has risen by more than ``drift`` since the last computation;
    * at once after ``invalidate()`` (a rollback), when the parameters asked for are not those
      it holds, or at the first step.

    What a refresh computes. ``rows`` None (all the probe): the whole probe, dealt round-robin
    into ``directions`` slices by batch (the directions: their gradients; their sum: the
    probe loss's gradient). ``rows`` R: the probe is read R rows at a time, in rotation: a
    refresh computes the gradient of the next R rows (their token-mean loss) and it replaces
    the oldest of the ``directions`` held (a ring); the signal's gradient is the mean of those
    held. The first refresh, and one after a drift, a rollback or a change of parameters, fills
    the whole ring (``directions`` x R rows).

    One decision for all ranks: the refresh (and whether it fills the ring) is agreed before
    anything is computed, and DDP replicas take rank 0's directions (one broadcast per
    refresh), so that every rank holds the same cached directions and projects with the same
    numbers. FSDP2 shards hold their own shard of each direction (DTensor), computed together."""

    def __init__(self, owner, probe, model, loss):
        self.owner, self.probe, self.model, self.loss_kind = owner, probe, model, loss
        self.every, self.drift, self.drift_rows, self.k, self.rows = 1, None, 8, 1, None
        self.step = None      # the step the newest direction was computed at
        self.grads = {}       # id(p) -> (p, gradient)
        self.held = {}        # id(p) -> p: the parameters it was computed for
        self.dirs = None      # K dicts id(p) -> (p, direction), or None
        self.ring = []        # rows mode: [(step, first row, {id(p): (p, gradient of those rows)})], oldest first
        self.next_row = 0
        self.loss = None
        self.ref = None       # the drift rows' loss where it was computed
        self.invalid = "first"
        self.last = None      # the Use of the last step decided
        self.gram = {}
        self.counts = {"fresh": 0, "cached": 0, "drift_checks": 0, "rows": 0}
        self._together = None  # during at(): the runtime's together (see _run)

    def configure(self, every, drift, drift_rows, directions, rows=None):
        every, directions = int(every), int(directions)
        if every < 1 or directions < 1 or int(drift_rows) < 1 or (rows is not None and int(rows) < 1):
            raise ValueError("refresh every, drift rows, rows and directions must be >= 1")
        if drift is not None and not float(drift) >= 0:
            raise ValueError("the drift bound must be >= 0")
        if rows is not None and (self.loss_kind != "ce" or self.probe.cfg.get("callable")):
            raise ValueError("rows (a rotating slice of the probe) needs loss 'ce' and a probe with data")
        if rows is not None:
            rows = int(rows)
            if rows >= len(self.probe.examples()):
                rows = None  # the whole probe at every refresh
        if directions != self.k or rows != self.rows:
            self.invalid = self.invalid or "params"
        self.every, self.drift, self.drift_rows, self.k, self.rows = every, drift, int(drift_rows), directions, rows

    def invalidate(self, reason="invalidated"):
        self.invalid = reason
        self.last = None

    def decided(self, step):
        """The Use of STEP when this step was decided (by at()), else None."""
        u = self.last
        if u is None or u.step != step or u.done != _steps_done(step):
            return None
        return u

    def _run(self, fn, *args, **kwargs):
        """fn(*args): work that may fail on one rank only (the probe's data, a forward), done
        between this signal's collectives. With TOGETHER (at()), its failure is agreed at once,
        so that no rank waits in a broadcast that another never reaches; under warn every rank
        then raises Refusal here."""
        if self._together is None:
            return fn(*args, **kwargs)
        ok, out = self._together(fn, *args, **kwargs)
        if not ok:
            from ..runtime.context import Refusal
            raise Refusal("the safety signal could not be computed on every rank (said above)")
        return out

    def at(self, params, step, agree=None, broadcast=None, together=None):
        """The Use for optimizer step STEP (a pre-step hook's step) and PARAMS. AGREE(value, op)
        reduces a decision over the ranks (rt.agree); BROADCAST(tensors) makes every rank hold
        rank 0's tensors (DDP replicas), or None; TOGETHER(fn, *args) -> (ok, result) runs the
        work that may fail on one rank and agrees on its failure (rt.together), or None."""
        self._together = together
        try:
            return self._at(params, step, agree, broadcast)
        finally:
            self._together = None

    def _at(self, params, step, agree, broadcast):
        params = list(params)
        done = _steps_done(step)
        u = self.last
        if u is not None and u.step == step and u.done == done and u.params == [id(p) for p in params]:
            return u  # decided already at this step
        reason, rise = self.invalid, None
        if reason is None and any(self.held.get(id(p)) is not p for p in params):
            reason = "params"
        if reason is None and step - self.step >= self.every:
            reason = "every"
        # the same collectives on every rank, in the same order: the refresh first (2: fill
        # everything, 1: the next slice), then, when none is due anywhere, the drift check
        need = 0 if reason is None else (2 if reason in FULL else 1)
        if agree is not None:
            got = int(agree(need, "max"))
            if got != need:
                reason = reason or "agreed"  # another rank's reason (or a fuller refresh than ours)
            need = got
        if need == 0 and self.drift is not None and self.ref is not None:
            rise = self._run(self.owner.drift_loss, self.probe, self.model, self.drift_rows, self.loss_kind) - self.ref
            self.counts["drift_checks"] += 1
            if agree is not None:
                rise = agree(rise, "max")
            if rise > float(self.drift):
                need, reason = 2, "drift"
        fresh = need > 0
        if fresh:
            self._refresh(params, step, broadcast, full=need == 2)
            self.counts["fresh"] += 1
        else:
            self.counts["cached"] += 1
        u = Use()
        u.step, u.done, u.fresh, u.reason, u.loss, u.drift = step, done, fresh, reason, self.loss, rise
        u.age = step - self.step
        u.oldest = step - self.ring[0][0] if self.ring else u.age
        u.params = [id(p) for p in params]
        u.grads = [self.grads[id(p)][1] if id(p) in self.grads else None for p in params]
        u.directions = None if self.dirs is None else \
            [[d[id(p)][1] if id(p) in d else None for p in params] for d in self.dirs]
        u.gram = self.gram
        self.last = u
        return u

    def _refresh(self, params, step, broadcast, full):
        if self.rows is not None:
            return self._refresh_rows(params, step, broadcast, full)
        self.grads, self.dirs, self.gram, self.held = {}, None, {}, {}  # the old tensors go first
        if self.k > 1:
            loss, total, parts = self._run(self.owner._compute, self.probe, self.model, params, self.loss_kind,
                                           self.k)
            self.owner.counts["computed"] += 1
        else:  # through the step's cache: a gradient another feature computed at these weights serves
            loss, total = self._run(self.owner.get, self.probe, self.model, params, step, self.loss_kind)
            parts = None
        if broadcast is not None:
            flat = [t for t in total if t is not None]
            for q in parts or ():
                flat += [t for t in q if t is not None]
            broadcast(flat)
            loss = agree_loss(loss, broadcast)
        self.grads = {id(p): (p, g) for p, g in zip(params, total) if g is not None}
        self.held = {id(p): p for p in params}
        self.counts["rows"] += len(self.probe.examples())
        if parts is not None and len(parts) > 1:
            self.dirs = [{id(p): (p, g) for p, g in zip(params, q) if g is not None} for q in parts]
        self.loss, self.step, self.invalid = loss, step, None
        self._set_ref(broadcast)

    def _refresh_rows(self, params, step, broadcast, full):
        import torch
        n = len(self.probe.examples())
        if full or len(self.ring) != self.k:
            self.ring = []
        self.grads, self.dirs, self.gram, self.held = {}, None, {}, {}
        todo = self.k if not self.ring else 1
        losses = []
        for _ in range(todo):
            lo = self.next_row
            self.next_row = (lo + self.rows) % n
            loss, g = self._run(self.owner._compute, self.probe, self.model, params, "ce", 1,
                                terms=lambda lo=lo: self.owner.slice_terms(self.probe, self.model, lo, self.rows))
            self.owner.counts["computed"] += 1
            self.counts["rows"] += self.rows
            if broadcast is not None:
                broadcast([t for t in g if t is not None])
                loss = agree_loss(loss, broadcast)
            if len(self.ring) == self.k:
                self.ring.pop(0)  # the oldest goes first
            self.ring.append((step, lo, {id(p): (p, t) for p, t in zip(params, g) if t is not None}, loss))
            losses.append(loss)
        k = len(self.ring)
        # the signal: the mean of the held slices' gradients (each slice's own token-mean
        # loss); the directions: their parts of it (each divided by k), so that they sum to it
        with torch.no_grad():
            for p in params:
                have = [r[2][id(p)][1] for r in self.ring if id(p) in r[2]]
                if not have:
                    continue
                tot = torch.zeros_like(have[0], memory_format=torch.contiguous_format)
                for t in have:
                    tot.add_(t)
                self.grads[id(p)] = (p, tot.div_(k))
            if k > 1:
                self.dirs = []
                for r in self.ring:
                    d = {}
                    for p in params:
                        t = r[2].get(id(p))
                        if t is not None:
                            d[id(p)] = (p, t[1] / k)
                        elif id(p) in self.grads:
                            d[id(p)] = (p, torch.zeros_like(self.grads[id(p)][1]))
                    self.dirs.append(d)
        self.held = {id(p): p for p in params}
        self.loss = sum(r[3] for r in self.ring) / k
        self.step, self.invalid = step, None
        self._set_ref(broadcast)

    def _set_ref(self, broadcast):
        self.ref = self._run(self.owner.drift_loss, self.probe, self.model, self.drift_rows, self.loss_kind) \
            if self.drift is not None else None
        if broadcast is not None and self.ref is not None:
            self.ref = agree_loss(self.ref, broadcast)


def agree_loss(value, broadcast):
    """VALUE as rank 0 has it (through BROADCAST, a tensor broadcast)."""
    import torch
    t = torch.tensor([float(value)], dtype=torch.float64)
    broadcast([t])
    return float(t[0])


def cone(G, a, tol=1e-12):
    """lam >= 0 minimizing 1/2 lam^T G lam + a^T lam (G: a K x K Gram matrix as nested lists,
    a: K floats), by the active-set method of Lawson and Hanson (Solving Least Squares
    Problems, 1974, ch. 23) on the Gram matrix, in float64: exact up to rounding, at most a few
    K steps. These are the Karush-Kuhn-Tucker multipliers of the nearest point to x in the cone
    {x': <x', s_j> >= 0 for all j} when a_j = <x, s_j>: x' = x + sum_j lam_j s_j. Directions
    that are linearly dependent (G singular) are solved by least squares; the point x' is
    unique even where lam is not."""
    import torch
    k = len(a)
    Gt = torch.tensor(G, dtype=torch.float64).reshape(k, k)
    at = torch.tensor(a, dtype=torch.float64)
    scale = float(Gt.diagonal().abs().max()) if k else 0.0
    lam = torch.zeros(k, dtype=torch.float64)
    if not scale > 0 or not bool(torch.isfinite(Gt).all()) or not bool(torch.isfinite(at).all()):
        return lam.tolist()
    eps = tol * scale * max(1.0, float(at.abs().max()) / scale)
    free = []
    for _ in range(3 * k + 3):
        w = -(Gt @ lam + at)  # minus the gradient in the multipliers
        cand = [j for j in range(k) if j not in free and float(w[j]) > eps]
        if not cand:
            break
        free.append(max(cand, key=lambda j: float(w[j])))
        for _ in range(3 * k + 3):
            idx = torch.tensor(free)
            z = torch.zeros(k, dtype=torch.float64)
            z[idx] = torch.linalg.lstsq(Gt[idx][:, idx], -at[idx].unsqueeze(1)).solution.squeeze(1)
            if all(float(z[j]) > 0 for j in free):
                lam = z
                break
            # step from lam toward z until the first free multiplier reaches 0, and drop it
            steps = [float(lam[j] / (lam[j] - z[j])) for j in free if float(z[j]) <= 0 and float(lam[j] - z[j]) > 0]
            alpha = min(steps) if steps else 0.0
            lam = lam + alpha * (z - lam)
            top = float(lam.abs().max())
            free = [j for j in free if float(lam[j]) > 1e-14 * top and not (float(z[j]) <= 0 and
                                                                           float(lam[j] - z[j]) <= 0)]
            keep = torch.zeros(k, dtype=torch.bool)
            if free:
                keep[torch.tensor(free)] = True
            lam = torch.where(keep, lam, torch.zeros_like(lam))
            if not free:
                break
    return [max(0.0, float(x)) for x in lam]


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
