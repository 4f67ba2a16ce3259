"""The shaping guards and their calibration on the probes (see the package docstring for what
each guard computes). A mixin of the Shaping class: it reads ``self.cfg``, ``self.guards``,
``self.harm_probe``, ``self.benign_probe`` and fills ``self.cal`` ({guard: calibrate()'s
thresholds}), ``self.probe_harm`` ({guard: the harmful probe rows' scores}), the direction
(``self.layer``, ``self.direction``), the gradient guard's unit safety gradient ``self.gsafe``
and step ``self.eps``, and the start scorer ``self.scorer``.

Scores, for a row with last prompt token b (higher is more harmful):

* direction: <h_l(b), r>, h_l the output of block l, r a unit direction (a difference of means
  at calibration, Fisher's discriminant once refitted on the stream: see decide.py);
* refusal: log sum_{t in R} softmax(z(b))_t, z the logits and R the first tokens of the harmful
  probe's refusals;
* gradient: -<g_row, g_s>/|g_s| ~ -(L(w + eps u) - L(w - eps u)) / (2 eps), u = g_s/|g_s|, L the
  row's mean response cross-entropy, eps = 1e-3 max(|w|, 1) (a central difference: two no-grad
  forwards through torch.func.functional_call, the weights never edited);
* callable: the user's risk in [0, 1] per response prefix of segment_tokens tokens.
"""
import math

import torch

from ... import probes
from ...runtime.stacks import find_blocks as _block_list
from .stats import auroc, calibrate, fisher_direction, _r

GUARDS = ("direction", "refusal", "gradient", "callable")
IN_FORWARD = ("direction", "refusal")       # scored from a forward of the row itself
STREAM_GUARDS = ("direction", "refusal", "gradient")  # the callable's 0.5 is the user's own scale
RECAL_ROWS = 16  # held-out rows per probe re-scored at a recalibration
REFIT_MIN = 8    # unflagged training rows the direction's refit needs


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    lg = getattr(out, "logits", None)
    if lg is None and isinstance(out, (tuple, list)):
        lg = out[0]
    return lg


def find_blocks(root):
    """The model's transformer blocks (a list; empty without a block list): runtime.stacks'."""
    bl = _block_list(root)
    return bl.modules if bl is not None else []


class Guards:
    """Binding, calibration and the guards' scores (a mixin of Shaping)."""

    def _on_model(self, info):
        try:
            self._bind(info.root)
        except Exception as e:
            self._fail("cannot set up: %s: %s" % (type(e).__name__, e))

    def _bind(self, root):
        self._prepare(root)
        self._install(root)

    def _prepare(self, root):
        """Load what the guards need and calibrate them on the probes (no hook installed)."""
        self.root = root
        cfg = self.cfg
        if cfg.get("tokenizer") or cfg.get("response_marker") or "callable" in self.guards:
            path = cfg.get("tokenizer") or self.harm_probe.cfg.get("tokenizer")
            if not path:
                raise ValueError("'callable' and 'response_marker' need shaping.tokenizer")
            from transformers import AutoTokenizer
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            if cfg.get("response_marker"):
                self.marker = list(self.tok(cfg["response_marker"], add_special_tokens=False)["input_ids"])
                if not self.marker:
                    raise ValueError("shaping.response_marker encodes to no tokens")
        if cfg.get("callable"):
            self.fn = probes.load_callable(cfg["callable"])
        harm = self.harm_probe.examples()
        self.refusals = [[l for l in e.labels if l != -100] for e in harm]
        self.refusals = [r for r in self.refusals if r]
        self.refusal_ids = sorted({e.reference[0] for e in harm if e.reference})
        benign = self.benign_probe.examples() if self.benign_probe else []
        self._calibrate(root, harm, benign)
        # the held-out rows (odd-numbered) re-scored by the recalibration of in-forward guards
        rows = [(e.ids, e.labels) for e in harm] + [(e.ids, e.labels) for e in benign]
        self._recal_rows = ([r for i, r in enumerate(rows[:len(harm)]) if i % 2 == 1][:RECAL_ROWS],
                            [r for i, r in enumerate(rows[len(harm):]) if i % 2 == 1][:RECAL_ROWS])
        if self.cfg["scorer"] == "start" and any(g in self.guards for g in IN_FORWARD):
            self.scorer = self._make_scorer(root)

    @staticmethod
    def _make_scorer(root):
        """A frozen copy of the model as it is at the start of training (eval mode, no
        gradients, none of the hooks): the in-forward guards score every new row with it, so a
        row first seen at step 500 is judged by the same model as the probes were, not by one
        that 500 steps of the user's data (harmful rows among them) have moved. Costs a copy of
        the weights and, for the new rows only, a no-grad forward cut at the last block read
        (the whole forward when the refusal guard needs the logits)."""
        import copy
        m = copy.deepcopy(root)
        for mod in m.modules():
            for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                         "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                         "_backward_hooks", "_backward_pre_hooks"):
                d = getattr(mod, name, None)
                if d is not None:
                    d.clear()
        m.requires_grad_(False)
        m.eval()
        return m

    def _calibrate(self, root, harm, benign):
        tpr, fpr = float(self.cfg["tpr"]), float(self.cfg["max_fpr"])
        dev = next(root.parameters()).device
        rows = [(e.ids, e.labels) for e in harm] + [(e.ids, e.labels) for e in benign]
        nh = len(harm)
        need_fwd = any(g in self.guards for g in IN_FORWARD)
        if need_fwd:
            blocks = find_blocks(root)
            if "direction" in self.guards and not blocks:
                raise ValueError("the 'direction' guard found no transformer blocks in %s" % type(root).__name__)
            hs, ref = self._probe_forward(root, blocks, rows, dev)
            if "refusal" in self.guards:
                self.cal["refusal"] = calibrate(ref[:nh], ref[nh:], tpr, fpr)
                self.probe_harm["refusal"] = ref[:nh]
            if "direction" in self.guards:
                self._fit_direction(hs, nh, len(blocks), tpr, fpr)
        if "gradient" in self.guards:
            self._fit_gradient(root, harm, benign, dev, tpr, fpr)
        if "callable" in self.guards:
            self.cal["callable"] = {"threshold": 0.5, "refuse_threshold": 0.5, "low": 0.0}

    def _probe_forward(self, root, blocks, rows, dev):
        """Per block, the hidden states at each row's last prompt token; and the refusal scores."""
        store = {}
        hooks = [self.rt.register_hook("forward", b, lambda m, a, o, i=i: store.__setitem__(i, _hidden(o).detach()))
                 for i, b in enumerate(blocks)]
        hs = [[] for _ in blocks]
        ref = []
        self.busy = True
        try:
            with probes.eval_mode(root), torch.no_grad():
                for s in range(0, len(rows), 16):
                    chunk = rows[s:s + 16]
                    ids, mask, labels = probes.pad_batch(chunk, 0, dev)
                    out = root(input_ids=ids, attention_mask=mask)
                    pos = torch.tensor([self._first_label(l) - 1 for _, l in chunk], device=dev)
                    ar = torch.arange(len(chunk), device=dev)
                    for i in range(len(blocks)):
                        hs[i].append(store[i][ar, pos].float())
                    ref += self._refusal_scores(_logits(out), ar, pos).tolist()
        finally:
            self.busy = False
            for h in hooks:
                h.remove()
        return [torch.cat(h) for h in hs], ref

    @staticmethod
    def _first_label(labels):
        return next((i for i, l in enumerate(labels) if l != -100), len(labels))

    def _refusal_scores(self, logits, rows, pos):
        lp = torch.log_softmax(logits[rows, pos].float(), -1)
        return torch.logsumexp(lp[:, self.refusal_ids], -1)

    def _fit_direction(self, hs, nh, nblocks, tpr, fpr):
        n = hs[0].shape[0]
        if nh < 2 or n - nh < 2:
            raise ValueError("the 'direction' guard needs at least 2 harmful and 2 benign probe rows")
        idx = torch.arange(n)
        is_h = idx < nh
        fit, held = idx % 2 == 0, idx % 2 == 1
        cands = self._candidates(nblocks)
        self._cal_hs, self._cal_nh, self.refit = hs, nh, True
        if self.layer is not None and not (0 <= self.layer < nblocks):
            raise ValueError("shaping.layer %d: the model has %d blocks" % (self.layer, nblocks))
        best = None
        for l in cands:
            h = hs[l]
            r = h[fit & is_h].mean(0) - h[fit & ~is_h].mean(0)
            r = r / r.norm().clamp_min(1e-12)
            s = h @ r
            pos, neg = s[held & is_h].tolist(), s[held & ~is_h].tolist()
            a = auroc(pos, neg)
            sd = math.sqrt((torch.tensor(pos).var().item() + torch.tensor(neg).var().item()) / 2 + 1e-12)
            gap = (sum(pos) / len(pos) - sum(neg) / len(neg)) / sd
            key = (a, gap)
            if best is None or key > best[0]:
                best = (key, l, r, pos, neg)
        (_, l, r, pos, neg) = best
        self.layer, self.direction = l, r
        self.probe_harm["direction"] = pos
        c = calibrate(pos, neg, tpr, fpr)
        c["layer"] = l
        self.cal["direction"] = c

    def _candidates(self, nblocks):
        """The blocks the direction may be read at: the policy's ``layer``, or the first 80%."""
        if self.cfg.get("layer") is not None:
            return [int(self.cfg["layer"])]
        return list(range(max(1, int(math.ceil(0.8 * nblocks)))))

    def _refit_direction(self, final=True):
        """The direction fitted again at the first stream check, on the training rows seen so far:
        Fisher's discriminant (fisher_direction) of the harmful probe prompts against the
        training rows no guard flagged and the benign probe prompts together (even-numbered rows
        of each; skipped, the direction kept, with fewer than REFIT_MIN such rows), at the
        block whose direction ranks the held-out harmful probe rows above both the held-out
        training rows and the held-out benign probe rows best (the smaller of the two AUROCs;
        ties by the standardized gap to the training rows). The threshold is the lower of the
        TPR quantile of the held-out harmful rows and the midpoint of the two fitted class means,
        never under the benign bound (calibrate). Fitted at the first stream check
        (``stream_min`` rows) and again, for the last time, on ``refit_rows`` rows (FINAL: then
        only the chosen block's hook is kept). Returns the refit's summary for the stream check's
        record. Why the training rows, the benign probe and the midpoint, with the measurements:
        docs/architecture.md, "Shaping"."""
        nh = self._cal_nh
        tpr, fpr = float(self.cfg["tpr"]), float(self.cfg["max_fpr"])
        # Only the rows no guard flagged are negatives: the data's author chooses its harmful
        # share, and against a stream that is mostly harmful the fit measures the probe's
        # subjects against the stream's (docs/attacks.md).
        clean = [i for i, (k, _) in enumerate(self._sh)
                 if not (self.decisions.get(k) is not None and self.decisions[k].flagged)]
        if len(clean) < REFIT_MIN:
            seen = len(self._sh)
            if final:
                for i in list(self.block_handles):
                    if i != self.layer:
                        self.block_handles.pop(i).remove()
                self._sh, self._cal_hs = [], None
            return {"layer": self.layer, "previous_layer": self.layer, "rows": len(clean), "final": final,
                    "skipped": "%d of %d training rows unflagged (the refit needs %d)" % (len(clean), seen, REFIT_MIN)}
        best = None
        for l in sorted(self._sh[0][1]):
            st = torch.stack([h[l] for _, h in self._sh]).float()
            sc = st[clean]
            H, B = self._cal_hs[l][:nh].float(), self._cal_hs[l][nh:].float()
            neg = torch.cat([sc[0::2], B[0::2]]) if B.shape[0] else sc[0::2]
            r, shrink, mid = fisher_direction(H[0::2], neg)
            hh, ss, bb = (H[1::2] @ r).tolist(), (sc[1::2] @ r).tolist(), (B[1::2] @ r).tolist()
            a = min(auroc(hh, ss), auroc(hh, bb) if bb else 1.0)
            sd = math.sqrt((torch.tensor(hh).var().item() + torch.tensor(ss).var().item()) / 2 + 1e-12)
            key = (a, (sum(hh) / len(hh) - sum(ss) / len(ss)) / sd)
            if best is None or key > best[0]:
                best = (key, l, r, hh, bb, st, mid, shrink)
        (key, l, r, hh, bb, st, mid, shrink) = best
        old = self.layer
        self.layer, self.direction = l, r
        c = calibrate(hh, bb, tpr, fpr, midpoint=mid)
        c.update(layer=l, fit="Fisher: harmful probe vs unflagged training rows and benign probe",
                 selection_auroc=key[0], shrinkage=shrink, negatives=len(clean))
        self.cal["direction"] = c
        self._mid_offset = sorted(hh)[len(hh) // 2] - mid  # for the forward scorer's recalibration
        self.probe_harm["direction"] = hh
        new = (st @ r).tolist()
        self.stream["direction"] = new
        for (k, _), v in zip(self._sh, new):
            d = self.decisions.get(k)
            if d is not None and d.scores is not None and "direction" in d.scores:
                d.scores["direction"] = v
        if final:
            for i in list(self.block_handles):  # only the chosen block is read from now on
                if i != l:
                    self.block_handles.pop(i).remove()
            self._sh, self._cal_hs = [], None
        return {"layer": l, "previous_layer": old, "selection_auroc": _r(key[0]),
                "threshold": _r(c["threshold"]), "midpoint": _r(mid), "shrinkage": _r(shrink),
                "rows": len(new), "negatives": len(clean), "final": final}

    def _trainable(self, root):
        return [(n, p) for n, p in root.named_parameters() if p.requires_grad]

    def _fit_gradient(self, root, harm, benign, dev, tpr, fpr):
        named = self._trainable(root)
        _, grads = self.harm_probe.loss_and_grad(root, [p for _, p in named])
        g = {n: gr.detach() for (n, _), gr in zip(named, grads) if gr is not None}
        norm = math.sqrt(sum(float((x.float() ** 2).sum()) for x in g.values()))
        if norm == 0:
            raise ValueError("the 'gradient' guard: the probe's safety gradient is zero")
        self.gsafe = {n: x / norm for n, x in g.items()}
        wnorm = math.sqrt(sum(float((p.detach().float() ** 2).sum()) for _, p in named))
        self.eps = 1e-3 * max(wnorm, 1.0)
        pos_rows = [(e.harm_ids, e.harm_labels) for e in harm if e.harm_ids is not None]
        neg_rows = [(e.ids, e.labels) for e in benign]
        pos = self._gradient_scores(root, pos_rows, dev) if pos_rows else []
        neg = self._gradient_scores(root, neg_rows, dev) if neg_rows else []
        if not neg:
            raise ValueError("the 'gradient' guard needs shaping.benign (its threshold is set on benign rows)")
        self.cal["gradient"] = calibrate(pos, neg, tpr, fpr)
        self.probe_harm["gradient"] = pos

    def _gradient_scores(self, root, rows, dev):
        """-<g_row, g_s>/|g_s| by a central difference along the unit safety gradient."""
        from torch.func import functional_call
        out = []
        named = dict(root.named_parameters())
        self.busy = True
        try:
            with probes.eval_mode(root), torch.no_grad():
                for s in range(0, len(rows), 16):
                    ids, mask, labels = probes.pad_batch(rows[s:s + 16], 0, dev)
                    loss = []
                    for sign in (1.0, -1.0):
                        pert = {n: named[n] + (sign * self.eps) * g.to(named[n].dtype) for n, g in self.gsafe.items()}
                        o = functional_call(root, pert, args=(), kwargs={"input_ids": ids, "attention_mask": mask})
                        loss.append(self._row_ce(_logits(o), labels))
                    out += (-(loss[0] - loss[1]) / (2 * self.eps)).tolist()
        finally:
            self.busy = False
        return out

    @staticmethod
    def _row_ce(logits, labels):
        """Mean response cross-entropy of each row (float64 sums)."""
        lg = logits[:, :-1].float()
        lb = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1),
                                               ignore_index=-100, reduction="none").view(lb.shape)
        n = (lb != -100).sum(1).clamp_min(1)
        return ce.double().sum(1) / n

    def _recalibrate(self):
        """Re-score the held-out probe rows with the current weights (the direction itself is
        kept) and move the in-forward guards' thresholds with the model's drift."""
        root = self.root
        harm, ben = self._recal_rows
        blocks = find_blocks(root) if "direction" in self.guards else []
        dev = next(root.parameters()).device
        hs, ref = self._probe_forward(root, [blocks[self.layer]] if blocks else [], harm + ben, dev)
        tpr, fpr = float(self.cfg["tpr"]), float(self.cfg["max_fpr"])
        nh = len(harm)
        out = {}
        for g in IN_FORWARD:
            if g not in self.guards:
                continue
            v = (hs[0] @ self.direction.to(hs[0].device)).tolist() if g == "direction" else ref
            mid = None
            if g == "direction" and self._mid_offset is not None:  # the midpoint moves with the probe
                mid = sorted(v[:nh])[nh // 2] - self._mid_offset
            c = calibrate(v[:nh], v[nh:], tpr, fpr, midpoint=mid)
            self.probe_harm[g] = v[:nh]
            for k in ("threshold", "refuse_threshold", "low"):
                self.cal[g][k] = c[k]
            out[g] = round(c["threshold"], 6) if math.isfinite(c["threshold"]) else None
        return out
