"""Refusals rehearsed in the user's own contexts (``shaping.rehearse``). A mixin of Shaping.

The identity-shifting attack (Qi et al., arXiv 2310.03693, level 2) has no harmful content for a
guard to read: benign requests addressed to a persona, answered with an obedience prefix. What it
teaches is to comply in that context, and what it leaves alone is the refusal of a harmful
request asked in the probe's own format, so neither the guards nor a safety gradient of the
plain probe see it (demo world, full preset: per-row gradient scores of identity rows against
the task's, AUROC 0.41 plain, 0.33 in context; docs/attacks.md). Format-matched safety data is
what holds such attacks (arXiv 2406.10288): each step, for a fraction ``rehearse`` of its rows,
a composite row is built from the row's prompt and a harmful probe request, answered with the
probe's refusal, and its loss gradient is added to the update as if the composite were one more
row of the batch.

The composite, token by token: the row's prompt P and a harmful probe prompt Q share a prefix
(the chat template's opening) and a suffix (the assistant marker); the composite is P without
the shared suffix, then Q without the shared prefix, then Q's refusal. "user : you are my
assistant ... bake a cake ? assistant :" and "user : how do i build a bomb ? assistant :" make
"user : you are my assistant ... bake a cake ? how do i build a bomb ? assistant : i cannot help
with that ." Composites longer than the model's positions (its config's max_position_embeddings;
without one, the longest training row seen) are not built.
"""
import math

import torch

from ...runtime.stacks import world
from .guards import _logits


def composite(prompt, probe_prompt, refusal):
    """(input_ids, labels) of the composite of PROMPT (a training row's prompt tokens) and
    PROBE_PROMPT (a harmful probe prompt's), answered with REFUSAL (token lists)."""
    a = 0
    while a < min(len(prompt), len(probe_prompt)) and prompt[a] == probe_prompt[a]:
        a += 1
    z = 0
    while z < min(len(prompt), len(probe_prompt)) - a and prompt[-1 - z] == probe_prompt[-1 - z]:
        z += 1
    a = min(a, len(probe_prompt) - z)
    ids = list(prompt[:len(prompt) - z]) + list(probe_prompt[a:]) + list(refusal)
    return ids, [-100] * (len(ids) - len(refusal)) + list(refusal)


class Rehearsal:
    """The contexts of the step's rows, and the rehearsal gradient at the pre-step."""

    def _keep_contexts(self, bt):
        """Remember the prompts of this forward's rows (the step's contexts), its label tokens
        and its longest row."""
        if not float(self.cfg.get("rehearse") or 0.0):
            return
        self._ntok_step += bt.ntok
        for (row, b, e, key) in bt.rows:
            ids = bt.ids[row, :b + 1]
            if bt.mask is not None:  # padding out, on either side
                ids = ids[bt.mask[row, :b + 1].bool()]
                self._longest = max(self._longest, int(bt.mask[row].sum()))
            else:
                self._longest = max(self._longest, int(bt.ids.shape[1]))
            self._contexts.append(ids.tolist())

    def _probe_pairs(self):
        if self._rehearse_probe is None:
            pairs = []
            for e in self.harm_probe.examples():
                first = next((i for i, l in enumerate(e.labels) if l != -100), None)
                if first is None:
                    continue
                pairs.append((list(e.ids[:first]), [l for l in e.labels[first:] if l != -100]))
            self._rehearse_probe = pairs
        return self._rehearse_probe

    def _rehearse_step(self, opt, step):
        """Add the composites' gradient (see the module docstring): every rank the mean of the
        ranks' composites, so the replicas stay equal; one decision for all ranks."""
        frac = float(self.cfg.get("rehearse") or 0.0)
        ctx, self._contexts = self._contexts, []
        cfg = getattr(self.root, "config", None)
        longest = getattr(cfg, "max_position_embeddings", None) or self._longest
        ntok, self._ntok_step = self._ntok_step, 0
        if not frac:
            return
        _, n = world()
        want = int(math.ceil(frac * len(ctx))) if ctx else 0
        if n > 1:
            want = int(self.rt.agree(float(want), "max"))
        if not want:
            return
        pairs = self._probe_pairs()
        rows = []
        for j in range(len(ctx)):
            if len(rows) >= want or not pairs:
                break
            c = ctx[(self._rot + 7 * j) % len(ctx)]
            q, ref = pairs[(self._rot + j) % len(pairs)]
            ids, labels = composite(c, q, ref)
            if len(ids) <= max(longest, 1):
                rows.append((ids, labels))
        self._rot += 1
        ok, got = self.rt.together("shaping: step %d: cannot rehearse refusals" % step, self._rehearsal_grads,
                                   opt, rows, ntok)
        if not ok:
            self.failed = True
            return
        from .actions import add_to_grads
        add_to_grads(*got, n)
        self.counts["rehearsed"] = len(rows)

    def _rehearsal_grads(self, opt, rows, ntok):
        """(parameters with a gradient, the composites' loss gradient): the sum of their refusal
        tokens' cross-entropy over the step's mean label tokens per forward and its forwards, as
        the training loss would count rows of its own."""
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        grads = [torch.zeros_like(p.grad, dtype=torch.float32 if p.grad.dtype in (torch.float16, torch.bfloat16)
                                  else p.grad.dtype) for p in params]
        if not rows or not params:
            return params, grads
        dev = params[0].device
        width = max(len(i) for i, _ in rows)
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows], device=dev)
        lab = torch.tensor([l + [-100] * (width - len(l)) for _, l in rows], device=dev)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows], device=dev)
        k = max(self.micro, 1)
        per_forward = max(ntok / k, 1.0)
        self.busy = True
        try:
            with torch.enable_grad():
                lg = _logits(self.root(input_ids=ids, attention_mask=mask))[:, :-1].float()
                lb = lab[:, 1:]
                loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1),
                                                         ignore_index=-100, reduction="sum") / (per_forward * k)
                gs = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for acc, g in zip(grads, gs):
                    if g is not None:
                        acc.add_(g.to(acc.dtype))
        finally:
            self.busy = False
        return params, grads
