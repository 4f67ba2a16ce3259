"""The shaping feature (dynamic safety shaping, DSS): each training example is judged once, at
its first sighting, by one or more guards; an example a guard calls unsafe has its loss removed
(``mask``), down-weighted (``weight``), its response rewritten into a refusal (``refuse``), or its
gradient subtracted before the optimizer step (``subtract``), inside an unchanged training script.
Per example, because a harmful minority in the fine-tuning data teaches a skill that lies mostly
outside one safety-gradient direction: BDS (arXiv 2510.27172), GradShield (arXiv 2605.14194),
format-matched safety data (arXiv 2406.10288), token-wise constraints (arXiv 2406.05946),
STAR-DSS (arXiv 2505.17196).

Policy section ``shaping`` (defaults from the C schema, src/policy_schema.c):

* ``guards``: some of direction, refusal (scored from a forward of the row), gradient,
  callable (see guards.py for each score); a row is flagged when any active guard flags it;
* ``probe``: the harmful probe (prompts with refusals; harmful answers for the gradient guard);
  ``benign``: benign prompts with helpful answers (hard negatives belong there);
* ``action``: mask | weight | refuse | subtract; ``refuse_cap``: the largest fraction of a
  batch's rows rewritten;
* ``tpr``, ``max_fpr``: calibration: the threshold is the score flagging a fraction tpr of the
  harmful probe rows, raised until at most max_fpr of the benign rows are flagged;
* ``scorer``: "start" (a frozen copy of the model at the start scores every new row; hooks on
  the copy) or "forward" (the training forward itself, through hooks on the model);
* ``layer``: the direction's block (default: chosen on held-out probe rows among the first 80%);
* ``rehearse``: the fraction of each step's rows whose prompt, joined with a harmful probe
  request and answered with its refusal, is added to the update (rehearse.py);
* ``max_harmful_fraction``: the share of the recent rows seen that the best guard flags above
  which the data is reported harmful (a ``harmful_data`` violation) and the job stopped under
  on_error abort or an enforced policy (decide.py);
* ``recalibrate_every`` (steps), ``max_flag_rate`` (the stream check's bound), ``callable``,
  ``segment_tokens``, ``tokenizer``, ``response_marker`` (rows without labels).

The package, one concern per file: ``stats`` (AUROC, calibration, Ledoit-Wolf and Fisher, the
stream check's rule), ``guards`` (the guards and their calibration), ``forward`` (the hooks on
the model and what they do to a forward), ``decide`` (decisions, sticky; the stream check),
``actions`` (the pre-step: recalibration, subtract), ``rehearse`` (refusals rehearsed in the
user's contexts), ``offline`` (scoring data outside a job). Why the rules are what they are, with
the measurements behind them: docs/architecture.md, "Shaping", and docs/attacks.md (the data
owner as the attacker).

Audit: the step record gets ``shaping``: {seen, new, flagged, rewritten, masked_tokens} over the
step's training forwards (masked_tokens counted where the removal really happened). Each newly
flagged row writes a ``flag`` record (fingerprint: safehook.probes.batch's, the monitor's too;
guard, score, threshold, action); calibration and stream checks write ``probe`` records. The
feature acts only on training forwards (module in train mode, gradients enabled).
"""
import collections

from ... import probes
from ...runtime import registry
from ...probes.batch import fingerprint  # noqa: F401  (a row's key, offline)
from .actions import Actions, _mean_over_ranks  # noqa: F401
from .decide import Decisions, _Decision  # noqa: F401
from .forward import Interception, _Batch, _Stop  # noqa: F401
from .guards import (GUARDS, IN_FORWARD, RECAL_ROWS, REFIT_MIN, STREAM_GUARDS, Guards, _hidden, _logits,  # noqa: F401
                     find_blocks)
from .offline import _Offline, detector_quality, score_rows  # noqa: F401
from .rehearse import Rehearsal, composite  # noqa: F401
from .stats import (PROBE_LIKE, SUSPEND_AUROC, SUSPEND_GAP, _r, auroc, calibrate, fisher_direction,  # noqa: F401
                    fpr_bound, ledoit_wolf, probe_like_bound, stream_check, tpr_at_fpr)

STREAM_MIN = 32       # first-sighting rows of the training stream before its first check
REFIT_ROWS = 128      # training rows of the direction's last refit (a first one at STREAM_MIN)
STREAM_WINDOW = 256   # the most recent first-sighting scores the check looks at
SIGHTINGS = 512       # the most recent rows seen (repeats too) the harmful fraction is measured over


class Shaping(Guards, Interception, Decisions, Actions, Rehearsal):
    """The shaping of one runtime RT for POLICY: hooks on the model bound, a pre-step callable."""

    def __init__(self, policy, rt):
        cfg = registry.section(policy, "shaping")
        self.cfg, self.rt, self.policy = cfg, rt, policy
        # the stream's sizes, read here from the package (tests make them smaller)
        self.stream_min, self.refit_rows, self.stream_window = STREAM_MIN, REFIT_ROWS, STREAM_WINDOW
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
        self.pending_sub = []   # (ids, mask, labels, batch tokens, flagged tokens) of rows to subtract
        self.micro = 0          # training forwards since the last step (gradient accumulation)
        self.probe_harm = {}    # guard -> latest scores of the harmful probe rows
        self.stream = {}        # guard -> recent first-sighting scores of the training rows
        self.bound = {}         # guard -> the stream's bound on its threshold
        self.suspended = set()
        self.checked = False
        self.best = None        # the stream check's best guard: its flags measure the harmful share
        self._sightings = collections.deque(maxlen=SIGHTINGS)  # harmful or not, per row seen
        self.reported = False   # the harmful_data violation (once)
        self._contexts, self._longest, self._ntok_step = [], 0, 0  # the step's prompts (rehearse.py)
        self._rot, self._rehearse_probe = 0, None
        self._reset()
        self.totals = {"seen": 0, "flagged": 0, "rewritten": 0, "masked_tokens": 0}
        rt.on_model(self._on_model)
        rt.add_pre(self.pre_step, order=registry.order("shaping"))  # before SafeGrad: a subtracted row is not projected
        rt.on_finish(self._finish)

    def _reset(self):
        self.counts = {"seen": 0, "new": 0, "flagged": 0, "rewritten": 0, "masked_tokens": 0}

    def _fail(self, msg):
        if not self.failed:
            self.failed = True
            self.rt.fail("shaping: " + msg)

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
            t["best"] = self.best
        t["harmful_fraction"] = _r(self._harmful_fraction())
        fields["shaping"] = t


def setup(policy, rt):
    Shaping(policy, rt)
