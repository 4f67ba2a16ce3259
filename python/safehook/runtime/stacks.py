"""The training stacks as safehook sees them, each defined once: wrappers (DDP, torch.compile,
FSDP) and the names they add; the transformer block list of a model (from its modules, or from
a checkpoint's tensor names: one rule); the rank's local view of a sharded tensor (FSDP2's
DTensor, DeepSpeed ZeRO-3); flat partitions that carry no names (DeepSpeed ZeRO, FSDP1); and the
collective group, with the one way to agree on a decision. Nothing here holds state."""
import re
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


# -- the block list --

# Paths (relative to the model root, matched as a suffix) of the block list of known families:
# Llama, Mistral, Qwen2, Gemma, Phi: model.layers; OPT: model.decoder.layers; GPT-2 and GPT-J
# style: transformer.h; GPT-NeoX / Pythia: gpt_neox.layers; a vision-language model's text
# blocks: model.language_model.layers. The bare names cover the base models (LlamaModel.layers,
# GPT2Model.h) and PEFT-wrapped ones (base_model.model.model.layers). A known path wins over a
# larger unnamed list (a vision tower's blocks).
KNOWN_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                     "model.language_model.layers", "transformer.layers", "decoder.layers",
                     "layers", "h", "blocks")


class Blocks:
    """The transformer block list of a model: ``path`` (stripped dotted name), ``modules``,
    ``how`` ("known" path or "largest" list)."""

    def __init__(self, path, modules, how):
        self.path, self.modules, self.how = path, list(modules), how

    def __len__(self):
        return len(self.modules)

    def describe(self):
        return {"path": self.path, "count": len(self.modules), "how": self.how,
                "class": type(self.modules[0]).__name__ if self.modules else None}


def _choose(cands):
    """The block list among CANDS, [(path, count, size)] of numbered lists none of which lies
    inside another (an expert list inside a block is not the block list): a known family path
    wins (ties: more entries, then shallower); otherwise the largest list (more entries, then a
    larger SIZE, then shallower), of at least 2 entries. Returns (path, how) or None."""
    outer = [c for c in cands if not any(c[0].startswith(o[0] + ".") for o in cands if o is not c)]
    for pat in KNOWN_BLOCK_PATHS:
        hits = [c for c in outer if c[0] == pat or c[0].endswith("." + pat)]
        if hits:
            return max(hits, key=lambda c: (c[1], -c[0].count(".")))[0], "known"
    if not outer:
        return None
    best = max(outer, key=lambda c: (c[1], c[2], -c[0].count(".")))
    return (best[0], "largest") if best[1] >= 2 else None


def _is_block_list(mod):
    import torch
    if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
        return False
    first = type(mod[0])
    return all(type(m) is first for m in mod) and any(True for _ in mod[0].parameters())


def find_blocks(root):
    """The transformer blocks of the module ROOT (a Blocks), or None. Candidates: the
    ModuleLists whose children are all of one class with parameters; the rule is _choose's."""
    mods = {}
    for n, m in root.named_modules():
        if _is_block_list(m):
            mods.setdefault(strip_name(n), m)
    found = _choose([(n, len(m), sum(p.numel() for p in m.parameters())) for n, m in mods.items()])
    if found is None:
        return None
    return Blocks(found[0], mods[found[0]], found[1])


_NUMBERED = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def find_block_list(names):
    """(path, count) of the transformer block list among tensor NAMES (a checkpoint's keys,
    wrapper prefixes already stripped), or None: the same rule as find_blocks, over the
    outermost numbered list of each name (count: the highest index + 1; size: its tensors)."""
    found = {}
    for n in names:
        m = _NUMBERED.match(n)
        if m:
            entry = found.setdefault(m.group(1), [set(), 0])
            entry[0].add(int(m.group(2)))
            entry[1] += 1
    got = _choose([(p, max(idx) + 1, k) for p, (idx, k) in found.items()])
    return (got[0], max(found[got[0]][0]) + 1) if got else None


def block_of(name, path=None):
    """The block a parameter NAME belongs to ("model.layers.3") when it lies in the block list
    PATH (default: the block list NAME alone shows, its outermost numbered list), else its module
    path ("model.embed_tokens"; a bare name is its own)."""
    if path is None:
        m = _NUMBERED.match(name)
        if m:
            return "%s.%s" % (m.group(1), m.group(2))
    elif name.startswith(path + "."):
        head = name[len(path) + 1:].split(".", 1)[0]
        if head.isdigit():
            return "%s.%s" % (path, head)
    return name.rsplit(".", 1)[0] if "." in name else name


# -- the rank's local view --

def is_dtensor(t):
    """True for a DTensor (FSDP2's sharded parameters and gradients)."""
    return hasattr(t, "_local_tensor") and hasattr(t, "device_mesh")


def local(t):
    """What this rank holds of T: a DTensor's (FSDP2) shard, a DeepSpeed ZeRO-3 parameter's
    partition (ds_tensor), else T: checksums, snapshots and restores work on it."""
    if is_dtensor(t):
        return t._local_tensor
    ds = getattr(t, "ds_tensor", None)
    if ds is not None:
        return ds
    return t


def shard_view(t):
    """(local tensor, mesh or None, weight) of T for a global sum over the ranks: a DTensor's
    shard counts once (weight 1), a replicated DTensor's 1/mesh size on each rank; a plain
    tensor is its own, with no mesh. Only 1-D meshes (FSDP2)."""
    if is_dtensor(t) and hasattr(t, "placements"):
        mesh = t.device_mesh
        if mesh.ndim != 1:
            raise NotImplementedError("1-D device meshes (FSDP2) only, not %d-D" % mesh.ndim)
        if any(p.is_shard() for p in t.placements):
            return t._local_tensor, mesh, 1.0
        return t._local_tensor, mesh, 1.0 / mesh.size()  # replicated: every rank holds it all
    return t, None, 1.0


def partition_rank(p):
    """This rank's index in the group DeepSpeed ZeRO-3 partitions P over (0 without a group)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group=getattr(p, "ds_process_group", None))


def partition_slice(p, full_numel):
    """(start, count) of this rank's ZeRO-3 slice of P's flattened FULL_NUMEL values: each rank
    holds ds_tensor.numel() of them (the last padded at the end)."""
    n = p.ds_tensor.numel()
    start = partition_rank(p) * n
    return start, max(0, min(n, full_numel - start))


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


# -- ranks --

def fsdp1_refusal(info, why):
    """The one line a feature fails with on an FSDP1 model (see fsdp1), WHY: what the flat shards
    keep it from doing; None when INFO's model is not FSDP1."""
    what = fsdp1(info)
    return "FSDP1 (%s) is not supported: %s; %s" % (what, why, FSDP1_HINT) if what else None


_OPS = {"max": "MAX", "min": "MIN", "sum": "SUM", "mean": "SUM", "any": "MAX", "all": "MIN"}


def collective_device(group=None):
    """Where a collective's tensor must live: the current CUDA device under nccl, else the CPU."""
    import torch
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank():
    """This process's rank in the world (0 without torch.distributed)."""
    dist, _ = world()
    return dist.get_rank() if dist is not None else 0


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
    t = torch.tensor([float(v) for v in vals], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    if op == "mean":
        t /= n
    out = [bool(x) if b else x for x, b in zip(t.cpu().tolist(), boolean)]
    return out if many else out[0]
