"""The freeze feature: the policy's safety blocks get requires_grad=False before the first
backward, and stay frozen.

When:   when a model is bound (rt.on_model: the root module owning an optimizer's parameters,
        at the optimizer's construction, at the model's first forward, or at the first step
        (then that step's gradients of the frozen parameters are dropped)), or earlier when the
        model is handed to DistributedDataParallel (its __init__ is watched, so the reducer never
        sees the frozen parameters). Each model trained in the process gets its own freeze.
Undone: uninstall() or a new policy gives requires_grad back to what was frozen.
What:   the transformer blocks selected by freeze.layers (the block list: runtime.stacks.find_blocks), every parameter
        inside them (LoRA adapters included), plus the parameters matched by freeze.params.
Holds:  a pre-step feature (order 10) drops any gradient a frozen parameter carries (someone set
        requires_grad again) and records a violation; every freeze.check_every steps and at exit
        the frozen tensors are checksummed (C, over their raw bytes) and any change is recorded
        and, with freeze.restore, undone from the CPU snapshot taken at freeze time.

Cases it cannot handle (documented, detected where possible):
- FSDP1 (FullyShardedDataParallel, FlatParameters): blocks inside a flat parameter cannot be
  frozen one by one. Detected when the model is bound: the policy cannot be applied (one line
  naming FSDP1; FSDP2's fully_shard and DDP work). SafeGrad, the gate and the monitor refuse it
  the same way (runtime.stacks.fsdp1).
- DeepSpeed ZeRO-3 partitions the parameters after the freeze: the checksums and snapshots move
  to each rank's slice (follow_partitions). A ZeRO-3 parameter kept whole on every rank
  (persistent, below stage3_param_persistence_threshold) is checked through its slice only.
- A model wrapped in DDP before safehook was installed: DDP's reducer already expects gradients
  for every parameter, so the parameters keep requires_grad and their gradients are dropped
  before each step instead (mode "grad_none"): the weights still do not move, the backward
  compute is not saved.
- Writes made after the last optimizer step and after the exit check (or in a process killed
  before exit) are not seen.
"""
import fnmatch
import math
import re
import sys

from .. import _core
from ..runtime.context import debug
from ..runtime import registry
from ..runtime.stacks import KNOWN_BLOCK_PATHS, find_blocks, fsdp1_refusal, local, partition_slice, strip_name, unwrap  # noqa: F401

MAX_NAMES = 32  # parameter names listed in one record


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def select_blocks(spec, n):
    """Sorted block indices chosen by the freeze.layers value SPEC for a model of N blocks.
    Raises ValueError with a message fit for the user when SPEC is malformed or out of range."""
    if spec is None:
        return []
    if isinstance(spec, dict):
        frac = spec.get("fraction")
        if (not isinstance(frac, (list, tuple)) or len(frac) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in frac)
                or not 0 <= frac[0] < frac[1] <= 1):
            raise ValueError("freeze.layers.fraction must be [a, b] with 0 <= a < b <= 1")
        lo, hi = int(math.floor(frac[0] * n)), int(math.ceil(frac[1] * n)) - 1
        return list(range(lo, max(lo, hi) + 1)) if n else []
    items = spec if isinstance(spec, list) else [spec]
    out = set()
    for it in items:
        if isinstance(it, int) and not isinstance(it, bool):
            lo = hi = it
        elif isinstance(it, str) and _RANGE.match(it):
            m = _RANGE.match(it)
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
        else:
            raise ValueError("freeze.layers: %r is not a range like \"15-25\"" % (it,))
        if lo > hi:
            raise ValueError("freeze.layers: range %r goes backwards" % (it,))
        if hi >= n:
            raise ValueError("freeze.layers: block %d does not exist (the model has %d blocks, 0-%d)"
                             % (hi, n, n - 1))
        out.update(range(lo, hi + 1))
    return sorted(out)


def _torch_checksum(t):
    """Checksum of a tensor the C kernel cannot read directly (GPU, non-contiguous): integer sums
    of its raw 32-bit words, plain and position-weighted, computed on its own device (exact and
    order-independent in int64, so deterministic)."""
    import torch
    x = t.detach().contiguous().reshape(-1).view(torch.uint8)
    w = x.view(torch.int32) if x.numel() % 4 == 0 else x
    h = x.numel() * 0x9E3779B97F4A7C15
    chunk = 1 << 22
    for off in range(0, w.numel(), chunk):
        c = w[off:off + chunk].to(torch.int64)
        pos = torch.arange(off, off + c.numel(), device=c.device, dtype=torch.int64) % 65521 + 1
        s1, s2 = int(c.sum()), int((c * pos).sum())
        h = ((h ^ s1) * 0x100000001B3 + s2) & 0xFFFFFFFFFFFFFFFF
    return h


def checksums(tensors):
    """64-bit checksums of TENSORS' values (this rank's shard of a DTensor): the C kernel over
    the raw bytes of CPU tensors (a contiguous copy first for the rare non-contiguous one), torch
    ops on their device for the rest (GPU), so that no frozen weight crosses to the host."""
    tensors = [local(t) for t in tensors]
    sums = _core.freeze_checksums(tensors)
    out = []
    for s, t in zip(sums, tensors):
        if s is None:
            if t.device.type == "cpu" and not t.is_sparse:
                s = _core.freeze_checksums([t.detach().contiguous()])[0]
            if s is None:
                s = _torch_checksum(t)
        out.append(s)
    return out


class _Bound:
    """The two modules fsdp1() looks at, for a model not bound through a ModelInfo (DDP init)."""

    def __init__(self, root, called):
        self.root, self.called = root, called if called is not None else root


def _wrapper_name(mod):
    return type(mod).__name__ if mod is not None else None


class Freezer:
    """The freeze state of one model: its frozen parameters, their reference checksums and
    snapshots."""

    def __init__(self, policy, rt):
        self.rt = rt
        self.cfg = registry.section(policy, "freeze")
        meta = policy.get("_meta") or {}
        self.embedded_default = meta.get("origin") == "<embedded default>"
        self.check_every = max(1, int(self.cfg["check_every"]))
        self.restore = bool(self.cfg["restore"])
        self.model = None
        self.mode = None          # "requires_grad" or "grad_none"
        self.blocks = None
        self.block_ids = []
        self.names, self.params, self.sums, self.snaps = [], [], [], []
        self.last_check = None
        self.rescanned = False
        self.unfreeze = []        # parameters this freezer set requires_grad=False on
        self.counts = {"violations": 0, "dropped_grads": 0, "changed": 0, "restored": 0, "checks": 0}
        self.partitioned = {}     # index -> (start, count) of a ZeRO-3 slice in the flat tensor, or None
        self.follow = True        # some frozen parameter may still get partitioned (ZeRO-3)

    # -- freezing --
    def apply(self, root, called, when):
        """Freeze ROOT's selected blocks (CALLED: the wrapper it was called through, if any)."""
        if self.model is not None:
            if root is not self.model:
                debug("freeze: ignoring another model (%s); %s is frozen" % (type(root).__name__,
                                                                            type(self.model).__name__))
            return
        self.model = root
        msg = fsdp1_refusal(_Bound(root, called), "its flat parameters mix the tensors of several blocks, so "
                            "blocks cannot be frozen one by one")
        if msg:
            self.rt.fail("freeze: " + msg)
            return
        spec = self.cfg.get("layers")
        globs = list(self.cfg.get("params") or [])
        blocks = find_blocks(root)
        self.blocks = blocks
        rec = {"model": type(root).__name__, "when": when,
               "wrapper": _wrapper_name(called) if called is not root else None,
               "blocks": blocks.describe() if blocks else None, "layers": spec, "params": globs,
               "check_every": self.check_every, "restore": self.restore}
        if spec is not None and blocks is None:
            rec.update(frozen_blocks=[], tensors=0, numel=0)
            if self.embedded_default:
                rec["note"] = "no transformer block list found: the default policy freezes nothing here"
                self.rt.audit("freeze", rec)
                debug("freeze: " + rec["note"])
                return
            self.rt.audit("freeze", rec)
            self.rt.fail("freeze: no transformer block list found in %s, so freeze.layers %r cannot "
                         "be applied" % (type(root).__name__, spec))
            return
        try:
            ids = select_blocks(spec, len(blocks)) if spec is not None else []
        except ValueError as e:
            self.rt.audit("freeze", dict(rec, error=str(e)))
            self.rt.fail(str(e))
            return
        self.block_ids = ids
        chosen = {}
        for i in ids:
            prefix = "%s.%d." % (blocks.path, i) if blocks.path else "%d." % i
            for n, p in blocks.modules[i].named_parameters():
                chosen.setdefault(id(p), (prefix + n, p))
        matched = 0
        if globs:
            for n, p in root.named_parameters():
                sn = strip_name(n)
                if any(fnmatch.fnmatchcase(sn, g) for g in globs):
                    matched += 1
                    chosen.setdefault(id(p), (sn, p))
        # DDP built before we could see the model: its reducer waits for every parameter that
        # required grad at construction, so flipping requires_grad now would hang or fail it.
        self.mode = "grad_none" if _wrapper_name(called) == "DistributedDataParallel" else "requires_grad"
        trainable = 0
        for n, p in chosen.values():
            self.names.append(n)
            self.params.append(p)
            if p.requires_grad:
                trainable += 1
                if self.mode == "requires_grad":
                    p.requires_grad_(False)
                    self.unfreeze.append(p)
            if when == "first_step":  # bound at its first step: this step's gradients exist
                p.grad = None
        self.sums = checksums(self.params)
        if self.restore:
            self.snaps = [local(p).detach().to("cpu", copy=True) for p in self.params]
        lora = [n for n in self.names if ".lora_" in n]
        rec.update(frozen_blocks=ids, tensors=len(self.params), numel=sum(p.numel() for p in self.params),
                   were_trainable=trainable, adapters=len(lora), glob_matches=matched, mode=self.mode)
        self.rt.audit("freeze", rec)
        debug("freeze: %d blocks of %s (%s), %d tensors, mode %s" % (
            len(ids), blocks.path if blocks else "-", when, len(self.params), self.mode))

    def rescan(self, step):
        """Freeze parameters that appeared inside the frozen blocks after freezing (LoRA adapters
        injected by a PEFT wrap made after the first forward)."""
        if not self.blocks or not self.block_ids:
            return
        known = {id(p) for p in self.params}
        new = []
        for i in self.block_ids:
            prefix = "%s.%d." % (self.blocks.path, i) if self.blocks.path else "%d." % i
            for n, p in self.blocks.modules[i].named_parameters():
                if id(p) not in known:
                    known.add(id(p))
                    new.append((prefix + n, p))
        if not new:
            return
        for n, p in new:
            if self.mode == "requires_grad" and p.requires_grad:
                p.requires_grad_(False)
                self.unfreeze.append(p)
            p.grad = None
            self.names.append(n)
            self.params.append(p)
        ps = [p for _, p in new]
        self.follow = True
        self.sums.extend(checksums(ps))
        if self.restore:
            self.snaps.extend(local(p).detach().to("cpu", copy=True) for p in ps)
        names = [n for n, _ in new]
        self.rt.audit("freeze", {"late": True, "step": step, "added": names[:MAX_NAMES], "tensors": len(new),
                                 "adapters": sum(1 for n in names if ".lora_" in n), "mode": self.mode})
        debug("freeze: %d parameters appeared in frozen blocks and were frozen" % len(new))

    # -- enforcement --
    def pre_step(self, optimizer, step, record):
        check = step % self.check_every == 0 and step != self.last_check
        if check or not self.rescanned:
            self.rescanned = True
            self.rescan(step)
        if not self.params:
            return
        idx = _core.freeze_with_grad(self.params)
        if idx:
            for i in idx:
                self.params[i].grad = None
            self.counts["dropped_grads"] += len(idx)
            record["freeze_dropped"] = len(idx)
            if self.mode == "requires_grad":
                names = [self.names[i] for i in idx]
                for i in idx:
                    self.params[i].requires_grad_(False)
                self.counts["violations"] += 1
                self.rt.violation("gradient on a frozen parameter (requires_grad was re-enabled); "
                                  "gradient dropped, parameter frozen again",
                                  {"params": names[:MAX_NAMES], "count": len(names)}, skip=2)
        if check:
            self.last_check = step
            self.check(step, record)

    def follow_partitions(self):
        """DeepSpeed ZeRO-3 partitions the parameters after they were frozen (the freeze happens
        when the optimizer is built; deepspeed.initialize partitions later): each rank then holds
        one slice of the flattened tensor (ds_tensor, padded at the end), and the checks run on
        that slice. Once per parameter, the reference moves to the slice: its checksum and
        snapshot become the slice's, when the slice holds the frozen values (compared with the
        freeze-time snapshot); a slice that differs keeps the full-tensor reference, so the check
        that follows records it and restores it from the snapshot's slice. Without snapshots
        (freeze.restore false) the slice is taken as it is, counted in 'repartitioned'."""
        import torch
        for i, p in enumerate(self.params):
            ds = getattr(p, "ds_tensor", None)
            if ds is None or i in self.partitioned:
                continue
            self.partitioned[i] = None
            snap = self.snaps[i] if self.snaps else None
            part = ds.detach().reshape(-1)
            if snap is not None and snap.numel() == part.numel():
                continue  # frozen after partitioning: the reference is the slice already
            if snap is not None:
                flat = snap.reshape(-1)
                start, n = partition_slice(p, flat.numel())
                mine = flat[start:start + n].to(part.dtype)
                self.partitioned[i] = (start, n)
                if not torch.equal(part[:n].cpu(), mine):
                    continue  # changed before the first check: the check records and restores it
                self.snaps[i] = local(p).detach().to("cpu", copy=True)
            self.sums[i] = checksums([p])[0]
            self.counts["repartitioned"] = self.counts.get("repartitioned", 0) + 1
        if self.partitioned and len(self.partitioned) == len(self.params):
            self.follow = False

    def check(self, step, record, where=None):
        """Compare the frozen tensors with their freeze-time checksums; record (and restore)
        the ones that changed. WHERE names a check made outside a step (a checkpoint save)."""
        import torch
        self.counts["checks"] += 1
        if self.follow and "deepspeed" in sys.modules:
            self.follow_partitions()
        now = checksums(self.params)
        bad = [i for i, (a, b) in enumerate(zip(now, self.sums)) if a != b]
        record["freeze_check"] = "changed" if bad else "ok"
        if not bad:
            return
        restored = False
        if self.restore and self.snaps:
            with torch.no_grad():
                for i in bad:
                    p = local(self.params[i])
                    cut = self.partitioned.get(i)
                    if cut is not None and self.snaps[i].numel() != p.numel():
                        # a ZeRO-3 slice that differed when first seen: its part of the snapshot
                        start, n = cut
                        p.reshape(-1)[:n].copy_(self.snaps[i].reshape(-1)[start:start + n])
                        self.snaps[i] = p.detach().to("cpu", copy=True)
                        self.sums[i] = checksums([self.params[i]])[0]
                        continue
                    if p.shape != self.snaps[i].shape or p.dtype != self.snaps[i].dtype:
                        p.data = self.snaps[i].to(p.device, copy=True)  # a rebinding p.data = other
                    else:
                        p.copy_(self.snaps[i])
            after = checksums([self.params[i] for i in bad])
            restored = all(a == self.sums[i] for a, i in zip(after, bad))
            if restored:
                self.counts["restored"] += len(bad)
        self.counts["changed"] += len(bad)
        self.counts["violations"] += 1
        record["freeze_restored"] = restored
        self.rt.violation("frozen weights changed" + (" and were restored from the freeze-time snapshot"
                                                      if restored else ""),
                          dict({"params": [self.names[i] for i in bad][:MAX_NAMES], "count": len(bad),
                                "restored": restored},
                               **({"where": where} if where else {"at_exit": True} if step is None else {})),
                          skip=3)

    def finish(self):
        """At exit: a last integrity check; returns the counters for the 'end' record."""
        if self.params:
            rec = {}
            self.check(None, rec)
        return dict(self.counts, tensors=len(self.params), blocks=self.block_ids)

    def undo(self):
        """Give back requires_grad to what this freezer froze (uninstall, a new policy)."""
        for p in self.unfreeze:
            p.requires_grad_(True)
        self.unfreeze = []


class Freeze:
    """The freeze feature of this process: a Freezer per model bound (several models may be
    trained in one process, each gets the policy's freeze)."""

    def __init__(self, policy, rt):
        self.policy, self.rt = policy, rt
        self.freezers = []

    def apply(self, root, called, when):
        for f in self.freezers:
            if f.model is root:
                return f
        f = Freezer(self.policy, self.rt)
        self.freezers.append(f)
        f.apply(root, called, when)
        return f

    def on_model(self, info):
        try:
            self.apply(info.root, info.called, getattr(info, "when", "first_forward"))
        except Exception as e:
            self.rt.fail("freeze: cannot freeze the model: %s: %s" % (type(e).__name__, e))

    def pre_step(self, optimizer, step, record):
        for f in self.freezers:
            f.pre_step(optimizer, step, record)

    def finish(self, fields):
        parts = [f.finish() for f in self.freezers]
        if not parts:
            fields["freeze"] = {"tensors": 0, "blocks": [], "models": 0}
            return
        out = dict(parts[0])
        for p in parts[1:]:
            for k, v in p.items():
                if k != "blocks":
                    out[k] = out.get(k, 0) + v
        out["models"] = len(parts)
        fields["freeze"] = out

    def close(self):
        for f in self.freezers:
            f.undo()


def _watch_ddp(fr):
    """Freeze the module handed to DistributedDataParallel before its reducer is built (the
    wrapper is the runtime's: gone with it)."""
    mod = sys.modules.get("torch.nn.parallel.distributed")
    if mod is None:
        try:
            from torch.nn.parallel import distributed as mod
        except Exception as e:  # no distributed support in this torch build
            debug("freeze: DDP not watched (%s)" % e)
            return

    def wrap(real):
        def __init__(self, *args, **kwargs):
            module = args[0] if args else kwargs.get("module")
            if module is not None and fr.rt.active() and fr.rt.accepts(unwrap(module)):
                try:
                    fr.apply(unwrap(module), None, "ddp_init")
                except Exception as e:
                    fr.rt.fail("freeze: cannot freeze the model before DDP: %s: %s" % (type(e).__name__, e))
            real(self, *args, **kwargs)
        return __init__

    fr.rt.patch(mod.DistributedDataParallel, "__init__", wrap)


def setup(policy, rt):
    """The Freeze (one Freezer per bound model) is the runtime's feature "freeze": the checkpoint
    check of features/tamper.py finds it there."""
    fr = rt.provide("freeze", Freeze(policy, rt))
    _watch_ddp(fr)
    rt.on_model(fr.on_model)
    rt.add_pre(fr.pre_step, order=registry.order("freeze"))
    rt.on_finish(fr.finish)
    rt.on_close(fr.close)
    return fr
