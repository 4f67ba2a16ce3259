"""Tamper evidence inside the process, honestly scoped: it detects and records, and it restores
what it can, but nothing in-process stops the user who owns the process (see README, "Shared
servers": what is prevented, detected where, and not covered).

Set up for every policy (no section of its own). Three checks:
- Hooks removed: every WATCH_EVERY forwards of the training model (a forward pre-hook on that one
  module, not a global hook) and at every checkpoint save, safehook's optimizer step hooks must
  still be in torch's global hook tables. Missing: a "violation" record, and the hooks are put
  back (while safehook is installed).
- Parameters that moved with no optimizer step through safehook (a manual no_grad update, a
  replaced ``step``, an update made in a post-accumulate-grad hook, a loaded state dict): at the
  same ticks (outside a step, after the first step through safehook), a checksum of a sample of
  the trainable tensors (the SAMPLE smallest and the SAMPLE largest) that changed while
  safehook's step counter did not is a "violation".
- Checkpoint saves: ``torch.save`` and safetensors' ``save_file``/``save_model`` are wrapped; before
  the file is written the frozen tensors are compared with their freeze-time checksums (the freeze
  feature's check: changed ones are recorded and, with freeze.restore, restored; a state dict
  shares storage with the model, so the file then holds the restored weights), and the hooks are
  checked. Each save leaves a "checkpoint" record with the path and the outcome.

Saves and forwards made by safehook's own step callables (the monitor's snapshots and probe
forwards, a rollback) are not checked: they are the runtime's (``rt.running``). The state is a
``Tamper`` object, the runtime's feature "tamper"; its hooks and save wrappers are the runtime's.
"""
import sys

from .. import _core
from ..probes import gradient
from ..runtime.context import debug

WATCH_EVERY = 16   # forwards between two checks
SAMPLE = 4         # trainable tensors at each end of the size order
MAX_RECORDS = 5    # violations of one kind written per runtime


def _optmod():
    return sys.modules.get("torch.optim.optimizer")


def hooks_present():
    """True when safehook's pre and post step hooks are in torch's global tables (or torch's
    optimizer module is not loaded yet)."""
    m = _optmod()
    if m is None:
        return True
    pre = getattr(m, "_global_optimizer_pre_hooks", {})
    post = getattr(m, "_global_optimizer_post_hooks", {})
    return (any(h is _core.pre_step for h in pre.values()) and any(h is _core.post_step for h in post.values()))


def _pick(params):
    ps = [p for p in params if p.requires_grad and p.numel() > 0]
    ps.sort(key=lambda p: p.numel())
    return ps[:SAMPLE] + [p for p in ps[-SAMPLE:] if all(p is not q for q in ps[:SAMPLE])]


def _sums(ps):
    from .freeze import checksums
    return checksums(ps)


class Tamper:
    """The tamper checks of one runtime RT."""

    def __init__(self, rt):
        self.rt = rt
        self.forwards = 0
        self.sample = None   # the trainable tensors checked
        self.sums = None     # their checksums at the last check
        self.steps = None    # the step count then
        self.counts = {}
        self.saving = 0

    def _violation(self, kind, what, fields):
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if n <= MAX_RECORDS:
            self.rt.violation(what, dict(fields, kind=kind, occurrence=n), skip=3)

    def check_hooks(self, where):
        if not self.rt.active() or hooks_present():
            return True
        self._violation("hooks_removed", "safehook's optimizer step hooks were removed from torch; put back",
                        {"where": where})
        self.rt.restore_step_hooks()
        return False

    def check_moved(self, where):
        """Sampled trainable tensors changed while no optimizer step went through safehook."""
        if not self.rt.active() or not self.sample:
            return True
        st = _core.stats()
        if st["in_step"] or self.rt.running:
            # inside a step or safehook's own step callables (a probe's forward, a rollback):
            # the features move weights on purpose
            return True
        steps = st["steps"]
        now = _sums(self.sample)
        if steps == 0:
            # before the first step through safehook a script may prepare its model by hand (a
            # pretraining loop of its own); a job that never steps through safehook writes no
            # "start" record, which is what the out-of-process checks (SPANK task check) flag
            self.sums, self.steps = now, steps
            return True
        moved = now != self.sums and steps == self.steps
        if moved:
            # the weights are not those any cached safety gradient was computed at
            gradient.of(self.rt).invalidate("moved_without_step")
            self._violation("moved_without_step",
                            "trainable parameters changed with no optimizer step through safehook (a manual update, "
                            "a replaced step, an update in a gradient hook, or a loaded state dict)",
                            {"where": where, "steps": steps})
        self.sums, self.steps = now, steps
        return not moved

    def forward_pre(self, module, args):
        self.forwards += 1
        if self.forwards % WATCH_EVERY == 0:
            try:
                self.check_hooks("forward")
                self.check_moved("forward")
            except Exception as e:  # never break the user's forward
                debug("tamper: check failed: %r" % (e,))
        return None

    def on_model(self, info):
        self.sample = _pick(info.root.parameters())
        self.sums = _sums(self.sample) if self.sample else None
        self.steps = _core.stats()["steps"]
        self.rt.register_hook("forward_pre", info.root, self.forward_pre)

    def before_save(self, path):
        """Run by the wrapped save functions before a checkpoint is written."""
        rt = self.rt
        if not rt.active() or rt.running:  # a save of safehook's own (the monitor's snapshot)
            return
        rec = {"path": str(path) if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__")
               else type(path).__name__}
        rec["hooks"] = "ok" if self.check_hooks("checkpoint") else "removed"
        if not self.check_moved("checkpoint"):
            rec["moved_without_step"] = True
        fz = rt.feature("freeze")
        for fr in (fz.freezers if fz is not None else ()):  # one Freezer per bound model
            if not fr.params:
                continue
            r = {}
            fr.check(_core.stats()["current"] or None, r, where="checkpoint %s" % rec["path"])
            if r.get("freeze_check") is not None:
                rec["frozen"] = r["freeze_check"] if rec.get("frozen") in (None, r["freeze_check"]) else "mixed"
            if "freeze_restored" in r:
                rec["restored_before_write"] = bool(rec.get("restored_before_write")) or bool(r["freeze_restored"])
        rt.audit("checkpoint", rec)

    def _wrap(self, owner, name):
        if getattr(owner, name, None) is None:
            return
        tamper = self

        def wrap(real):
            def save(*args, **kwargs):
                if tamper.saving == 0:  # a save that calls another save is one checkpoint
                    try:
                        path = args[1] if len(args) > 1 else kwargs.get("f", kwargs.get("filename"))
                        tamper.before_save(path)
                    except Exception as e:  # never break the user's save
                        debug("tamper: checkpoint check failed: %r" % (e,))
                tamper.saving += 1
                try:
                    return real(*args, **kwargs)
                finally:
                    tamper.saving -= 1
            return save

        self.rt.patch(owner, name, wrap)

    def wrap_saves(self):
        torch = sys.modules.get("torch")
        if torch is not None:
            ser = sys.modules.get("torch.serialization")
            self._wrap(torch, "save")
            if ser is not None:
                self._wrap(ser, "save")
        try:
            import safetensors.torch as st
        except Exception:
            return
        self._wrap(st, "save_file")
        self._wrap(st, "save_model")

    def finish(self, fields):
        if self.rt.active() and not hooks_present():
            self._violation("hooks_removed", "safehook's optimizer step hooks were removed from torch", {"where": "exit"})
        if self.counts:
            fields["tamper"] = dict(self.counts)


def setup(policy, rt):
    t = rt.provide("tamper", Tamper(rt))
    rt.on_model(t.on_model)
    t.wrap_saves()
    rt.on_finish(t.finish)
