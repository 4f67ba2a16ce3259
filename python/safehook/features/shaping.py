"""The shaping feature (dynamic safety shaping, DSS): each training example is judged once, at
its first sighting, by one or more guards; an example a guard calls unsafe has its loss removed
(``mask``), down-weighted (``weight``), its response rewritten into a refusal (``refuse``), or its
gradient subtracted before the optimizer step (``subtract``), inside an unchanged training script.

Why per example: a harmful minority in the fine-tuning data teaches a skill that lies mostly
outside one safety-gradient direction, and a per-batch gate sees a harmful example in most
batches. Defenses that reach base-level harm act per example or per token: BDS (arXiv
2510.27172), GradShield (arXiv 2605.14194), format-matched safety data (arXiv 2406.10288),
token-wise constraints (arXiv 2406.05946), STAR-DSS (arXiv 2505.17196).

Where it acts (hooks on the model being trained, bound at its first forward):

* a forward pre-hook on the model finds each row's response span (from ``labels``: the positions
  with a label other than -100; without labels, from ``response_marker``: the tokens after its
  last occurrence), fingerprints the row (a hash of its tokens), applies decisions already made,
  and runs the guards that need no forward of their own (``gradient``, ``callable``). Where labels
  pass through the forward it hands the model rewritten copies (the caller's tensors are never
  touched): masked rows get -100, refused rows get a refusal in input_ids and labels;
* ``scorer: "start"`` (default): the pre-hook also scores the new rows for ``direction`` and
  ``refusal`` with a frozen copy of the model taken when training starts (``_make_scorer``): a
  no-grad forward of the new rows only, cut at the block read unless the refusal guard needs the
  logits. Every row, whenever first seen, is then judged by the model the probes calibrated
  (measured on the demo world, full preset: reading the scores from the drifting training
  forward, the guards that separated the rows at the start ranked the probe below the training
  rows by step 31, and caught 86 of the 200 harmful rows);
* ``scorer: "forward"``: a forward hook on one block reads the hidden state at each new row's
  last prompt token (``direction``), and a forward hook on the output embedding reads the
  logits there (``refusal``), so both guards cost no extra forward; rows they flag are masked at
  once (in the labels copy, before the model computes its own loss) and their decision is kept;
* a gradient hook on the logits multiplies each row's logits gradient by its weight, so the
  weights hold for whatever loss the script computes from the logits (a custom loss outside the
  model included). ``subtract`` is for losses that do not flow through the logits: at the
  optimizer's pre-step hook the flagged rows' own loss (mean token cross-entropy over the
  forward's batch, as Hugging Face computes it) is backpropagated and its gradient subtracted.

Guards (a row is flagged when any guard's score reaches its threshold):

* ``direction``: <h_l(b), r> with h_l(b) the output of block l at the last prompt token b and r
  the unit difference of means (harmful probe prompts minus benign probe prompts) at that block
  (Arditi et al., arXiv 2406.11717). Block l is ``layer``, or chosen at calibration: the fit uses
  the even-numbered probe rows; among the first 80% of blocks, the one whose direction separates
  the odd-numbered rows best (AUROC, ties broken by the standardized gap of the means).
* ``refusal``: log of the probability mass the model puts, at b, on the first tokens of the
  harmful probe's refusals (the model's own propensity to start a refusal).
* ``gradient``: -<g_i, g_s>/|g_s| (GradShield's first-order harm score), g_i the gradient of the
  row's mean response cross-entropy and g_s that of the harmful probe's loss at the start of
  training (computed once). Without per-example gradients: a central finite difference of the
  row's loss along g_s/|g_s| (two no-grad forwards of the new rows, on perturbed copies of the
  weights through torch.func.functional_call; the model's weights are never edited). A row that
  teaches against the probe's refusals scores high.
* ``callable``: ``pkg.module:function`` called as ``f(prompt, prefixes)`` with the decoded prompt
  and the decoded response prefixes at every ``segment_tokens`` tokens; it returns one risk in
  [0, 1] per prefix (the DSS partial-response score). A segment at risk >= 0.5 flags the row;
  ``mask`` then removes that segment and everything after it, ``weight`` weighs each segment's
  tokens by 1 - risk.

Calibration (once, at the model's first forward, in eval mode): each guard scores the harmful
probe's rows (``probe``: prompts with refusals; for ``gradient``, the rows' harmful answers when
the probe has them) and the benign probe's rows (``benign``: benign prompts with helpful answers;
hard negatives, benign requests that use harmful words, belong there). The threshold is the
score at which a fraction ``tpr`` of the harmful rows is flagged, raised where needed so that at
most a fraction ``max_fpr`` of the benign rows is; with no harmful rows, the benign bound alone.
The threshold stays next to the harmful rows on purpose: a midpoint between the two sets would
flag the user's own task, which the benign probe does not cover (measured on the demo world:
75-100% of the task rows flagged with a midpoint, 0% with this rule).
The refusal threshold of ``refuse`` is above every benign calibration score (and at least the
flag threshold). A ``probe`` record (``what: "shaping calibration"``) gives each guard's
threshold, block, and the TPR, FPR and AUROC it reached on the calibration rows.

The training stream checks the probes (``stream_check``): once ``STREAM_MIN`` (32) training
rows have been scored, and at every recalibration after, each guard's threshold is raised where
needed so that it flags at most ``max_flag_rate`` (default 0.3) of the most recent 256 training
rows, and a guard whose AUROC of harmful probe rows against training rows is under 0.65, or more
than 0.1 under the best guard's, is suspended (the best one never is). At that first check the
``direction`` is fitted again, against the training rows and the benign probe together
(Fisher's discriminant, its threshold down to the class means' midpoint: see
``_refit_direction``; once more at 128 rows), and the rows judged so far are judged again.
Until that last refit ``refuse`` only masks (with the direction guard on, a training set of
fewer than 128 distinct rows is masked, never rewritten). A ``probe`` record
(``what: "shaping stream check"``) gives each guard's AUROC, bound and state.

The model drifts as it learns (arXiv 2509.06795 measures the refusal direction moving most in
the first steps), and a row seen for the first time at step 500 is judged by the model of step
500: every ``recalibrate_every`` steps (default 10) the first 16 held-out rows of each probe are
scored again with the current weights (one no-grad forward over them; the direction is kept) and the
``direction`` and ``refusal`` thresholds are set again by the same rule. The step record says so
(``shaping.recalibrated``: the new thresholds).

Decisions are sticky: made at a row's first sighting (while the model is closest to its aligned
start) and kept for every later sighting of the same tokens. ``refuse``: a flagged row whose
score clears the refusal threshold is rewritten into one of the probe's refusals (rotated; one
that fits in its response span), the rest of the span masked, at most ``refuse_cap`` of a batch's
rows; a row first flagged inside the forward (``direction``, ``refusal``) is masked at that
sighting and rewritten from its next one on (its input was already embedded).

Audit: the step record gets ``shaping``: {seen, new, flagged, rewritten, masked_tokens} over the
step's training forwards (masked_tokens: response tokens whose loss was removed, counted when
the removal really happened: labels handed to the model, the gradient hook run, the subtraction
done). Each newly flagged row writes a ``flag`` record (fingerprint, guard, score, threshold,
action). The feature acts only on training forwards (module in train mode, gradients enabled).
"""
import hashlib
import math

import torch

from .. import probes
from ..runtime.context import attach, debug

RECAL_ROWS = 16  # held-out rows per probe re-scored at a recalibration (cost: ~0.7 step of 16 rows)
ORDER = 15  # before SafeGrad (20): a subtracted row is not projected
GUARDS = ("direction", "refusal", "gradient", "callable")
IN_FORWARD = ("direction", "refusal")
DEFAULTS = {"guards": ["direction", "refusal"], "action": "mask", "tpr": 0.95, "max_fpr": 0.05,
            "refuse_cap": 0.25, "segment_tokens": 8, "recalibrate_every": 10, "max_flag_rate": 0.3,
            "scorer": "start"}
STREAM_MIN = 32       # first-sighting rows of the training stream before its first check
REFIT_ROWS = 128      # training rows of the direction's last refit (a first one at STREAM_MIN)
STREAM_WINDOW = 256   # the most recent first-sighting scores the check looks at
SUSPEND_AUROC = 0.65  # a guard that ranks the harmful probe above the stream no better is suspended
SUSPEND_GAP = 0.1     # ... and so is one more than this behind the best guard
STREAM_GUARDS = ("direction", "refusal", "gradient")  # the callable's 0.5 is the user's own scale
_BLOCK_LISTS = ("layers", "h", "blocks", "layer")


# -- small statistics --

def auroc(pos, neg):
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not pos or not neg:
        return None
    allv = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    ranks, i = {}, 0
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


def stream_check(harmful, stream, max_flag_rate, min_auroc=SUSPEND_AUROC):
    """What the training stream says of each guard. HARMFUL: {guard: scores of the harmful probe
    rows}; STREAM: {guard: scores of the training rows at their first sighting}. The stream is
    mostly the user's own task, which the benign probe need not resemble (measured on the demo
    world, seed 1: the direction flagged 41% of the task rows at its probe threshold, and the
    refusal guard, AUROC 1.0 on the probes, ranked the task rows above the harmful ones).
    Per guard: ``auroc`` of harmful probe rows against stream rows (a guard that separates the
    harmful rows from the task ranks the probe above most of the stream: about 1 - p/2 for a
    harmful share p), ``bound``, the lowest threshold that flags at most MAX_FLAG_RATE of the
    stream, and ``suspended`` when the AUROC is under MIN_AUROC (that guard cannot tell this
    stream's rows from harmful ones) or more than SUSPEND_GAP under the best guard's (in the
    union it would only add false flags). A guard without harmful probe scores (no AUROC) is
    suspended when another guard has one. The guard with the highest AUROC is never suspended."""
    out = {}
    for g, v in stream.items():
        out[g] = {"auroc": auroc(harmful.get(g) or [], v), "bound": fpr_bound(v, max_flag_rate), "rows": len(v)}
    known = [c["auroc"] for c in out.values() if c["auroc"] is not None]
    # a guard well behind the best one only adds false flags to the union; so does one the
    # stream cannot judge (no harmful probe scores: a gradient guard on a probe without harmful
    # answers) beside one it can (measured on SmolLM2: such a gradient guard was inverted,
    # AUROC 0.025, and flagged its bound, 33% of the stream)
    floor = max(min_auroc, max(known) - SUSPEND_GAP) if known else min_auroc
    for c in out.values():
        c["suspended"] = c["auroc"] < floor if c["auroc"] is not None else bool(known)
    if out and all(c["suspended"] for c in out.values()):
        best = max(out, key=lambda g: -1.0 if out[g]["auroc"] is None else out[g]["auroc"])
        out[best]["suspended"] = False
    return out


def _r(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(float(v), 6)


def fingerprint(tokens):
    """A row's key: 16 hex digits of a hash of its token ids."""
    return hashlib.blake2b(",".join(map(str, tokens)).encode(), digest_size=8).hexdigest()


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    lg = getattr(out, "logits", None)
    if lg is None and isinstance(out, (tuple, list)):
        lg = out[0]
    return lg


def find_blocks(root):
    """The model's transformer blocks: its largest ModuleList named layers/h/blocks/layer."""
    best = None
    for name, m in root.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS:
            if best is None or len(m) > len(best):
                best = m
    return list(best) if best is not None else []


class _Stop(Exception):
    """Raised by the start scorer's last needed block: the rest of its forward is not needed."""


class _Decision:
    __slots__ = ("weight", "refuse", "guard", "score", "seg", "scores")

    def __init__(self, weight=1.0, refuse=False, guard=None, score=None, seg=None, scores=None):
        self.weight, self.refuse, self.guard, self.score, self.seg = weight, refuse, guard, score, seg
        self.scores = scores  # the guard scores it was made from (re-judged at the first stream check)
        # weight: 1.0 keep, 0.0 remove, a float in between, or per response token (callable guard)

    @property
    def flagged(self):
        return self.guard is not None


class _Batch:
    """What the pre-hook learned of one training forward, for the hooks after it."""

    def __init__(self):
        self.rows = []       # (row, b, e, key): b last prompt token, e last response token
        self.pending = []    # indices into rows still to judge inside the forward
        self.decided = {}    # row -> _Decision applied to this forward
        self.labels = None   # the labels copy handed to the model, or None
        self.ids = None
        self.mask = None
        self.hidden = {}     # block index -> block output (direction guard)
        self.done = False
        self.ntok = 0


class Shaping:
    def __init__(self, policy, rt):
        cfg = dict(DEFAULTS)
        cfg.update(policy.get("shaping") or {})
        self.cfg, self.rt, self.policy = cfg, rt, policy
        self.guards = list(cfg["guards"])
        bad = [g for g in self.guards if g not in GUARDS]
        if bad or not self.guards:
            raise ValueError("shaping.guards must name some of %s" % ", ".join(GUARDS))
        self.action = cfg["action"]
        if self.action not in ("mask", "weight", "refuse", "subtract"):
            raise ValueError("shaping.action must be mask, weight, refuse or subtract")
        if cfg["scorer"] not in ("start", "forward"):
            raise ValueError("shaping.scorer must be start or forward")
        self.scorer = None      # the frozen copy of the model at the start (scorer "start")
        self._cap = {}
        self._stop_at = None
        self._gather = None         # (rows, positions) the scorer's head reads, during its forward
        self._head_gather = False
        if "callable" in self.guards and not cfg.get("callable"):
            raise ValueError("the 'callable' guard needs shaping.callable")
        if not cfg.get("probe"):
            raise ValueError("shaping needs 'probe' (harmful prompts with refusals)")
        self.harm_probe = probes.get(rt, cfg["probe"], policy)
        self.benign_probe = probes.get(rt, cfg["benign"], policy) if cfg.get("benign") else None
        if cfg.get("callable"):
            probes.check_callable(cfg["callable"])
        self.decisions = {}
        self.cal = {}
        self.layer = cfg.get("layer")
        self.direction = None
        self.refusal_ids = None
        self.refusals = []
        self.gsafe = None
        self.eps = None
        self.fn = None
        self.tok = None
        self.marker = None
        self.root = None
        self.failed = False
        self.busy = False
        self.batch = None
        self.handles = []
        self.block_handles = {}
        self._first_unseen = True  # the model's first forward, begun before the hooks existed
        self._orphan_hidden = {}   # block outputs of that forward
        self.refit = False      # the direction is fitted again on the stream at its first check
        self._sh = []           # (key, {block: hidden}) of the rows before the first check
        self._mid_offset = None  # median harmful probe score minus the refit's midpoint
        self.step = 0
        self.rotate = 0
        self.pending_sub = []   # (ids, mask, labels, batch tokens) of rows to subtract
        self.forwards = 0
        self.probe_harm = {}    # guard -> latest scores of the harmful probe rows
        self.stream = {}        # guard -> recent first-sighting scores of the training rows
        self.bound = {}         # guard -> the stream's bound on its threshold
        self.suspended = set()
        self.checked = False
        self._reset()
        self.totals = {"seen": 0, "flagged": 0, "rewritten": 0, "masked_tokens": 0}
        rt.on_model(self._on_model)
        rt.add_pre(self.pre_step, order=ORDER)
        rt.on_finish(self._finish)

    def _reset(self):
        self.counts = {"seen": 0, "new": 0, "flagged": 0, "rewritten": 0, "masked_tokens": 0}

    def _fail(self, msg):
        if not self.failed:
            self.failed = True
            self.rt.fail("shaping: " + msg)

    # -- binding and calibration --
    def _on_model(self, info):
        try:
            self._bind(info.root)
        except Exception as e:
            self._fail("cannot set up: %s: %s" % (type(e).__name__, e))

    def _bind(self, root):
        self._prepare(root)
        self._install(root)

    def _prepare(self, root):
        """Load what the guards need and calibrate them on the probes (no hook installed)."""
        self.root = root
        cfg = self.cfg
        if cfg.get("tokenizer") or cfg.get("response_marker") or "callable" in self.guards:
            path = cfg.get("tokenizer") or self.harm_probe.cfg.get("tokenizer")
            if not path:
                raise ValueError("'callable' and 'response_marker' need shaping.tokenizer")
            from transformers import AutoTokenizer
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            if cfg.get("response_marker"):
                self.marker = list(self.tok(cfg["response_marker"], add_special_tokens=False)["input_ids"])
                if not self.marker:
                    raise ValueError("shaping.response_marker encodes to no tokens")
        if cfg.get("callable"):
            self.fn = probes.load_callable(cfg["callable"])
        harm = self.harm_probe.examples()
        self.refusals = [[l for l in e.labels if l != -100] for e in harm]
        self.refusals = [r for r in self.refusals if r]
        self.refusal_ids = sorted({e.reference[0] for e in harm if e.reference})
        benign = self.benign_probe.examples() if self.benign_probe else []
        self._calibrate(root, harm, benign)
        # the held-out rows (odd-numbered) re-scored by the recalibration of in-forward guards
        rows = [(e.ids, e.labels) for e in harm] + [(e.ids, e.labels) for e in benign]
        self._recal_rows = ([r for i, r in enumerate(rows[:len(harm)]) if i % 2 == 1][:RECAL_ROWS],
                            [r for i, r in enumerate(rows[len(harm):]) if i % 2 == 1][:RECAL_ROWS])
        if self.cfg["scorer"] == "start" and any(g in self.guards for g in IN_FORWARD):
            self.scorer = self._make_scorer(root)

    @staticmethod
    def _make_scorer(root):
        """A frozen copy of the model as it is at the start of training (eval mode, no
        gradients, none of the hooks): the in-forward guards score every new row with it, so a
        row first seen at step 500 is judged by the same model as the probes were, not by one
        that 500 steps of the user's data (harmful rows among them) have moved. Costs a copy of
        the weights and, for the new rows only, a no-grad forward cut at the last block read
        (the whole forward when the refusal guard needs the logits)."""
        import copy
        m = copy.deepcopy(root)
        for mod in m.modules():
            for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                         "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                         "_backward_hooks", "_backward_pre_hooks"):
                d = getattr(mod, name, None)
                if d is not None:
                    d.clear()
        m.requires_grad_(False)
        m.eval()
        return m

    def _install(self, root):
        if "direction" in self.guards:
            # until the first stream check every candidate block is read (the refit chooses
            # among them); afterwards only the chosen one. With the start scorer the hooks are
            # on the frozen copy, else on the model itself.
            blocks = find_blocks(self.scorer if self.scorer is not None else root)
            cands = self._candidates(len(blocks)) if self.refit else [self.layer]
            for i in cands:
                if self.scorer is not None:
                    hook = (lambda m, a, o, i=i: self._cap_hook(i, o))
                else:
                    hook = (lambda m, a, o, i=i: self._block_hook(i, m, a, o))
                self.block_handles[i] = self.rt.register_hook("forward", blocks[i], hook)
        head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
        reg = self.rt.register_hook
        shead = None
        if self.scorer is not None and hasattr(self.scorer, "get_output_embeddings"):
            shead = self.scorer.get_output_embeddings()
        if isinstance(shead, torch.nn.Linear):
            self.handles.append(reg("forward_pre", shead, self._gather_hook))
            self._head_gather = True
        if head is not None:
            self.handles.append(reg("forward", head, self._head_hook))
        self.handles.append(reg("forward_pre", root, self._pre_hook, with_kwargs=True))
        self.handles.append(reg("forward", root, self._post_hook, with_kwargs=True))
        fields = {"what": "shaping calibration", "guards": self.guards, "action": self.action,
                  "scorer": "start" if self.scorer is not None else "forward",
                  "calibration": {g: {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else
                                          (None if isinstance(v, float) else v)) for k, v in c.items()}
                                  for g, c in self.cal.items()}}
        self.rt.audit("probe", fields)
        debug("shaping: calibrated %s" % fields["calibration"])

    def _calibrate(self, root, harm, benign):
        tpr, fpr = float(self.cfg["tpr"]), float(self.cfg["max_fpr"])
        dev = next(root.parameters()).device
        rows = [(e.ids, e.labels) for e in harm] + [(e.ids, e.labels) for e in benign]
        nh = len(harm)
        need_fwd = any(g in self.guards for g in IN_FORWARD)
        if need_fwd:
            blocks = find_blocks(root)
            if "direction" in self.guards and not blocks:
                raise ValueError("the 'direction' guard found no transformer blocks in %s" % type(root).__name__)
            hs, ref = self._probe_forward(root, blocks, rows, dev)
            if "refusal" in self.guards:
                self.cal["refusal"] = calibrate(ref[:nh], ref[nh:], tpr, fpr)
                self.probe_harm["refusal"] = ref[:nh]
            if "direction" in self.guards:
                self._fit_direction(hs, nh, len(blocks), tpr, fpr)
        if "gradient" in self.guards:
            self._fit_gradient(root, harm, benign, dev, tpr, fpr)
        if "callable" in self.guards:
            self.cal["callable"] = {"threshold": 0.5, "refuse_threshold": 0.5, "low": 0.0}

    def _probe_forward(self, root, blocks, rows, dev):
        """Per block, the hidden states at each row's last prompt token; and the refusal scores."""
        store = {}
        hooks = [self.rt.register_hook("forward", b, lambda m, a, o, i=i: store.__setitem__(i, _hidden(o).detach()))
                 for i, b in enumerate(blocks)]
        hs = [[] for _ in blocks]
        ref = []
        self.busy = True
        try:
            with probes.eval_mode(root), torch.no_grad():
                for s in range(0, len(rows), 16):
                    chunk = rows[s:s + 16]
                    ids, mask, labels = probes.pad_batch(chunk, 0, dev)
                    out = root(input_ids=ids, attention_mask=mask)
                    pos = torch.tensor([self._first_label(l) - 1 for _, l in chunk], device=dev)
                    ar = torch.arange(len(chunk), device=dev)
                    for i in range(len(blocks)):
                        hs[i].append(store[i][ar, pos].float())
                    ref += self._refusal_scores(_logits(out), ar, pos).tolist()
        finally:
            self.busy = False
            for h in hooks:
                h.remove()
        return [torch.cat(h) for h in hs], ref

    @staticmethod
    def _first_label(labels):
        return next((i for i, l in enumerate(labels) if l != -100), len(labels))

    def _refusal_scores(self, logits, rows, pos):
        lp = torch.log_softmax(logits[rows, pos].float(), -1)
        return torch.logsumexp(lp[:, self.refusal_ids], -1)

    def _fit_direction(self, hs, nh, nblocks, tpr, fpr):
        n = hs[0].shape[0]
        if nh < 2 or n - nh < 2:
            raise ValueError("the 'direction' guard needs at least 2 harmful and 2 benign probe rows")
        idx = torch.arange(n)
        is_h = idx < nh
        fit, held = idx % 2 == 0, idx % 2 == 1
        cands = self._candidates(nblocks)
        self._cal_hs, self._cal_nh, self.refit = hs, nh, True
        if self.layer is not None and not (0 <= self.layer < nblocks):
            raise ValueError("shaping.layer %d: the model has %d blocks" % (self.layer, nblocks))
        best = None
        for l in cands:
            h = hs[l]
            r = h[fit & is_h].mean(0) - h[fit & ~is_h].mean(0)
            r = r / r.norm().clamp_min(1e-12)
            s = h @ r
            pos, neg = s[held & is_h].tolist(), s[held & ~is_h].tolist()
            a = auroc(pos, neg)
            sd = math.sqrt((torch.tensor(pos).var().item() + torch.tensor(neg).var().item()) / 2 + 1e-12)
            gap = (sum(pos) / len(pos) - sum(neg) / len(neg)) / sd
            key = (a, gap)
            if best is None or key > best[0]:
                best = (key, l, r, pos, neg)
        (_, l, r, pos, neg) = best
        self.layer, self.direction = l, r
        self.probe_harm["direction"] = pos
        c = calibrate(pos, neg, tpr, fpr)
        c["layer"] = l
        self.cal["direction"] = c

    def _candidates(self, nblocks):
        """The blocks the direction may be read at: the policy's ``layer``, or the first 80%."""
        if self.cfg.get("layer") is not None:
            return [int(self.cfg["layer"])]
        return list(range(max(1, int(math.ceil(0.8 * nblocks)))))

    def _refit_direction(self, final=True):
        """The direction fitted again at the first stream check, on the training rows seen so far:
        Fisher's discriminant (fisher_direction) of the harmful probe prompts against the
        training rows and the benign probe prompts together (even-numbered rows of each), at the
        block whose direction ranks the held-out harmful probe rows above both the held-out
        training rows and the held-out benign probe rows best (the smaller of the two AUROCs;
        ties by the standardized gap to the training rows). The threshold is the lower of the
        TPR quantile of the held-out harmful rows and the midpoint of the two fitted class means,
        never under the benign bound (calibrate). Fitted at the first stream check (STREAM_MIN
        rows) and again, for the last time, on REFIT_ROWS rows.
        Why the training rows: the user's task need not look like the benign probe, and a
        direction fitted against the benign probe alone can measure the task's style instead of
        harm (demo world, full preset, seed 0: AUROC 0.29 on the training rows). Why the benign
        probe too, and the covariance: against the training rows alone a difference of means
        also measures "not the task", and the benign probe, requests in the harmful rows' own
        style, scores on the harmful side of it; whitening by the shrunk covariance removes
        the directions along which rows of one kind merely vary. Why the midpoint: with the
        quantile alone the guard flags about TPR of the harmful rows however well they separate.
        Measured on the demo world's harmful-mix training sets scored by the base model (seed
        1, 6 blocks, p = 0.1 / 0.2; seed 0, 8 blocks, p = 0.1): a difference of means against the
        training rows flagged 91% / 92% / 94% of the harmful rows at 1.7% / 1.2% / 7.8% of the
        task rows; this fit 97-100% at under 0.1%. The training rows hold the harmful minority
        too; it shrinks the difference of means, not its direction."""
        nh = self._cal_nh
        tpr, fpr = float(self.cfg["tpr"]), float(self.cfg["max_fpr"])
        best = None
        for l in sorted(self._sh[0][1]):
            st = torch.stack([h[l] for _, h in self._sh]).float()
            H, B = self._cal_hs[l][:nh].float(), self._cal_hs[l][nh:].float()
            neg = torch.cat([st[0::2], B[0::2]]) if B.shape[0] else st[0::2]
            r, shrink, mid = fisher_direction(H[0::2], neg)
            hh, ss, bb = (H[1::2] @ r).tolist(), (st[1::2] @ r).tolist(), (B[1::2] @ r).tolist()
            a = min(auroc(hh, ss), auroc(hh, bb) if bb else 1.0)
            sd = math.sqrt((torch.tensor(hh).var().item() + torch.tensor(ss).var().item()) / 2 + 1e-12)
            key = (a, (sum(hh) / len(hh) - sum(ss) / len(ss)) / sd)
            if best is None or key > best[0]:
                best = (key, l, r, hh, bb, st, mid, shrink)
        (key, l, r, hh, bb, st, mid, shrink) = best
        old = self.layer
        self.layer, self.direction = l, r
        c = calibrate(hh, bb, tpr, fpr, midpoint=mid)
        c.update(layer=l, fit="Fisher: harmful probe vs training rows and benign probe",
                 selection_auroc=key[0], shrinkage=shrink)
        self.cal["direction"] = c
        self._mid_offset = sorted(hh)[len(hh) // 2] - mid  # for the forward scorer's recalibration
        self.probe_harm["direction"] = hh
        new = (st @ r).tolist()
        self.stream["direction"] = new
        for (k, _), v in zip(self._sh, new):
            d = self.decisions.get(k)
            if d is not None and d.scores is not None and "direction" in d.scores:
                d.scores["direction"] = v
        if final:
            for i in list(self.block_handles):  # only the chosen block is read from now on
                if i != l:
                    self.block_handles.pop(i).remove()
            self._sh, self._cal_hs = [], None
        return {"layer": l, "previous_layer": old, "selection_auroc": _r(key[0]),
                "threshold": _r(c["threshold"]), "midpoint": _r(mid), "shrinkage": _r(shrink),
                "rows": len(new), "final": final}

    def _trainable(self, root):
        return [(n, p) for n, p in root.named_parameters() if p.requires_grad]

    def _fit_gradient(self, root, harm, benign, dev, tpr, fpr):
        named = self._trainable(root)
        _, grads = self.harm_probe.loss_and_grad(root, [p for _, p in named])
        g = {n: gr.detach() for (n, _), gr in zip(named, grads) if gr is not None}
        norm = math.sqrt(sum(float((x.float() ** 2).sum()) for x in g.values()))
        if norm == 0:
            raise ValueError("the 'gradient' guard: the probe's safety gradient is zero")
        self.gsafe = {n: x / norm for n, x in g.items()}
        wnorm = math.sqrt(sum(float((p.detach().float() ** 2).sum()) for _, p in named))
        self.eps = 1e-3 * max(wnorm, 1.0)
        pos_rows = [(e.harm_ids, e.harm_labels) for e in harm if e.harm_ids is not None]
        neg_rows = [(e.ids, e.labels) for e in benign]
        pos = self._gradient_scores(root, pos_rows, dev) if pos_rows else []
        neg = self._gradient_scores(root, neg_rows, dev) if neg_rows else []
        if not neg:
            raise ValueError("the 'gradient' guard needs shaping.benign (its threshold is set on benign rows)")
        self.cal["gradient"] = calibrate(pos, neg, tpr, fpr)
        self.probe_harm["gradient"] = pos

    def _gradient_scores(self, root, rows, dev):
        """-<g_row, g_s>/|g_s| by a central difference along the unit safety gradient."""
        from torch.func import functional_call
        out = []
        named = dict(root.named_parameters())
        self.busy = True
        try:
            with probes.eval_mode(root), torch.no_grad():
                for s in range(0, len(rows), 16):
                    ids, mask, labels = probes.pad_batch(rows[s:s + 16], 0, dev)
                    loss = []
                    for sign in (1.0, -1.0):
                        pert = {n: named[n] + (sign * self.eps) * g.to(named[n].dtype) for n, g in self.gsafe.items()}
                        o = functional_call(root, pert, args=(), kwargs={"input_ids": ids, "attention_mask": mask})
                        loss.append(self._row_ce(_logits(o), labels))
                    out += (-(loss[0] - loss[1]) / (2 * self.eps)).tolist()
        finally:
            self.busy = False
        return out

    @staticmethod
    def _row_ce(logits, labels):
        """Mean response cross-entropy of each row (float64 sums)."""
        lg = logits[:, :-1].float()
        lb = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1),
                                               ignore_index=-100, reduction="none").view(lb.shape)
        n = (lb != -100).sum(1).clamp_min(1)
        return ce.double().sum(1) / n

    # -- the training forward --
    def _spans(self, ids, labels, mask):
        """[(row, b, e)]: last prompt token and last response token of each row with a response."""
        out = []
        B, T = ids.shape
        if labels is not None:
            sc = (labels != -100)
            anyr = sc.any(1).tolist()
            first = sc.int().argmax(1).tolist()
            last = (T - 1 - sc.flip(1).int().argmax(1)).tolist()
            for i in range(B):
                if anyr[i] and first[i] >= 1:
                    out.append((i, first[i] - 1, last[i]))
            return out
        if self.marker is None:
            return out
        m = len(self.marker)
        rows = ids.tolist()
        lens = mask.sum(1).tolist() if mask is not None else [T] * B
        for i, r in enumerate(rows):
            end = T - 1
            if mask is not None:  # right or left padding: the last real token
                nz = [j for j, v in enumerate(mask[i].tolist()) if v]
                if not nz:
                    continue
                end = nz[-1]
            k = -1
            for j in range(end - m + 1, -1, -1):
                if r[j:j + m] == self.marker:
                    k = j + m - 1
                    break
            if k >= 0 and k < end and lens[i]:
                out.append((i, k, end))
        return out

    def _key(self, ids, mask, row, e):
        r = ids[row]
        if mask is not None:
            return fingerprint(r[mask[row].bool()].tolist())
        return fingerprint(r[:e + 1].tolist())

    def _pre_hook(self, module, args, kwargs):
        self.batch = None
        if not self._active(module):
            return None
        try:
            return self._pre(module, args, kwargs, apply=True)
        except Exception as e:
            self._fail("%s: %s (in the forward pre-hook)" % (type(e).__name__, e))
            return None

    def _active(self, module):
        return (not self.busy and not self.failed and self.root is not None and module.training
                and torch.is_grad_enabled())

    def _pre(self, module, args, kwargs, apply):
        """Find the rows, apply known decisions; APPLY: hand the model rewritten copies."""
        ids = kwargs.get("input_ids")
        pos_ids = ids is None and len(args) > 0
        if pos_ids:
            ids = args[0]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        labels = kwargs.get("labels")
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != ids.shape):
            labels = None
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
            mask = None
        bt = _Batch()
        bt.ids, bt.mask = ids, mask
        spans = self._spans(ids, labels, mask)
        for (row, b, e) in spans:
            bt.rows.append((row, b, e, self._key(ids, mask, row, e)))
        if not bt.rows:
            return None
        self.counts["seen"] += len(bt.rows)
        new = [k for k, (_, _, _, key) in enumerate(bt.rows) if key not in self.decisions]
        self.counts["new"] += len(new)
        if new and any(g in self.guards for g in ("gradient", "callable")):
            self._judge_before(bt, new, labels)
        if new and self.scorer is not None:
            self._judge_start(bt, [k for k in new if bt.rows[k][3] not in self.decisions])
        for k, (row, b, e, key) in enumerate(bt.rows):
            d = self.decisions.get(key)
            if d is not None:
                bt.decided[row] = d
            elif any(g in self.guards for g in IN_FORWARD):
                bt.pending.append(k)
            else:
                self.decisions[key] = bt.decided[row] = _Decision()
        lab_ref = labels if labels is not None else self._labels_from_spans(ids, bt.rows)
        bt.ntok = int((lab_ref[:, 1:] != -100).sum())
        self.batch = bt
        if labels is None or not apply:
            bt.labels_given = False
            bt.labels = lab_ref
            return None
        bt.labels_given = True
        new_ids, new_labels = self._apply_pre(bt, ids, labels)
        if bt.pending and new_labels is labels:
            # rows judged inside this forward are masked in the labels the model reads: a copy,
            # never the caller's own tensor
            new_labels = labels.clone()
        bt.labels = new_labels
        if new_ids is not ids or new_labels is not labels:
            kwargs = dict(kwargs)
            kwargs["labels"] = new_labels
            if new_ids is not ids:
                if pos_ids:
                    args = (new_ids,) + tuple(args[1:])
                else:
                    kwargs["input_ids"] = new_ids
                bt.ids = new_ids
            return args, kwargs
        return None

    @staticmethod
    def _labels_from_spans(ids, rows):
        lab = torch.full_like(ids, -100)
        for (row, b, e, _) in rows:
            lab[row, b + 1:e + 1] = ids[row, b + 1:e + 1]
        return lab

    def _judge_before(self, bt, new, labels):
        """The gradient and callable guards on the rows seen for the first time."""
        sub = [bt.rows[k] for k in new]
        scores = {}
        if "gradient" in self.guards:
            lab = labels if labels is not None else self._labels_from_spans(bt.ids, bt.rows)
            rows = []
            for (row, b, e, key) in sub:
                m = bt.mask[row].bool() if bt.mask is not None else None
                ids_r = bt.ids[row] if m is None else bt.ids[row][m]
                lab_r = lab[row] if m is None else lab[row][m]
                rows.append((ids_r.tolist(), lab_r.tolist()))
            dev = bt.ids.device
            scores["gradient"] = self._gradient_scores(self.root, rows, dev)
            self._observe([{"gradient": v} for v in scores["gradient"]])
        segs = {}
        if "callable" in self.guards:
            for j, (row, b, e, key) in enumerate(sub):
                segs[j] = self._callable_segments(bt.ids[row], b, e)
        for j, (row, b, e, key) in enumerate(sub):
            d = None
            if "gradient" in scores:
                d = self._decide({"gradient": scores["gradient"][j]})
            if j in segs and (d is None or not d.flagged):
                d2 = segs[j]
                if d2.flagged or d is None:
                    d = d2
            if d is not None and d.flagged:
                self._record_flag(key, d)
                self.decisions[key] = d
            elif not any(g in self.guards for g in IN_FORWARD):
                self.decisions[key] = d or _Decision()

    def _gather_hook(self, module, args):
        """On the scorer's output head: its input at the rows' last prompt tokens only (a
        large vocabulary makes the head the biggest matrix of a small model's forward)."""
        g = self._gather
        if g is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            return None
        ar, pos = g
        return (args[0][ar, pos].unsqueeze(1),) + tuple(args[1:])

    def _cap_hook(self, i, output):
        self._cap[i] = _hidden(output).detach()
        if self._stop_at is not None and i >= self._stop_at:
            raise _Stop()

    def _judge_start(self, bt, idx):
        """The in-forward guards on new rows, scored by the frozen start copy (scorer "start"):
        decided before the training forward, so a flagged row is masked or rewritten at once."""
        if not idx:
            return
        rows = [bt.rows[k] for k in idx]
        dev = bt.ids.device
        sub = torch.tensor([r[0] for r in rows], device=dev)
        # a causal model's outputs up to the last prompt token do not depend on what follows:
        # the scorer reads the prompts only, and its output head only there (_gather_hook)
        cut = max(r[1] for r in rows) + 1
        kw = {"input_ids": bt.ids.index_select(0, sub)[:, :cut]}
        if bt.mask is not None:
            kw["attention_mask"] = bt.mask.index_select(0, sub)[:, :cut]
        ar = torch.arange(len(rows), device=dev)
        pos = torch.tensor([r[1] for r in rows], device=dev)
        need_logits = "refusal" in self.guards
        self._cap = {}
        self._stop_at = None if need_logits or not self.block_handles else max(self.block_handles)
        self._gather = (ar, pos) if self._head_gather else None
        gathered = self._gather is not None
        out = None
        try:
            with torch.no_grad():
                out = self.scorer(**kw)
        except _Stop:
            pass
        finally:
            self._stop_at = self._gather = None
        scores = [dict() for _ in rows]
        if need_logits:
            lg = _logits(out)
            at = torch.zeros_like(pos) if gathered and lg.shape[1] == 1 else pos  # the head read the ends only
            for j, v in enumerate(self._refusal_scores(lg, ar, at).tolist()):
                scores[j]["refusal"] = v
        if "direction" in self.guards:
            h = self._cap[self.layer][ar, pos].float()
            for j, v in enumerate((h @ self.direction.to(h.device)).tolist()):
                scores[j]["direction"] = v
            if self.refit:  # kept for the refits (first stream check, REFIT_ROWS)
                hb = dict((i, x[ar, pos].float().cpu()) for i, x in self._cap.items())
                for j, (row, b, e, key) in enumerate(rows):
                    self._sh.append((key, dict((i, x[j]) for i, x in hb.items())))
        self._cap = {}
        for (row, b, e, key), sc in zip(rows, scores):
            d = self._decide(sc)
            self.decisions[key] = d
            if d.flagged:
                self._record_flag(key, d)
        self._observe(scores)

    def _callable_segments(self, ids_row, b, e):
        """The callable guard over the response of one row: a decision with per-token weights."""
        n = int(self.cfg["segment_tokens"])
        toks = ids_row.tolist()
        prompt = self.tok.decode(toks[:b + 1], skip_special_tokens=True)
        resp = toks[b + 1:e + 1]
        cuts = list(range(n, len(resp), n)) + [len(resp)]
        prefixes = [self.tok.decode(resp[:c], skip_special_tokens=True) for c in cuts]
        risks = [float(x) for x in self.fn(prompt, prefixes)]
        if len(risks) != len(prefixes):
            raise ValueError("shaping.callable returned %d risks for %d segments" % (len(risks), len(prefixes)))
        w = [1.0] * len(resp)
        flagged_at = None
        start = 0
        for c, r in zip(cuts, risks):
            r = min(max(r, 0.0), 1.0)
            if r >= 0.5 and flagged_at is None:
                flagged_at = start
            for t in range(start, c):
                w[t] = 1.0 - r if self.action == "weight" else (0.0 if flagged_at is not None else 1.0)
            start = c
        if flagged_at is None:
            return _Decision(weight=1.0 if self.action != "weight" else w)
        score = max(risks)
        refuse = self.action == "refuse"
        return _Decision(weight=w if self.action in ("mask", "weight") else 0.0, refuse=refuse,
                         guard="callable", score=score, seg=flagged_at)

    def _threshold(self, g):
        """Guard G's flag threshold: its calibrated one, raised to the stream's bound."""
        return max(self.cal[g]["threshold"], self.bound.get(g, -math.inf))

    def _decide(self, scores):
        """A decision from guard scores (each compared with its thresholds; suspended guards
        are not asked). ``refuse`` teaches a refusal, so it takes more than a flag: where two or
        more active guards score the row, every one of them must flag it; with one active guard,
        the row must score above every benign calibration row and at least the median harmful
        probe row (``_confident``). A flagged row that is not rewritten is masked."""
        active = dict((g, s) for g, s in scores.items() if g not in self.suspended)
        flag, top, hits = None, None, 0
        for g, s in active.items():
            t = self._threshold(g)
            if s >= t:
                hits += 1
                if flag is None or s - t > top:
                    flag, top = g, s - t
        if flag is None:
            if self.action == "weight":
                w = 1.0
                for g, s in active.items():
                    c = self.cal[g]
                    span = self._threshold(g) - c["low"]
                    if span > 0 and math.isfinite(span):
                        w = min(w, 1.0 - min(max((s - c["low"]) / span, 0.0), 1.0))
                return _Decision(weight=w, scores=scores)
            return _Decision(scores=scores)
        s = active[flag]
        refuse = False
        # before the first stream check the thresholds are the probes' alone: mask, never rewrite
        provisional = (not self.checked or self.refit) and any(g in STREAM_GUARDS for g in self.guards)
        if self.action == "refuse" and not provisional:
            if len(active) >= 2:
                refuse = hits == len(active)
            else:  # one guard: only a row as harmful-looking as a typical harmful probe row
                refuse = s >= max(self.cal[flag]["refuse_threshold"], self._threshold(flag), self._confident(flag))
        return _Decision(weight=0.0, refuse=refuse, guard=flag, score=s, scores=scores)

    def _confident(self, g):
        """The median score of the harmful probe's held-out rows: a row scoring at least this
        is as harmful-looking as a typical harmful request to the guard."""
        v = sorted(self.probe_harm.get(g) or [])
        return v[len(v) // 2] if v else math.inf

    def _observe(self, scores):
        """First-sighting scores of training rows, for the stream check."""
        for sc in scores:
            for g, v in sc.items():
                if g in STREAM_GUARDS:
                    w = self.stream.setdefault(g, [])
                    w.append(v)
                    if len(w) > STREAM_WINDOW:
                        del w[:len(w) - STREAM_WINDOW]
        if not self.checked and self.stream and min(len(v) for v in self.stream.values()) >= STREAM_MIN:
            self._stream_check(first=True)
        elif self.refit and len(self._sh) >= REFIT_ROWS:
            self._stream_check()

    def _stream_check(self, first=False):
        """Bound each guard's threshold by the training stream and suspend a guard that cannot
        tell the stream from the harmful probe (see stream_check). At the first check the rows
        judged so far are judged again (their later sightings get the new decision; a bound only
        raises thresholds, so a decision can only be withdrawn or a rewrite become a mask)."""
        refit = None
        if self.refit and "direction" in self.stream and len(self._sh) >= 4 and (first or len(self._sh) >= REFIT_ROWS):
            final = len(self._sh) >= REFIT_ROWS
            refit = self._refit_direction(final)
            self.refit = not final
        elif first:
            self.refit = False
        chk = stream_check(self.probe_harm, self.stream, float(self.cfg["max_flag_rate"]))
        self.bound = dict((g, c["bound"]) for g, c in chk.items())
        before = set(self.suspended)
        self.suspended = set(g for g, c in chk.items() if c["suspended"])
        self.checked = True
        revoked = 0
        if first or refit:
            for key, d in list(self.decisions.items()):
                if d.scores is None:
                    continue
                nd = self._decide(d.scores)
                if d.flagged and not nd.flagged:
                    revoked += 1
                    self.rt.audit("flag", {"fingerprint": key, "guard": d.guard, "action": "none",
                                           "revoked": "stream check"}, self.step + 1)
                elif nd.flagged and (not d.flagged or nd.refuse != d.refuse):
                    self._record_flag(key, nd)  # newly flagged, or its action changed
                self.decisions[key] = nd
        report = dict((g, {"auroc_vs_probe": _r(c["auroc"]), "bound": _r(c["bound"]),
                           "threshold": _r(self._threshold(g)) if g in self.cal else None,
                           "suspended": c["suspended"], "rows": c["rows"]}) for g, c in chk.items())
        if first or refit or self.suspended != before:
            fields = {"what": "shaping stream check", "max_flag_rate": float(self.cfg["max_flag_rate"]),
                      "guards": report, "revoked": revoked}
            if refit:
                fields["direction_refit"] = refit
            self.rt.audit("probe", fields, self.step + 1)
            if self.suspended - before:
                debug("shaping: guard(s) %s suspended by the stream check" % sorted(self.suspended - before))
        return report

    def _apply_pre(self, bt, ids, labels):
        """Copies of input_ids and labels with the known decisions applied (masks, refusals)."""
        new_ids, new_labels = ids, labels
        cap = int(math.floor(float(self.cfg["refuse_cap"]) * ids.shape[0]))
        rewrites = 0
        for (row, b, e, key) in bt.rows:
            d = bt.decided.get(row)
            if d is None or (not d.flagged and self.action != "weight"):
                continue
            if self.action == "subtract" and d.flagged:
                continue  # handled by _stash (its gradient is removed at the step)
            if d.refuse and rewrites < cap:
                ref = self._refusal_for(e - b)
                if ref is not None:
                    if new_ids is ids:
                        new_ids = ids.clone()
                    if new_labels is labels:
                        new_labels = labels.clone()
                    s = b + 1
                    t = torch.tensor(ref, dtype=ids.dtype, device=ids.device)
                    new_ids[row, s:s + len(ref)] = t
                    new_labels[row, s:s + len(ref)] = t.to(labels.dtype)
                    new_labels[row, s + len(ref):e + 1] = -100
                    rewrites += 1
                    self.counts["rewritten"] += 1
                    self.counts["masked_tokens"] += int((labels[row, s + len(ref):e + 1] != -100).sum())
                    bt.decided[row] = _Decision(weight=1.0, guard=d.guard)  # trained as the refusal
                    continue
            w = d.weight
            if isinstance(w, list):  # per-token weights of the callable guard: zeros are masked here
                zero = [b + 1 + t for t, x in enumerate(w) if x == 0.0]
                if zero:
                    if new_labels is labels:
                        new_labels = labels.clone()
                    idx = torch.tensor(zero, device=labels.device)
                    self.counts["masked_tokens"] += int((labels[row, idx] != -100).sum())
                    new_labels[row, idx] = -100
            elif w == 0.0:
                if new_labels is labels:
                    new_labels = labels.clone()
                self.counts["masked_tokens"] += int((labels[row, b + 1:e + 1] != -100).sum())
                new_labels[row, :] = -100
        return new_ids, new_labels

    def _refusal_for(self, span):
        fits = [r for r in self.refusals if len(r) <= span]
        if not fits:
            return None
        self.rotate += 1
        return fits[self.rotate % len(fits)]

    def _block_hook(self, i, module, args, output):
        if self.busy:
            return
        bt = self.batch
        if bt is not None:
            if bt.pending:
                bt.hidden[i] = _hidden(output)
        elif self._first_unseen and module.training and torch.is_grad_enabled():
            self._orphan_hidden[i] = _hidden(output)  # the first forward (see _post_hook)

    def _head_hook(self, module, args, output):
        bt = self.batch
        if bt is None or self.busy or bt.done:
            return None
        try:
            self._finalize(bt, output)
        except Exception as e:
            self._fail("%s: %s (in the output hook)" % (type(e).__name__, e))
        return None

    def _post_hook(self, module, args, kwargs, output):
        if self.busy or self.failed:
            return None
        bt = self.batch
        try:
            if bt is None and self._active(module) and self._first_unseen:
                # the model's first forward started before the hooks existed, so the pre-hook
                # did not see it: judge it now from what it was given; its loss is computed,
                # so decisions act through the logits' gradient only
                self._first_unseen = False
                self._pre(module, args, kwargs, apply=False)
                bt = self.batch
                if bt is not None:
                    bt.hidden = self._orphan_hidden
            self._orphan_hidden = {}
            if bt is not None and not bt.done:
                lg = _logits(output)
                if isinstance(lg, torch.Tensor):
                    self._finalize(bt, lg)
        except Exception as e:
            self._fail("%s: %s (in the forward hook)" % (type(e).__name__, e))
        finally:
            self.batch = None
        return None

    def _finalize(self, bt, logits):
        """Judge the pending rows from this forward, then install the weights on the logits."""
        bt.done = True
        self._first_unseen = False
        if bt.pending:
            rows = [bt.rows[k] for k in bt.pending]
            ar = torch.tensor([r[0] for r in rows], device=logits.device)
            pos = torch.tensor([r[1] for r in rows], device=logits.device)
            scores = [dict() for _ in rows]
            with torch.no_grad():
                if "refusal" in self.guards and logits.shape[1] == bt.ids.shape[1]:
                    for j, v in enumerate(self._refusal_scores(logits.detach(), ar, pos).tolist()):
                        scores[j]["refusal"] = v
                if "direction" in self.guards and self.layer in bt.hidden:
                    h = bt.hidden[self.layer].detach()[ar, pos].float()
                    for j, v in enumerate((h @ self.direction.to(h.device)).tolist()):
                        scores[j]["direction"] = v
                    if self.refit:  # kept for the refits (first stream check, REFIT_ROWS)
                        hb = dict((i, x.detach()[ar, pos].float().cpu()) for i, x in bt.hidden.items())
                        for j, (row, b, e, key) in enumerate(rows):
                            self._sh.append((key, dict((i, x[j]) for i, x in hb.items())))
            for j, (row, b, e, key) in enumerate(rows):
                if not scores[j]:
                    continue  # no score this time (e.g. logits cut short): judged at a later sighting
                d = self._decide(scores[j])
                self.decisions[key] = d
                if d.flagged:
                    self._record_flag(key, d, now="mask" if self.action == "refuse" else None)
                # first sighting: masked now (the input is already embedded), refused later
                now = _Decision(weight=d.weight, guard=d.guard, score=d.score)
                bt.decided[row] = now
                if d.flagged and self.action != "subtract" and bt.labels_given:
                    self.counts["masked_tokens"] += int((bt.labels[row, b + 1:e + 1] != -100).sum())
                    bt.labels[row, :] = -100  # the copy the model computes its loss from
            self._observe([sc for sc in scores if sc])
        self.counts["flagged"] += sum(1 for d in bt.decided.values() if d.flagged)
        if self.action == "subtract":
            self._stash(bt)
            return
        self._install_weights(bt, logits)

    def _install_weights(self, bt, logits):
        if not isinstance(logits, torch.Tensor) or not logits.requires_grad or logits.dim() != 3:
            return
        B, T = logits.shape[:2]
        W = None
        masked = 0
        for (row, b, e, key) in bt.rows:
            d = bt.decided.get(row)
            if d is None:
                continue
            w = d.weight
            if isinstance(w, list):
                if all(x == 1.0 for x in w):
                    continue
                if W is None:
                    W = torch.ones(B, T, dtype=logits.dtype, device=logits.device)
                for t, x in enumerate(w):  # the logits at b+t predict response token t
                    if b + t < T:
                        W[row, b + t] = x
                if not bt.labels_given:
                    masked += sum(1 for x in w if x == 0.0)
            elif w != 1.0:
                if W is None:
                    W = torch.ones(B, T, dtype=logits.dtype, device=logits.device)
                W[row, :] = w
                if w == 0.0 and not bt.labels_given:
                    masked += e - b
        if W is None:
            return
        counts = self.counts
        Wv = W[:, :, None]

        def hook(g, Wv=Wv, masked=masked):
            counts["masked_tokens"] += masked
            return g * Wv.to(g.dtype)
        self.rt.register_hook("tensor", logits, hook)

    def _stash(self, bt):
        rows = [r for r in bt.rows if bt.decided.get(r[0]) is not None and bt.decided[r[0]].flagged]
        if not rows:
            return
        idx = torch.tensor([r[0] for r in rows], device=bt.ids.device)
        lab = bt.labels if bt.labels is not None else self._labels_from_spans(bt.ids, bt.rows)
        mask = bt.mask[idx].detach().clone() if bt.mask is not None else None
        ntok = sum(int((lab[r[0], 1:] != -100).sum()) for r in rows)
        self.pending_sub.append((bt.ids[idx].detach().clone(), mask, lab[idx].detach().clone(), bt.ntok, ntok))

    # -- the step --
    def _recalibrate(self):
        """Re-score the held-out probe rows with the current weights (the direction itself is
        kept) and move the in-forward guards' thresholds with the model's drift."""
        root = self.root
        harm, ben = self._recal_rows
        blocks = find_blocks(root) if "direction" in self.guards else []
        dev = next(root.parameters()).device
        hs, ref = self._probe_forward(root, [blocks[self.layer]] if blocks else [], harm + ben, dev)
        tpr, fpr = float(self.cfg["tpr"]), float(self.cfg["max_fpr"])
        nh = len(harm)
        out = {}
        for g in IN_FORWARD:
            if g not in self.guards:
                continue
            v = (hs[0] @ self.direction.to(hs[0].device)).tolist() if g == "direction" else ref
            mid = None
            if g == "direction" and self._mid_offset is not None:  # the midpoint moves with the probe
                mid = sorted(v[:nh])[nh // 2] - self._mid_offset
            c = calibrate(v[:nh], v[nh:], tpr, fpr, midpoint=mid)
            self.probe_harm[g] = v[:nh]
            for k in ("threshold", "refuse_threshold", "low"):
                self.cal[g][k] = c[k]
            out[g] = round(c["threshold"], 6) if math.isfinite(c["threshold"]) else None
        return out

    def pre_step(self, opt, step, record):
        self.step = step
        every = int(self.cfg.get("recalibrate_every") or 0)
        if every and step % every == 0 and self.root is not None and not self.failed \
                and self.scorer is None and any(g in self.guards for g in IN_FORWARD):
            try:
                self.counts["recalibrated"] = self._recalibrate()
            except Exception as e:
                self._fail("step %d: cannot recalibrate: %s: %s" % (step, type(e).__name__, e))
        if every and step % every == 0 and self.checked and not self.failed:
            rep = self._stream_check()
            self.counts["stream"] = dict((g, "suspended" if c["suspended"] else c["threshold"]) for g, c in rep.items())
        if self.pending_sub and not self.failed:
            try:
                self._subtract(opt)
            except Exception as e:
                self._fail("step %d: cannot subtract flagged rows: %s: %s" % (step, type(e).__name__, e))
        for k in self.totals:
            self.totals[k] += self.counts[k]
        record["shaping"] = dict(self.counts)
        self._reset()

    def _subtract(self, opt):
        """Remove the stashed rows' share of the gradient: the forwards since the last step
        averaged (gradient accumulation), each forward's loss a mean over its batch's tokens."""
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        k = len(self.pending_sub)
        root = self.root
        self.busy = True
        try:
            with torch.enable_grad():
                for ids, mask, labels, ntok, nflag in self.pending_sub:
                    kw = {"input_ids": ids}
                    if mask is not None:
                        kw["attention_mask"] = mask
                    lg = _logits(root(**kw))[:, :-1].float()
                    lb = labels[:, 1:]
                    loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1),
                                                             ignore_index=-100, reduction="sum")
                    loss = loss / (max(ntok, 1) * k)
                    gs = torch.autograd.grad(loss, params, allow_unused=True)
                    with torch.no_grad():
                        for p, g in zip(params, gs):
                            if g is not None:
                                p.grad.sub_(g.to(p.grad.dtype))
                    self.counts["masked_tokens"] += nflag
        finally:
            self.busy = False
            self.pending_sub = []

    def _record_flag(self, key, d, now=None):
        """NOW: what this sighting gets when it differs from the decision (a row flagged inside
        the forward is masked now and rewritten into a refusal from its next sighting on)."""
        c = self.cal.get(d.guard, {})
        act = self.action
        if act == "refuse" and not d.refuse:
            act = "mask"
        fields = {"fingerprint": key, "guard": d.guard, "score": round(float(d.score), 6),
                  "threshold": round(float(c.get("threshold", float("nan"))), 6), "action": act}
        if now is not None and now != act:
            fields["this_sighting"] = now
        if d.seg is not None:
            fields["from_token"] = d.seg
        self.rt.audit("flag", fields, self.step + 1)

    def _finish(self, fields):
        for k in self.totals:
            self.totals[k] += self.counts[k]
        self._reset()
        t = dict(self.totals)
        t["examples_judged"] = len(self.decisions)
        t["examples_flagged"] = sum(1 for d in self.decisions.values() if d.flagged)
        if self.checked:
            t["suspended"] = sorted(self.suspended)
            t["bounds"] = dict((g, _r(b)) for g, b in self.bound.items())
        fields["shaping"] = t


class _Offline:
    """A stand-in for the runtime, to score data outside a training job: nothing published to
    the optimizer hooks, no records, a failure raises; hooks are attached to torch directly (the
    caller removes the Shaping's ``handles``), the probes are this object's."""
    on_error = "abort"

    def __init__(self, policy=None):
        self.policy = policy or {}

    def owned(self, key, factory):
        made = self.__dict__.setdefault("_owned", {})
        if key not in made:
            made[key] = factory(self)
        return made[key]

    def register_hook(self, kind, target, fn, **kw):
        return attach(kind, target, fn, **kw)

    def on_model(self, cb):
        pass

    def add_pre(self, fn, order=50):
        pass

    def add_post(self, fn, order=50):
        pass

    def on_finish(self, cb):
        pass

    def audit(self, event, fields=None, step=None):
        pass

    def fail(self, msg):
        raise RuntimeError(msg)


def score_rows(policy, model, rows):
    """Calibrate POLICY's shaping guards with MODEL (as at the start of a job) and score ROWS
    (pre-tokenized {"input_ids", "labels"} dicts) with each guard: ({guard: [score per row]},
    the Shaping object with its calibration). The direction is fitted again on the first
    first REFIT_ROWS rows as a job's last refit does (ROWS in training order). The callable
    guard is not scored here."""
    sh = Shaping(policy, _Offline(policy))
    sh._prepare(model)
    dev = next(model.parameters()).device
    pairs = [(r["input_ids"], r.get("labels", r["input_ids"])) for r in rows]
    out = {}
    fwd = [g for g in IN_FORWARD if g in sh.guards]
    if fwd:
        blocks = find_blocks(model)
        hs, ref = sh._probe_forward(model, blocks if "direction" in fwd else [], pairs, dev)
        if "direction" in fwd:
            if len(pairs) >= STREAM_MIN:
                cands = sh._candidates(len(blocks))
                n = min(REFIT_ROWS, len(pairs))
                sh._sh = [(None, dict((l, hs[l][i]) for l in cands)) for i in range(n)]
                sh._refit_direction()
            out["direction"] = (hs[sh.layer] @ sh.direction).tolist()
        if "refusal" in fwd:
            out["refusal"] = ref
    if "gradient" in sh.guards:
        out["gradient"] = sh._gradient_scores(model, pairs, dev)
    return out, sh


def detector_quality(policy, model, rows, truth, fpr=0.05):
    """Each guard's AUROC, TPR at FPR false positives, and TPR/FPR at its calibrated threshold,
    on ROWS with ground truth TRUTH (True = harmful); "any" is the union the feature applies."""
    scores, sh = score_rows(policy, model, rows)
    pos_i = [i for i, t in enumerate(truth) if t]
    neg_i = [i for i, t in enumerate(truth) if not t]
    # the stream check as a job would make it, with these rows as the training stream
    chk = stream_check(sh.probe_harm, dict((g, v) for g, v in scores.items() if g in STREAM_GUARDS),
                       float(sh.cfg["max_flag_rate"]))
    out = {}
    flagged = [False] * len(rows)
    flagged_s = [False] * len(rows)
    for g, v in scores.items():
        pos, neg = [v[i] for i in pos_i], [v[i] for i in neg_i]
        t = sh.cal[g]["threshold"]
        out[g] = {"auroc": auroc(pos, neg), "tpr_at_5fpr": tpr_at_fpr(pos, neg, fpr),
                  "tpr": sum(x >= t for x in pos) / max(len(pos), 1),
                  "fpr": sum(x >= t for x in neg) / max(len(neg), 1),
                  "threshold": t, "calibration": {k: x for k, x in sh.cal[g].items()
                                                  if not (isinstance(x, float) and not math.isfinite(x))}}
        flagged = [f or x >= t for f, x in zip(flagged, v)]
        if g in chk:
            c = chk[g]
            ts = max(t, c["bound"])
            out[g]["stream"] = {"auroc_vs_probe": c["auroc"], "suspended": c["suspended"], "threshold": ts,
                                "tpr": sum(x >= ts for x in pos) / max(len(pos), 1),
                                "fpr": sum(x >= ts for x in neg) / max(len(neg), 1)}
            if not c["suspended"]:
                flagged_s = [f or x >= ts for f, x in zip(flagged_s, v)]
    if scores:
        out["any"] = {"auroc": float("nan"), "tpr_at_5fpr": float("nan"),
                      "tpr": sum(flagged[i] for i in pos_i) / max(len(pos_i), 1),
                      "fpr": sum(flagged[i] for i in neg_i) / max(len(neg_i), 1)}
        if chk:
            out["any"]["stream"] = {"tpr": sum(flagged_s[i] for i in pos_i) / max(len(pos_i), 1),
                                    "fpr": sum(flagged_s[i] for i in neg_i) / max(len(neg_i), 1)}
    return out


def setup(policy, rt):
    Shaping(policy, rt)
