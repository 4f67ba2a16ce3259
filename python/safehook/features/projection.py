"""safehook.project(): SafeGrad's projection of task gradients against safety gradients, the
same code the safegrad feature runs in the optimizer hook.

For each group of tensors (all of them: "global"; a group per block: "layer"; one per tensor:
"tensor") with g the task gradient and s the safety gradient, when cos(g, s) < threshold t:

    g <- g - coef s,   coef = g.s / s.s - t |r| / (|s| sqrt(1 - t^2)),  |r|^2 = g.g - (g.s)^2 / s.s

in place (the tensors are never rebound): g's component along s is moved just far enough that
the cosine becomes t (t = 0: the conflicting component is removed, coef = g.s / s.s), and the
part of g orthogonal to s is kept. A group at or above t is left alone, so a positive t never
removes a component that helps safety. A cosine within 1e-6 of the threshold counts as not
below it, so projecting twice changes nothing. t must be in [-1, 1). Contiguous CPU float32/bfloat16/float16 tensors go
through the C kernel (one pass for the dot products, one for the update, both cores); the rest
(other devices, non-contiguous, DTensor shards) through torch ops. Sharded DTensor gradients
(FSDP2) have their partial dot products summed with one all_reduce over the shard group."""
import math

from .. import _core
from ..runtime.stacks import collective_device, shard_view

GRANULARITIES = ("global", "layer", "tensor")
COS_EPS = 1e-6  # as SH_SG_COS_EPS: a cosine this close to the threshold is not below it


def coef_for(gs, ss, gg, cs, threshold):
    """The coefficient of s to subtract from g (0: leave the group alone), as sh_sg_decide."""
    if not (cs == cs and cs < threshold - COS_EPS):
        return 0.0
    x = 0.0
    if threshold != 0.0:
        rr = gg - gs * gs / ss
        x = threshold * math.sqrt(rr if rr > 0 else 0.0) / math.sqrt(ss * (1 - threshold * threshold))
    return gs / ss - x


def _group_ids(n, granularity, groups):
    if granularity == "global":
        return None, 1
    if granularity == "tensor":
        return list(range(n)), max(n, 1)
    if granularity == "layer":
        if groups is None:
            raise ValueError("granularity 'layer' needs groups= (a key per tensor, e.g. its block)")
        if len(groups) != n:
            raise ValueError("%d groups for %d tensors" % (len(groups), n))
        index = {}
        ids = [index.setdefault(k, len(index)) for k in groups]
        return ids, max(len(index), 1)
    raise ValueError("granularity must be one of %s, got %r" % (", ".join(GRANULARITIES), granularity))


def _torch_dots(g, s, w):
    import torch
    g64 = g.detach().reshape(-1).to(torch.float64)
    s64 = s.detach().reshape(-1).to(device=g.device, dtype=torch.float64)
    d = torch.stack([torch.dot(g64, s64), torch.dot(s64, s64), torch.dot(g64, g64)])
    return d * w if w != 1.0 else d


def project(task_grads, safety_grads, granularity="global", threshold=0.0, groups=None,
            grad_scale=None, process_group=None, replicated=False):
    """Project TASK_GRADS (a list of tensors, changed in place) against SAFETY_GRADS (same
    shapes) and return what was done:

        {"granularity", "cosine", "projected", "coef", "norms": {"task", "safety"},
         "total": {"cosine", "norms"}}

    scalars for "global", lists (one entry per group) otherwise ("total": over all tensors); cosine is None where a norm is
    0. Pairs where either tensor is None are left out. ``groups`` gives a key per tensor for
    "layer". ``grad_scale`` (GradScaler's scale, when the gradients are still scaled) only
    divides the reported task norm: the projection is linear, so scaled gradients project the
    same. ``process_group`` all-reduces the dot products (sharded gradients that are plain
    tensors); DTensor gradients use their own mesh. ``replicated`` (with ``process_group``):
    the gradients are replicas (DDP), so the dot products are averaged over the group instead:
    every rank then takes the same decision with the same coefficients, even where the ranks'
    numbers differ in their last bits."""
    if not -1.0 <= threshold < 1.0:
        raise ValueError("threshold must be in [-1, 1), got %r" % (threshold,))
    pairs = [(i, g, s) for i, (g, s) in enumerate(zip(task_grads, safety_grads))
             if g is not None and s is not None]
    if len(task_grads) != len(safety_grads):
        raise ValueError("%d task gradients but %d safety gradients" % (len(task_grads), len(safety_grads)))
    if groups is not None and granularity == "layer":
        groups = [groups[i] for i, _, _ in pairs]
    ids, ngroups = _group_ids(len(pairs), granularity, groups)

    g_loc, s_loc, weights, mesh = [], [], [], None
    for _, g, s in pairs:
        gl, gm, w = shard_view(g)
        sl, _, _ = shard_view(s)
        g_loc.append(gl)
        s_loc.append(sl)
        weights.append(w)
        if gm is not None:
            mesh = gm
    group = process_group if process_group is not None else (mesh.get_group() if mesh is not None else None)

    res = None
    if group is None and all(w == 1.0 for w in weights):
        res = _core.safegrad_project(g_loc, s_loc, ids, ngroups, float(threshold))
    if res is not None:
        dots, coefs, cosines, _ = res
    else:
        dots, coefs, cosines = _two_pass(g_loc, s_loc, ids, ngroups, weights, group, threshold,
                                         replicated and process_group is not None and mesh is None)
    return _report(granularity, dots, coefs, cosines, ngroups, grad_scale)


def _two_pass(g_loc, s_loc, ids, ngroups, weights, group, threshold, mean=False):
    """Dots from the kernel and torch, summed over ranks, then the update."""
    import torch
    kernel = [i for i, w in enumerate(weights) if w == 1.0]
    dots, skipped = _core.safegrad_dots([g_loc[i] for i in kernel], [s_loc[i] for i in kernel],
                                        None if ids is None else [ids[i] for i in kernel], ngroups)
    rest = [kernel[j] for j in skipped] + [i for i, w in enumerate(weights) if w != 1.0]
    if rest or group is not None:
        total = torch.tensor(dots, dtype=torch.float64)
        if rest:
            # per-tensor dots stay on their device; one transfer per device brings them all back
            by_dev = {}
            for i in rest:
                by_dev.setdefault(g_loc[i].device, []).append(i)
            for idx in by_dev.values():
                d = torch.stack([_torch_dots(g_loc[i], s_loc[i], weights[i]) for i in idx]).cpu()
                for row, i in zip(d, idx):
                    k = 0 if ids is None else ids[i]
                    total[3 * k:3 * k + 3] += row
        if group is not None:
            import torch.distributed as dist
            t = total.to(collective_device(group))
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            total = t.cpu()
            if mean:
                total /= dist.get_world_size(group)
        dots = total.tolist()
    coefs, cosines = [], []
    for k in range(ngroups):
        gs, ss, gg = dots[3 * k:3 * k + 3]
        cs = gs / math.sqrt(gg * ss) if ss > 0 and gg > 0 else float("nan")
        cosines.append(cs)
        coefs.append(coef_for(gs, ss, gg, cs, threshold))
    if any(c != 0.0 for c in coefs):
        left = _core.safegrad_update(g_loc, s_loc, coefs, ids)
        by_coef = {}
        for i in left:
            c = coefs[0 if ids is None else ids[i]]
            if c != 0.0:
                by_coef.setdefault(c, []).append(i)
        with torch.no_grad():
            for c, idx in by_coef.items():
                for i in idx:
                    g = g_loc[i]
                    s = s_loc[i].to(device=g.device).view(g.shape)
                    if g.dtype in (torch.bfloat16, torch.float16):
                        g.add_(s.float() * -c)  # torch would round alpha to g's dtype
                    else:
                        g.add_(s.to(g.dtype), alpha=-c)
    return dots, coefs, cosines


def _report(granularity, dots, coefs, cosines, ngroups, grad_scale):
    scale = 1.0
    if grad_scale is not None:
        scale = float(grad_scale)
        if not scale > 0:
            scale = 1.0
    cos = [None if c != c else c for c in cosines]
    proj = [c != 0.0 for c in coefs]
    nt = [math.sqrt(max(dots[3 * k + 2], 0.0)) / scale for k in range(ngroups)]
    ns = [math.sqrt(max(dots[3 * k + 1], 0.0)) for k in range(ngroups)]
    gs, ss, gg = (sum(dots[3 * k + c] for k in range(ngroups)) for c in range(3))
    total = {"cosine": gs / math.sqrt(gg * ss) if gg > 0 and ss > 0 else None,
             "norms": {"task": math.sqrt(max(gg, 0.0)) / scale, "safety": math.sqrt(max(ss, 0.0))}}
    if granularity == "global":
        return {"granularity": "global", "total": total, "cosine": cos[0], "projected": proj[0], "coef": coefs[0],
                "norms": {"task": nt[0], "safety": ns[0]}}
    return {"granularity": granularity, "total": total, "cosine": cos, "projected": proj, "coef": coefs,
            "norms": {"task": nt, "safety": ns}}
