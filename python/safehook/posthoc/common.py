"""What the post-hoc methods share: the JSONL record of what changed, progress lines on
stderr, the choice of tensors a method edits, and the checks that inputs line up."""
import json
import math
import os
import re
import sys
import time

from .tensors import PosthocError

# Restoration edits the weight matrices of the transformer blocks; embeddings and the output
# head are looked up / tied rather than applied as a linear map to a hidden state.
DEFAULT_RESTORE_INCLUDE = r"\.weight$"
DEFAULT_RESTORE_EXCLUDE = r"embed|lm_head|wte|wpe|norm|ln_"


class Record:
    """The JSONL record of a run: one "posthoc_start" line, one "posthoc_tensor" line per edited
    (or considered) tensor, one "posthoc_end" line. Flushed line by line."""

    def __init__(self, path, method, params):
        self.path = path
        self.t0 = time.time()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "w") if path else None
        self.n = 0
        self.changed = 0
        self.write({"event": "posthoc_start", "method": method, "params": params,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def write(self, rec):
        if self.f:
            self.f.write(json.dumps(_clean(rec), sort_keys=False) + "\n")
            self.f.flush()

    def tensor(self, rec):
        self.n += 1
        self.changed += bool(rec.get("changed"))
        self.write(dict({"event": "posthoc_tensor"}, **rec))

    def close(self, **extra):
        self.write(dict({"event": "posthoc_end", "tensors": self.n, "changed": self.changed,
                         "seconds": round(time.time() - self.t0, 2)}, **extra))
        if self.f:
            self.f.close()
            self.f = None


def _clean(v):
    """JSON-safe: NaN/inf become None (json.dumps would write invalid JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class Progress:
    """Progress lines on stderr for long work, at most one every EVERY seconds (plus the ones
    marked force)."""

    def __init__(self, tag, quiet=False, every=2.0, stream=None):
        self.tag, self.quiet, self.every = tag, quiet, every
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.time()

    def __call__(self, msg, force=True):
        now = time.time()
        if self.quiet or (not force and now - self.last < self.every):
            return
        self.last = now
        self.stream.write("[%s %6.1fs] %s\n" % (self.tag, now - self.t0, msg))
        self.stream.flush()


class Selector:
    """Which tensors a method edits: 2-D, name matching INCLUDE and not EXCLUDE."""

    def __init__(self, include=None, exclude=None):
        self.inc = re.compile(include) if include else None
        self.exc = re.compile(exclude) if exclude else None

    def __call__(self, name, shape):
        if len(shape) != 2:
            return False
        if self.inc and not self.inc.search(name):
            return False
        if self.exc and self.exc.search(name):
            return False
        return True


def check_like(name, ref, other, what):
    """NAME must exist in OTHER with REF's shape (REF, OTHER: Sources)."""
    if name not in other:
        raise PosthocError("missing tensor %s in %s %s" % (name, what, other.path))
    s1, s2 = ref.info(name)[1], other.info(name)[1]
    if s1 != s2:
        raise PosthocError("shape mismatch for %s: %s in %s, %s in %s %s"
                           % (name, "x".join(map(str, s1)), ref.path,
                              "x".join(map(str, s2)), what, other.path))


def finite(**values):
    """Refuse a NaN or infinite parameter (NaN compares false with everything: --alpha nan
    would write NaN weights and count nothing as changed). VALUES: {option name: value}."""
    for k, v in values.items():
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise PosthocError("--%s must be a finite number, not %r" % (k.replace("_", "-"), v))


def work_dtype(t):
    """The dtype the formulas run in: float64 stays float64, everything else float32."""
    import torch
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def default_record(out):
    if os.path.isdir(out) or not out.endswith(".safetensors"):
        return os.path.join(out, "posthoc.jsonl")
    return os.path.splitext(out)[0] + ".posthoc.jsonl"


def fnorm(t):
    import torch
    return float(torch.linalg.vector_norm(t)) if t.numel() else 0.0
