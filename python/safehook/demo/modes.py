"""The protection modes of the demo and their policies (policies/SCHEMA.md, version 1).

A mode is a set of safehook features plus the policy that asks for them; "plain" is the
unprotected baseline (no preload at all). Policies are written per run, because the probe's
data path is a file of that run."""
import importlib.util
import json
import os

# name, label, features it needs
MODES = [
    ("plain", "plain SFT", ()),
    ("freeze", "freeze (middle layers)", ("freeze",)),
    ("safegrad", "SafeGrad (probe)", ("safegrad", "probes")),
    ("gate", "gate", ("gate", "probes")),
    ("monitor", "monitor+rollback", ("monitor", "probes")),
    ("freeze_safegrad", "freeze+SafeGrad", ("freeze", "safegrad", "probes")),
    ("all", "all together", ("freeze", "safegrad", "gate", "monitor", "probes")),
    # Post-hoc rows (demo/posthoc.py): no preload; LoX hardens the base before plain SFT, the
    # restore rows edit plain SFT's model afterwards.
    ("lox_plain", "LoX + plain SFT", ()),
    ("plain_safelora", "plain SFT + Safe LoRA", ()),
    ("plain_nlsr", "plain SFT + NLSR", ()),
    ("shaping", "shaping (DSS)", ("shaping", "probes")),
    ("recommended", "recommended", ("shaping", "safegrad", "gate", "probes")),
]
LABELS = {name: label for name, label, _ in MODES}
PROBE = "refusals"
PROBE_RATE = "refusal_rate"


# The shaping guards' calibration sets, written by bench.write_shaping_probes next to the probe.
SHAPING_FILES = {"harmful": "probe-shaping.jsonl", "benign": "probe-benign.jsonl"}
# The guards that work on the demo world (bench.detector_quality measures all three; the
# gradient guard reaches AUROC 0.90 on the training rows but misses at its calibrated threshold).
SHAPING_GUARDS = ["direction", "refusal"]


def recommended_policy():
    """policies/recommended.json as shipped (installed into the package; else the source tree's)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in (os.path.join(here, "policies", "recommended.json"),
                 os.path.join(os.path.dirname(os.path.dirname(here)), "policies", "recommended.json")):
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    raise FileNotFoundError("policies/recommended.json is not installed with this safehook")


def _module(feature):
    """The module of FEATURE: safehook.probes, or safehook.features.<name>."""
    return "safehook.probes" if feature == "probes" else "safehook.features." + feature


def available(features):
    """(True, None) when this safehook has every feature module, else (False, reason)."""
    missing = [_module(f) for f in features if importlib.util.find_spec(_module(f)) is None]
    if missing:
        return False, "feature not in this safehook build: %s" % ", ".join(missing)
    return True, None


def policy(mode, probe_data, cfg, tokenizer_dir=None):
    """The policy dict of MODE (None for plain). PROBE_DATA: JSONL of pre-tokenized harmful
    prompts with refusals, disjoint from the evaluation prompts; TOKENIZER_DIR lets the
    monitor's probe read its greedy answers."""
    features = dict((n, f) for n, _, f in MODES)[mode]
    if not features:
        return None
    work = os.path.dirname(os.path.abspath(probe_data))
    if mode == "recommended":
        # the shipped file, with this run's data: its probes point at the demo's probe files
        p = recommended_policy()
        for name, pr in p.get("probes", {}).items():
            pr.pop("tokenizer", None)  # the demo's probe rows are pre-tokenized
            pr["data"] = os.path.join(work, SHAPING_FILES["benign"]) if name == "benign" else \
                os.path.join(work, SHAPING_FILES["harmful"])
            pr["limit"] = 4 * cfg["probe_rows"]
        return p
    p = {"version": 1, "on_error": "abort", "audit": {"level": "steps"}}
    if "probes" in features:
        p["probes"] = {PROBE: {"data": os.path.abspath(probe_data), "limit": cfg["probe_rows"]}}
    if "shaping" in features:
        p["probes"]["shaping_harm"] = {"data": os.path.join(work, SHAPING_FILES["harmful"]),
                                       "limit": 4 * cfg["probe_rows"]}
        p["probes"]["shaping_benign"] = {"data": os.path.join(work, SHAPING_FILES["benign"]),
                                         "limit": 4 * cfg["probe_rows"]}
        p["shaping"] = {"guards": list(SHAPING_GUARDS), "probe": "shaping_harm",
                        "benign": "shaping_benign", "action": "mask"}
    if "freeze" in features:
        # The middle half of the blocks, where safety behaviour is reported to concentrate.
        p["freeze"] = {"layers": {"fraction": [0.25, 0.75]}}
    if "safegrad" in features:
        p["safegrad"] = {"source": "probe", "probe": PROBE}
    if "gate" in features:
        p["gate"] = {"probe": PROBE}
    if "monitor" in features:
        # The monitor watches behaviour: the refusal rate of greedy answers to the probe prompts.
        p["probes"][PROBE_RATE] = {"data": os.path.abspath(probe_data), "limit": cfg["probe_rows"],
                                   "score": "refusal_rate", "judge": "keyword",
                                   "max_new_tokens": 12}
        if tokenizer_dir:
            p["probes"][PROBE_RATE]["tokenizer"] = os.path.abspath(tokenizer_dir)
        # Roll back and halve the LR on a drop, so that the job ends (a plain "rollback" aborts
        # training after max_rollbacks drops, which is right for a real job but ends the demo).
        p["monitor"] = {"probe": PROBE_RATE, "every": cfg["monitor_every"], "action": "both",
                        "max_rollbacks": 10, "progress": False}
    return p


def write_policy(path, pol):
    with open(path, "w") as f:
        json.dump(pol, f, indent=2)
        f.write("\n")
    return path
