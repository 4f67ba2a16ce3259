"""SafehookCallback: safehook's per-step stats in a transformers Trainer's own logs.

While safehook is active, every Trainer built afterwards gets one (it is added to
``transformers.trainer.DEFAULT_CALLBACKS`` as soon as that module is imported, whatever the
import order); passing ``callbacks=[SafehookCallback()]`` yourself does the same, and the added
one then stays quiet. Right after each of the Trainer's own training logs (every ``logging_steps``) the
callback logs the stats of the optimizer steps since the last one through ``Trainer.log()``
(an entry of its own, at the same step), so they land
in ``trainer.state.log_history`` and in every tracker ``report_to`` names (TensorBoard, W&B,
...): counts are summed over the interval (``safehook/projected``: projected steps,
``safehook/gate_skipped``, ``safehook/flagged``, ``safehook/rollbacks``, ...), values are
averaged (``safehook/cosine``, ``safehook/safety_loss``, ``safehook/gate_scale``) or the last
one taken (``safehook/probe_score``); ``safehook/steps`` is the number of optimizer steps they
cover. See integrations/tap.py for each key."""
import sys

from . import tap

SUMMED = ("safehook/projected", "safehook/gate_skipped", "safehook/gate_scaled", "safehook/flagged",
          "safehook/rollbacks", "safehook/shaping_masked_tokens", "safehook/shaping_rewritten")
LAST = ("safehook/probe_score",)

_state = {"watcher": None, "added": None}


def _callback_base():
    from transformers import TrainerCallback
    return TrainerCallback


def _find_trainer():
    """The Trainer whose callback handler is calling: the ``self`` of a calling frame."""
    mod = sys.modules.get("transformers.trainer")
    cls = getattr(mod, "Trainer", None)
    if cls is None:
        return None
    f = sys._getframe(1)
    for _ in range(12):
        if f is None:
            return None
        v = f.f_locals.get("self")
        if isinstance(v, cls):
            return v
        f = f.f_back
    return None


def _make_classes():
    base = _callback_base()

    class SafehookCallback(base):
        """Logs safehook's per-step stats through the Trainer's own log() at its logging steps
        (see the module docstring). TRAINER: the Trainer, when you build the callback for one;
        otherwise it is found when the Trainer calls the callback first."""

        auto = False
        trainer_logging = True  # tells the tap that a Trainer's trackers get the stats

        def __init__(self, trainer=None):
            self.trainer = trainer
            self.quiet = False
            self._logging = False
            self._reset()

        def _reset(self):
            self.sums, self.n, self.steps, self.last = {}, {}, 0, {}

        def add(self, step, stats):
            self.steps += 1
            for k, v in stats.items():
                if k in LAST:
                    self.last[k] = v
                else:
                    self.sums[k] = self.sums.get(k, 0) + v
                    self.n[k] = self.n.get(k, 0) + 1

        def stats(self):
            """The stats since the last log: counts summed, values averaged."""
            out = {}
            for k, v in self.sums.items():
                out[k] = v if k in SUMMED else v / self.n[k]
            out.update(self.last)
            if out:
                out["safehook/steps"] = self.steps
            return out

        def _find(self):
            if self.trainer is None:
                self.trainer = _find_trainer()
            return self.trainer

        def _attach(self):
            """Receive the tap's steps from now on (from the start of training: a Trainer built
            and never trained takes nothing)."""
            self._find()
            if self.auto and self.trainer is not None:
                # a SafehookCallback the user passed does the logging
                self.quiet = any(isinstance(c, SafehookCallback) and not c.auto
                                 for c in self.trainer.callback_handler.callbacks)
            if not self.quiet and self not in tap.sinks():
                tap.sinks().append(self)
            return self.trainer

        def __call__(self, step, stats):  # the tap's sink: one closed optimizer step
            self.add(step, stats)

        def _detach(self):
            if self in tap.sinks():
                tap.sinks().remove(self)

        def on_init_end(self, args, state, control, **kwargs):
            self._find()

        def on_train_begin(self, args, state, control, **kwargs):
            self._reset()
            self._attach()

        def _flush(self):
            s = self.stats()
            self._reset()
            if s and self.trainer is not None and not self.quiet:
                self._logging = True
                try:
                    self.trainer.log(s)
                finally:
                    self._logging = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            # right after the Trainer's own training log (its loss at a logging step): logging
            # from on_step_end instead would take the Trainer's should_log and drop its loss
            if not self._logging and logs and "loss" in logs and self.steps:
                self._flush()

        def on_train_end(self, args, state, control, **kwargs):
            if self.steps:
                self._flush()
            self._detach()

    class _AddedSafehookCallback(SafehookCallback):
        """The one safehook adds to every Trainer (a class of its own, so that a user's
        SafehookCallback beside it is no duplicate to transformers)."""
        auto = True

    return SafehookCallback, _AddedSafehookCallback


_classes = {}


def classes():
    if not _classes:
        _classes["user"], _classes["auto"] = _make_classes()
    return _classes["user"], _classes["auto"]


def _add_to(trainer_mod):
    lst = getattr(trainer_mod, "DEFAULT_CALLBACKS", None)
    if not isinstance(lst, list):
        return
    auto = classes()[1]
    if auto not in lst:
        lst.append(auto)
        _state["added"] = lst


def _after_trainer_import(module):
    _unwatch()
    _add_to(module)


def auto_add():
    """Add the callback to every Trainer built from now on (now if transformers.trainer is
    imported, else as soon as it is)."""
    mod = sys.modules.get("transformers.trainer")
    if mod is not None:
        _add_to(mod)
        return
    if _state["watcher"] is None:
        from ..runtime.importwatch import AfterImport
        _state["watcher"] = AfterImport("transformers.trainer", _after_trainer_import).insert()


def _unwatch():
    w, _state["watcher"] = _state["watcher"], None
    if w is not None:
        w.remove()


def auto_remove():
    """Undo auto_add (uninstall(), or a new policy)."""
    _unwatch()
    lst, _state["added"] = _state["added"], None
    if lst is not None and _classes and _classes["auto"] in lst:
        lst.remove(_classes["auto"])
    for s in list(tap.sinks()):
        tap.sinks().remove(s)
