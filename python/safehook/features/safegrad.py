"""The safegrad feature: before each optimizer step, remove from the task gradient the part that
conflicts with a safety gradient (safehook.projection does the arithmetic).

Where the safety gradient comes from (policy ``safegrad.source``):

* ``anchor`` (data-free): the gradient of 1/2 |w - w0|^2, i.e. w - w0, with w0 the weights at
  the model's first forward (or, for parameters not seen there, at their first step). An update
  that moves the weights away from w0 conflicts. Zero at the first step: nothing to project.
* ``direction``: a safetensors file of per-parameter directions *towards* safety (keys: the
  stripped parameter names), e.g. aligned minus base weights. The safety gradient is its
  negation; an update that moves against the direction conflicts. Parameters without an entry
  are not projected.
* ``probe``: the gradient of a safety loss on a probe's data at the current weights, refreshed
  every ``refresh_every`` steps. ``loss: "ce"`` is the probe's own loss (cross-entropy on the
  refusals); ``"kl"`` is KL(p0 || p) on the probe's label positions, with p0 the model's
  distribution before the first update, cached as log-probabilities (no second model kept).
  It comes from ``safehook.probes.gradient``, the one safety gradient of a step that the gate
  (and shaping's gradient guard) share: computed once per step however many features ask,
  batch by batch (the graph of one probe batch at a time), every .grad tensor kept the same
  object. ``safety_shared`` in the step record: another feature computed it at these weights.

Several ranks: one decision for all. DDP replicas average their dot products over the world
(one all_reduce), FSDP2 shards sum theirs over the mesh; FSDP1 (flat parameters) is refused
when the model is bound. DeepSpeed ZeRO's flat partitions: anchor/global only (summed over the
ranks), the rest refused.

The step record gets ``cosine``, ``projected`` and ``norms`` ({"task", "safety"}; the task norm is
unscaled when a GradScaler leaves the gradients scaled for a fused optimizer). With ``layer`` or
``tensor`` granularity, ``cosine`` is over all tensors, ``projected`` is still a bool (any group
projected), and ``groups_projected``, ``groups`` and ``cosine_min`` are added.
"""
import math

from .. import _core, probes
from ..probes import gradient
from . import projection
from ..runtime.context import Refusal, debug, warn
from ..runtime import registry
from ..runtime.stacks import FSDP1_HINT, block_of, collective_device, find_blocks, fsdp1_refusal, is_dtensor, world

def layer_key(name, path=None):
    """The group of granularity "layer" of a parameter NAME: its block in the block list PATH
    ("model.layers.3"; default: the list the name shows), else its module path."""
    return block_of(name, path)


class SafeGrad:
    def __init__(self, policy, rt):
        cfg = registry.section(policy, "safegrad")
        self.rt = rt
        self.policy = policy
        self.source = cfg["source"]
        self.granularity = cfg["granularity"]
        self.threshold = float(cfg["threshold"])
        self.refresh_every = int(cfg["refresh_every"])
        self.drift = cfg.get("refresh_drift")
        self.drift_rows = int(cfg["drift_rows"])
        self.directions = int(cfg["directions"])
        self.rows = cfg.get("rows")
        self.loss_kind = cfg["loss"]
        self.on_error = rt.on_error
        self.info = None      # the first model bound
        self.names = {}       # id(param) -> stripped name, over every model bound
        self.blocks = {}      # id(param) -> the path of its model's block list
        self.failed = False
        self.anchor = {}      # id(param) -> (param, w0)
        self.safety = {}      # id(param) -> (param, safety gradient buffer)
        self.direction = None # stripped name -> tensor (the file's)
        self.use = None       # the safety signal's Use of the last step (probes.gradient.Signal)
        self.probe = None
        if self.granularity not in projection.GRANULARITIES:
            raise ValueError("safegrad.granularity must be one of %s" % ", ".join(projection.GRANULARITIES))
        if self.source == "probe":
            name = cfg.get("probe")
            if not name:
                raise ValueError("safegrad.source 'probe' needs safegrad.probe")
            self.probe = probes.get(rt, name, policy)
            if self.loss_kind == "kl" and self.probe.cfg.get("callable"):
                raise ValueError("safegrad.loss 'kl' needs a probe with data, not a callable")
            if self.loss_kind not in ("ce", "kl"):
                raise ValueError("safegrad.loss must be 'ce' or 'kl'")
        elif self.source == "direction":
            path = cfg.get("direction")
            if not path:
                raise ValueError("safegrad.source 'direction' needs safegrad.direction (a safetensors file)")
            from safetensors.torch import load_file
            self.direction = load_file(path)
            import torch
            for n, d in self.direction.items():  # a NaN/inf direction would project garbage silently
                if d.is_floating_point() and not bool(torch.isfinite(d).all()):
                    bad = int((~torch.isfinite(d)).sum())
                    raise ValueError("safegrad.direction %s: %s holds %d NaN/inf values of %d"
                                     % (path, n, bad, d.numel()))
        elif self.source != "anchor":
            raise ValueError("safegrad.source must be probe, direction or anchor, got %r" % self.source)
        if self.source != "probe" and (self.drift is not None or self.directions != 1 or self.rows is not None):
            raise ValueError("safegrad.refresh_drift, safegrad.rows and safegrad.directions need source 'probe'")
        if self.directions > 1 and self.threshold != 0.0:
            raise ValueError("safegrad.directions > 1 projects onto the cone of the directions, at threshold 0 only "
                             "(got threshold %g)" % self.threshold)
        if self.directions > 1 and self.probe.cfg.get("callable"):
            raise ValueError("safegrad.directions > 1 needs a probe with data (its batches are the slices), "
                             "not a callable")
        rt.on_model(self._on_model)

    # -- the model --
    def _on_model(self, info):
        msg = fsdp1_refusal(info, "its flat parameters are shards of several tensors each, so a per-tensor "
                            "safety gradient cannot be matched to them")
        if msg:
            self._fail(msg)
            return
        if self.info is None:
            self.info = info
        self.names.update({id(p): n for n, p in info.params.items()})
        bl = find_blocks(info.root)
        self.blocks.update({id(p): bl.path if bl else "" for p in info.params.values()})  # "": none
        if self.source == "anchor":
            import torch
            with torch.no_grad():
                for p in info.params.values():
                    if p.requires_grad and id(p) not in self.anchor:
                        self.anchor[id(p)] = (p, p.detach().clone())
        elif self.source == "direction":
            hits = [n for n in self.direction if n in info.params]
            if not hits:
                self._fail("safegrad.direction: no key of the file names a parameter of the model "
                           "(first keys: %s)" % ", ".join(sorted(self.direction)[:3]))
            for n in hits:
                if tuple(self.direction[n].shape) != tuple(info.params[n].shape):
                    self._fail("safegrad.direction: %s has shape %s in the file, %s in the model"
                               % (n, tuple(self.direction[n].shape), tuple(info.params[n].shape)))
                    break
            trainable = [n for n, p in info.params.items() if p.requires_grad]
            missing = [n for n in trainable if n not in self.direction]
            if hits and missing:
                # documented (such parameters are not projected), but never silent: one error
                # record and one line
                msg = ("safegrad.direction covers %d of %d trainable parameters; the other %d are not projected "
                       "(first: %s)" % (len(trainable) - len(missing), len(trainable), len(missing),
                                        ", ".join(missing[:3])))
                self.rt.audit("error", {"message": msg, "missing": missing[:32], "count": len(missing)})
                warn(msg)

    def _fail(self, msg):
        """Protection cannot be applied (found outside a step): the runtime stops every rank at
        the next step under abort."""
        if not self.failed:
            self.failed = True
            self.rt.fail("safegrad: " + msg)

    def _names(self):
        if not self.names:
            info = self.rt.model()
            return {id(p): n for n, p in info.params.items()} if info else {}
        return self.names

    # -- the step --
    def pre_step(self, opt, step, record):
        if self.failed:
            return
        # what may fail on one rank (a probe's data, a direction's names) is agreed before the
        # projection's all_reduce: every rank stops here, or none does
        ok, prep = self.rt.together("safegrad", self._prepare, opt, step, record)
        if not ok:
            self.failed = True
        elif prep is not None:
            self._project(opt, step, record, *prep)

    def _prepare(self, opt, step, record):
        """(params with a gradient, their safety gradients, ZeRO partitions?), or None when
        there is nothing to project this step. Raises Refusal where the projection cannot be
        applied."""
        import torch
        found_inf = getattr(opt, "found_inf", None)
        if isinstance(found_inf, torch.Tensor) and float(found_inf) > 0:
            record["projected"] = False  # the fused step skips itself: nothing to protect
            return None
        params = [p for grp in opt.param_groups for p in grp["params"] if p.grad is not None]
        if not params:
            return None
        if any(getattr(p, "_is_flat_param", False) for p in params):
            raise Refusal("FSDP1 (flat parameters) is not supported: its flat parameters are shards of several "
                          "tensors each, so a per-tensor safety gradient cannot be matched to them; " + FSDP1_HINT)
        zero = self.partitions(params)
        # Several ranks (DDP replicas): the dot products are averaged over the world, so that
        # every rank projects, or not, with the same coefficient (and the cached signal's
        # directions are rank 0's). DTensor shards (FSDP2) are summed over their mesh inside
        # project(), ZeRO partitions over the world.
        dist, _ = world()
        replicated = dist is not None and not any(is_dtensor(p.grad) for p in params)
        if replicated and zero:
            replicated = False  # ZeRO's disjoint partitions: their dot products are summed
        self._replicated = replicated
        try:
            with torch.no_grad():
                safety = self._safety(opt, params, step, record)
        except (Refusal, _core.SafehookError):  # said already (a failure agreed inside the signal)
            raise
        except Exception as e:  # the projection could not be applied to this step
            raise Refusal("step %d: %s: %s" % (step, type(e).__name__, e)) from e
        if safety is None:
            return None
        return params, safety, zero

    def _project(self, opt, step, record, params, safety, zero):
        import torch
        dirs = self.use.directions if self.use is not None and self.source == "probe" else None
        keep = [i for i, s in enumerate(safety) if s is not None]
        pairs = [(params[i], safety[i]) for i in keep]
        groups = None
        if self.granularity == "layer":
            names = self._names()
            groups = [layer_key(names.get(id(p), "param%d" % id(p)), self.blocks.get(id(p))) for p, _ in pairs]
        scale = getattr(opt, "grad_scale", None)
        dist, _ = world()
        replicated = self._replicated
        kw = dict(groups=groups, grad_scale=float(scale) if isinstance(scale, torch.Tensor) else None,
                  process_group=dist.group.WORLD if dist is not None and (replicated or zero) else None,
                  replicated=replicated)
        if dirs is not None:
            res = projection.project_cone([p.grad for p, _ in pairs], [[d[i] for i in keep] for d in dirs],
                                          self.granularity, gram=self.use.gram, **kw)
            record["active"] = res["active"] if self.granularity == "global" else sum(res["active"])
        else:
            res = projection.project([p.grad for p, _ in pairs], [s for _, s in pairs], self.granularity,
                                     self.threshold, **kw)
        tot = res["total"]
        cos = tot["cosine"]
        vals = [cos] + list(tot["norms"].values())
        if any(isinstance(v, float) and not math.isfinite(v) for v in vals):  # NaN/inf in a gradient
            record["nonfinite"] = True
            self.nonfinite = getattr(self, "nonfinite", 0) + 1
            if self.nonfinite <= 3:
                self.rt.violation("non-finite values in the task or safety gradient at step %d: the "
                                  "projection cannot hold for this update" % step, {"step": step}, skip=3)
        record["cosine"] = cos
        record["norms"] = dict(tot["norms"])
        if self.granularity == "global":
            record["projected"] = res["projected"]
        else:
            record["projected"] = any(res["projected"])  # one type in every record: a bool
            record["groups_projected"] = sum(res["projected"])
            record["groups"] = len(res["projected"])
            mins = [c for c in res["cosine"] if c is not None]
            record["cosine_min"] = min(mins) if mins else None

    def partitions(self, params):
        """True when PARAMS are DeepSpeed ZeRO's flat fp32 partitions (no model holds them, each
        rank steps its own slice of the flattened parameters). Only the anchor source with
        global granularity has a meaning there (w - w0 is computed slice by slice, dot products
        summed over the ranks); the rest is refused (no parameter names, no per-layer groups)."""
        import sys
        if "deepspeed" not in sys.modules or not self.names or any(id(p) in self.names for p in params):
            return False
        if self.source != "anchor" or self.granularity != "global":
            raise Refusal("the optimizer steps DeepSpeed ZeRO's flat partitions, which carry no parameter "
                              "names: source %r with granularity %r cannot be applied (use source 'anchor' with "
                              "granularity 'global', or DDP/FSDP2)" % (self.source, self.granularity))
        return True

    def _safety(self, opt, params, step, record):
        if self.source == "anchor":
            return self._anchor(params)
        if self.source == "direction":
            return self._direction(params)
        info = self.rt.model_for(opt) or self.info or self.rt.model()
        if info is None:
            raise Refusal("source 'probe' needs the model, but no forward was seen before the first optimizer step")
        cache = gradient.of(self.rt)
        sig = cache.signal(self.probe, info.root, self.loss_kind, every=self.refresh_every, drift=self.drift,
                           drift_rows=self.drift_rows, directions=self.directions, rows=self.rows)
        before = cache.stats()
        # the refresh's collectives (its agreement, rank 0's directions) run between pieces of
        # work that may fail on one rank: each such failure is agreed at once (rt.together)
        use = self.use = sig.at(params, step, agree=self.rt.agree,
                                broadcast=_broadcast if self._replicated else None,
                                together=(lambda fn, *a, **kw: self.rt.together(
                                    "safegrad: probe '%s'" % self.probe.name, fn, *a, **kw))
                                if world()[1] > 1 else None)
        record["safety"] = use.record()
        if use.fresh:
            record["safety_refreshed"] = True
            record["safety_loss"] = use.loss
            after = cache.stats()
            if after["shared"] > before["shared"] and after["computed"] == before["computed"]:
                record["safety_shared"] = True  # another feature computed it at these weights
        return use.grads

    def _anchor(self, params):
        out = []
        for p in params:
            a = self.anchor.get(id(p))
            if a is None or a[0] is not p:
                a = self.anchor[id(p)] = (p, p.detach().clone())  # first seen now: its step-0 value
            buf = self.safety.get(id(p))
            if buf is None or buf[0] is not p:
                buf = self.safety[id(p)] = (p, torch_empty_like(p.grad))
            buf[1].copy_(p.detach())
            buf[1].sub_(a[1])
            out.append(buf[1])
        return out

    def _direction(self, params):
        import torch
        names = self._names()
        if not names:
            raise Refusal("source 'direction' needs the parameter names, but no model forward was seen "
                          "before the first optimizer step")
        out = []
        for p in params:
            buf = self.safety.get(id(p))
            if buf is None or buf[0] is not p:
                d = self.direction.get(names.get(id(p), ""))
                if d is None:
                    out.append(None)
                    continue
                # kept in the file's precision (the kernel mixes dtypes), float64 aside
                dt = d.dtype if d.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
                s = (-d).to(device=p.grad.device, dtype=dt)
                if is_dtensor(p):  # a DTensor parameter (FSDP2): its shard
                    from torch.distributed.tensor import distribute_tensor
                    s = distribute_tensor(s, p.device_mesh, p.placements)
                buf = self.safety[id(p)] = (p, s)
            out.append(buf[1])
        return out


def _broadcast(tensors, chunk=1 << 24):
    """Make every rank hold rank 0's TENSORS (in place): DDP replicas then cache the same
    directions bit for bit. Flattened per dtype and device, CHUNK elements per broadcast."""
    import torch
    import torch.distributed as dist
    dev = collective_device()
    by = {}
    for t in tensors:
        by.setdefault((t.dtype, t.device), []).append(t)
    for ts in by.values():
        i = 0
        while i < len(ts):
            part, n = [], 0
            while i < len(ts) and (not part or n + ts[i].numel() <= chunk):
                part.append(ts[i])
                n += ts[i].numel()
                i += 1
            flat = torch.cat([t.reshape(-1) for t in part])
            if flat.device != dev:
                flat = flat.to(dev)
            dist.broadcast(flat, src=0)
            off = 0
            with torch.no_grad():
                for t in part:
                    t.copy_(flat[off:off + t.numel()].view_as(t))
                    off += t.numel()


def torch_empty_like(t):
    import torch
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def setup(policy, rt):
    sg = SafeGrad(policy, rt)
    rt.add_pre(sg.pre_step, order=registry.order("safegrad"))
    debug("safegrad: source %s, granularity %s, threshold %g, refresh every %d"
          % (sg.source, sg.granularity, sg.threshold, sg.refresh_every))
    return sg
