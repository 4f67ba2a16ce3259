"""Finding the model being trained: a global forward pre-hook that lives until the first
forward call, takes the outermost module called as the model, and is removed at once (a global
module hook slows every module call while it exists)."""
from .log import debug

_WRAPPER_ATTRS = ("module", "_orig_mod", "_fsdp_wrapped_module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

_state = {"handle": None, "info": None, "listeners": []}


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
        name = type(mod).__name__
        if name in ("DistributedDataParallel", "DataParallel", "OptimizedModule",
                    "FullyShardedDataParallel") and any(hasattr(mod, a) for a in _WRAPPER_ATTRS):
            for a in _WRAPPER_ATTRS:
                inner = getattr(mod, a, None)
                if inner is not None and inner is not mod:
                    mod = inner
                    break
            continue
        break
    return mod


class ModelInfo:
    """The model found at its first forward: ``root`` (unwrapped), ``called`` (the module that
    was called, maybe a wrapper), and ``params``: {stripped name: parameter}."""

    def __init__(self, called):
        self.called = called
        self.root = unwrap(called)
        self.params = {strip_name(n): p for n, p in self.root.named_parameters()}


def _pre_hook(module, args):
    h = _state["handle"]
    if h is None:
        return None
    h.remove()
    _state["handle"] = None
    info = ModelInfo(module)
    _state["info"] = info
    debug("model found at first forward: %s (%d parameter tensors)" % (type(info.root).__name__, len(info.params)))
    listeners, _state["listeners"] = _state["listeners"], []
    for cb in listeners:
        cb(info)
    return None


def on_model(cb):
    if _state["info"] is not None:
        cb(_state["info"])
        return
    _state["listeners"].append(cb)
    if _state["handle"] is None:
        from torch.nn.modules import module as nnmod
        _state["handle"] = nnmod.register_module_forward_pre_hook(_pre_hook)


def current():
    """The ModelInfo found so far, or None."""
    return _state["info"]
