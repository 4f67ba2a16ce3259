"""Forward interception: the hooks shaping attaches (through the runtime) to the model being
trained, and what they do to a training forward. A mixin of the Shaping class.

* a forward pre-hook on the model (``_pre_hook``) finds each row's response span (the
  positions whose label is not -100; without labels, the tokens after the last
  ``response_marker``), keys the row by its fingerprint (safehook.probes.batch), applies the
  decisions already made and judges new rows with the guards that need no forward of their own
  (gradient, callable) or with the start scorer. Where labels pass through the forward it hands
  the model copies (the caller's tensors are never written): masked rows get -100, refused rows
  a refusal in input_ids and labels;
* scorer "forward": a forward hook on the direction's block and one on the output embedding read
  h_l(b) and the logits at b of the new rows in the training forward itself; a row flagged there
  is masked in the labels copy before the model computes its loss;
* a gradient hook on the logits multiplies row i's logits gradient by its weight w_i (1 keep,
  0 mask, in between for "weight"), so the weights hold for any loss computed from the logits;
* action "subtract" stashes the flagged rows for the step (actions.py).
"""
import math

import torch

from ...runtime.context import debug
from .decide import _Decision
from .guards import IN_FORWARD, _hidden, _logits, find_blocks
from ...probes.batch import fingerprints


class _Stop(Exception):
    """Raised by the start scorer's last needed block: the rest of its forward is not needed."""


class _Batch:
    """What the pre-hook learned of one training forward, for the hooks after it."""

    def __init__(self):
        self.rows = []       # (row, b, e, key): b last prompt token, e last response token
        self.pending = []    # indices into rows still to judge inside the forward
        self.decided = {}    # row -> _Decision applied to this forward
        self.labels = None   # the labels copy handed to the model, or None
        self.ids = None
        self.mask = None
        self.hidden = {}     # block index -> block output (direction guard)
        self.done = False
        self.ntok = 0


class Interception:
    """The hooks on the model and what they do to a training forward (a mixin of Shaping)."""

    def _install(self, root):
        if "direction" in self.guards:
            # until the first stream check every candidate block is read (the refit chooses
            # among them); afterwards only the chosen one. With the start scorer the hooks are
            # on the frozen copy, else on the model itself.
            blocks = find_blocks(self.scorer if self.scorer is not None else root)
            cands = self._candidates(len(blocks)) if self.refit else [self.layer]
            for i in cands:
                if self.scorer is not None:
                    hook = (lambda m, a, o, i=i: self._cap_hook(i, o))
                else:
                    hook = (lambda m, a, o, i=i: self._block_hook(i, m, a, o))
                self.block_handles[i] = self.rt.register_hook("forward", blocks[i], hook)
        head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
        reg = self.rt.register_hook
        shead = None
        if self.scorer is not None and hasattr(self.scorer, "get_output_embeddings"):
            shead = self.scorer.get_output_embeddings()
        if isinstance(shead, torch.nn.Linear):
            self.handles.append(reg("forward_pre", shead, self._gather_hook))
            self._head_gather = True
        if head is not None:
            self.handles.append(reg("forward", head, self._head_hook))
        self.handles.append(reg("forward_pre", root, self._pre_hook, with_kwargs=True))
        self.handles.append(reg("forward", root, self._post_hook, with_kwargs=True))
        fields = {"what": "shaping calibration", "guards": self.guards, "action": self.action,
                  "scorer": "start" if self.scorer is not None else "forward",
                  "calibration": {g: {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else
                                          (None if isinstance(v, float) else v)) for k, v in c.items()}
                                  for g, c in self.cal.items()}}
        self.rt.audit("probe", fields)
        debug("shaping: calibrated %s" % fields["calibration"])

    def _spans(self, ids, labels, mask):
        """[(row, b, e)]: last prompt token and last response token of each row with a response."""
        out = []
        B, T = ids.shape
        if labels is not None:
            sc = (labels != -100)
            anyr = sc.any(1).tolist()
            first = sc.int().argmax(1).tolist()
            last = (T - 1 - sc.flip(1).int().argmax(1)).tolist()
            for i in range(B):
                if anyr[i] and first[i] >= 1:
                    out.append((i, first[i] - 1, last[i]))
            return out
        if self.marker is None:
            return out
        m = len(self.marker)
        rows = ids.tolist()
        lens = mask.sum(1).tolist() if mask is not None else [T] * B
        for i, r in enumerate(rows):
            end = T - 1
            if mask is not None:  # right or left padding: the last real token
                nz = [j for j, v in enumerate(mask[i].tolist()) if v]
                if not nz:
                    continue
                end = nz[-1]
            k = -1
            for j in range(end - m + 1, -1, -1):
                if r[j:j + m] == self.marker:
                    k = j + m - 1
                    break
            if k >= 0 and k < end and lens[i]:
                out.append((i, k, end))
        return out

    def _pre_hook(self, module, args, kwargs):
        self.batch = None
        if not self._active(module):
            return None
        try:
            return self._pre(module, args, kwargs, apply=True)
        except Exception as e:
            self._fail("%s: %s (in the forward pre-hook)" % (type(e).__name__, e))
            return None

    def _active(self, module):
        return (not self.busy and not self.failed and self.root is not None and module.training
                and torch.is_grad_enabled())

    def _pre(self, module, args, kwargs, apply):
        """Find the rows, apply known decisions; APPLY: hand the model rewritten copies."""
        ids = kwargs.get("input_ids")
        pos_ids = ids is None and len(args) > 0
        if pos_ids:
            ids = args[0]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        self.micro += 1  # a training forward: one term of the step's (accumulated) loss
        labels = kwargs.get("labels")
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != ids.shape):
            labels = None
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
            mask = None
        bt = _Batch()
        bt.ids, bt.mask = ids, mask
        spans = self._spans(ids, labels, mask)
        keys = fingerprints(ids, mask) if spans else []  # the monitor's row keys: the attended tokens
        for (row, b, e) in spans:
            bt.rows.append((row, b, e, keys[row]))
        if not bt.rows:
            return None
        self.counts["seen"] += len(bt.rows)
        new = [k for k, (_, _, _, key) in enumerate(bt.rows) if key not in self.decisions]
        self.counts["new"] += len(new)
        if new and any(g in self.guards for g in ("gradient", "callable")):
            self._judge_before(bt, new, labels)
        if new and self.scorer is not None:
            self._judge_start(bt, [k for k in new if bt.rows[k][3] not in self.decisions])
        for k, (row, b, e, key) in enumerate(bt.rows):
            d = self.decisions.get(key)
            if d is not None:
                bt.decided[row] = d
            elif any(g in self.guards for g in IN_FORWARD):
                bt.pending.append(k)
            else:
                self.decisions[key] = bt.decided[row] = _Decision()
        lab_ref = labels if labels is not None else self._labels_from_spans(ids, bt.rows)
        bt.ntok = int((lab_ref[:, 1:] != -100).sum())
        self._keep_contexts(bt)
        self.batch = bt
        if labels is None or not apply:
            bt.labels_given = False
            bt.labels = lab_ref
            return None
        bt.labels_given = True
        new_ids, new_labels = self._apply_pre(bt, ids, labels)
        if bt.pending and new_labels is labels:
            # rows judged inside this forward are masked in the labels the model reads: a copy,
            # never the caller's own tensor
            new_labels = labels.clone()
        bt.labels = new_labels
        if new_ids is not ids or new_labels is not labels:
            kwargs = dict(kwargs)
            kwargs["labels"] = new_labels
            if new_ids is not ids:
                if pos_ids:
                    args = (new_ids,) + tuple(args[1:])
                else:
                    kwargs["input_ids"] = new_ids
                bt.ids = new_ids
            return args, kwargs
        return None

    @staticmethod
    def _labels_from_spans(ids, rows):
        lab = torch.full_like(ids, -100)
        for (row, b, e, _) in rows:
            lab[row, b + 1:e + 1] = ids[row, b + 1:e + 1]
        return lab

    def _judge_before(self, bt, new, labels):
        """The gradient and callable guards on the rows seen for the first time."""
        sub = [bt.rows[k] for k in new]
        scores = {}
        if "gradient" in self.guards:
            lab = labels if labels is not None else self._labels_from_spans(bt.ids, bt.rows)
            rows = []
            for (row, b, e, key) in sub:
                m = bt.mask[row].bool() if bt.mask is not None else None
                ids_r = bt.ids[row] if m is None else bt.ids[row][m]
                lab_r = lab[row] if m is None else lab[row][m]
                rows.append((ids_r.tolist(), lab_r.tolist()))
            dev = bt.ids.device
            scores["gradient"] = self._gradient_scores(self.root, rows, dev)
            self._observe([{"gradient": v} for v in scores["gradient"]])
        segs = {}
        if "callable" in self.guards:
            for j, (row, b, e, key) in enumerate(sub):
                segs[j] = self._callable_segments(bt.ids[row], b, e)
        for j, (row, b, e, key) in enumerate(sub):
            d = None
            if "gradient" in scores:
                d = self._decide({"gradient": scores["gradient"][j]})
            if j in segs and (d is None or not d.flagged):
                d2 = segs[j]
                if d2.flagged or d is None:
                    d = d2
            if d is not None and d.flagged:
                self._record_flag(key, d)
                self.decisions[key] = d
            elif not any(g in self.guards for g in IN_FORWARD):
                self.decisions[key] = d or _Decision()

    def _gather_hook(self, module, args):
        """On the scorer's output head: its input at the rows' last prompt tokens only (a
        large vocabulary makes the head the biggest matrix of a small model's forward)."""
        g = self._gather
        if g is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            return None
        ar, pos = g
        return (args[0][ar, pos].unsqueeze(1),) + tuple(args[1:])

    def _cap_hook(self, i, output):
        self._cap[i] = _hidden(output).detach()
        if self._stop_at is not None and i >= self._stop_at:
            raise _Stop()

    def _judge_start(self, bt, idx):
        """The in-forward guards on new rows, scored by the frozen start copy (scorer "start"):
        decided before the training forward, so a flagged row is masked or rewritten at once."""
        if not idx:
            return
        rows = [bt.rows[k] for k in idx]
        dev = bt.ids.device
        sub = torch.tensor([r[0] for r in rows], device=dev)
        # a causal model's outputs up to the last prompt token do not depend on what follows:
        # the scorer reads the prompts only, and its output head only there (_gather_hook)
        cut = max(r[1] for r in rows) + 1
        kw = {"input_ids": bt.ids.index_select(0, sub)[:, :cut]}
        if bt.mask is not None:
            kw["attention_mask"] = bt.mask.index_select(0, sub)[:, :cut]
        ar = torch.arange(len(rows), device=dev)
        pos = torch.tensor([r[1] for r in rows], device=dev)
        need_logits = "refusal" in self.guards
        self._cap = {}
        self._stop_at = None if need_logits or not self.block_handles else max(self.block_handles)
        self._gather = (ar, pos) if self._head_gather else None
        gathered = self._gather is not None
        out = None
        try:
            with torch.no_grad():
                out = self.scorer(**kw)
        except _Stop:
            pass
        finally:
            self._stop_at = self._gather = None
        scores = [dict() for _ in rows]
        if need_logits:
            lg = _logits(out)
            at = torch.zeros_like(pos) if gathered and lg.shape[1] == 1 else pos  # the head read the ends only
            for j, v in enumerate(self._refusal_scores(lg, ar, at).tolist()):
                scores[j]["refusal"] = v
        if "direction" in self.guards:
            h = self._cap[self.layer][ar, pos].float()
            for j, v in enumerate((h @ self.direction.to(h.device)).tolist()):
                scores[j]["direction"] = v
            if self.refit:  # kept for the refits (first stream check, REFIT_ROWS)
                hb = dict((i, x[ar, pos].float().cpu()) for i, x in self._cap.items())
                for j, (row, b, e, key) in enumerate(rows):
                    self._sh.append((key, dict((i, x[j]) for i, x in hb.items())))
        self._cap = {}
        for (row, b, e, key), sc in zip(rows, scores):
            d = self._decide(sc)
            self.decisions[key] = d
            if d.flagged:
                self._record_flag(key, d)
        self._observe(scores)

    def _apply_pre(self, bt, ids, labels):
        """Copies of input_ids and labels with the known decisions applied (masks, refusals)."""
        new_ids, new_labels = ids, labels
        cap = int(math.floor(float(self.cfg["refuse_cap"]) * ids.shape[0]))
        rewrites = 0
        for (row, b, e, key) in bt.rows:
            d = bt.decided.get(row)
            if d is None or (not d.flagged and self.action != "weight"):
                continue
            if self.action == "subtract" and d.flagged:
                continue  # handled by _stash (its gradient is removed at the step)
            if d.refuse and rewrites < cap:
                ref = self._refusal_for(e - b)
                if ref is not None:
                    if new_ids is ids:
                        new_ids = ids.clone()
                    if new_labels is labels:
                        new_labels = labels.clone()
                    s = b + 1
                    t = torch.tensor(ref, dtype=ids.dtype, device=ids.device)
                    new_ids[row, s:s + len(ref)] = t
                    new_labels[row, s:s + len(ref)] = t.to(labels.dtype)
                    new_labels[row, s + len(ref):e + 1] = -100
                    rewrites += 1
                    self.counts["rewritten"] += 1
                    self.counts["masked_tokens"] += int((labels[row, s + len(ref):e + 1] != -100).sum())
                    bt.decided[row] = _Decision(weight=1.0, guard=d.guard)  # trained as the refusal
                    continue
            w = d.weight
            if isinstance(w, list):  # per-token weights of the callable guard: zeros are masked here
                zero = [b + 1 + t for t, x in enumerate(w) if x == 0.0]
                if zero:
                    if new_labels is labels:
                        new_labels = labels.clone()
                    idx = torch.tensor(zero, device=labels.device)
                    self.counts["masked_tokens"] += int((labels[row, idx] != -100).sum())
                    new_labels[row, idx] = -100
            elif w == 0.0:
                if new_labels is labels:
                    new_labels = labels.clone()
                self.counts["masked_tokens"] += int((labels[row, b + 1:e + 1] != -100).sum())
                new_labels[row, :] = -100
        return new_ids, new_labels

    def _refusal_for(self, span):
        fits = [r for r in self.refusals if len(r) <= span]
        if not fits:
            return None
        self.rotate += 1
        return fits[self.rotate % len(fits)]

    def _block_hook(self, i, module, args, output):
        if self.busy:
            return
        bt = self.batch
        if bt is not None:
            if bt.pending:
                bt.hidden[i] = _hidden(output)
        elif self._first_unseen and module.training and torch.is_grad_enabled():
            self._orphan_hidden[i] = _hidden(output)  # the first forward (see _post_hook)

    def _head_hook(self, module, args, output):
        bt = self.batch
        if bt is None or self.busy or bt.done:
            return None
        try:
            self._finalize(bt, output)
        except Exception as e:
            self._fail("%s: %s (in the output hook)" % (type(e).__name__, e))
        return None

    def _post_hook(self, module, args, kwargs, output):
        if self.busy or self.failed:
            return None
        bt = self.batch
        try:
            if bt is None and self._active(module) and self._first_unseen:
                # the model's first forward started before the hooks existed, so the pre-hook
                # did not see it: judge it now from what it was given; its loss is computed,
                # so decisions act through the logits' gradient only
                self._first_unseen = False
                self._pre(module, args, kwargs, apply=False)
                bt = self.batch
                if bt is not None:
                    bt.hidden = self._orphan_hidden
            self._orphan_hidden = {}
            if bt is not None and not bt.done:
                lg = _logits(output)
                if isinstance(lg, torch.Tensor):
                    self._finalize(bt, lg)
        except Exception as e:
            self._fail("%s: %s (in the forward hook)" % (type(e).__name__, e))
        finally:
            self.batch = None
        return None

    def _finalize(self, bt, logits):
        """Judge the pending rows from this forward, then install the weights on the logits."""
        bt.done = True
        self._first_unseen = False
        if bt.pending:
            rows = [bt.rows[k] for k in bt.pending]
            ar = torch.tensor([r[0] for r in rows], device=logits.device)
            pos = torch.tensor([r[1] for r in rows], device=logits.device)
            scores = [dict() for _ in rows]
            with torch.no_grad():
                if "refusal" in self.guards and logits.shape[1] == bt.ids.shape[1]:
                    for j, v in enumerate(self._refusal_scores(logits.detach(), ar, pos).tolist()):
                        scores[j]["refusal"] = v
                if "direction" in self.guards and self.layer in bt.hidden:
                    h = bt.hidden[self.layer].detach()[ar, pos].float()
                    for j, v in enumerate((h @ self.direction.to(h.device)).tolist()):
                        scores[j]["direction"] = v
                    if self.refit:  # kept for the refits (first stream check, REFIT_ROWS)
                        hb = dict((i, x.detach()[ar, pos].float().cpu()) for i, x in bt.hidden.items())
                        for j, (row, b, e, key) in enumerate(rows):
                            self._sh.append((key, dict((i, x[j]) for i, x in hb.items())))
            for j, (row, b, e, key) in enumerate(rows):
                if not scores[j]:
                    continue  # no score this time (e.g. logits cut short): judged at a later sighting
                d = self._decide(scores[j])
                self.decisions[key] = d
                if d.flagged:
                    self._record_flag(key, d, now="mask" if self.action == "refuse" else None)
                # first sighting: masked now (the input is already embedded), refused later
                now = _Decision(weight=d.weight, guard=d.guard, score=d.score)
                bt.decided[row] = now
                if d.flagged and self.action != "subtract" and bt.labels_given:
                    self.counts["masked_tokens"] += int((bt.labels[row, b + 1:e + 1] != -100).sum())
                    bt.labels[row, :] = -100  # the copy the model computes its loss from
            self._observe([sc for sc in scores if sc])
        self.counts["flagged"] += sum(1 for d in bt.decided.values() if d.flagged)
        for (row, b, e, key) in bt.rows:  # for the harmful fraction (decide.py)
            self._sightings.append(self._harmful(self.decisions.get(key)))
        if self.action == "subtract":
            self._stash(bt)
            return
        self._install_weights(bt, logits)

    def _install_weights(self, bt, logits):
        if not isinstance(logits, torch.Tensor) or not logits.requires_grad or logits.dim() != 3:
            return
        B, T = logits.shape[:2]
        W = None
        masked = 0
        for (row, b, e, key) in bt.rows:
            d = bt.decided.get(row)
            if d is None:
                continue
            w = d.weight
            if isinstance(w, list):
                if all(x == 1.0 for x in w):
                    continue
                if W is None:
                    W = torch.ones(B, T, dtype=logits.dtype, device=logits.device)
                for t, x in enumerate(w):  # the logits at b+t predict response token t
                    if b + t < T:
                        W[row, b + t] = x
                if not bt.labels_given:
                    masked += sum(1 for x in w if x == 0.0)
            elif w != 1.0:
                if W is None:
                    W = torch.ones(B, T, dtype=logits.dtype, device=logits.device)
                W[row, :] = w
                if w == 0.0 and not bt.labels_given:
                    masked += e - b
        if W is None:
            return
        counts = self.counts
        Wv = W[:, :, None]

        def hook(g, Wv=Wv, masked=masked):
            counts["masked_tokens"] += masked
            return g * Wv.to(g.dtype)
        self.rt.register_hook("tensor", logits, hook)
