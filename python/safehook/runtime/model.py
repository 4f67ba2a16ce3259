"""Finding the models being trained. A model is the root module that owns an optimizer's
parameters: one per optimizer, several per process (a notebook, a sweep, a GAN). A module that
no optimizer trains (a reference model evaluated first, a teacher, a decoy) is never bound.

How an optimizer gets its model, earliest first:

* at its construction (torch.optim.Optimizer.__init__ is wrapped while safehook is active): a
  module already called that holds all its parameters, else the root module holding them all
  (find_root: one gc scan). So the freeze happens before the first forward and backward, before
  DeepSpeed flattens the parameters, before FSDP2's lazy initialization;
* at the next forward of a module that holds all its parameters: a global forward pre-hook is
  registered only while some known optimizer has no model (a global module hook slows every
  module call and makes torch.compile warn), checked once per module, and removed as soon as
  every known optimizer is bound;
* at install(), for optimizers that already exist (find_root);
* at its first step (the features' first pre-step callable, see bind_step), when none of the
  above saw it (an optimizer created before install(), Lightning calling training_step instead
  of the module): the smallest live module holding all its parameters (one gc scan).

Listeners (Context.on_model) are called once per model, the first time it is bound, with a
ModelInfo. An optimizer over parameters no module holds (bare tensors, DeepSpeed's flat
partitions) has no model."""
import gc
import weakref

from .log import debug

_WRAPPER_ATTRS = ("module", "_orig_mod", "_fsdp_wrapped_module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "OptimizedModule", "FullyShardedDataParallel")


def _fresh():
    return {"handle": None, "listeners": [], "infos": [], "by_opt": {}, "optimizers": weakref.WeakSet(),
            "candidates": [], "checked": {}, "gen": 0, "init_real": None}


_state = _fresh()


def strip_name(name):
    """A parameter name without wrapper prefixes (DDP's module., torch.compile's _orig_mod., FSDP's)."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                changed = True
        name = name.replace("._fsdp_wrapped_module.", ".").replace("._checkpoint_wrapped_module.", ".")
    return name


def unwrap(mod):
    """The user's model inside DDP, torch.compile's OptimizedModule or an FSDP wrapper."""
    seen = 0
    while seen < 8:
        seen += 1
        if type(mod).__name__ in _WRAPPERS and any(hasattr(mod, a) for a in _WRAPPER_ATTRS):
            for a in _WRAPPER_ATTRS:
                inner = getattr(mod, a, None)
                if inner is not None and inner is not mod:
                    mod = inner
                    break
            continue
        break
    return mod


class ModelInfo:
    """A bound model: ``root`` (unwrapped), ``called`` (the module found, maybe a wrapper),
    ``params``: {stripped name: parameter}, ``when`` ("optimizer_init", "install",
    "first_forward", "first_step") and ``optimizers`` (weak references)."""

    def __init__(self, called, when="first_forward"):
        self.called = called
        self.root = unwrap(called)
        self.params = {strip_name(n): p for n, p in self.root.named_parameters()}
        self.when = when
        self.optimizers = []


def _opt_ids(opt):
    return {id(p) for grp in opt.param_groups for p in grp["params"]}


def _owns(module, ids):
    if not ids:
        return False
    have = {id(p) for p in module.parameters()}
    return ids <= have


def _unbound():
    return [o for o in list(_state["optimizers"]) if id(o) not in _state["by_opt"]]


def _bind(opt, module, when):
    root = unwrap(module)
    info = next((i for i in _state["infos"] if i.root is root), None)
    new = info is None
    if new:
        info = ModelInfo(module, when)
        _state["infos"].append(info)
    info.optimizers.append(weakref.ref(opt))
    _state["by_opt"][id(opt)] = info
    weakref.finalize(opt, _state["by_opt"].pop, id(opt), None)
    _state["optimizers"].add(opt)
    if not _unbound():
        _unhook()  # every known optimizer has its model: no global module hook left
    if new:
        debug("model bound (%s): %s (%d parameter tensors) for %s" % (
            when, type(info.root).__name__, len(info.params), type(opt).__name__))
        for cb in list(_state["listeners"]):
            cb(info)
    return info


def _unhook():
    h = _state["handle"]
    if h is not None:
        h.remove()
        _state["handle"] = None
        _state["checked"] = {}


def _hook():
    if _state["handle"] is None:
        from torch.nn.modules import module as nnmod
        _state["handle"] = nnmod.register_module_forward_pre_hook(_pre_hook)


def _pre_hook(module, args):
    unbound = _unbound()
    if not unbound:  # no optimizer yet (remember the outermost module called), or all bound
        if not _state["infos"]:
            _state["candidates"].append(weakref.ref(module))
            del _state["candidates"][:-16]
        _unhook()
        return None
    if _state["checked"].get(id(module)) == _state["gen"]:
        return None
    _state["checked"][id(module)] = _state["gen"]
    have = None
    for opt in unbound:
        ids = _opt_ids(opt)
        if have is None:
            have = {id(p) for p in module.parameters()}
        if ids and ids <= have:
            _bind(opt, module, "first_forward")
    if not _unbound():
        _unhook()
    return None


def _new_optimizer(opt):
    """An optimizer was constructed: bind it to a module already called, else watch forwards."""
    if not _state["listeners"]:
        return
    _state["optimizers"].add(opt)
    _state["gen"] += 1
    ids = _opt_ids(opt)
    for ref in reversed(_state["candidates"]):
        m = ref()
        if m is not None and _owns(m, ids):
            _bind(opt, m, "optimizer_init")
            return
    root = find_root(ids)
    if root is not None:
        _bind(opt, root, "optimizer_init")
        return
    _hook()


def _watch_optimizer_init():
    """Wrap torch.optim.Optimizer.__init__ (every subclass calls it) and note the optimizers
    that already exist. Taken from sys.modules: this runs while torch itself may be importing."""
    if _state["init_real"] is not None:
        return
    import sys
    mod = sys.modules.get("torch.optim.optimizer")
    if mod is None:
        return
    cls = mod.Optimizer
    real = cls.__init__

    def __init__(self, *args, **kwargs):
        real(self, *args, **kwargs)
        try:
            _new_optimizer(self)
        except Exception as e:  # never break the user's optimizer
            debug("model: cannot bind a new optimizer: %r" % (e,))

    __init__.__wrapped__ = real
    __init__.__doc__ = real.__doc__
    cls.__init__ = __init__
    _state["init_real"] = (cls, real)
    for o in gc.get_objects():  # optimizers created before install()
        if issubclass(type(o), cls):  # type(), not isinstance: no __class__ property runs
            _state["optimizers"].add(o)


def on_model(cb):
    """Call cb(ModelInfo) for every model bound, now for those already bound."""
    _state["listeners"].append(cb)
    _watch_optimizer_init()
    for info in list(_state["infos"]):
        cb(info)
    for opt in _unbound():  # optimizers built before install(): their models now
        root = find_root(_opt_ids(opt))
        if root is not None:
            _bind(opt, root, "install")
    if _unbound():
        _hook()


def find_root(ids):
    """The root module holding every parameter of IDS (ids of tensors): among the live modules
    holding them all (one gc scan), those inside no other such module; the smallest of those
    (a container holding the model and another one is not the model). None when no module
    holds them (bare tensors, DeepSpeed's flat partitions)."""
    if not ids:
        return None
    import torch.nn
    hold = []
    for o in gc.get_objects():
        if issubclass(type(o), torch.nn.Module):  # type(), not isinstance: no __class__ property runs
            try:
                have = [id(p) for p in o.parameters()]
            except Exception:
                continue
            if len(have) >= len(ids) and ids <= set(have):
                hold.append((len(have), o))
    if not hold:
        return None
    inner = set()
    for _, o in hold:
        for sub in o.modules():
            if sub is not o:
                inner.add(id(sub))
    roots = [(k, o) for k, o in hold if id(o) not in inner] or hold
    root = min(roots, key=lambda t: t[0])[1]
    # a container without a forward of its own (a LightningModule that only has training_step)
    # is not what a probe can call: its one child holding every parameter is the model
    while _no_forward(root):
        kids = [c for c in root.children() if _owns(c, ids)]
        if len(kids) != 1:
            break
        root = kids[0]
    return root


def _no_forward(m):
    import torch.nn
    f = type(m).forward
    return f is torch.nn.Module.forward or getattr(f, "__qualname__", "") == "LightningModule.forward"


def bind_step(opt):
    """At a step of OPT: its ModelInfo, binding it now if nothing did before (None when no
    module holds its parameters)."""
    by = _state["by_opt"]
    if id(opt) in by:
        return by[id(opt)]
    if not _state["listeners"]:
        return None
    _state["optimizers"].add(opt)
    ids = _opt_ids(opt)
    found = None
    for ref in reversed(_state["candidates"]):
        m = ref()
        if m is not None and _owns(m, ids):
            found = m
            break
    if found is None:
        found = find_root(ids)
    if found is None:
        by[id(opt)] = None
        debug("model: no module holds the parameters of %s" % type(opt).__name__)
        if not _unbound():
            _unhook()
        return None
    info = _bind(opt, found, "first_step")
    if not _unbound():
        _unhook()
    return info


def for_optimizer(opt):
    """The ModelInfo bound to OPT, or None."""
    return _state["by_opt"].get(id(opt))


def current():
    """The first model bound, or None."""
    return _state["infos"][0] if _state["infos"] else None


def models():
    return list(_state["infos"])


def reset():
    """Forget the listeners, remove the forward hook and the Optimizer.__init__ wrapper
    (uninstall(), or a new policy replacing the features). The models bound so far stay known:
    a new policy's features get them at once."""
    _unhook()
    if _state["init_real"] is not None:
        cls, real = _state["init_real"]
        cls.__init__ = real
        _state["init_real"] = None
    _state["listeners"] = []
