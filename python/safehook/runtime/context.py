"""The Runtime: everything a feature (freeze, safegrad, probes, gate, monitor, shaping, tamper)
sees of safehook, and everything it leaves in the process. One Runtime is made by each
activation (install(), the preload) and destroyed exactly by uninstall() or by the next
install(); it owns

* the step callables, model listeners, finish and close callbacks of the features;
* every hook a feature attaches (``rt.register_hook``: module forward and forward pre-hooks,
  the global module forward pre-hook of the model binding, tensor gradient hooks) and every
  function it wraps (``rt.patch``: torch.save, Optimizer.__init__, DDP's __init__). Nothing
  else attaches one, so that ``close()`` removes them all;
* every feature's state (``rt.provide(name, obj)``, ``rt.feature(name)``) and every cache
  (``rt.owned(key, factory)``: the probes of the policy, the step's safety gradient, the models
  bound, see model.py). Once closed and dropped, no model and no gradient-sized buffer is held
  by safehook.

A feature is a module of the registry (safehook.runtime.registry: the C schema's FEATURES) with
``setup(policy, rt)``, called once at activation when its policy section is present:

    def setup(policy, rt):
        rt.on_model(lambda info: ...)          # once per model bound (see model.py)
        rt.add_pre(my_pre_step, order=registry.order("name"))  # f(optimizer, step, record)
        rt.add_post(my_post_step, order=registry.order("name"))  # after the update

``record`` is a dict merged into the step's audit record. Orders (the registry's): model binding
0, freeze 10, shaping 15, safegrad 20, gate 30, monitor 40 (lower runs first). When step() gets a closure,
the pre-step callables run inside it, after its backward (runtime/closure.py): they always see
the gradients the optimizer will use.

Several ranks: a decision that changes the update (skip, scale, project or not, roll back, flag
an example) must be the same on every rank. Reduce it first with ``rt.agree(value, op)`` (see
stacks.agree): every rank calls it at the same point, e.g. ``skip = rt.agree(skip, "any")``.

Failing is a decision too, and it has one path. ``rt.fail(msg)`` (protection cannot be applied:
a setup error, a hook that broke) records and says it; under on_error=abort every rank stops at
the start of the next optimizer step, together: the runtime's gate, which the C core calls first
in every step, agrees "has any rank failed?" (one all_reduce per step when there are several
ranks) before the step is counted or recorded and before any feature's collective runs.
``rt.together(what, fn, ...)`` runs work that may fail on one rank only (a probe reading its
file, a snapshot written to a full disk) right before a collective that depends on it: the failure is agreed at once, and under abort every rank raises PolicyError at
that point, before the update; under warn every rank gets (False, None) and the feature stands
down on all of them. A feature that cannot go on raises ``Refusal(msg)`` inside such work.
"""
import functools
import traceback

from .. import _core
from .log import debug, warn  # noqa: F401  (re-exported for features)
from .stacks import FSDP1_HINT, ZERO_HINT, agree, fsdp1, rank, strip_name, unwrap, world  # noqa: F401
from .stacks import zero_partitions as _zero_partitions

HOOK_KINDS = ("forward_pre", "forward", "global_forward_pre", "tensor")


class Refusal(Exception):
    """Raised by a feature's work inside rt.together: protection cannot be applied, for the
    reason its message gives (used as it is, after the feature's name)."""


def attach(kind, target, fn, **kw):
    """Attach FN to torch as a hook of KIND (see Runtime.register_hook); torch's handle."""
    if kind not in HOOK_KINDS:
        raise ValueError("hook kind must be one of %s" % ", ".join(HOOK_KINDS))
    if kind == "tensor":
        return target.register_hook(fn)
    if kind == "forward_pre":
        return target.register_forward_pre_hook(fn, **kw)
    if kind == "forward":
        return target.register_forward_hook(fn, **kw)
    from torch.nn.modules import module as nnmod
    return nnmod.register_module_forward_pre_hook(fn)


def _own_module_only(target, fn):
    """FN as a module hook that acts for TARGET alone. A plain function: copy.deepcopy of the
    user's model copies the hook dicts, and a function is copied as itself, so a copy neither
    drags the runtime along (a bound method's object would be deep-copied) nor is acted on (the
    copy's calls are passed over). TARGET is held weakly."""
    import weakref
    ref = weakref.ref(target)

    def hook(module, *args, **kwargs):
        if module is not ref():
            return None
        return fn(module, *args, **kwargs)

    hook.__wrapped__ = fn
    return hook


class _Handle:
    """A hook attached through the runtime: remove() detaches it and forgets it."""
    __slots__ = ("_rt", "_key", "_torch")

    def __init__(self, rt, key, handle):
        self._rt, self._key, self._torch = rt, key, handle

    def remove(self):
        self._torch.remove()
        self._rt._handles.pop(self._key, None)


class Runtime:
    """Handed to each feature's setup(). ``report`` (records and says a failure), ``active`` and
    ``restore_step_hooks`` come from the activation code, so that a feature never imports it."""

    def __init__(self, policy=None, report=None, active=None, restore_step_hooks=None):
        self.policy = policy or {}
        self._report = report
        self._failed = None      # the first failure under on_error=abort: every rank stops at the next step
        self._active = active
        self._restore_step_hooks = restore_step_hooks
        self._pre, self._post, self._finish, self._close = [], [], [], []
        self._handles = {}       # key -> torch RemovableHandle
        self._next_key = 0
        self._patches = []       # [owner, name, real, installed gate, live flag cell]
        self._owned = {}
        self.features = {}
        self._running = 0
        self._published = False
        self._closed = False
        self.models = None       # model.Models, made by the first on_model
        self._records = []       # observers of audit(): on_record

    @property
    def on_error(self):
        """'abort' (the default) or 'warn': what the policy says to do when protection cannot
        be applied."""
        p = self.policy
        return (p.get("_meta") or {}).get("on_error", p.get("on_error", "abort"))

    def active(self):
        """True while these features are in force (False after uninstall() or once a new
        policy replaced them)."""
        if self._closed:
            return False
        return self._active() if self._active is not None else True

    @property
    def running(self):
        """True while this runtime's own step callables run (a probe's forward, a snapshot
        write, a rollback): what they do to the model is safehook's, not the user's."""
        return self._running > 0

    # -- features' state and caches --
    def provide(self, name, obj):
        """Make OBJ the state of feature NAME (``feature(name)`` finds it)."""
        self.features[name] = obj
        return obj

    def feature(self, name):
        """The state of feature NAME in this runtime, or None when the policy has no such feature."""
        return self.features.get(name)

    def owned(self, key, factory):
        """The cache KEY of this runtime, made by factory(self) at the first call."""
        if key not in self._owned:
            self._owned[key] = factory(self)
        return self._owned[key]

    # -- step callables --
    def add_pre(self, fn, order=50):
        self._pre.append((order, len(self._pre), fn))
        self._publish()

    def add_post(self, fn, order=50):
        self._post.append((order, len(self._post), fn))
        self._publish()

    def _run(self, fns, opt, step, record):
        self._running += 1
        try:
            for f in fns:
                f(opt, step, record)
        finally:
            self._running -= 1

    def start(self):
        """Put this runtime's step callables in force (the activation code calls it once the
        features are set up; add_pre/add_post after it publish again)."""
        self._started = True
        self._publish()

    def _publish(self):
        if not getattr(self, "_started", False):
            return
        from . import closure
        pre = [f for _, _, f in sorted(self._pre, key=lambda t: t[:2])]
        post = [f for _, _, f in sorted(self._post, key=lambda t: t[:2])]
        _core.set_features([functools.partial(self._run, pre)] if pre else [],
                           [functools.partial(self._run, post)] if post else [],
                           closure.wrap if pre else None, self._stop_if_failed)
        self._published = True

    def on_close(self, cb):
        """Call cb() when these features are removed: uninstall(), or install() of a new
        policy. A feature undoes what it did to the user's objects there (freeze: requires_grad)."""
        self._close.append(cb)

    def on_finish(self, cb):
        """Call cb(fields) at exit, before the 'end' record; cb may add keys to fields."""
        self._finish.append(cb)

    def finish(self, fields):
        """Run the finish callbacks (errors are logged, never raised)."""
        for cb in self._finish:
            try:
                cb(fields)
            except Exception as e:  # never break the user's exit
                debug("finish callback failed: %r" % (e,))

    # -- hooks: the only way a feature attaches one --
    def register_hook(self, kind, target, fn, **kw):
        """Attach FN as a hook of KIND on TARGET and return a handle with remove():
        "forward_pre" / "forward" (TARGET a module; KW as torch's, e.g. with_kwargs=True),
        "global_forward_pre" (every module's forward; TARGET None), "tensor" (TARGET a tensor:
        a gradient hook; it lives as long as the tensor and does nothing once the runtime is
        closed, and its handle is not kept). Every module hook is removed by close()."""
        if kind == "tensor":
            def guarded(g):
                return None if self._closed else fn(g)
            return attach(kind, target, guarded)
        if kind != "global_forward_pre":
            fn = _own_module_only(target, fn)
        h = attach(kind, target, fn, **kw)
        key = self._next_key
        self._next_key += 1
        self._handles[key] = h
        return _Handle(self, key, h)

    def hook_count(self):
        """Hooks this runtime holds now (for tests)."""
        return len(self._handles)

    def patch(self, owner, name, wrap):
        """Replace OWNER.NAME by wrap(real) while the runtime lives; close() puts REAL back (or,
        when something wrapped it again meanwhile, leaves a pass-through to REAL in place)."""
        real = getattr(owner, name)
        inner = wrap(real)
        live = [True]

        def gate(*args, **kwargs):
            return (inner if live[0] else real)(*args, **kwargs)

        functools.update_wrapper(gate, real)
        gate._safehook_patch = True
        setattr(owner, name, gate)
        self._patches.append((owner, name, real, gate, live))
        return real

    def restore_step_hooks(self):
        """Put safehook's optimizer step hooks back into torch's tables (tamper, after they
        were removed), through the activation code so that uninstall() removes them."""
        if self._restore_step_hooks is not None:
            self._restore_step_hooks()

    # -- the model --
    def _binding(self):
        if self.models is None:
            from .model import Models
            self.models = Models(self)
            self.add_pre(self._bind_step, order=0)
        return self.models

    def on_model(self, cb):
        """Call cb(ModelInfo) once for each model bound (the root module that owns an
        optimizer's parameters; see model.py), now for those already bound. Several models may
        be bound in one process."""
        self._binding().on_model(cb)

    def _bind_step(self, optimizer, step, record):
        self.models.bind_step(optimizer)

    def accepts(self, root):
        """True when these features act on the model ROOT: always, except in a branch of the
        embedded default (runtime/default.py: protect or fall back, model by model). A feature
        that acts on a model before it is bound (freeze, at DDP's construction) asks first."""
        return True

    def model_for(self, optimizer):
        """The ModelInfo of the model OPTIMIZER trains, or None."""
        return self.models.for_optimizer(optimizer) if self.models is not None else None

    def model(self):
        """The first model bound, or None."""
        return self.models.current() if self.models is not None else None

    def all_models(self):
        """Every ModelInfo bound so far, in binding order."""
        return self.models.all() if self.models is not None else []

    def zero_partitions(self, params):
        """True when PARAMS are DeepSpeed ZeRO's flat partitions, not parameters of a bound
        model (see stacks.zero_partitions)."""
        known = {id(p) for info in self.all_models() for p in info.params.values()}
        return _zero_partitions(params, known)

    # -- ranks --
    def agree(self, value, op="max", group=None):
        """One decision for every rank: see stacks.agree."""
        return agree(value, op, group)

    # -- records --
    def audit(self, event, fields=None, step=None):
        ok = _core.audit(event, fields, step)
        for cb in self._records:
            try:
                cb(event, fields, step)
            except Exception as e:  # an observer never breaks the step that recorded
                debug("record observer failed: %r" % (e,))
        return ok

    def on_record(self, cb):
        """Call cb(event, fields, step) after each record written through audit() (e.g.
        safehook.integrations, which passes the records on to the Trainer's, Accelerate's and
        Python's logs). cb must not change FIELDS; its errors are logged, never raised."""
        self._records.append(cb)

    def violation(self, what, fields=None, skip=1):
        """A 'violation' record with the Python stack and the native (libunwind) stack of the
        call site."""
        rec = dict(fields or {})
        rec["what"] = what
        rec["python_stack"] = [l.rstrip("\n") for l in traceback.format_stack()[:-skip]]
        rec["native_stack"] = _core.native_stack(skip)
        _core.audit("violation", rec)
        debug("violation: %s" % what)

    def _say(self, msg, now=False):
        if self._report is not None:
            self._report(msg, self.on_error, now)
        else:
            warn(msg)

    def fail(self, msg):
        """Protection that the policy asks for cannot be applied: an "error" record and one line
        on stderr; under on_error=abort every rank stops at the start of the next optimizer step
        (see the module docstring)."""
        self._say(msg)
        if self.on_error == "abort" and self._failed is None:
            self._failed = msg

    def failed(self):
        """The failure that stops this runtime's job at its next step, or None."""
        return self._failed

    def _stop_if_failed(self):
        """The C core's gate, first in every optimizer step (before it is counted or recorded):
        stop here, on every rank, when any rank has failed."""
        failed = self._failed
        _, n = world()
        if n > 1:
            who = agree(rank() if failed is not None else -1, "max")
            if who >= 0 and failed is None:
                failed = ("protection could not be applied on rank %d (its own message says why); "
                          "every rank stops here" % who)
        if failed is not None:
            _core.set_pending_error(failed)
            raise _core.PolicyError(failed)

    def together(self, what, fn, *args, **kwargs):
        """Run fn(*args, **kwargs) on this rank and agree with the others whether it failed,
        before anything that depends on it: (True, its result) when it succeeded on every rank.
        Otherwise the failure (WHAT: the message's head; a Refusal's own message, or the
        exception's type and message) is recorded; under on_error=abort every rank raises
        PolicyError here, under warn every rank gets (False, None). A SafehookError that fn
        raises (a decision already agreed, such as the monitor's stop) passes through."""
        err = None
        try:
            out = fn(*args, **kwargs)
        except _core.SafehookError:
            raise
        except Exception as e:
            err, out = e, None
        who = -1 if err is None else rank()
        if world()[1] > 1:
            who = agree(who, "max")
        if who < 0:
            return True, out
        if err is None:
            msg = "%s: failed on rank %d (its own message says why); every rank stops here" % (what, who)
        elif isinstance(err, Refusal):
            msg = "%s: %s" % (what, err)
        else:
            msg = "%s: %s: %s" % (what, type(err).__name__, err)
        self._say(msg, now=True)
        if self.on_error == "abort":
            if self._failed is None:
                self._failed = msg
            _core.set_pending_error(msg)
            raise _core.PolicyError(msg) from err
        return False, None

    # -- the end --
    def close(self):
        """Remove these features and everything they left: the step callables, the on_close
        callbacks (run, errors logged), every hook and wrapper, the models bound, the features'
        state and the caches. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._published:
            _core.set_features([], [])
        for cb in reversed(self._close):
            try:
                cb()
            except Exception as e:
                debug("close callback failed: %r" % (e,))
        for h in list(self._handles.values()):
            h.remove()
        self._handles.clear()
        for owner, name, real, gate, live in reversed(self._patches):
            live[0] = False
            if getattr(owner, name, None) is gate:
                setattr(owner, name, real)
        self._patches = []
        if self.models is not None:
            self.models.close()
        self._pre, self._post, self._finish, self._close = [], [], [], []
        self.features.clear()
        self._owned.clear()


Context = Runtime  # the name of before
