"""Statistics of the shaping guards, on plain lists of scores (higher = more harmful) and float
tensors of hidden states. Nothing here knows of models or hooks.

* auroc(pos, neg): P(a random positive scores above a random negative), ties half: the
  Mann-Whitney U statistic over n1 n0, from the ranks of the pooled scores.
* fpr_bound(neg, fpr): the lowest threshold t with #{neg >= t} <= floor(fpr |neg|).
* calibrate(harmful, benign, tpr, max_fpr, midpoint): a guard's thresholds (see its docstring).
* ledoit_wolf(X), fisher_direction(pos, neg): the refitted direction's linear discriminant.
* probe_like_bound(harmful, stream, threshold): how far a threshold rises before the rows it
  flags look like the harmful probe.
* stream_check(harmful, stream, max_flag_rate, thresholds): what the training stream says of
  each guard.
"""
import bisect
import math

import torch

SUSPEND_AUROC = 0.65  # a guard that ranks the harmful probe above the stream no better is suspended
SUSPEND_GAP = 0.1     # ... and so is one more than this behind the best guard
PROBE_LIKE = 0.65     # flagged stream rows this like the harmful probe (its AUROC against them) are not capped


def auroc(pos, neg):
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not pos or not neg:
        return None
    allv = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    i = 0
    rank_sum = 0.0
    while i < len(allv):
        j = i
        while j < len(allv) and allv[j][0] == allv[i][0]:
            j += 1
        r = (i + j + 1) / 2.0  # mean 1-based rank of the tie group
        rank_sum += r * sum(1 for k in range(i, j) if allv[k][1] == 1)
        i = j
    n1, n0 = len(pos), len(neg)
    return (rank_sum - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def tpr_at_fpr(pos, neg, fpr):
    """Fraction of POS at or above the lowest threshold that flags at most FPR of NEG."""
    t = fpr_bound(neg, fpr)
    return sum(v >= t for v in pos) / len(pos) if pos else None


def fpr_bound(neg, fpr):
    """The lowest threshold t with at most a fraction FPR of NEG at or above t."""
    s = sorted(neg)
    k = int(math.floor(fpr * len(s) + 1e-9))  # rows allowed above
    if k >= len(s):
        return -math.inf
    return math.nextafter(s[len(s) - k - 1], math.inf)


def calibrate(harmful, benign, tpr, max_fpr, midpoint=None):
    """The guard's thresholds from its scores on harmful and benign calibration rows. MIDPOINT
    (the refitted direction's): the threshold is the lower of the TPR quantile and MIDPOINT,
    never under the benign bound."""
    t = -math.inf
    if harmful:
        s = sorted(harmful)
        t = s[int(math.floor((1.0 - tpr) * len(s) + 1e-9))] if tpr < 1 else s[0]
    if midpoint is not None and math.isfinite(midpoint):
        t = min(t, midpoint)
    if benign:
        t = max(t, fpr_bound(benign, max_fpr))
        refuse = max(t, math.nextafter(max(benign), math.inf))
        lo = sorted(benign)[len(benign) // 2]
    else:
        refuse, lo = t, (min(harmful) if harmful else t)
    out = {"threshold": t, "refuse_threshold": refuse, "low": min(lo, t),
           "n_harmful": len(harmful), "n_benign": len(benign)}
    if harmful:
        out["tpr"] = sum(v >= t for v in harmful) / len(harmful)
    if benign:
        out["fpr"] = sum(v >= t for v in benign) / len(benign)
    if harmful and benign:
        out["auroc"] = auroc(harmful, benign)
    if midpoint is not None:
        out["midpoint"] = midpoint
    return out


def ledoit_wolf(X):
    """Ledoit and Wolf's shrinkage of the covariance S = X^T X / n of the rows of X (n x d,
    already centered) towards mu I, mu = tr(S)/d (J. Multivariate Anal. 88, 2004): the weight a
    of (1 - a) S + a mu I. Computed from the n x n Gram matrix G = X X^T (|S|_F = |G|_F / n,
    |x_k|^2 = G_kk), never a d x d matrix: the training rows are far fewer than the hidden size of
    a real model. Returns (a, mu, G)."""
    n, d = X.shape
    G = X @ X.T
    mu = float(torch.trace(G)) / (n * d)
    if not mu > 0:
        return 1.0, 0.0, G
    s2 = float((G ** 2).sum()) / (n * n)                 # |S|_F^2
    d2 = s2 - mu * mu * d                                # |S - mu I|_F^2
    b2 = (float((torch.diagonal(G) ** 2).sum()) - n * s2) / (n * n)
    a = 1.0 if d2 <= 0 else min(max(b2 / d2, 0.0), 1.0)
    return a, mu, G


def fisher_direction(pos, neg):
    """The unit direction w = C^-1 (mean(POS) - mean(NEG)) (Fisher's discriminant), C the
    pooled within-class covariance of POS and NEG (rows: float hidden states) shrunk by
    ledoit_wolf (weight floored at 1e-6, so C is invertible also for n < d); computed in float64
    through Woodbury's identity, an n x n solve: C = alpha I + beta X^T X with alpha = a mu,
    beta = (1 - a)/n, C^-1 v = (v - beta X^T (alpha I + beta G)^-1 X v) / alpha. Returns (w,
    shrinkage, midpoint), the midpoint being the projection of the two class means' midpoint
    (Fisher's rule with equal priors)."""
    P, N = pos.double(), neg.double()
    mp, mn = P.mean(0), N.mean(0)
    X = torch.cat([P - mp, N - mn])
    a, mu, G = ledoit_wolf(X)
    v = mp - mn
    if mu > 0:
        a = max(a, 1e-6)
        alpha, beta = a * mu, (1.0 - a) / X.shape[0]
        inner = alpha * torch.eye(X.shape[0], dtype=X.dtype, device=X.device) + beta * G
        v = (v - beta * (X.T @ torch.linalg.solve(inner, X @ v))) / alpha
    w = v / v.norm().clamp_min(1e-300)
    return w.to(pos.dtype), a, float((mp + mn) @ w) / 2


def probe_like_bound(harmful, stream, threshold, like=PROBE_LIKE):
    """The lowest threshold t >= THRESHOLD at which the STREAM rows flagged (scores >= t) look
    like the HARMFUL probe rows: the probe's AUROC against them is at most LIKE (0.5: the same
    distribution; 1: every probe row above every flagged row). Dropping the lowest flagged row
    never raises that AUROC, so this is one scan from the top. THRESHOLD itself when the rows it
    flags already look like the probe (or none are flagged)."""
    hs = sorted(harmful)
    n = len(hs)
    above = sorted((v for v in stream if v >= threshold), reverse=True)
    if not n or not above:
        return threshold
    total, keep = 0.0, 0
    for i, f in enumerate(above):
        lo, hi = bisect.bisect_left(hs, f), bisect.bisect_right(hs, f)
        total += ((n - hi) + 0.5 * (hi - lo)) / n  # P(a probe row scores above f), ties half
        if total / (i + 1) <= like:
            keep = i + 1
    if keep == len(above):
        return threshold
    return math.nextafter(above[keep], math.inf)


def stream_check(harmful, stream, max_flag_rate, min_auroc=SUSPEND_AUROC, thresholds=None):
    """What the training stream says of each guard. HARMFUL: {guard: scores of the harmful probe
    rows}; STREAM: {guard: scores of the training rows at their first sighting}; MAX_FLAG_RATE in
    (0, 1]; THRESHOLDS: {guard: its calibrated threshold} (absent: -inf). The stream is mostly
    the user's own task, which the benign probe need not resemble; and the person who writes the
    data chooses its harmful share, so the share of flags is no measure of a guard's calibration
    (issue 24; docs/attacks.md). Per guard:

    * ``bound``: the threshold rises only until the rows it flags look like the harmful probe
      (probe_like_bound) or are at most MAX_FLAG_RATE of the stream, the lower of the two: a
      guard whose flags score like harmful requests keeps its threshold however many there are;
      one whose flags are a tail of the task just above its threshold is held to MAX_FLAG_RATE;
    * ``flag_rate``: the share of the stream flagged at the bound;
    * ``auroc``: of the harmful probe rows against the stream rows; ``auroc_rest``: the same
      against the stream's benign part, estimated as (auroc - p/2) / (1 - p), p the best guard's
      flag rate (the harmful rows score like the probe: AUROC 0.5 against it); the raw AUROC
      where p > 0.9;
    * ``suspended`` when ``auroc_rest`` is under MIN_AUROC (the guard cannot tell this stream's
      benign rows from harmful ones) or, while p <= 0.5, more than SUSPEND_GAP under the best
      guard's (in the union it would only add false flags; at higher p the estimate divides the
      probe's sampling noise by 1 - p). A guard without harmful probe scores (no AUROC) is
      suspended when another guard has one. The guard with the highest AUROC (``best``, its flag
      rate ``harmful_share``) is never suspended; where p > 0.9 none is."""
    out = {}
    thresholds = thresholds or {}
    for g, v in stream.items():
        h = harmful.get(g) or []
        t = thresholds.get(g, -math.inf)
        cap = fpr_bound(v, max_flag_rate)
        bound = min(cap, probe_like_bound(h, v, t)) if h else cap
        tt = max(t, bound)
        out[g] = {"auroc": auroc(h, v), "bound": bound, "rows": len(v),
                  "flag_rate": sum(x >= tt for x in v) / len(v) if v else 0.0}
    known = dict((g, c["auroc"]) for g, c in out.items() if c["auroc"] is not None)
    best = max(known, key=known.get) if known else None
    share = out[best]["flag_rate"] if best else 0.0
    for c in out.values():
        a = c["auroc"]
        c["auroc_rest"] = None if a is None else (a if share > 0.9 else (a - 0.5 * share) / (1.0 - share))
    rest = [c["auroc_rest"] for c in out.values() if c["auroc_rest"] is not None]
    # a guard well behind the best one only adds false flags to the union; so does one the
    # stream cannot judge (no harmful probe scores: a gradient guard on a probe without harmful
    # answers) beside one it can (docs/architecture.md, "Shaping")
    floor = max(min_auroc, max(rest) - SUSPEND_GAP) if rest and share <= 0.5 else min_auroc
    if share > 0.9:
        floor = -math.inf  # nearly every row flagged: no benign rest to judge a guard by
    for c in out.values():
        c["suspended"] = c["auroc_rest"] < floor if c["auroc_rest"] is not None else bool(known)
    if out and all(c["suspended"] for c in out.values()):
        top = max(out, key=lambda g: -1.0 if out[g]["auroc"] is None else out[g]["auroc"])
        out[top]["suspended"] = False
    if best is not None:
        out[best]["suspended"] = False
    for c in out.values():
        c["best"], c["harmful_share"] = best, share
    return out


def _r(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(float(v), 6)
