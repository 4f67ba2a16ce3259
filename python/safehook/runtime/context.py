"""What a feature (freeze, safegrad, probes, gate, monitor) sees of the runtime: the Context.

A feature is a module safehook.features.<name> with ``setup(policy, rt)``, called once at
activation when its policy section is present; ``rt`` is a Context. It registers step callables and model listeners on ``rt``:

    def setup(policy, rt):
        rt.on_model(lambda info: ...)          # at the model's first forward
        rt.add_pre(my_pre_step, order=20)      # f(optimizer, step, record), before the update
        rt.add_post(my_post_step, order=20)    # f(optimizer, step, record), after it

``record`` is a dict merged into the step's audit record. Orders: freeze 10, safegrad 20,
gate 30, monitor 40 (lower runs first).
"""
import traceback

from .. import _core
from .log import debug, warn  # noqa: F401  (re-exported for features)
from .model import strip_name, unwrap, current as current_model  # noqa: F401


class Context:
    """Handed to each feature's setup(). ``fail`` and ``active`` come from the activation code,
    so that a feature never imports it."""

    def __init__(self, policy, fail=None, active=None):
        self.policy = policy or {}
        self._fail = fail
        self._active = active
        self._pre = []
        self._post = []
        self._finish = []

    @property
    def on_error(self):
        """'abort' (the default) or 'warn': what the policy says to do when protection cannot
        be applied."""
        p = self.policy
        return (p.get("_meta") or {}).get("on_error", p.get("on_error", "abort"))

    def active(self):
        """True while the optimizer hooks are registered (False after uninstall())."""
        return self._active() if self._active is not None else True

    # -- step callables --
    def add_pre(self, fn, order=50):
        self._pre.append((order, len(self._pre), fn))
        self._publish()

    def add_post(self, fn, order=50):
        self._post.append((order, len(self._post), fn))
        self._publish()

    def _publish(self):
        _core.set_features([f for _, _, f in sorted(self._pre, key=lambda t: t[:2])],
                           [f for _, _, f in sorted(self._post, key=lambda t: t[:2])])

    def on_finish(self, cb):
        """Call cb(fields) at exit, before the 'end' record; cb may add keys to fields."""
        self._finish.append(cb)

    # -- the model --
    def on_model(self, cb):
        """Call cb(ModelInfo) at the first forward of the training model (now, if already seen)."""
        from . import model
        model.on_model(cb)

    # -- records --
    def audit(self, event, fields=None, step=None):
        return _core.audit(event, fields, step)

    def violation(self, what, fields=None, skip=1):
        """A 'violation' record with the Python stack and the native (libunwind) stack of the
        call site."""
        rec = dict(fields or {})
        rec["what"] = what
        rec["python_stack"] = [l.rstrip("\n") for l in traceback.format_stack()[:-skip]]
        rec["native_stack"] = _core.native_stack(skip)
        _core.audit("violation", rec)
        debug("violation: %s" % what)

    def fail(self, msg):
        """Protection that the policy asks for cannot be applied: say so once; under
        on_error=abort the first optimizer step raises (see boot._protection_failed)."""
        if self._fail is not None:
            self._fail(msg)
        else:
            warn(msg)
            if self.on_error == "abort":
                _core.set_pending_error(msg)


Runtime = Context  # the name features and tests used before the move
