"""safehook verify --base MODEL --checkpoint CKPT [--policy P]: out of process, check that the
tensors a policy freezes are bit-identical in a saved checkpoint and in the base model.

MODEL and CKPT are a file (.safetensors, or a torch .bin/.pt/.pth state dict) or a folder
holding one (model.safetensors, pytorch_model.bin) or shards with their index json
(model.safetensors.index.json, pytorch_model.bin.index.json). Tensors are read one at a time
(safetensors' safe_open, torch.load with mmap), so memory stays near the largest tensor.

Which tensors are frozen: freeze.layers picks blocks of the block list found in the base's
tensor names (the same family paths as the runtime: model.layers, transformer.h, ...), and
freeze.params globs match names. Names are compared after stripping wrapper prefixes (DDP's
module., torch.compile's _orig_mod., PEFT's base_model.model. and .base_layer).

Exit 0: every frozen tensor present in CKPT is bit-identical (a tensor CKPT does not hold is
unchanged by it: an adapter-only checkpoint); 1: some differ, or CKPT adds a tensor inside a
frozen block that can change its output (a LoRA adapter whose B is not all zeros); 2: usage,
unreadable input, or a policy that cannot be applied to the base."""
import fnmatch
import json
import os
import re
import sys

_PEFT = "base_model.model."


def _norm(name):
    """A checkpoint name as the base model's: wrapper prefixes (DDP, torch.compile, FSDP: the
    runtime's own strip_name) and PEFT's base_model.model. / .base_layer. taken off."""
    from ..runtime.model import strip_name
    name = strip_name(name)
    while name.startswith(_PEFT):
        name = strip_name(name[len(_PEFT):])
    return name.replace(".base_layer.", ".")


class Source:
    """A checkpoint's tensors by normalized name, read lazily: names() and get(name)."""

    def __init__(self, path):
        self.path = path
        self.files = {}  # normalized name -> (file, stored name)
        self._open = (None, None)  # the one file open at a time
        for f in self._files(path):
            for stored in self._keys(f):
                self.files.setdefault(_norm(stored), (f, stored))

    @staticmethod
    def _files(path):
        if os.path.isfile(path):
            return [path]
        if not os.path.isdir(path):
            raise OSError("%s: no such file or folder" % path)
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            p = os.path.join(path, index)
            if os.path.exists(p):
                with open(p) as fh:
                    wm = json.load(fh)["weight_map"]
                return [os.path.join(path, f) for f in sorted(set(wm.values()))]
        for single in ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin"):
            p = os.path.join(path, single)
            if os.path.exists(p):
                return [p]
        found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
        if not found:
            raise OSError("%s: no .safetensors or torch weights in this folder" % path)
        return [os.path.join(path, f) for f in found]

    def _handle(self, f):
        if self._open[0] == f:
            return self._open[1]
        if f.endswith(".safetensors"):
            from safetensors import safe_open
            h = safe_open(f, framework="pt", device="cpu")
        else:
            import torch
            try:
                h = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # an old (non-zip) torch file cannot be mapped
                h = torch.load(f, map_location="cpu", weights_only=True)
            if isinstance(h, dict) and "state_dict" in h and isinstance(h["state_dict"], dict):
                h = h["state_dict"]
        self._open = (f, h)
        return h

    def _keys(self, f):
        h = self._handle(f)
        if f.endswith(".safetensors"):
            return list(h.keys())
        return [k for k, v in h.items() if hasattr(v, "dtype")]

    def names(self):
        return list(self.files)

    def get(self, name):
        f, stored = self.files[name]
        h = self._handle(f)
        return h.get_tensor(stored) if f.endswith(".safetensors") else h[stored]


_NUMBERED = re.compile(r"^(.*?)\.(\d+)\.")


def _block_list(names):
    """(path, count) of the transformer block list among tensor NAMES, or None."""
    from ..features.freeze import KNOWN_BLOCK_PATHS
    found = {}
    for n in names:
        m = _NUMBERED.match(n)  # the outermost numbered list of a name
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not found:
        return None
    for pat in KNOWN_BLOCK_PATHS:
        hits = [p for p in found if p == pat or p.endswith("." + pat)]
        if hits:
            p = max(hits, key=lambda p: (len(found[p]), -p.count(".")))
            return p, max(found[p]) + 1
    p = max(found, key=lambda p: (len(found[p]), -p.count(".")))
    return (p, max(found[p]) + 1) if len(found[p]) >= 2 else None


def frozen_names(freeze, names):
    """The sorted names among NAMES that the policy's freeze section freezes, and a description.
    Raises ValueError when freeze.layers cannot be applied."""
    from ..features.freeze import select_blocks
    spec, globs = freeze.get("layers"), list(freeze.get("params") or [])
    chosen, desc = set(), {"layers": spec, "params": globs}
    if spec is not None:
        bl = _block_list(names)
        if bl is None:
            raise ValueError("no transformer block list among the base's tensor names, so freeze.layers %r "
                             "cannot be applied" % (spec,))
        path, count = bl
        ids = select_blocks(spec, count)
        desc.update(blocks=path, count=count, frozen_blocks=ids)
        prefixes = tuple("%s.%d." % (path, i) for i in ids)
        chosen.update(n for n in names if n.startswith(prefixes))
    chosen.update(n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs))
    return sorted(chosen), desc


def _bytes(t):
    import torch
    return t.detach().contiguous().reshape(-1).view(torch.uint8).view(-1, max(1, t.element_size()))


def _same_bits(a, b):
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False, "dtype/shape %s%s vs %s%s" % (a.dtype, tuple(a.shape), b.dtype, tuple(b.shape))
    import torch
    if a.numel() == 0:
        return True, ""
    ab, bb = _bytes(a), _bytes(b)
    if torch.equal(ab, bb):
        return True, ""
    changed = int((ab != bb).any(1).sum())
    why = "%d of %d values differ" % (changed, a.numel())
    if a.is_floating_point():
        why += ", max |diff| %.3g" % float((a.double() - b.double()).abs().max())
    return False, why


def verify(base, ckpt, freeze, out=None, limit=20):
    """Compare; returns (exit code, summary dict). Prints one line per differing tensor (LIMIT)."""
    out = out or sys.stdout
    b, c = Source(base), Source(ckpt)
    names, desc = frozen_names(freeze, b.names())
    summary = dict(desc, frozen=len(names), identical=0, differ=[], absent=0, added=[])
    for n in names:
        if n not in c.files:
            summary["absent"] += 1
            continue
        ok, why = _same_bits(b.get(n), c.get(n))
        if ok:
            summary["identical"] += 1
        else:
            summary["differ"].append(n)
            if len(summary["differ"]) <= limit:
                print("DIFFERS %s: %s" % (n, why), file=out)
    # Tensors only the checkpoint has, inside a frozen block: an adapter there changes the block
    # unless its up-projection is still all zeros.
    if desc.get("frozen_blocks"):
        prefixes = tuple("%s.%d." % (desc["blocks"], i) for i in desc["frozen_blocks"])
        for n in c.names():
            if n in b.files or not n.startswith(prefixes):
                continue
            if re.search(r"lora_(embedding_)?A\b|lora_A\.", n):
                continue  # A alone changes nothing; its B decides
            t = c.get(n)
            if re.search(r"lora_(embedding_)?B", n) and not bool(t.abs().sum()):
                continue
            summary["added"].append(n)
            if len(summary["added"]) <= limit:
                print("ADDED %s: a tensor the base does not have, inside frozen block(s)" % n, file=out)
    bad = len(summary["differ"]) + len(summary["added"])
    print("%s: %d frozen tensors (%s): %d identical, %d differ, %d added inside frozen blocks, "
          "%d not in the checkpoint" % ("FAIL" if bad else "OK", len(names), _describe(desc), summary["identical"],
                                        len(summary["differ"]), len(summary["added"]), summary["absent"]), file=out)
    return (1 if bad else 0), summary


def _describe(desc):
    parts = []
    if desc.get("frozen_blocks") is not None:
        ids = desc["frozen_blocks"]
        parts.append("blocks %s of %s[0-%d]" % (_ranges(ids), desc["blocks"], desc["count"] - 1))
    if desc.get("params"):
        parts.append("params %s" % ", ".join(desc["params"]))
    return "; ".join(parts) or "nothing"


def _ranges(ids):
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else "%d-%d" % (ids[i], ids[j]))
        i = j + 1
    return ",".join(out) or "none"


def _policy_freeze(path):
    from .. import _core
    if path is None:
        state = _core.system_policy_state()
        if state["state"] == "none":
            raise ValueError("no --policy given and no system policy at %s" % state["path"])
        path = state["path"]
    doc = json.loads(_core.explain_file(path))
    freeze = doc.get("freeze")
    if not freeze:
        raise ValueError("%s has no freeze section: nothing to verify" % path)
    return freeze


def _run(args):
    from .. import _core
    try:
        freeze = _policy_freeze(args.policy)
        code, summary = verify(args.base, args.checkpoint, freeze, limit=args.limit)
    except _core.PolicyError as e:
        print("safehook verify: %s" % e, file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as e:
        print("safehook verify: %s" % e, file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    sys.stdout.flush()
    return code


def register(sub):
    s = sub.add_parser("verify", help="check a checkpoint's frozen tensors against the base model",
                       description="Check that the tensors POLICY freezes are bit-identical in CHECKPOINT and "
                                   "BASE (safetensors or torch files, sharded too; read tensor by tensor). "
                                   "Exit 0 identical, 1 some differ, 2 cannot check.")
    s.add_argument("--base", required=True, metavar="MODEL", help="the base model (file or folder)")
    s.add_argument("--checkpoint", required=True, metavar="CKPT", help="the saved checkpoint (file or folder)")
    s.add_argument("--policy", metavar="P", help="the policy whose freeze section applies (default: the system policy)")
    s.add_argument("--limit", type=int, default=20, help="differing tensors listed (default 20)")
    s.add_argument("--json", metavar="OUT", help="also write the summary as JSON")
    s.set_defaults(func=_run)
