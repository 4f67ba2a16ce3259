"""Safe-state snapshots for the monitor: the model's weights (its state_dict: parameters and
buffers) and the per-parameter state of its optimizers, restored bit for bit.

In memory the snapshot is a CPU copy whose buffers are reused from one snapshot to the next.
On disk it is one file per process (``last-safe.pt``, ``last-safe-rankN.pt`` under torchrun),
written atomically: a temporary file beside it is written, flushed, fsync'ed, renamed over the
old one, and the directory fsync'ed, so a kill -9 at any moment leaves the previous snapshot
whole. ``load(path)`` and ``restore(snapshot, model, optimizers)`` work on such a file after a
crash too.

Optimizer hyper-parameters (param_groups: lr, betas...) are not part of a snapshot: after a
rollback the learning-rate schedule goes on from where training is, only the weights and the
optimizer's per-parameter state (moments, step counters) go back.
"""
import copy
import os


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _opt_state(opt, to_cpu, reuse):
    """{param index: {key: value}} with tensors copied (to CPU when to_cpu), and their devices."""
    import torch
    states, devices = {}, {}
    for i, p in enumerate(_params(opt)):
        st = opt.state.get(p)
        if not st:
            continue
        old = reuse.get(i, {}) if reuse else {}
        s, d = {}, {}
        for k, v in st.items():
            if torch.is_tensor(v):
                d[k] = str(v.device)
                if not to_cpu:
                    s[k] = v.detach()
                    continue
                buf = old.get(k)
                if torch.is_tensor(buf) and buf.shape == v.shape and buf.dtype == v.dtype:
                    buf.copy_(v.detach())
                else:
                    buf = v.detach().to("cpu", copy=True)
                s[k] = buf
            else:
                s[k] = copy.deepcopy(v)
        states[i] = s
        devices[i] = d
    return states, devices


def capture(model, optimizers, step, score, reuse=None):
    """A snapshot dict of MODEL and OPTIMIZERS as CPU copies; buffers of REUSE (an older
    snapshot) are overwritten when shapes match."""
    import torch
    old_model = (reuse or {}).get("model", {})
    weights = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            buf = old_model.get(name)
            if torch.is_tensor(buf) and buf.shape == t.shape and buf.dtype == t.dtype:
                buf.copy_(t)
            else:
                buf = t.detach().to("cpu", copy=True)
            weights[name] = buf
    old_opts = (reuse or {}).get("optim", [])
    optim, devices = [], []
    for n, opt in enumerate(optimizers):
        s, d = _opt_state(opt, True, old_opts[n] if n < len(old_opts) else None)
        optim.append(s)
        devices.append(d)
    return {"format": 1, "step": step, "score": score, "model": weights, "optim": optim, "devices": devices}


def restore(snap, model, optimizers):
    """Put MODEL's weights and OPTIMIZERS' per-parameter state back to SNAP, bit-identical.
    Tensors are copied into the live ones where shapes and dtypes match (so that references
    the optimizer keeps stay valid), else replaced by copies on their recorded device;
    parameters without state in SNAP lose theirs."""
    import torch
    with torch.no_grad():
        live = model.state_dict()
        missing = [n for n in live if n not in snap["model"]]
        if missing:
            raise ValueError("snapshot has no tensor for %s" % ", ".join(missing[:5]))
        for name, t in live.items():
            t.copy_(snap["model"][name])
    for n, opt in enumerate(optimizers):
        if n >= len(snap["optim"]):
            break
        saved, devices = snap["optim"][n], snap["devices"][n]
        for i, p in enumerate(_params(opt)):
            s = saved.get(i)
            if not s:
                opt.state.pop(p, None)
                continue
            cur = opt.state.get(p) or {}
            new = {}
            for k, v in s.items():
                if torch.is_tensor(v):
                    c = cur.get(k)
                    if torch.is_tensor(c) and c.shape == v.shape and c.dtype == v.dtype \
                            and str(c.device) == devices[i][k]:
                        with torch.no_grad():
                            c.copy_(v)
                        new[k] = c
                    else:
                        new[k] = v.to(devices[i][k], copy=True)
                else:
                    new[k] = copy.deepcopy(v)
            opt.state[p] = new


class MemorySnapshots:
    """The last safe state as a CPU copy."""
    where = "memory"

    def __init__(self):
        self.snap = None

    def save(self, model, optimizers, step, score):
        self.snap = capture(model, optimizers, step, score, reuse=self.snap)

    @property
    def step(self):
        return None if self.snap is None else self.snap["step"]

    def restore(self, model, optimizers):
        restore(self.snap, model, optimizers)


def disk_path(directory):
    """One file per process: last-safe.pt, or last-safe-rankN.pt under torchrun."""
    rank = os.environ.get("RANK")
    name = "last-safe-rank%s.pt" % rank if rank else "last-safe.pt"
    return os.path.join(directory, name)


def write_atomic(obj, path):
    """torch.save OBJ to PATH so that PATH is always either the old file or the new one."""
    import torch
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a failed write (full disk, quota) leaves no partial file behind; PATH keeps the old one
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load(path):
    """A snapshot written by the monitor (tensors on the CPU)."""
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


class DiskSnapshots:
    """The last safe state in one file, replaced atomically."""
    where = "disk"

    def __init__(self, directory):
        self.path = disk_path(directory)
        self.step = None

    def save(self, model, optimizers, step, score):
        weights = {k: v.detach() for k, v in model.state_dict().items()}
        optim, devices = [], []
        for opt in optimizers:
            s, d = _opt_state(opt, False, None)
            optim.append(s)
            devices.append(d)
        write_atomic({"format": 1, "step": step, "score": score, "model": weights, "optim": optim,
                      "devices": devices}, self.path)
        self.step = step

    def restore(self, model, optimizers):
        restore(load(self.path), model, optimizers)
