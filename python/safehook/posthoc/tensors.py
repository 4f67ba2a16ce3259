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


# Side files are copied from the input folder, except weights in another format than the
# safetensors being written (a stale pytorch_model.bin beside them would be loaded by some
# loaders instead: a mix of edited and unedited weights), their indices, records and markers.
_NOT_SIDE = (".safetensors", ".partial", ".jsonl", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
             ".onnx", ".npz", ".bin.index.json", ".pt.index.json")
MARKER = "safehook-posthoc.json"  # in every output folder: what wrote it (a re-run may replace it)


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
        if os.path.isfile(p) and not fn.endswith(_NOT_SIDE) and fn != MARKER:
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


def _input_files(src):
    """Every file an input consists of: its weight files, and for a folder every file in it
    (index, config, tokenizer: side files are read and copied)."""
    if src.dir is None:
        return [src.path]
    return [os.path.join(src.dir, f) for f in os.listdir(src.dir) if os.path.isfile(os.path.join(src.dir, f))] + \
        [src._file_path(fn) for fn in src.files]


def _same(a, b):
    try:
        return os.path.samefile(a, b)  # symlinks and hard links too
    except OSError:
        return False


class Output:
    """Where a post-hoc method writes OUT (and its record), written so that no reader ever sees
    a mix of two runs: a folder output is written into a fresh folder beside OUT and renamed to
    OUT once complete (a previous output of safehook there, marked by MARKER, is replaced
    whole; any other non-empty folder is refused); a file output is written to a temporary
    name and renamed (write_file). Nothing written may be an input: OUT, the record and the
    files of OUT are checked against every file of every input (same file, through links too).

    Use: dest = Output(out, src, inputs, record); write to dest.target, the record to
    dest.record_path; then dest.commit(method) or dest.abort(). dest.record is where the record
    is once committed."""

    def __init__(self, out, src, inputs, record=None):
        from .common import default_record
        self.out, self.is_dir = out, src.dir is not None
        self.record = record if record is not None else default_record(out)
        protected = [f for s in inputs for f in _input_files(s)]
        paths = [s.path for s in inputs]
        check_distinct(out, *paths)
        for what, p in (("--out", out), ("--record", self.record)):
            for f in protected + paths:
                if _same(p, f) or os.path.realpath(p) == os.path.realpath(f):
                    raise PosthocError("%s %s is an input file (%s); choose a new path" % (what, p, f))
        ro, rr = os.path.realpath(out), os.path.realpath(self.record)
        if rr == ro:
            raise PosthocError("--record %s is the output itself; choose another path" % self.record)
        inside = self.is_dir and (rr + os.sep).startswith(ro + os.sep)
        if inside and os.path.relpath(rr, ro) in set(src.files) | {MARKER} | set(
                f for f in (os.listdir(src.dir) if src.dir else [])):
            raise PosthocError("--record %s would be overwritten by the output's file of that name" % self.record)
        if self.is_dir:
            if os.path.exists(out) and not os.path.isdir(out):
                raise PosthocError("--out %s is a file, but the input is a folder: give a folder" % out)
            if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MARKER)):
                raise PosthocError("--out %s is a folder with files that safehook did not write (no %s); "
                                   "choose a new or empty folder" % (out, MARKER))
            parent = os.path.dirname(ro) or "."
            os.makedirs(parent, exist_ok=True)
            import tempfile
            self.tmp = tempfile.mkdtemp(prefix="." + os.path.basename(ro) + ".partial-", dir=parent)
            self.target = self.tmp
            self.record_path = os.path.join(self.tmp, os.path.relpath(rr, ro)) if inside else self.record
        else:
            if os.path.isdir(out):
                raise PosthocError("--out %s is a folder, but the input is one file: give a .safetensors path" % out)
            self.tmp, self.target, self.record_path = None, out, self.record

    def commit(self, method):
        """Put the complete output in place of OUT."""
        if self.tmp is None:
            return
        written = sorted(os.path.relpath(os.path.join(d, f), self.tmp) for d, _, fs in os.walk(self.tmp) for f in fs)
        with open(os.path.join(self.tmp, MARKER), "w") as f:
            json.dump({"written_by": "safehook " + method, "files": written}, f, indent=1)
            f.write("\n")
        old = None
        if os.path.isdir(self.out):
            if os.listdir(self.out):
                old = self.tmp.replace(".partial-", ".old-")
                os.rename(self.out, old)
            else:
                os.rmdir(self.out)
        os.rename(self.tmp, self.out)
        self.tmp = None
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def write(self, src, produce, progress, rec, method, fields=None):
        """write_like(SRC, the target, PRODUCE, PROGRESS); then the record REC closed "ok" (with
        fields() added: figures known once every tensor is written), before the rename so that a
        record inside OUT goes with it, and commit(METHOD). On any failure REC is closed "failed",
        what was written removed, and the error raised."""
        try:
            write_like(src, self.target, produce, progress)
            rec.close(status="ok", **(fields() if fields else {}))
            self.commit(method)
        except BaseException:
            rec.close(status="failed")
            self.abort()
            raise

    def abort(self):
        """Remove what was written (OUT, as it was, stays)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
