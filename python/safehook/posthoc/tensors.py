"""Streaming access to the weights of a Hugging Face model directory, a safetensors file (sharded
or not) or a PEFT adapter directory, one tensor at a time.

Reading: each file's header is parsed once (names, dtypes, shapes, byte offsets); a tensor is
read with safetensors' safe_open, opened for that one read, so the memory map and the pages it
touched are released before the next tensor (the resident set never holds a whole model).
Writing: an output file's header is known before any data (every output tensor has the shape
and dtype of the input it replaces), so it is written first and the tensors are appended one by
one as they are computed; the output keeps the input's shard layout, index and side files
(config, tokenizer, adapter_config.json), so transformers and peft load it as they load the input.
"""
import json
import os
import shutil
import struct

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# safetensors dtype names <-> torch dtypes (resolved lazily: importing torch is slow)
_DTYPES = ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), \
    ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), \
    ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")


class PosthocError(Exception):
    """A problem with the inputs that the user can fix: the message is one line."""


def torch_dtype(name):
    import torch
    for st, tn in _DTYPES:
        if st == name:
            return getattr(torch, tn)
    raise PosthocError("unsupported safetensors dtype %s" % name)


def st_dtype(dtype):
    for st, tn in _DTYPES:
        if str(dtype) == "torch." + tn:
            return st
    raise PosthocError("cannot store torch dtype %s in safetensors" % dtype)


def read_header(path):
    """(entries, metadata) of a safetensors file: entries is a list of (name, dtype, shape,
    begin, end) sorted by offset."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise PosthocError("%s: not a safetensors file (too short)" % path)
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 1024 * 1024:
                raise PosthocError("%s: not a safetensors file (header of %d bytes)" % (path, n))
            hdr = json.loads(f.read(n))
    except OSError as e:
        raise PosthocError("%s: %s" % (path, e.strerror))
    except ValueError:
        raise PosthocError("%s: not a safetensors file (header is not JSON)" % path)
    meta = hdr.pop("__metadata__", None) or {}
    ents = sorted(((k, v["dtype"], tuple(v["shape"]), v["data_offsets"][0], v["data_offsets"][1])
                   for k, v in hdr.items()), key=lambda e: (e[3], e[0]))
    return ents, meta


class Source:
    """The tensors of one model, safetensors file or adapter. Attributes: path, kind ("model",
    "adapter" or "file"), dir (None for a bare file), files ({file name: (entries, metadata)}),
    index (the parsed index JSON or None), adapter_config (dict or None)."""

    def __init__(self, path):
        self.path = path
        self.index = None
        self.adapter_config = None
        if not os.path.exists(path):
            raise PosthocError("%s: no such file or directory" % path)
        if os.path.isdir(path):
            self.dir = path
            if os.path.exists(os.path.join(path, INDEX_FILE)):
                self.kind = "model"
                self.index = _load_json(os.path.join(path, INDEX_FILE))
                names = sorted(set(self.index.get("weight_map", {}).values()))
                if not names:
                    raise PosthocError("%s: empty weight_map" % os.path.join(path, INDEX_FILE))
            elif os.path.exists(os.path.join(path, MODEL_FILE)):
                self.kind, names = "model", [MODEL_FILE]
            elif os.path.exists(os.path.join(path, ADAPTER_FILE)):
                self.kind, names = "adapter", [ADAPTER_FILE]
                cfgp = os.path.join(path, ADAPTER_CONFIG)
                if not os.path.exists(cfgp):
                    raise PosthocError("%s: adapter weights without %s" % (path, ADAPTER_CONFIG))
                self.adapter_config = _load_json(cfgp)
            else:
                raise PosthocError("%s: not a model directory (no %s, %s or %s)"
                                   % (path, MODEL_FILE, INDEX_FILE, ADAPTER_FILE))
        elif path.endswith(".json"):
            self.dir = os.path.dirname(path) or "."
            self.kind = "model"
            self.index = _load_json(path)
            names = sorted(set(self.index.get("weight_map", {}).values()))
        else:
            self.dir, self.kind, names = None, "file", [os.path.basename(path)]
        self.files = {}
        self._where = {}
        for fn in names:
            fp = self._file_path(fn)
            ents, meta = read_header(fp)
            self.files[fn] = (ents, meta)
            for e in ents:
                self._where[e[0]] = (fn, e)
        if self.index is not None:
            for name, fn in self.index["weight_map"].items():
                if name not in self._where:
                    raise PosthocError("%s: index lists %s in %s, which does not hold it"
                                       % (path, name, fn))

    def _file_path(self, fn):
        if self.dir is None:
            return self.path
        return os.path.join(self.dir, fn)

    def names(self):
        """Tensor names, file by file in offset order."""
        return [e[0] for fn in self.files for e in self.files[fn][0]]

    def __contains__(self, name):
        return name in self._where

    def info(self, name):
        """(dtype name, shape) of NAME."""
        fn, e = self._entry(name)
        return e[1], e[2]

    def _entry(self, name):
        try:
            return self._where[name]
        except KeyError:
            raise PosthocError("%s: missing tensor %s" % (self.path, name))

    def get(self, name):
        """NAME as a torch tensor of its stored dtype (a private copy)."""
        from safetensors import safe_open
        fn, _ = self._entry(name)
        with safe_open(self._file_path(fn), framework="pt") as f:
            return f.get_tensor(name)

    def nbytes(self):
        return sum(e[4] - e[3] for fn in self.files for e in self.files[fn][0])

    def largest(self):
        return max((e[4] - e[3] for fn in self.files for e in self.files[fn][0]), default=0)


def _load_json(p):
    try:
        with open(p) as f:
            return json.load(f)
    except OSError as e:
        raise PosthocError("%s: %s" % (p, e.strerror))
    except ValueError as e:
        raise PosthocError("%s: not valid JSON (%s)" % (p, e))


def write_file(path, entries, metadata, produce):
    """Write a safetensors file at PATH holding ENTRIES [(name, dtype name, shape)] in that
    order; PRODUCE(name) returns each tensor, called once per name in order, just before it is
    written. A tensor of another dtype is cast to the entry's; another shape is an error."""
    import torch
    offsets, pos = {}, 0
    sizes = {}
    for name, dt, shape in entries:
        n = torch_dtype(dt).itemsize
        for s in shape:
            n *= s
        offsets[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + n]}
        sizes[name] = n
        pos += n
    hdr = dict(offsets)
    if metadata:
        hdr["__metadata__"] = metadata
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dt, shape in entries:
            t = produce(name)
            if tuple(t.shape) != tuple(shape):
                raise PosthocError("%s: computed shape %s, expected %s"
                                   % (name, tuple(t.shape), tuple(shape)))
            t = t.to(torch_dtype(dt)).contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy().data)
            del t
        if f.tell() != 8 + len(raw) + pos:
            raise PosthocError("%s: wrote %d bytes, expected %d" % (path, f.tell(), 8 + len(raw) + pos))
    os.replace(tmp, path)


def write_like(src, out_dir, produce, progress=None):
    """Write into OUT_DIR a copy of SRC's layout (same files, tensor order, dtypes, index and
    side files) whose tensors come from PRODUCE(name). Returns the written weight file paths.
    A bare-file SRC: OUT_DIR is the output file path."""
    if src.dir is None:
        (fn, (ents, meta)), = src.files.items()
        d = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(d, exist_ok=True)
        write_file(out_dir, [(e[0], e[1], e[2]) for e in ents], meta, produce)
        return [out_dir]
    os.makedirs(out_dir, exist_ok=True)
    # Side files first: config, tokenizer, generation config, adapter config, index.
    for fn in sorted(os.listdir(src.dir)):
        p = os.path.join(src.dir, fn)
        if os.path.isfile(p) and not fn.endswith(".safetensors") and not fn.endswith(".partial") \
                and not fn.endswith(".jsonl"):
            shutil.copyfile(p, os.path.join(out_dir, fn))
    paths = []
    for i, (fn, (ents, meta)) in enumerate(src.files.items()):
        if progress:
            progress("file %d/%d %s (%d tensors)" % (i + 1, len(src.files), fn, len(ents)))
        op = os.path.join(out_dir, fn)
        write_file(op, [(e[0], e[1], e[2]) for e in ents], meta, produce)
        paths.append(op)
    return paths


def check_distinct(out, *inputs):
    """Refuse to write over an input (it is being read while the output is written)."""
    ro = os.path.realpath(out)
    for p in inputs:
        if p and os.path.realpath(p) == ro:
            raise PosthocError("--out %s is one of the inputs; choose a new directory" % out)
