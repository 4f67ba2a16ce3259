"""What shaping does at the optimizer step (its pre-step callable, order 15: before SafeGrad, so
that a subtracted row is not projected): recalibration, the stream check, and action
"subtract". A mixin of the Shaping class.

subtract: with K training forwards since the last step, forward j of n_j response tokens whose
flagged rows F_j have summed cross-entropy CE(F_j), the gradient the optimizer gets loses

    c = (1/W) sum_ranks (1/K) sum_j grad CE(F_j) / n_j

the flagged rows' share of the loss as the training loss counted it (a forward's mean over its
tokens, averaged over the accumulated forwards, and under DDP over the W ranks: the shares are
summed with one all_reduce and divided by W, so every replica subtracts the same c).
"""
import torch

from ...runtime.stacks import world
from .guards import IN_FORWARD, _logits
from .stats import _r


class Actions:
    """The pre-step callable and the subtraction (a mixin of Shaping)."""

    def pre_step(self, opt, step, record):
        self.step = step
        every = int(self.cfg.get("recalibrate_every") or 0)
        if every and step % every == 0 and self.root is not None and not self.failed \
                and self.scorer is None and any(g in self.guards for g in IN_FORWARD):
            try:
                self.counts["recalibrated"] = self._recalibrate()
            except Exception as e:
                self._fail("step %d: cannot recalibrate: %s: %s" % (step, type(e).__name__, e))
        if every and step % every == 0 and self.checked and not self.failed:
            rep = self._stream_check()
            self.counts["stream"] = dict((g, "suspended" if c["suspended"] else c["threshold"]) for g, c in rep.items())
            self.counts["harmful_fraction"] = _r(self._harmful_fraction())
        if not self.failed:
            self._check_fraction()
        if self.action == "subtract" and not self.failed:
            self._subtract_step(opt, step)
        if not self.failed:
            self._rehearse_step(opt, step)
        self.micro = 0
        for k in self.totals:
            self.totals[k] += self.counts[k]
        record["shaping"] = dict(self.counts)
        self._reset()

    def _stash(self, bt):
        rows = [r for r in bt.rows if bt.decided.get(r[0]) is not None and bt.decided[r[0]].flagged]
        if not rows:
            return
        idx = torch.tensor([r[0] for r in rows], device=bt.ids.device)
        lab = bt.labels if bt.labels is not None else self._labels_from_spans(bt.ids, bt.rows)
        mask = bt.mask[idx].detach().clone() if bt.mask is not None else None
        ntok = sum(int((lab[r[0], 1:] != -100).sum()) for r in rows)
        self.pending_sub.append((bt.ids[idx].detach().clone(), mask, lab[idx].detach().clone(), bt.ntok, ntok))

    def _subtract_step(self, opt, step):
        """Remove the flagged rows' share of the gradient the optimizer is about to use. Each
        rank's share is its flagged rows' loss as the training loss counted it: a forward's mean
        over its batch's tokens, averaged over the K training forwards since the last step
        (gradient accumulation). Under DDP the gradient is the mean over the W ranks, so is the
        correction: the ranks' shares are summed (one all_reduce) and divided by W, and every
        replica subtracts the same tensor. Every rank takes part when any rank has rows."""
        _, n = world()
        pending = bool(self.pending_sub)
        if n > 1:
            pending = self.rt.agree(pending, "any")
        if not pending:
            return
        ok, got = self.rt.together("shaping: step %d: cannot subtract flagged rows" % step, self._shares, opt)
        self.pending_sub = []
        if not ok:
            self.failed = True
            return
        add_to_grads(*got, n, sign=-1)

    def _shares(self, opt):
        """(parameters with a gradient, this rank's share of each: see _subtract_step)."""
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        shares = [torch.zeros_like(p.grad, dtype=torch.float32 if p.grad.dtype in (torch.float16, torch.bfloat16)
                                   else p.grad.dtype) for p in params]
        k = max(self.micro, 1)
        root = self.root
        self.busy = True
        try:
            with torch.enable_grad():
                for ids, mask, labels, ntok, nflag in self.pending_sub:
                    kw = {"input_ids": ids}
                    if mask is not None:
                        kw["attention_mask"] = mask
                    lg = _logits(root(**kw))[:, :-1].float()
                    lb = labels[:, 1:]
                    loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1),
                                                             ignore_index=-100, reduction="sum")
                    loss = loss / (max(ntok, 1) * k)
                    gs = torch.autograd.grad(loss, params, allow_unused=True)
                    with torch.no_grad():
                        for acc, g in zip(shares, gs):
                            if g is not None:
                                acc.add_(g.to(acc.dtype))
                    self.counts["masked_tokens"] += nflag
        finally:
            self.busy = False
        return params, shares


def add_to_grads(params, grads, n, sign=1):
    """p.grad += sign * g for each parameter and this rank's GRADS, the GRADS first averaged over
    the world when N > 1 ranks train: the subtract action's shares, the rehearsal's gradients."""
    import torch
    if n > 1:
        _mean_over_ranks(grads)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.grad.add_(g.to(p.grad.dtype), alpha=sign)


def _mean_over_ranks(tensors):
    """TENSORS (this rank's) replaced in place by their mean over the world: one all_reduce per
    dtype and device, on flattened copies."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    by = {}
    for t in tensors:
        by.setdefault((t.dtype, t.device), []).append(t)
    n = dist.get_world_size()
    for ts in by.values():
        flat = _flatten_dense_tensors(ts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= n
        for t, v in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(v)
