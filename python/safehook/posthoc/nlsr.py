"""NLSR, neuron-level safety realignment (Yi et al., arXiv 2412.12497), on full weights: after
fine-tuning, put back the safety-critical neurons of the layers whose fine-tuned update has
drifted furthest from a safety reference.

- Safety reference: R = W_aligned + beta * (W_aligned - W_base) (beta = 0: the aligned model;
  beta > 0 pre-amplifies it by extrapolation away from the base, as the paper's ExPO step).
- Safety-critical neurons, per selected weight: the output neurons (rows) with the largest
  norm of the reference update dR = R - W_base, the top FRACTION of rows. The paper scores
  neurons by a low-rank importance over safety data; this is a data-free stand-in, computed
  from weights only, and is named as such in the record ("neuron_score": "delta_row_norm").
- Per layer similarity: cos(dF[rows], dR[rows]) with dF = W_finetuned - W_base.
- Layer choice: the layers are ranked by similarity and each is drawn with a Bernoulli
  probability spread linearly over [rate - epsilon, rate + epsilon], the LEAST similar layer
  getting rate + epsilon, as the paper states (a layer that drifted from the reference is the
  one to patch). The reference code (xinykou/NLSR src/safe_lora/inner.py,
  Adaptive_Search_Operation) ranks by descending similarity and gives the highest rank, hence
  the highest probability, to the MOST similar layer, against its own comment "the less similar
  layer will be updated"; we follow the paper and the comment. direction="reference" reproduces
  the code's choice. The draws come from a torch.Generator seeded with SEED: the same inputs and
  seed give the same layers.
- Transplant: in a drawn layer the rows of the mask take R's values; every other entry, layer
  and tensor is the fine-tuned model's, bit-identical."""

from . import common as C
from .tensors import Output, PosthocError, Source, check_distinct


def neuron_rows(dr, fraction):
    """Indices (sorted) of the top FRACTION of DR's rows by L2 norm (at least one row)."""
    import torch
    n = dr.shape[0]
    k = max(1, min(n, int(round(fraction * n))))
    score = torch.linalg.vector_norm(dr, dim=1)
    return torch.sort(torch.topk(score, k, sorted=True).indices).values


def masked_similarity(df, dr, rows):
    """cos(dF[rows], dR[rows]) flattened; None where either is zero."""
    import torch
    a, b = df[rows].reshape(-1), dr[rows].reshape(-1)
    if not bool(a.any()) or not bool(b.any()):
        return None
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def probabilities(sims, rate, epsilon, direction="paper"):
    """Per-layer draw probabilities, in the order of SIMS (floats; None = no similarity, which
    ranks as the least similar: a layer whose update has nothing in common with the reference).
    Ranks spread linearly over [rate - epsilon, rate + epsilon]: direction "paper" gives the top
    of the range to the least similar layer, "reference" to the most similar one."""
    n = len(sims)
    if n == 0:
        return []
    key = [(-2.0 if s is None else s, i) for i, s in enumerate(sims)]
    order = sorted(key)  # least similar first
    p = [0.0] * n
    for r, (_, i) in enumerate(order):
        t = 1.0 - r / (n - 1) if n > 1 else 1.0  # 1 for the least similar
        if direction == "reference":
            t = 1.0 - t
        elif direction != "paper":
            raise ValueError("direction must be 'paper' or 'reference'")
        p[i] = min(1.0, max(0.0, rate - epsilon + 2 * epsilon * t))
    return p


def draw(probs, seed):
    """Bernoulli draws of PROBS from a generator seeded with SEED (list of bools)."""
    import torch
    if not probs:
        return []
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(len(probs), generator=g, dtype=torch.float64)
    return [bool(x < p) for x, p in zip(u.tolist(), probs)]


def restore(base, aligned, finetuned, out, fraction=0.2, rate=0.5, epsilon=0.2, beta=0.0,
            seed=0, direction="paper", include=None, exclude=None, record=None, quiet=False):
    """Write the NLSR restoration of the full model FINETUNED to OUT."""
    import torch
    C.finite(neurons=fraction, rate=rate, epsilon=epsilon, amplify=beta)
    if not 0 < fraction <= 1:
        raise PosthocError("--neurons must be in (0, 1]")
    check_distinct(out, base, aligned, finetuned)
    ub, ua, uf = Source(base), Source(aligned), Source(finetuned)
    if uf.kind == "adapter" or ub.kind == "adapter" or ua.kind == "adapter":
        raise PosthocError("nlsr needs full models; merge the adapter first "
                           "(peft merge_and_unload) or use --method safelora")
    if include is None and exclude is None:
        include, exclude = C.DEFAULT_RESTORE_INCLUDE, C.DEFAULT_RESTORE_EXCLUDE
    sel = C.Selector(include, exclude)
    targets = [n for n in uf.names() if sel(n, uf.info(n)[1])]
    for n in targets:
        C.check_like(n, uf, ua, "aligned")
        C.check_like(n, uf, ub, "base")
    dest = Output(out, uf, [ub, ua, uf], record)
    rec = C.Record(dest.record_path, "nlsr",
                   {"base": base, "aligned": aligned, "finetuned": finetuned, "out": out,
                    "neuron_fraction": fraction, "rate": rate, "epsilon": epsilon, "beta": beta,
                    "seed": seed, "direction": direction, "neuron_score": "delta_row_norm",
                    "include": include, "exclude": exclude})
    prog = C.Progress("restore", quiet)
    prog("NLSR on %s: %d layers, top %.0f%% neurons, draw p in [%g, %g] (%s direction), seed %d"
         % (finetuned, len(targets), 100 * fraction, rate - epsilon, rate + epsilon, direction, seed))

    def load(w):
        wd = torch.float64 if uf.info(w)[0] == "F64" else torch.float32
        u = ub.get(w).to(wd)
        r = ua.get(w).to(wd)
        if beta:
            r.add_(r - u, alpha=beta)
        return u, r

    sims, rows = {}, {}
    for i, w in enumerate(targets):
        u, r = load(w)
        dr = r - u
        rows[w] = neuron_rows(dr, fraction)
        df = uf.get(w).to(dr.dtype).sub_(u)
        sims[w] = masked_similarity(df, dr, rows[w])
        prog("similarity %d/%d %s" % (i + 1, len(targets), w), force=False)
    probs = probabilities([sims[w] for w in targets], rate, epsilon, direction)
    drawn = draw(probs, seed)
    chosen = {w for w, d in zip(targets, drawn) if d}
    pmap = dict(zip(targets, probs))
    prog("%d of %d layers drawn for transplant" % (len(chosen), len(targets)))

    def produce(name):
        if name not in sims:
            return uf.get(name)
        f = uf.get(name)
        rr = {"name": name, "shape": list(f.shape), "similarity": sims[name],
              "probability": round(pmap[name], 6), "neurons": int(rows[name].numel()),
              "changed": name in chosen}
        if name not in chosen:
            rec.tensor(rr)
            return f
        _, r = load(name)
        idx = rows[name]
        before = f[idx].to(r.dtype)
        rr["norm_rows_finetuned_minus_reference"] = C.fnorm(before - r[idx])
        rr["rows"] = idx.tolist() if idx.numel() <= 64 else None
        out_t = f.clone()
        out_t[idx] = r[idx].to(f.dtype)
        rec.tensor(rr)
        return out_t

    dest.write(uf, produce, prog, rec, "restore", lambda: {"layers": len(targets), "transplanted": len(chosen)})
    prog("done: neurons transplanted in %d of %d layers, record %s"
         % (len(chosen), len(targets), dest.record))
    return {"layers": len(targets), "transplanted": len(chosen), "record": dest.record,
            "similarities": sims, "chosen": sorted(chosen)}
