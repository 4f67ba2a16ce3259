"""The training stacks as safehook sees them, each defined once: wrappers (DDP, torch.compile,
FSDP) and the names they add, the rank's local view of a sharded tensor, flat partitions that
carry no names (DeepSpeed ZeRO, FSDP1), and the collective group with the one way to agree on a
decision."""
import sys

_WRAPPER_ATTRS = ("module", "_orig_mod", "_fsdp_wrapped_module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "OptimizedModule", "FullyShardedDataParallel")


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


def zero_partitions(params, known):
    """True when PARAMS (what an optimizer steps) are DeepSpeed ZeRO's flat partitions rather
    than a model's parameters: deepspeed is loaded, KNOWN (ids of the bound models' parameters)
    is not empty, and none of PARAMS is in it. Such a partition carries no parameter names and a
    slice of many tensors; a probe's backward outside the engine never reaches it (and breaks
    ZeRO's gradient reduction), and restoring the model's weights does not restore it."""
    if "deepspeed" not in sys.modules or not params or not known:
        return False
    return not any(id(p) in known for p in params)


ZERO_HINT = "use DDP or FSDP2 (fully_shard) for this feature"

FSDP1_HINT = "use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP"


def fsdp1(info):
    """What makes the model of INFO (a ModelInfo, or anything with ``root`` and ``called``) an
    FSDP1 model, or None: a FullyShardedDataParallel module in it, or flat parameters (FSDP1's
    FlatParameter). Its parameters are flat shards of several tensors each, and its inner module
    cannot be called without the wrapper gathering them, so no feature that needs per-tensor
    gradients or calls the model for a probe can act on it; each refuses with one line naming
    FSDP1."""
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
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None, 1
    n = dist.get_world_size(group)
    return (dist, n) if n > 1 else (None, 1)


def agree(value, op="max", group=None):
    """One decision for every rank: VALUE (a number or bool, or a list of them) reduced over the
    ranks of GROUP (default: the world) with OP ("max", "min", "sum", "mean", "any", "all"), so
    that every rank takes the same decision; VALUE itself when torch.distributed is not
    initialized or the world is one rank. One all_reduce (float64; on the current CUDA device
    under nccl). Every rank must call it at the same point, as any collective: call it on every
    step where the decision is made, not only where it is true. Booleans come back as booleans
    ("any": True when any rank says True)."""
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
