"""LoX, low-rank extrapolation (Perin et al., arXiv 2506.15606): before fine-tuning, push the
aligned model further along the top singular directions of its alignment update, so that
fine-tuning has to travel further to undo them.

For every selected 2-D weight: dW = W_aligned - W_base = U S V^T; keep the top k singular
triplets (k = 0: the whole of dW, no SVD); W = W_aligned + alpha * U_k S_k V_k^T. Every other
tensor (1-D parameters, buffers) is copied from the aligned model unchanged."""
import time

from . import common as C
from .tensors import Output, PosthocError, Source, check_distinct


def extrapolate(w_aligned, w_base, k, alpha):
    """(W_aligned + alpha * rank-k part of (W_aligned - W_base), info); W_BASE (and W_ALIGNED,
    whose storage holds the result) may be overwritten: pass tensors you own. Computed in float32 (or
    float64 for float64 inputs); the result has that dtype. info: norm of dW, effective rank
    kept, share of dW's energy in the kept part, norm of the added term, top singular values."""
    import torch
    wd = C.work_dtype(w_aligned)
    a = w_aligned.to(wd)
    # dW in W_base's own storage when it already has the working dtype: one tensor less at
    # the SVD's peak (the caller hands over W_base; it is overwritten)
    dw = w_base.to(wd).neg_().add_(a)
    info = {"norm_delta": C.fnorm(dw), "norm_aligned": C.fnorm(a)}
    full = min(dw.shape)
    if k <= 0 or k >= full:
        low = dw
        info.update(rank=full, energy_kept=1.0)
    else:
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        del dw
        e = s.double().square()
        info.update(rank=k, energy_kept=float(e[:k].sum() / e.sum()) if float(e.sum()) > 0 else 1.0,
                    singular_values=[round(float(x), 6) for x in s[:min(k, 8)]])
        low = (u[:, :k] * s[:k]) @ vh[:k]
        del u, s, vh
    if alpha != 1.0:
        low.mul_(alpha)
    info["norm_added"] = C.fnorm(low)
    return a.add_(low), info


def harden(base, aligned, out, k=6, alpha=0.5, include=None, exclude=None, record=None,
           quiet=False):
    """Write the LoX-hardened ALIGNED model (paths) to OUT; returns the end record's summary.
    k: rank kept (0 = full); alpha: extrapolation coefficient; include/exclude: regexes over
    tensor names (default: every 2-D tensor, as the reference does)."""
    C.finite(alpha=alpha)
    if k < 0:
        raise PosthocError("--rank must be >= 0 (0 = full rank)")
    check_distinct(out, base, aligned)
    ub, ua = Source(base), Source(aligned)
    if ua.kind == "adapter" or ub.kind == "adapter":
        raise PosthocError("harden needs full models (base and aligned), not adapters")
    sel = C.Selector(include, exclude)
    for name in ua.names():
        if sel(name, ua.info(name)[1]):
            C.check_like(name, ua, ub, "base")
    dest = Output(out, ua, [ub, ua], record)
    rec = C.Record(dest.record_path, "lox",
                   {"base": base, "aligned": aligned, "out": out, "rank": k, "alpha": alpha,
                    "include": include, "exclude": exclude})
    prog = C.Progress("harden", quiet)
    prog("LoX rank %s alpha %g: %s + alpha * (%s - %s) -> %s"
         % (k or "full", alpha, aligned, aligned, base, out))
    names = ua.names()
    done = [0]

    def produce(name):
        done[0] += 1
        shape = ua.info(name)[1]
        if not sel(name, shape):
            return ua.get(name)
        t0 = time.time()
        w, info = extrapolate(ua.get(name), ub.get(name), k, alpha)
        rec.tensor(dict({"name": name, "shape": list(shape), "changed": info["norm_added"] > 0,
                         "seconds": round(time.time() - t0, 3)}, **info))
        prog("%d/%d %s %s" % (done[0], len(names), name, "x".join(map(str, shape))), force=False)
        return w

    dest.write(ua, produce, prog, rec, "harden")
    prog("done: %d of %d tensors changed, record %s" % (rec.changed, len(names), dest.record))
    return {"tensors": len(names), "changed": rec.changed, "record": dest.record}
