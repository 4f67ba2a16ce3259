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
"""
import functools
import sys

from .. import _core
from ..runtime.context import debug

WATCH_EVERY = 16   # forwards between two checks
SAMPLE = 4         # trainable tensors at each end of the size order
MAX_RECORDS = 5    # violations of one kind written per process

_state = {"rt": None, "forwards": 0, "sample": None, "sums": None, "steps": None, "counts": {}, "saving": 0}


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


def _violation(kind, what, fields):
    rt = _state["rt"]
    n = _state["counts"].get(kind, 0) + 1
    _state["counts"][kind] = n
    if n <= MAX_RECORDS:
        rt.violation(what, dict(fields, kind=kind, occurrence=n), skip=3)


def check_hooks(where):
    rt = _state["rt"]
    if rt is None or not rt.active() or hooks_present():
        return True
    m = _optmod()
    _violation("hooks_removed", "safehook's optimizer step hooks were removed from torch; put back",
               {"where": where})
    m.register_optimizer_step_pre_hook(_core.pre_step)
    m.register_optimizer_step_post_hook(_core.post_step)
    return False


def _pick(params):
    ps = [p for p in params if p.requires_grad and p.numel() > 0]
    ps.sort(key=lambda p: p.numel())
    return ps[:SAMPLE] + [p for p in ps[-SAMPLE:] if all(p is not q for q in ps[:SAMPLE])]


def _sums(ps):
    from .freeze import checksums
    return checksums(ps)


def check_moved(where):
    """Sampled trainable tensors changed while no optimizer step went through safehook."""
    rt = _state["rt"]
    if rt is None or not rt.active() or not _state["sample"]:
        return True
    st = _core.stats()
    if st["in_step"]:
        # inside a step (a probe's forward, a rollback): the features move weights on purpose
        return True
    steps = st["steps"]
    now = _sums(_state["sample"])
    if steps == 0:
        # before the first step through safehook a script may prepare its model by hand (a
        # pretraining loop of its own); a job that never steps through safehook writes no
        # "start" record, which is what the out-of-process checks (SPANK task check) flag
        _state["sums"], _state["steps"] = now, steps
        return True
    moved = now != _state["sums"] and steps == _state["steps"]
    if moved:
        _violation("moved_without_step",
                   "trainable parameters changed with no optimizer step through safehook (a manual update, "
                   "a replaced step, an update in a gradient hook, or a loaded state dict)",
                   {"where": where, "steps": steps})
    _state["sums"], _state["steps"] = now, steps
    return not moved


def _forward_pre(module, args):
    _state["forwards"] += 1
    if _state["forwards"] % WATCH_EVERY == 0:
        try:
            check_hooks("forward")
            check_moved("forward")
        except Exception as e:  # never break the user's forward
            debug("tamper: check failed: %r" % (e,))
    return None


def _on_model(info):
    _state["sample"] = _pick(info.root.parameters())
    _state["sums"] = _sums(_state["sample"]) if _state["sample"] else None
    _state["steps"] = _core.stats()["steps"]
    info.root.register_forward_pre_hook(_forward_pre)


def before_save(path):
    """Run by the wrapped save functions before a checkpoint is written."""
    rt = _state["rt"]
    if rt is None or not rt.active():
        return
    rec = {"path": str(path) if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__") else type(path).__name__}
    rec["hooks"] = "ok" if check_hooks("checkpoint") else "removed"
    if not check_moved("checkpoint"):
        rec["moved_without_step"] = True
    from . import freeze
    fz = freeze.CURRENT[0]
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


def _wrap(owner, name):
    real = getattr(owner, name, None)
    if real is None or getattr(real, "_safehook_save", False):
        return

    @functools.wraps(real)
    def save(*args, **kwargs):
        if _state["saving"] == 0:  # a save that calls another save is one checkpoint
            try:
                path = args[1] if len(args) > 1 else kwargs.get("f", kwargs.get("filename"))
                before_save(path)
            except Exception as e:  # never break the user's save
                debug("tamper: checkpoint check failed: %r" % (e,))
        _state["saving"] += 1
        try:
            return real(*args, **kwargs)
        finally:
            _state["saving"] -= 1

    save._safehook_save = True
    setattr(owner, name, save)


def _wrap_saves():
    torch = sys.modules.get("torch")
    if torch is not None:
        _wrap(torch, "save")
        ser = sys.modules.get("torch.serialization")
        if ser is not None:
            _wrap(ser, "save")
    try:
        import safetensors.torch as st
    except Exception:
        return
    _wrap(st, "save_file")
    _wrap(st, "save_model")


def _finish(fields):
    if _state["rt"] is not None and _state["rt"].active() and not hooks_present():
        _violation("hooks_removed", "safehook's optimizer step hooks were removed from torch", {"where": "exit"})
    if _state["counts"]:
        fields["tamper"] = dict(_state["counts"])


def setup(policy, rt):
    _state.update(rt=rt, forwards=0, counts={})
    rt.on_model(_on_model)
    _wrap_saves()
    rt.on_finish(_finish)
