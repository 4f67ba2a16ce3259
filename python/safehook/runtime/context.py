"""What a feature (freeze, safegrad, probes, gate, monitor) sees of the runtime: the Context.

A feature is a module safehook.features.<name> with ``setup(policy, rt)``, called once at
activation when its policy section is present; ``rt`` is a Context. It registers step callables and model listeners on ``rt``:

    def setup(policy, rt):
        rt.on_model(lambda info: ...)          # once per model bound (see model.py)
        rt.add_pre(my_pre_step, order=20)      # f(optimizer, step, record), before the update
        rt.add_post(my_post_step, order=20)    # f(optimizer, step, record), after it

``record`` is a dict merged into the step's audit record. Orders: model binding 0, freeze 10,
safegrad 20, gate 30, monitor 40 (lower runs first). When step() gets a closure, the pre-step
callables run inside it, after its backward (runtime/closure.py): they always see the gradients
the optimizer will use.

Several ranks: a decision that changes the update (skip, scale, project or not, roll back, flag
an example) must be the same on every rank. Reduce it first with ``rt.agree(value, op)`` (or the
module function ``agree``): one all_reduce when torch.distributed is initialized, the value
itself otherwise; every rank calls it at the same point. E.g. ``skip = rt.agree(skip, "any")``,
``score = rt.agree(score, "min")``.
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
        self._binding = False
        self._close = []
        self._closed = False
        self._records = []

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

    # -- step callables --
    def add_pre(self, fn, order=50):
        self._pre.append((order, len(self._pre), fn))
        self._publish()

    def add_post(self, fn, order=50):
        self._post.append((order, len(self._post), fn))
        self._publish()

    def _publish(self):
        from . import closure
        pre = [f for _, _, f in sorted(self._pre, key=lambda t: t[:2])]
        _core.set_features(pre, [f for _, _, f in sorted(self._post, key=lambda t: t[:2])],
                           closure.wrap if pre else None)

    def on_close(self, cb):
        """Call cb() when these features are removed: uninstall(), or install() of a new
        policy. A feature undoes what it did to the user's objects there (freeze: requires_grad)."""
        self._close.append(cb)

    def close(self):
        """Remove these features: the step callables, the model listeners and hooks, and run
        the on_close callbacks (errors are logged, never raised)."""
        from . import model
        self._closed = True
        model.reset()
        for cb in reversed(self._close):
            try:
                cb()
            except Exception as e:
                debug("close callback failed: %r" % (e,))
        self._close = []

    def on_finish(self, cb):
        """Call cb(fields) at exit, before the 'end' record; cb may add keys to fields."""
        self._finish.append(cb)

    # -- the model --
    def on_model(self, cb):
        """Call cb(ModelInfo) once for each model bound (the root module that owns an
        optimizer's parameters; see model.py), now for those already bound. Several models may
        be bound in one process."""
        from . import model
        if not self._binding:
            self._binding = True
            self.add_pre(self._bind_step, order=0)
        model.on_model(cb)

    @staticmethod
    def _bind_step(optimizer, step, record):
        from . import model
        model.bind_step(optimizer)

    def model_for(self, optimizer):
        """The ModelInfo of the model OPTIMIZER trains, or None."""
        from . import model
        return model.for_optimizer(optimizer)

    def models(self):
        """Every ModelInfo bound so far, in binding order."""
        from . import model
        return model.models()

    # -- ranks --
    def agree(self, value, op="max", group=None):
        """One decision for every rank: VALUE (a number or bool, or a list of them) reduced
        over the ranks of GROUP (default: the world) with OP ("max", "min", "sum", "mean",
        "any", "all"), so that every rank takes the same decision; VALUE itself when
        torch.distributed is not initialized or the world is one rank. One all_reduce (float64;
        on the current CUDA device under nccl). Every rank must call it at the same point, as any
        collective: call it on every step where the decision is made, not only where it is true.
        Booleans come back as booleans ("any": True when any rank says True)."""
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

    def fail(self, msg):
        """Protection that the policy asks for cannot be applied: say so once; under
        on_error=abort the first optimizer step raises (see boot._protection_failed)."""
        if self._fail is not None:
            self._fail(msg)
        else:
            warn(msg)
            if self.on_error == "abort":
                _core.set_pending_error(msg)


def zero_partitions(params):
    """True when PARAMS (what an optimizer steps) are DeepSpeed ZeRO's flat partitions rather
    than a model's parameters: deepspeed is loaded, some model is bound, and none of PARAMS
    belongs to a bound model. Such a partition carries no parameter names and a slice of many
    tensors; a probe's backward outside the engine never reaches it (and breaks ZeRO's gradient
    reduction), and restoring the model's weights does not restore it."""
    import sys
    if "deepspeed" not in sys.modules or not params:
        return False
    from . import model
    infos = model.models()
    if not infos:
        return False
    known = {id(p) for info in infos for p in info.params.values()}
    return not any(id(p) in known for p in params)


ZERO_HINT = "use DDP or FSDP2 (fully_shard) for this feature"

FSDP1_HINT = "use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP"


def fsdp1(info):
    """What makes the model of INFO (a ModelInfo) an FSDP1 model, or None: a
    FullyShardedDataParallel module in it, or flat parameters (FSDP1's FlatParameter). Its
    parameters are flat shards of several tensors each, and its inner module cannot be called
    without the wrapper gathering them, so no feature that needs per-tensor gradients or calls
    the model for a probe can act on it; each refuses with one line naming FSDP1."""
    mods = [m for m in (getattr(info, "called", None), getattr(info, "root", None)) if m is not None]
    for m in mods:
        for sub in m.modules():
            if type(sub).__name__ == "FullyShardedDataParallel":
                return "FullyShardedDataParallel"
    for m in mods[-1:]:
        for n, p in m.named_parameters():
            if getattr(p, "_is_flat_param", False):
                return "flat parameter %s" % n
    return None


_OPS = {"max": "MAX", "min": "MIN", "sum": "SUM", "mean": "SUM", "any": "MAX", "all": "MIN"}


def world(group=None):
    """(torch.distributed module, world size) when a process group is initialized, else (None, 1)."""
    import sys
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None, 1
    n = dist.get_world_size(group)
    return (dist, n) if n > 1 else (None, 1)


def agree(value, op="max", group=None):
    """See Context.agree."""
    if op not in _OPS:
        raise ValueError("agree: op must be one of %s" % ", ".join(sorted(_OPS)))
    dist, n = world(group)
    if dist is None:
        return value
    import torch
    many = isinstance(value, (list, tuple))
    vals = list(value) if many else [value]
    boolean = [isinstance(v, bool) for v in vals]
    dev = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([float(v) for v in vals], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    if op == "mean":
        t /= n
    out = [bool(x) if b else x for x, b in zip(t.cpu().tolist(), boolean)]
    return out if many else out[0]


Runtime = Context  # the name features and tests used before the move
