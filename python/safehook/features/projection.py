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


def project_cone(task_grads, directions, granularity="global", groups=None, grad_scale=None,
                 process_group=None, replicated=False, gram=None):
    """Project TASK_GRADS (changed in place) onto the gradients that conflict with none of K
    safety directions: DIRECTIONS is a list of K lists of tensors, each shaped as TASK_GRADS
    (SafeGrad's cached subspace: the gradients of K slices of the probe, whose sum is the probe
    loss's gradient). Per group, g becomes the nearest g' with <g', s_j> >= 0 for every j:

        g' = g + sum_j lam_j s_j,   lam >= 0 minimizing 1/2 lam^T G lam + a^T lam,

    G the K x K Gram matrix of the directions and a_j = <g, s_j> (the Karush-Kuhn-Tucker
    conditions of the projection onto that polyhedral cone; ``probes.gradient.cone``). K = 1 is
    ``project()`` at threshold 0. What is left of g orthogonal to every direction is kept.

    ``gram``: a dict kept by the caller between calls with the same directions (the Gram
    matrices of each grouping are computed once, K (K + 1) / 2 dot passes; a new dict when the
    directions change). Distributed arguments as ``project()``. Returns

        {"granularity", "cosine", "projected", "active", "coef", "norms": {"task", "safety"},
         "total": {"cosine", "norms"}}

    with the cosine and safety norm those of the sum of the directions (from the dots: no
    extra pass), "active" the count of directions with lam > 0 and "coef" the lam's, per group
    (scalars for "global")."""
    from ..probes.gradient import cone
    k = len(directions)
    if k < 1:
        raise ValueError("project_cone needs at least one direction")
    n = len(task_grads)
    if any(len(d) != n for d in directions):
        raise ValueError("every direction needs one tensor per task gradient (%d)" % n)
    keep = [i for i in range(n) if task_grads[i] is not None and all(d[i] is not None for d in directions)]
    if groups is not None and granularity == "layer":
        groups = [groups[i] for i in keep]
    ids, ngroups = _group_ids(len(keep), granularity, groups)
    g_loc, weights, mesh = [], [], None
    d_loc = [[] for _ in range(k)]
    for i in keep:
        gl, gm, w = shard_view(task_grads[i])
        g_loc.append(gl)
        weights.append(w)
        if gm is not None:
            mesh = gm
        for j in range(k):
            d_loc[j].append(shard_view(directions[j][i])[0])
    group = process_group if process_group is not None else (mesh.get_group() if mesh is not None else None)
    mean = replicated and process_group is not None and mesh is None
    key = (granularity, None if ids is None else tuple(ids), id(group))
    G = None if gram is None else gram.get(key)
    if G is None:
        G = [[[0.0] * k for _ in range(k)] for _ in range(ngroups)]
        for a in range(k):
            for b in range(a, k):
                dd = _dots(d_loc[a], d_loc[b], ids, ngroups, weights, group, mean)
                for q in range(ngroups):
                    G[q][a][b] = G[q][b][a] = dd[3 * q]
        if gram is not None:
            gram[key] = G
    gs = []  # per direction: [g.s_j, s_j.s_j, g.g] per group
    for j in range(k):
        gs.append(_dots(g_loc, d_loc[j], ids, ngroups, weights, group, mean))
    lams = []
    for q in range(ngroups):
        a = [gs[j][3 * q] for j in range(k)]
        lams.append(cone(G[q], a))
    for j in range(k):
        # g -= coef s with coef = -lam_j of the group
        _update(g_loc, d_loc[j], [-lams[q][j] for q in range(ngroups)], ids)
    dots = []  # as project(): [g.S, S.S, g.g] per group, S the sum of the directions
    for q in range(ngroups):
        dots += [sum(gs[j][3 * q] for j in range(k)), sum(sum(r) for r in G[q]), gs[0][3 * q + 2]]
    coefs = [sum(l) for l in lams]
    cosines = [d[0] / math.sqrt(d[2] * d[1]) if d[1] > 0 and d[2] > 0 else float("nan")
               for d in (dots[3 * q:3 * q + 3] for q in range(ngroups))]
    res = _report(granularity, dots, coefs, cosines, ngroups, grad_scale)
    active = [sum(1 for x in l if x > 0) for l in lams]
    if granularity == "global":
        res["active"], res["coef"] = active[0], list(lams[0])
    else:
        res["active"], res["coef"] = active, [list(l) for l in lams]
    return res


def _two_pass(g_loc, s_loc, ids, ngroups, weights, group, threshold, mean=False):
    """Dots from the kernel and torch, summed over ranks, then the update."""
    dots = _dots(g_loc, s_loc, ids, ngroups, weights, group, mean)
    coefs, cosines = [], []
    for k in range(ngroups):
        gs, ss, gg = dots[3 * k:3 * k + 3]
        cs = gs / math.sqrt(gg * ss) if ss > 0 and gg > 0 else float("nan")
        cosines.append(cs)
        coefs.append(coef_for(gs, ss, gg, cs, threshold))
    _update(g_loc, s_loc, coefs, ids)
    return dots, coefs, cosines


def _dots(g_loc, s_loc, ids, ngroups, weights, group, mean=False):
    """[g.s, s.s, g.g] per group (3 * ngroups floats): the kernel's where it takes the tensors,
    torch's for the rest, summed over GROUP's ranks (averaged with MEAN: replicas)."""
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
    return dots


def _update(g_loc, s_loc, coefs, ids):
    """g -= coef s per tensor (the coefficient of its group), in place; a zero changes nothing."""
    import torch
    if not any(c != 0.0 for c in coefs):
        return
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
