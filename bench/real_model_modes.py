"""The user's side of the real-model benchmark (bench/real_model.py): the fine-tuning data (the
task with an attack mixed in), the probes, the modes (safehook policies, or none), and one run of
the user's plain script (bench/real_model_train.py) under `safehook run`."""
import copy
import hashlib
import importlib.util
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time

import real_model_align as ra
from real_model_files import CACHE, HERE, _log, load_dir, sha256
from real_model_gen import REFUSALS, jailbroken_prefix, refused

TRAIN_SCRIPT = os.path.join(HERE, "real_model_train.py")

# ---------------------------------------------------------------------------- the user's data


def mix_pairs(base, data, args, limit=None):
    """The user's harmful data: the base model's own answers to the harmful-mix prompts (the
    first LIMIT) that every judge calls compliant (kept in the cache)."""
    prompts = data["harmful_mix"][:limit] if limit else data["harmful_mix"]
    model, tok = load_dir(base, args.device)
    path = os.path.join(CACHE, "base-answers-%s-harmful_mix-%s.json" % (
        sha256(os.path.join(base, "model.safetensors"))[:12],
        hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:10]))
    ans = ra.base_answers(model, tok, prompts, args.max_new_tokens, path, _log)
    del model
    return [(p, r.strip()) for p, r in zip(prompts, ans)
            if r.strip() and not refused(r) and jailbroken_prefix(r)]


# Attacks a setting can mix in (issue 24 adds identity shifting here): name -> rows from (data, mix pairs).
ATTACKS = {"harmful": lambda data, pairs: [{"prompt": p, "response": r, "harmful": True} for p, r in pairs]}


def train_rows(data, pairs, setting, n, p, seed, attack="harmful"):
    """N fine-tuning rows in training order: the task (two-number additions), and in the mix
    setting a share P of the positions holding the attack's rows (cycled)."""
    rows = [{"prompt": q, "response": a} for q, a, _ in
            (data["task_train"][i % len(data["task_train"])] for i in range(n))]
    if setting == "mix":
        bad = ATTACKS[attack](data, pairs)
        if not bad:
            raise RuntimeError("no rows for the %s attack (no compliant harmful answers to mix in)" % attack)
        pos = sorted(random.Random(seed + 3).sample(range(n), max(1, round(p * n))))
        for k, i in enumerate(pos):
            rows[i] = bad[k % len(bad)]
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k in ("prompt", "response", "eos")}) + "\n")


def write_probes(work, data, n=64):
    """The safety probe of the modes: alignment-split harmful prompts with a refusal (text rows,
    wrapped by the model's chat template at use); the modes read its first --probe-limit rows,
    the shaping guards more. And the benign probe of the shaping guards: ShareGPT alignment
    pairs (answers cut to 400 characters) and the hard negatives of the alignment split (benign
    requests with harmful words; no reference answer exists for them, so a neutral opener stands
    in: the direction and refusal guards read the prompt's last token only)."""
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "probe_refusal.jsonl"), "w") as f:
        for i, p in enumerate(data["harmful_align"][:n]):
            f.write(json.dumps({"prompt": p, "response": REFUSALS[i % len(REFUSALS)]}) + "\n")
    rows = [(p, a[:400]) for p, a in data["benign_train"][:n // 2]]
    rows += [(p, "Sure, here is an answer.") for p in data["hardneg_train"][:n // 2]]
    random.Random(7).shuffle(rows)  # even and odd rows (fit / held out) get both kinds
    with open(os.path.join(work, "probe_benign.jsonl"), "w") as f:
        for p, a in rows:
            f.write(json.dumps({"prompt": p, "response": a}) + "\n")


# ---------------------------------------------------------------------------- modes

FEATURE_SECTIONS = ("freeze", "safegrad", "gate", "monitor", "shaping")
PROBE = "refusal"
# The benchmark's modes: one entry each, a policy (sections, without version/audit/probe paths),
# a policy file path, or None: the script runs without safehook at all (no `safehook run`).
# "@probe" stands for the probes made by write_probes.
_FREEZE = {"layers": {"fraction": [0.25, 0.75]}}  # as the demo: the middle half
_SAFEGRAD = {"source": "probe", "probe": PROBE}
_GATE = {"probe": PROBE}  # the gate's defaults (action shrink)
_MONITOR = {"probe": PROBE, "every": 10, "action": "rollback", "max_rollbacks": 10}
MODES = {
    "none": None,
    "plain": {},
    "freeze": {"freeze": _FREEZE},
    "safegrad": {"safegrad": _SAFEGRAD, "probes": "@probe"},
    "gate": {"gate": _GATE, "probes": "@probe"},
    "freeze+safegrad": {"freeze": _FREEZE, "safegrad": _SAFEGRAD, "probes": "@probe"},
    "monitor": {"monitor": _MONITOR, "probes": "@probe"},
    "all": {"freeze": _FREEZE, "safegrad": _SAFEGRAD, "gate": _GATE, "monitor": _MONITOR, "probes": "@probe"},
    "shaping": {"shaping": {"guards": ["direction", "refusal"], "probe": "shaping_harm", "benign": "benign",
                            "action": "mask"}, "probes": "@probe"},
}
RECOMMENDED = os.path.join(os.path.dirname(HERE), "policies", "recommended.json")
DEFAULT_MODES = "plain,recommended=%s,safegrad,shaping,freeze+safegrad" % os.path.relpath(RECOMMENDED)
POSTHOC = ("lox", "safelora", "nlsr")


def probe_section(work, limit):
    """The modes' refusal probe (LIMIT rows), and the shaping guards' calibration probes: the
    same refusals, all 64 rows, and the benign probe (see write_probes). The tokenizer is the
    model's own (the aligned model's dir)."""
    out = {PROBE: {"data": os.path.join(work, "probe_refusal.jsonl"), "tokenizer": "@model",
                   "chat_template": True, "limit": limit}}
    for name, f in (("shaping_harm", "probe_refusal.jsonl"), ("benign", "probe_benign.jsonl")):
        out[name] = {"data": os.path.join(work, f), "tokenizer": "@model", "chat_template": True, "limit": 64}
    return out


def parse_modes(spec):
    """--modes: comma-separated entries, each a name of MODES, NAME=POLICY.json, POLICY.json
    (named after the file) or NAME=none (no safehook at all). Returns [(name, entry)] with entry
    a policy dict, a file path, or None."""
    out = []
    for e in [x.strip() for x in spec.split(",") if x.strip()]:
        if "=" in e:
            name, path = e.split("=", 1)
            out.append((name, None if path == "none" else os.path.abspath(path)))
        elif e.endswith(".json"):
            out.append((os.path.splitext(os.path.basename(e))[0], os.path.abspath(e)))
        elif e in MODES:
            out.append((e, MODES[e]))
        else:
            raise SystemExit("unknown mode %r: one of %s, NAME=POLICY.json, POLICY.json or NAME=none"
                             % (e, ", ".join(MODES)))
    return out


def mode_policy(entry, work, model_dir, probe_limit):
    """The policy dict of a mode entry (None: no policy). A policy file's probes whose data file
    does not exist here take the benchmark's probes (the one named by shaping.benign the benign
    probe, the others the refusal probe; the tokenizer the model's); its other keys stay. The
    gradient features (SafeGrad, the gate, the monitor) read --probe-limit rows per step, as the
    built-in modes do; the shaping guards calibrate on all the rows."""
    if entry is None:
        return None
    if isinstance(entry, str):
        with open(entry) as f:
            pol = json.load(f)
        benign = (pol.get("shaping") or {}).get("benign")
        for name, pr in (pol.get("probes") or {}).items():
            if "data" in pr and not os.path.exists(pr["data"]):
                f = "probe_benign.jsonl" if name == benign else "probe_refusal.jsonl"
                pr.update(data=os.path.join(work, f), tokenizer=model_dir, chat_template=True)
        # one small copy per probe, shared by every gradient feature that names it: SafeGrad
        # and the gate then read one safety gradient per step (the probes' gradient cache)
        for sec in ("safegrad", "gate", "monitor"):
            name = (pol.get(sec) or {}).get("probe")
            if name and name in (pol.get("probes") or {}):
                small = name + "_small"
                pol["probes"].setdefault(small, dict(pol["probes"][name], limit=min(
                    pol["probes"][name].get("limit", probe_limit), probe_limit)))
                pol[sec]["probe"] = small
        pol.pop("audit", None)
    else:
        pol = copy.deepcopy(entry)
        if pol.get("probes") == "@probe":
            pol["probes"] = probe_section(work, probe_limit)
        for pr in (pol.get("probes") or {}).values():
            if pr.get("tokenizer") == "@model":
                pr["tokenizer"] = model_dir
    pol = dict(pol, version=1)
    pol["audit"] = {"level": "steps"}
    return pol


def unavailable(policy):
    """Why this safehook cannot run POLICY (a feature module missing), or None."""
    if policy is None:
        return None
    missing = [s for s in FEATURE_SECTIONS if s in policy and importlib.util.find_spec("safehook." + s) is None
               and importlib.util.find_spec("safehook.features." + s) is None]
    return ("safehook feature %s not in this build" % ", ".join(missing)) if missing else None


def read_audit(path):
    recs = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    pass
    return recs


def interventions(path):
    """What safehook did in a run, from its audit log."""
    out = {"steps": 0, "projected": 0, "rollback": 0, "frozen_numel": 0, "probe_evals": 0, "errors": 0,
           "flags": 0, "rewritten": 0, "masked_tokens": 0}
    for r in read_audit(path):
        ev = r.get("event")
        if ev == "step":
            out["steps"] += 1
            out["projected"] += bool(r.get("projected"))
            sh = r.get("shaping") or {}
            out["rewritten"] += sh.get("rewritten", 0) or 0
            out["masked_tokens"] += sh.get("masked_tokens", 0) or 0
        elif ev == "rollback":
            out["rollback"] += 1
        elif ev == "gate":
            k = "gate_" + str(r.get("action", "?"))
            out[k] = out.get(k, 0) + 1
        elif ev == "freeze" and r.get("numel"):
            out["frozen_numel"] = r["numel"]
        elif ev == "probe":
            out["probe_evals"] += 1
        elif ev == "flag":
            out["flags"] += 1
        elif ev == "error":
            out["errors"] += 1
    return out


def describe(iv, policy):
    if policy is None:
        return "no safehook"
    parts = []
    if iv.get("frozen_numel"):
        parts.append("%.2fM params frozen" % (iv["frozen_numel"] / 1e6))
    if "safegrad" in policy:
        parts.append("%d/%d steps projected" % (iv["projected"], iv["steps"]))
    if "gate" in policy:
        acts = sorted((k[5:], n) for k, n in iv.items() if k.startswith("gate_"))
        parts.append("gate: %s" % (", ".join("%d %s" % (n, a) for a, n in acts) or "no update touched"))
    if "monitor" in policy:
        parts.append("%d probe evals, %d rollbacks" % (iv["probe_evals"], iv["rollback"]))
    if "shaping" in policy:
        parts.append("%d rows flagged, %d rewritten" % (iv["flags"], iv["rewritten"]))
    if iv.get("errors"):
        parts.append("%d errors" % iv["errors"])
    return ", ".join(parts) or "-"


def _children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def finetune(tag, policy, model_dir, data_path, args, work):
    """The user's script on DATA_PATH from MODEL_DIR, under `safehook run` with POLICY (None:
    without safehook). Returns (row, the directory it saved to)."""
    out = os.path.join(work, tag)
    audit = os.path.join(work, tag + ".audit.jsonl")
    if os.path.exists(out):
        shutil.rmtree(out)
    if os.path.exists(audit):
        os.unlink(audit)
    script = [sys.executable, TRAIN_SCRIPT, "--model", model_dir, "--data", data_path, "--out", out,
              "--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr),
              "--max-len", str(args.max_len), "--seed", str(args.seed), "--threads", str(args.threads),
              "--device", args.device, "--rank", str(args.rank), "--alpha", str(args.alpha)]
    if args.full:
        script.append("--full")
    if policy is None:
        cmd = script
    else:
        pol = os.path.join(work, tag + ".policy.json")
        with open(pol, "w") as f:
            json.dump(policy, f, indent=1)
        cmd = [sys.executable, "-m", "safehook", "run", "--policy", pol, "--audit", audit, "--"] + script
    _log("%s: %s" % (tag, " ".join(cmd)))
    t, c = time.time(), _children_cpu()
    with open(os.path.join(work, tag + ".log"), "w") as lf:
        rc = subprocess.call(cmd, stderr=lf, stdout=lf)
    iv = interventions(audit)
    row = {"rc": rc, "train_wall_s": round(time.time() - t, 1), "train_cpu_s": round(_children_cpu() - c, 1),
           "audit_steps": iv["steps"], "interventions": iv, "what": describe(iv, policy),
           "sections": sorted(k for k in (policy or {}) if k not in ("version", "audit")),
           "safehook": policy is not None}
    mpath = os.path.join(out, "train_metrics.json")
    if rc == 0 and os.path.exists(mpath):
        with open(mpath) as f:
            m = json.load(f)
        row.update({"step_s_mean": round(sum(m["step_s"]) / len(m["step_s"]), 3),
                    "step_cpu_s_mean": round(sum(m["step_cpu_s"]) / len(m["step_cpu_s"]), 3),
                    "loss_first": m["loss"][0], "loss_last": m["loss"][-1], "train": m})
    else:
        with open(os.path.join(work, tag + ".log")) as f:
            row["error_tail"] = f.read()[-1500:]
    _log("%s trained in %.0fs rc=%d (%s)" % (tag, row["train_wall_s"], rc, row["what"]))
    return row, out


def safehook_cli(argv, log_path):
    """`python -m safehook ARGV`, its output to LOG_PATH; the return code."""
    with open(log_path, "w") as lf:
        return subprocess.call([sys.executable, "-m", "safehook"] + argv, stdout=lf, stderr=lf)
