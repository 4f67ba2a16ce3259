"""safehook verify --base MODEL --checkpoint CKPT [--policy P] [--json [OUT]]: out of process,
check that the tensors a policy freezes are bit-identical in a saved checkpoint and in the base
model, as every loader would read the checkpoint.

MODEL and CKPT are a file (.safetensors, a torch .bin/.pt/.pth state dict, or an index .json)
or a folder. A folder is read as the loaders read it, and then some: every .safetensors file in
it (listed in an index or not: transformers reads every tensor of every shard its index lists,
the last one read wins; vLLM reads the folder's files), every torch file an index lists or that
is named like weights (pytorch_model*.bin, *.pt, *.pth that load as a state dict; Trainer's
optimizer.pt and the like are skipped, and named). Tensors are read one at a time.

Names are resolved as the loaders resolve them: wrapper prefixes taken off (DDP's module.,
torch.compile's _orig_mod., FSDP's _fsdp_wrapped_module., PEFT's base_model.model.,
.base_layer. and .modules_to_save.<adapter>.), the legacy .gamma/.beta of LayerNorms, the base
model prefix added or removed (model.layers.0... / layers.0...) when only that form is a base
name, and tied embeddings: when the checkpoint's config ties them, a loader builds the output
embedding from the stored input one (or, transformers 4.x, loads both names into one shared
tensor), so the copies of either name count for both. A name can so have several stored
copies: every copy of a frozen tensor must be bit-identical to the base.

Which tensors are frozen: freeze.layers picks blocks of the block list found in the base's
tensor names (the same family paths as the runtime: model.layers, transformer.h, ...), and
freeze.params globs match names.

Exit 0 (verified): every frozen tensor the checkpoint holds, in every copy, is bit-identical;
no tensor the checkpoint adds inside a frozen block changes it; nothing is ambiguous. A partial
checkpoint (an adapter, a bare file or a folder without config.json) may lack frozen tensors:
loaded over the base they keep the base's values.
Exit 1 (failed): a frozen tensor differs (in any copy), a full checkpoint (a folder with
config.json, which from_pretrained loads whole) lacks one (it would be initialized afresh), an
added tensor changes a frozen block (a LoRA B not all zeros, a DoRA magnitude off the base
weight's norms), or the checkpoint is ambiguous: one name stored twice with different values,
or an index that lists a shard holding a tensor the index maps to another shard (a duplicate),
or a name listed in a shard that does not hold it.
Exit 2 (cannot verify): usage, an unreadable, corrupt or truncated file, a policy that cannot
be applied to the base, an ambiguous base, or a checkpoint that shares no tensor name with the
base (another architecture). A root-side artifact check treats anything but 0 as not verified.

--json prints one JSON document (schema safehook.verify/1, docs/cli.md) instead of the lines;
--json OUT writes it to OUT beside the lines."""
import fnmatch
import json
import os
import re
import sys

SCHEMA = "safehook.verify/1"
_PEFT = "base_model.model."
_TORCH_EXT = (".bin", ".pt", ".pth")


def _sniff(path):
    """"torch" or "safetensors" for a model file named otherwise (root's watcher checks every
    model file a job wrote, under any name), by its first bytes as safehookd knows them: a zip
    (torch.save) or a pickle; a safetensors header (its length, then '{'). None otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CannotVerify("%s: cannot read: %s" % (path, e.strerror or e))
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return None
_OUT_EMB = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")
_IN_EMB = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings|tok_embeddings)\.weight$")


class CannotVerify(Exception):
    """Exit 2: the message is one line."""


def _norm(name):
    """A stored name as the model's: wrapper prefixes (DDP, torch.compile, FSDP: the runtime's
    own strip_name) and PEFT's base_model.model., .base_layer. and .modules_to_save.NAME.
    taken off."""
    from ..runtime.model import strip_name
    name = strip_name(name)
    while name.startswith(_PEFT):
        name = strip_name(name[len(_PEFT):])
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    return name.replace(".base_layer.", ".")


def _safetensors_names(path):
    """The tensor names of a safetensors file, after checking its header and its size (a
    truncated file is refused here, as safetensors itself refuses it)."""
    from ..posthoc.tensors import PosthocError, read_header
    try:
        ents, _ = read_header(path)
        size = os.path.getsize(path)
    except PosthocError as e:
        raise CannotVerify(str(e))
    except OSError as e:
        raise CannotVerify("%s: %s" % (path, e.strerror))
    with open(path, "rb") as f:
        import struct
        (n,) = struct.unpack("<Q", f.read(8))
    end = max((e[4] for e in ents), default=0)
    if size < 8 + n + end:
        raise CannotVerify("%s: truncated: %d bytes, the header describes %d" % (path, size, 8 + n + end))
    if size > 8 + n + end:
        raise CannotVerify("%s: corrupt: %d bytes after the tensors the header describes" % (path, size - 8 - n - end))
    return [e[0] for e in ents]


def _torch_state(path, required):
    """The tensors of a torch file, or None when it is not a state dict (REQUIRED: it must be)."""
    import warnings
    with warnings.catch_warnings():  # torch warns about pickle protocols: one line is said below
        warnings.simplefilter("ignore")
        return _torch_load(path, required)


def _torch_load(path, required):
    import pickle
    import torch
    try:
        try:
            h = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            h = torch.load(path, map_location="cpu", weights_only=True)  # an old (non-zip) torch file
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        if not required:
            return None
        why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise CannotVerify("%s: not a readable torch state dict (%s)" % (path, why))
    if isinstance(h, dict) and isinstance(h.get("state_dict"), dict):
        h = h["state_dict"]
    if not isinstance(h, dict) or not any(hasattr(v, "dtype") for v in h.values()):
        if required:
            raise CannotVerify("%s: holds no tensors by name (not a state dict)" % path)
        return None
    return {k: v for k, v in h.items() if hasattr(v, "dtype") and isinstance(k, str)}


class Source:
    """The stored tensors of a model file or folder: every copy of every name.

    copies: {canonical name: [(file, stored name)]} (canonical: _norm'ed, and with RESOLVE,
    mapped to the base's form); files: the weight files read; skipped: [(file, why)];
    index_problems: [(name, why)]; kind: "full", "partial" or "adapter"; config: the
    folder's config.json (dict) or None."""

    def __init__(self, path, resolve=None):
        self.path, self.resolve = path, resolve
        self.copies, self.files, self.skipped, self.index_problems = {}, [], [], []
        self.config, self.kind = None, "partial"
        self._open = (None, None)
        self._torch = {}
        listed, indices = self._layout(path)
        for f in self.files:
            for stored in self._keys(f):
                self.copies.setdefault(self._canonical(stored), []).append((f, stored))
        self._check_indices(indices)

    # -- which files --
    def _layout(self, path):
        if os.path.isfile(path):
            if path.endswith(".json"):
                return self._folder(os.path.dirname(path) or ".", only_index=path)
            kind = ("safetensors" if path.endswith(".safetensors") else "torch" if path.endswith(_TORCH_EXT)
                    else _sniff(path))
            if kind is None:
                raise CannotVerify("%s: not a .safetensors, torch (.bin, .pt, .pth) or index (.json) file, "
                                   "by its name or its first bytes" % path)
            if kind == "torch":
                self._torch[path] = _torch_state(path, True)
            self.files = [path]
            return {path}, []
        if not os.path.isdir(path):
            raise CannotVerify("%s: no such file or folder" % path)
        return self._folder(path)

    def _folder(self, d, only_index=None):
        names = sorted(os.listdir(d))
        cfg = os.path.join(d, "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg) as fh:
                    self.config = json.load(fh)
            except (OSError, ValueError) as e:
                raise CannotVerify("%s: not readable JSON: %s" % (cfg, e))
        if os.path.isfile(os.path.join(d, "adapter_config.json")):
            self.kind = "adapter"
        elif self.config is not None:
            self.kind = "full"
        indices = []
        listed = set()
        for fn in names:
            if fn.endswith(".index.json") and (only_index is None or os.path.join(d, fn) == only_index):
                p = os.path.join(d, fn)
                try:
                    with open(p) as fh:
                        wm = json.load(fh)["weight_map"]
                    if not isinstance(wm, dict):
                        raise TypeError
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise CannotVerify("%s: not an index (a JSON object with a weight_map): %s" % (p, e))
                for shard in set(wm.values()):
                    if not os.path.isfile(os.path.join(d, shard)):
                        raise CannotVerify("%s lists %s, which is not in %s" % (p, shard, d))
                indices.append((p, {k: os.path.join(d, v) for k, v in wm.items()}))
                listed.update(os.path.join(d, v) for v in wm.values())
        files = []
        for fn in names:
            p = os.path.join(d, fn)
            if not os.path.isfile(p):
                continue
            if fn.endswith(".safetensors"):
                files.append(p)
            elif fn.endswith(_TORCH_EXT):
                required = p in listed or re.match(r"^(pytorch_model|adapter_model|model)([-.].*)?\.(bin|pt|pth)$", fn)
                state = _torch_state(p, bool(required))
                if state is None:
                    self.skipped.append((p, "not a state dict of tensors (loaders do not read it as weights)"))
                    continue
                self._torch[p] = state
                files.append(p)
        if not files:
            raise CannotVerify("%s: no .safetensors or torch weights in this folder" % d)
        self.files = files
        return listed, indices

    def _check_indices(self, indices):
        """What an index says against what its shards hold: a loader reads every tensor of
        every listed shard, so a shard holding a name the index maps elsewhere is a duplicate
        a loader may take, and a name its shard does not hold is taken from wherever it is."""
        for ipath, wm in indices:
            holders = {}
            for f in set(wm.values()):
                for stored in self._keys(f):
                    holders.setdefault(stored, []).append(f)
            for name, f in sorted(wm.items()):
                if f not in holders.get(name, []):
                    self.index_problems.append((self._canonical(name), "%s maps %s to %s, which does not hold it"
                                                % (os.path.basename(ipath), name, os.path.basename(f))))
            for name, fs in sorted(holders.items()):
                others = [f for f in fs if wm.get(name) != f]
                if others and (len(fs) > 1 or name in wm):
                    self.index_problems.append((self._canonical(name), "%s lists %s, which also holds %s (the index "
                                                "maps it to %s)" % (os.path.basename(ipath), ", ".join(
                                                    os.path.basename(f) for f in others), name,
                                                    os.path.basename(wm[name]) if name in wm else "no shard")))

    # -- names and tensors --
    def _canonical(self, stored):
        n = _norm(stored)
        return self.resolve(n) if self.resolve else n

    def _keys(self, f):
        if f in self._torch:
            return list(self._torch[f])
        return _safetensors_names(f)

    def get(self, f, stored):
        if f in self._torch:
            return self._torch[f][stored]
        from safetensors import SafetensorError, safe_open
        try:
            if self._open[0] != f:
                self._open = (f, safe_open(f, framework="pt", device="cpu"))
            return self._open[1].get_tensor(stored)
        except SafetensorError as e:
            raise CannotVerify("%s: %s" % (f, e))

    def tied(self):
        """Whether the checkpoint's config ties the output embedding to the input one."""
        cfg = self.config
        if cfg is None:
            return False
        for c in (cfg, cfg.get("text_config") or {}):
            if "tie_word_embeddings" in c:
                return bool(c["tie_word_embeddings"])
        try:  # the model class's own default
            from transformers import AutoConfig
            from transformers.utils import logging as tlog
            tlog.set_verbosity_error()
            return bool(getattr(AutoConfig.for_model(**cfg), "tie_word_embeddings", False))
        except Exception:
            return True  # unknown: a loader may tie them, so the stored input embedding counts


def _resolver(base_names):
    """Map a _norm'ed checkpoint name to the base's form, as loaders do: the legacy LayerNorm
    .gamma/.beta, then the base model prefix added (layers.0.x -> model.layers.0.x) or taken
    off, when only that form is a base name."""
    names = set(base_names)
    heads = {}
    for n in names:
        h = n.split(".", 1)[0]
        heads[h] = heads.get(h, 0) + 1
    prefixes = sorted(h for h, c in heads.items() if c > 1)

    def resolve(n):
        if n in names:
            return n
        cands = [n]
        for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
            if n.endswith(old):
                cands.append(n[:-len(old)] + new)
        for c in cands:
            if c in names:
                return c
            for p in prefixes:
                if p + "." + c in names:
                    return p + "." + c
            if "." in c and c.split(".", 1)[1] in names:
                return c.split(".", 1)[1]
        return n
    return resolve


_NUMBERED = re.compile(r"^(.*?)\.(\d+)\.")


def _block_list(names):
    """(path, count) of the transformer block list among tensor NAMES, or None. (runtime/stacks.py
    is to define the one block list; until then this follows freeze's KNOWN_BLOCK_PATHS.)"""
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


def _tie_pair(names):
    """(output embedding, input embedding) names among the base's NAMES, or None."""
    outs = [n for n in names if _OUT_EMB.search(n)]
    ins = [n for n in names if _IN_EMB.search(n)]
    return (outs[0], ins[0]) if len(outs) == 1 and len(ins) == 1 else None


_ADAPTER = re.compile(r"^(.*?)\.(lora_[A-Za-z_]+|ia3_[lf]|hada_\w+|lokr_\w+|oft_\w+|boft_\w+)(\.|$)")


def _attached(name, base_names):
    """Whether NAME is an adapter tensor of a module the base has (PEFT's module.lora_A...)."""
    m = _ADAPTER.match(name)
    return bool(m) and m.group(1) + ".weight" in base_names


def _adapter_changes(name, t, base):
    """Why the adapter tensor NAME (value T) inside a frozen block changes it, or None."""
    if re.search(r"\.lora_(embedding_)?A\b|lora_A\.", name):
        return None  # A alone changes nothing; its B decides
    if re.search(r"lora_(embedding_)?B", name):
        return None if not bool(t.abs().sum()) else "a LoRA B that is not all zeros"
    if "lora_magnitude_vector" in name:  # DoRA: m = ||W + s B A|| per output row; = ||W|| while B is 0
        import torch
        w = name.split(".lora_magnitude_vector", 1)[0] + ".weight"
        if w in base.copies:
            ref = torch.linalg.vector_norm(base.get(*base.copies[w][0]).double(), dim=1)
            if ref.shape == t.shape and torch.allclose(t.double(), ref, rtol=1e-5, atol=1e-7):
                return None
        return "a DoRA magnitude that is not the base weight's row norms"
    return "a tensor the base does not have"


def verify(base, ckpt, freeze, out=None, limit=20):
    """Compare; returns (exit code, summary dict). Prints one line per problem (LIMIT of each
    kind) and the verdict line to OUT (None: print nothing). Raises CannotVerify (exit 2)."""
    say = (lambda s: print(s, file=out)) if out is not None else (lambda s: None)
    b = Source(base)
    dup = sorted(n for n, cs in b.copies.items() if len(cs) > 1)
    if dup:
        raise CannotVerify("the base %s is itself ambiguous: %s is stored %d times"
                           % (base, dup[0], len(b.copies[dup[0]])))
    if b.index_problems:
        raise CannotVerify("the base %s is itself ambiguous: %s" % (base, b.index_problems[0][1]))
    try:
        names, desc = frozen_names(freeze, list(b.copies))
    except ValueError as e:
        raise CannotVerify(str(e))
    c = Source(ckpt, resolve=_resolver(b.copies))
    shared = [n for n in c.copies if n in b.copies or _attached(n, b.copies)]
    if not shared:
        raise CannotVerify("%s shares none of its %d tensor names with the base %s (%d names, e.g. %s vs %s): another "
                           "architecture, or names verify cannot map" % (ckpt, len(c.copies), base, len(b.copies),
                                                                          sorted(c.copies)[0], sorted(b.copies)[0]))
    tie = _tie_pair(sorted(set(b.copies) | set(c.copies))) if c.tied() else None
    effective = dict(c.copies)
    notes = []
    if tie:
        # Tied by the checkpoint's config, the two embeddings are one tensor to a loader, and
        # which stored copy fills it depends on the loader (transformers 5 builds the output
        # one from the input one when only that is stored, 4.x shares one parameter and loads
        # both names into it): each one's copies count for both.
        both = c.copies.get(tie[0], []) + c.copies.get(tie[1], [])
        effective[tie[0]] = effective[tie[1]] = both
        if tie[0] in c.copies and tie[1] in c.copies:
            notes.append("%s and %s: both stored, tied by the checkpoint's config: each is checked as either" % tie)
    summary = dict(desc, frozen=len(names), identical=0, checkpoint_kind=c.kind, shared_names=len(shared),
                   files=[os.path.relpath(f, ckpt) if os.path.isdir(ckpt) else f for f in c.files],
                   skipped=[{"file": f, "why": w} for f, w in c.skipped],
                   tied={"output": tie[0], "input": tie[1]} if tie else None, notes=notes,
                   differ=[], missing=[], absent=0, added=[], ambiguous=[], problems=[])
    shown = {}

    def problem(kind, name, why, stored=None):
        summary["problems"].append({"kind": kind, "name": name, "why": why,
                                    "stored": [{"file": f, "name": s} for f, s in stored or []]})
        shown[kind] = shown.get(kind, 0) + 1
        if shown[kind] <= limit:
            say("%s %s: %s" % (kind.upper(), name, why))

    for n in names:
        copies = effective.get(n)
        if not copies:
            if c.kind == "full":
                summary["missing"].append(n)
                problem("missing", n, "a full checkpoint (config.json) without it: from_pretrained would initialize "
                                      "it afresh")
            else:
                summary["absent"] += 1
            continue
        ref = b.get(*b.copies[n][0])
        bad = []
        for f, stored in copies:
            ok, why = _same_bits(ref, c.get(f, stored))
            if not ok:
                bad.append((f, stored, why))
        if bad:
            summary["differ"].append(n)
            f, stored, why = bad[0]
            where = "" if len(copies) == 1 and stored == n else " (stored as %s in %s%s)" % (
                stored, os.path.basename(f), ", %d of %d copies differ" % (len(bad), len(copies))
                if len(copies) > 1 else "")
            problem("differs", n, why + where, [(f, s) for f, s, _ in bad])
        else:
            summary["identical"] += 1
    # one name stored twice with different values: what a loader gets depends on the loader
    for n, copies in sorted(c.copies.items()):
        if len(copies) < 2 or n in summary["differ"]:
            continue
        first = c.get(*copies[0])
        other = next(((f, s) for f, s in copies[1:] if not _same_bits(first, c.get(f, s))[0]), None)
        if other is not None:
            summary["ambiguous"].append(n)
            problem("ambiguous", n, "stored %d times with different values (%s)" % (
                len(copies), ", ".join("%s in %s" % (s, os.path.basename(f)) for f, s in copies)), copies)
    for n, why in c.index_problems:
        if n not in summary["ambiguous"]:
            summary["ambiguous"].append(n)
        problem("ambiguous", n, why)
    # tensors only the checkpoint has, inside a frozen block: an adapter there changes the block
    # unless it is still a no-op
    if desc.get("frozen_blocks"):
        prefixes = tuple("%s.%d." % (desc["blocks"], i) for i in desc["frozen_blocks"])
        for n, copies in sorted(c.copies.items()):
            if n in b.copies or not n.startswith(prefixes):
                continue
            for f, stored in copies:
                why = _adapter_changes(n, c.get(f, stored), b)
                if why:
                    summary["added"].append(n)
                    problem("added", n, "%s, inside frozen block(s)" % why, [(f, stored)])
                    break
    for note in notes:
        say("NOTE %s" % note)
    bad = len(summary["differ"]) + len(summary["missing"]) + len(summary["added"]) + len(summary["ambiguous"])
    say("%s: %d frozen tensors (%s): %d identical, %d differ, %d missing, %d added inside frozen blocks, %d ambiguous, "
        "%d not in the checkpoint%s" % (
            "FAIL" if bad else "OK", len(names), _describe(desc), summary["identical"], len(summary["differ"]),
            len(summary["missing"]), len(summary["added"]), len(summary["ambiguous"]), summary["absent"],
            " (a partial checkpoint: loaded over the base they keep its values)" if summary["absent"] else ""))
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
    from . import ranges
    return ranges(ids)


def _policy_freeze(path):
    from .. import _core
    if path is None:
        state = _core.system_policy_state()
        if state["state"] == "none":
            raise CannotVerify("no --policy given and no system policy at %s" % state["path"])
        path = state["path"]
    try:
        doc = json.loads(_core.explain_file(path))
    except _core.PolicyError as e:
        raise CannotVerify(str(e))
    freeze = doc.get("freeze")
    if not freeze:
        raise CannotVerify("%s has no freeze section: nothing to verify" % path)
    return path, freeze


def _run(args):
    to_stdout = args.json == "-"
    doc = {"schema": SCHEMA, "verdict": "error", "exit": 2, "base": args.base, "checkpoint": args.checkpoint,
           "policy": args.policy, "error": None}
    try:
        doc["policy"], freeze = _policy_freeze(args.policy)
        code, summary = verify(args.base, args.checkpoint, freeze, out=None if to_stdout else sys.stdout,
                               limit=args.limit)
        doc.update(verdict="ok" if code == 0 else "fail", exit=code, **summary)
    except CannotVerify as e:
        code = 2
        doc["error"] = str(e)
        print("safehook verify: %s" % e, file=sys.stderr)
    if to_stdout:
        print(json.dumps(doc, indent=1))
    elif args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
        except OSError as e:
            print("safehook verify: cannot write %s: %s" % (args.json, e.strerror), file=sys.stderr)
            return 2
    return code


def register(sub):
    s = sub.add_parser("verify", help="check a checkpoint's frozen tensors against the base model",
                       description="Check that the tensors POLICY freezes are bit-identical in CHECKPOINT and "
                                   "BASE, in every copy any loader could read (every shard, duplicates, wrapper and "
                                   "PEFT prefixes, tied embeddings). Exit 0 verified, 1 failed (a frozen tensor "
                                   "differs or is missing, an adapter changes a frozen block, the checkpoint is "
                                   "ambiguous), 2 cannot verify (unreadable, corrupt, another architecture).")
    s.add_argument("--base", required=True, metavar="MODEL", help="the base model (file or folder)")
    s.add_argument("--checkpoint", required=True, metavar="CKPT", help="the saved checkpoint (file or folder)")
    s.add_argument("--policy", metavar="P", help="the policy whose freeze section applies (default: the system policy)")
    s.add_argument("--limit", type=int, default=20, help="problems listed of each kind (default 20)")
    s.add_argument("--json", nargs="?", const="-", metavar="OUT",
                   help="print the result as one JSON document (schema %s); with OUT, write it there and print "
                        "the lines as usual" % SCHEMA)
    s.set_defaults(func=_run)
