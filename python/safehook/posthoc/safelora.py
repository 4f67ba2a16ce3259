"""Safe LoRA (Hsu et al., arXiv 2405.16833): after fine-tuning, project the fine-tuning update
of each layer onto the alignment subspace where the update has drifted away from it.

Per selected weight: V = W_aligned - W_base, C = V V^T / ||V||_F (the reference's projection;
C X is computed in the order with the smaller intermediate, see project()). With the
fine-tuning update dW (W_finetuned - W_aligned for a full model; s * B A for a PEFT LoRA
adapter), the similarity is cos(C dW, dW). A layer whose similarity is below the threshold
(or, with --layers N, one of the N least similar layers) gets C dW in place of dW (an adapter:
B -> C B); the others are left bit-identical."""
import re

from . import common as C
from .tensors import Output, PosthocError, Source, check_distinct


def project(v, x):
    """C X with C = V V^T / ||V||_F (V: d_out x d_in, X: d_out x k), in the product order whose
    intermediate is smaller: V (V^T X) holds a d_in x k matrix, (V V^T) X a d_out x d_out one.
    For a full-model update (k = d_in) that is min(d_out, d_in)^2 <= the tensor's own size: a
    wide weight (down_proj, d_in = 4 d_out) would otherwise hold d_in^2, 4x the tensor; for an
    adapter's B (k = r) V (V^T B) is tiny."""
    import torch
    n = torch.linalg.matrix_norm(v)
    d_out, d_in = v.shape
    if d_in * x.shape[1] <= d_out * d_out:
        return (v @ (v.T @ x)).div_(n)
    return ((v @ v.T) @ x).div_(n)


def similarity(v, dw):
    """cos(C dW, dW) (flattened), or None where V or dW is zero (nothing to compare)."""
    import torch
    if not bool(v.any()) or not bool(dw.any()):
        return None, None
    p = project(v, dw)
    cos = float(torch.nn.functional.cosine_similarity(p.reshape(-1), dw.reshape(-1), dim=0))
    return cos, p


def _adapter_pairs(src):
    """{base weight name: (lora_A name, lora_B name, scale)} of a PEFT LoRA adapter."""
    cfg = src.adapter_config or {}
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PosthocError("%s: only LoRA adapters are supported (peft_type %s)"
                           % (src.path, cfg.get("peft_type")))
    pairs = {}
    for name in src.names():
        m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_A(?:\.[^.]+)?\.weight$", name)
        if not m:
            continue
        bname = name.replace("lora_A", "lora_B")
        if bname not in src:
            raise PosthocError("missing tensor %s in adapter %s" % (bname, src.path))
        module = m.group(1)
        r = src.info(name)[1][0]
        alpha = cfg.get("lora_alpha", r)
        for pat, a in (cfg.get("alpha_pattern") or {}).items():
            if re.search(pat, module):
                alpha = a
        scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        pairs[module + ".weight"] = (name, bname, scale)
    if not pairs:
        raise PosthocError("%s: no lora_A/lora_B tensors in the adapter" % src.path)
    return pairs


def restore(base, aligned, finetuned, out, threshold=0.5, layers=None, include=None,
            exclude=None, record=None, quiet=False):
    """Write the Safe LoRA restoration of FINETUNED (a model or a PEFT LoRA adapter dir) to OUT.
    threshold: project layers with similarity below it; layers: project the N least similar
    layers instead (the reference's 'number' mode)."""
    import torch
    C.finite(threshold=threshold)
    check_distinct(out, base, aligned, finetuned)
    ub, ua, uf = Source(base), Source(aligned), Source(finetuned)
    if ub.kind == "adapter" or ua.kind == "adapter":
        raise PosthocError("restore needs full base and aligned models (the finetuned one may be an adapter)")
    adapter = uf.kind == "adapter"
    if include is None and exclude is None:
        include, exclude = C.DEFAULT_RESTORE_INCLUDE, C.DEFAULT_RESTORE_EXCLUDE
    sel = C.Selector(include, exclude)
    if adapter:
        pairs = _adapter_pairs(uf)
        targets = [w for w in pairs if sel(w, ua.info(w)[1] if w in ua else (0, 0))]
        for w in targets:
            C.check_like(w, ua, ub, "base")
            dout, din = ua.info(w)[1]
            a_shape, b_shape = uf.info(pairs[w][0])[1], uf.info(pairs[w][1])[1]
            if a_shape[1] != din or b_shape[0] != dout:
                raise PosthocError("shape mismatch for %s: adapter A %s, B %s vs weight %s"
                                   % (w, a_shape, b_shape, ua.info(w)[1]))
        missing = [w for w in pairs if w not in ua]
        if missing:
            raise PosthocError("missing tensor %s in aligned %s (adapter target)" % (missing[0], aligned))
    else:
        targets = [n for n in uf.names() if sel(n, uf.info(n)[1])]
        for n in targets:
            C.check_like(n, uf, ua, "aligned")
            C.check_like(n, uf, ub, "base")
    dest = Output(out, uf, [ub, ua, uf], record)
    rec = C.Record(dest.record_path, "safelora",
                   {"base": base, "aligned": aligned, "finetuned": finetuned, "out": out,
                    "threshold": threshold, "layers": layers, "adapter": adapter,
                    "include": include, "exclude": exclude})
    prog = C.Progress("restore", quiet)
    prog("Safe LoRA on %s (%s, %d layers), %s" % (
        finetuned, "adapter" if adapter else "full model", len(targets),
        "the %d least similar layers" % layers if layers else "threshold %g" % threshold))

    def load(w):
        wd = torch.float32 if ua.info(w)[0] != "F64" else torch.float64
        v = ua.get(w).to(wd) - ub.get(w).to(wd)
        if adapter:
            an, bn, scale = pairs[w]
            a, b = uf.get(an).to(wd), uf.get(bn).to(wd)
            return v, (b @ a) * scale, (a, b, scale)
        return v, uf.get(w).to(wd) - ua.get(w).to(wd), None

    # Pass 1: the similarity of every target layer.
    sims = {}
    for i, w in enumerate(targets):
        v, dw, _ = load(w)
        sims[w] = similarity(v, dw)[0]
        prog("similarity %d/%d %s" % (i + 1, len(targets), w), force=False)
    if layers:
        ranked = sorted((s, w) for w, s in sims.items() if s is not None)
        chosen = set(w for _, w in ranked[:layers])
    else:
        chosen = set(w for w, s in sims.items() if s is not None and s < threshold)
    prog("%d of %d layers below %s: projecting them" % (
        len(chosen), len(targets), "rank %d" % layers if layers else "threshold %g" % threshold))

    edit = {}  # tensor name in the output -> base weight name
    for w in targets:
        if adapter:
            edit[pairs[w][1]] = w
        else:
            edit[w] = w

    def produce(name):
        w = edit.get(name)
        if w is None:
            return uf.get(name)
        s = sims[w]
        r = {"name": w, "shape": list(ua.info(w)[1]), "similarity": s, "changed": w in chosen}
        if w not in chosen:
            rec.tensor(r)
            return uf.get(name)
        v, dw, ab = load(w)
        if adapter:
            a, b, scale = ab
            nb = project(v, b)
            r.update(norm_update=C.fnorm(dw), norm_projected=C.fnorm(nb @ a) * scale,
                     norm_v=C.fnorm(v), tensor=name)
            rec.tensor(r)
            return nb
        p = project(v, dw)
        r.update(norm_update=C.fnorm(dw), norm_projected=C.fnorm(p), norm_v=C.fnorm(v))
        rec.tensor(r)
        return ua.get(w).to(p.dtype).add_(p)

    dest.write(uf, produce, prog, rec, "restore", lambda: {"layers": len(targets), "projected": len(chosen)})
    prog("done: %d of %d layers projected, record %s" % (len(chosen), len(targets), dest.record))
    return {"layers": len(targets), "projected": len(chosen), "record": dest.record,
            "similarities": sims}
