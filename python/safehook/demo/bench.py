"""The alignment-tax benchmark: an aligned base model is fine-tuned on a benign task (the clean
reference: no harmful data), and on the task mixed with a fraction p of harmful requests
answered compliantly (one setting "harmful_mix@p" per ratio of ``--ratios``), once per
protection mode. Each fine-tuning is a subprocess running scripts/finetune.py (no safehook
import) under LD_PRELOAD=$(safehook lib) with the mode's policy and an audit log, the path users
take. The fine-tuned models are evaluated side by side with the same prompts and judges.

Results JSON (schema ``safehook.alignment_tax/2``): ``settings`` maps each setting to
``{"data", "harmful_ratio", "clean", "modes": {mode: result}}``; ``ratios`` lists the harmful
ratios run; ``chart`` is the PNG's path, or null with ``chart_error`` when it could not be drawn
(matplotlib missing: ``pip install 'safehook[demo]'``)."""
import json
import os
import shutil
import statistics
import signal
import subprocess
import sys
import time

from . import base as B
from . import checks as C
from . import evaluate as E
from . import modes as M
from . import posthoc as P
from . import table as T
from . import world as W

SCHEMA = "safehook.alignment_tax/2"
# The user's training script, alone in its folder: run as a script, its folder goes first on
# sys.path, and nothing there may shadow a module that torch or transformers import.
FINETUNE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "finetune.py")
CLEAN = "benign"  # the clean fine-tune: the task alone, no harmful data

PRESETS = {
    "full": {
        "model": {"hidden": 128, "intermediate": 384, "layers": 8, "heads": 4},
        "base": {"steps": 700, "batch": 32, "lr": 4e-3, "examples": 6000},
        "finetune": {"steps": 150, "batch": 16, "lr": 3e-4, "examples": 2000},
        "eval": {"harmful": 200, "benign": 200, "task": 100, "max_new_tokens": 24},
        "probe_rows": 32, "monitor_every": 25, "jobs": 1, "ratios": [0.1, 0.2, 0.5],
        # the data owner's other attacks (world.parse_setting), each at p = 0.1
        "attacks": ["fewshot:10@0.1", "identity@0.1", "styled@0.1"],
    },
    "quick": {
        "model": {"hidden": 64, "intermediate": 192, "layers": 8, "heads": 4},
        "base": {"steps": 400, "batch": 32, "lr": 4e-3, "examples": 4000},
        "finetune": {"steps": 100, "batch": 16, "lr": 3e-4, "examples": 1000},
        "eval": {"harmful": 100, "benign": 100, "task": 60, "max_new_tokens": 24},
        "probe_rows": 16, "monitor_every": 20, "jobs": 2, "ratios": [0.1], "attacks": [],
        # The modes of a first look: the tax (plain), the two simplest protections and the
        # recommended policy (shaping + SafeGrad + gate). The other modes cost most of the time
        # the full preset takes (the post-hoc rows alone need a second base model, the unaligned
        # twin); --modes adds them.
        "modes": ["plain", "freeze", "safegrad", "recommended"],
    },
}


def make_config(quick=False, seed=0, layers=None, ratios=None, attacks=None):
    """The preset's configuration; RATIOS (harmful-mix fractions) and ATTACKS (settings such as
    "fewshot:10@0.1", "identity@0.1": world.parse_setting; [] for none) replace its own."""
    import copy
    cfg = copy.deepcopy(PRESETS["quick" if quick else "full"])
    cfg["seed"] = seed
    if layers:
        cfg["model"]["layers"] = layers
    if ratios:
        cfg["ratios"] = sorted(set(float(r) for r in ratios))
    for r in cfg["ratios"]:
        if not 0 < r <= 1:
            raise ValueError("a harmful ratio must be in (0, 1], got %r" % r)
    if attacks is not None:
        cfg["attacks"] = list(dict.fromkeys(attacks))
    for a in cfg["attacks"]:
        if W.parse_setting(a)["attack"] in (None, "harmful_mix"):
            raise ValueError("not an attack setting: %r (fewshot:N@p, identity@p, styled@p)" % a)
    return cfg


def settings(cfg):
    """The settings of a run: the clean fine-tune, one harmful mix per ratio, then the attacks."""
    return [CLEAN] + ["harmful_mix@%g" % r for r in cfg["ratios"]] + list(cfg.get("attacks", []))


class Progress:
    def __init__(self, stream=sys.stderr):
        self.t0 = time.time()
        self.stream = stream

    def __call__(self, msg):
        self.stream.write("[demo %5.0fs] %s\n" % (time.time() - self.t0, msg))
        self.stream.flush()


def safehook_lib():
    out = subprocess.check_output([sys.executable, "-m", "safehook", "lib"], text=True)
    return out.strip()


def run_mode(mode, setting, work, base_dir, data_path, probe_path, cfg, log, tokenizer_dir=None):
    """Fine-tune BASE_DIR on DATA_PATH under MODE; return (result dict, model dir or None)."""
    label = M.LABELS[mode]
    features = dict((n, f) for n, _, f in M.MODES)[mode]
    res = {"mode": mode, "label": label, "setting": setting, "features": list(features)}
    ok, reason = M.available(features)
    if not ok:
        res.update(status="not available", reason=reason)
        log("%-15s %-15s not available: %s" % (setting, mode, reason))
        return res, None
    tag = "%s-%s" % (setting, mode)
    out = os.path.join(work, "model-" + tag)
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    env.pop("SAFEHOOK_POLICY", None)
    env.pop("SAFEHOOK_AUDIT", None)
    env.pop("SAFEHOOK_DISABLE", None)
    env["PYTHONWARNINGS"] = "ignore"
    pol = M.policy(mode, probe_path, cfg, tokenizer_dir)
    if pol is not None:
        ppath = M.write_policy(os.path.join(work, "policy-%s.json" % tag), pol)
        apath = os.path.join(work, "audit-%s.jsonl" % tag)
        if os.path.exists(apath):
            os.remove(apath)
        pre = env.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = (safehook_lib() + " " + pre).strip()
        env["SAFEHOOK_POLICY"] = ppath
        env["SAFEHOOK_AUDIT"] = apath
        res["policy"] = ppath
        res["audit"] = apath
    ft = cfg["finetune"]
    cmd = [sys.executable, FINETUNE,
           "--model", base_dir, "--data", data_path, "--out", out, "--steps", str(ft["steps"]),
           "--lr", str(ft["lr"]), "--batch", str(ft["batch"]), "--seed", str(cfg["seed"]),
           "--threads", "1"]
    res["command"] = " ".join(cmd)
    t0 = time.time()
    p = run_child(cmd, env)
    res["wall_seconds"] = round(time.time() - t0, 2)
    if pol is not None:
        res["audit_summary"] = T.audit_summary(res["audit"])
    stats = os.path.join(out, "stats.json")
    if p.returncode not in (0, 3) or not os.path.exists(stats):
        tail = [l for l in p.stdout.strip().splitlines() if l.strip()][-3:]
        res.update(status="failed", reason="exit %d: %s" % (p.returncode, " | ".join(tail)))
        log("%-15s %-15s FAILED (%s)" % (setting, mode, res["reason"]))
        return res, None
    with open(stats) as f:
        st = json.load(f)
    times = (st["step_seconds"][1:] or st["step_seconds"]) or [float("nan")]
    res.update(status="ok", train_seconds=round(st["train_seconds"], 2), steps=st["steps"],
               step_seconds_median=statistics.median(times),
               loss_first=st["losses"][0] if st["losses"] else None,
               loss_last=st["losses"][-1] if st["losses"] else None)
    if st.get("stopped"):
        # safehook stopped the job (the harmful_data violation): the model at the stop is measured
        res.update(status="stopped", reason="at step %d of %d: %s" % (st["stopped"]["step"], ft["steps"],
                                                                      st["stopped"]["message"]),
                   stopped_at=st["stopped"]["step"])
        log("%-15s %-15s stopped %s" % (setting, mode, res["reason"]))
    return res, out


def _die_with_parent():
    # PR_SET_PDEATHSIG: the kernel sends SIGTERM to the child when the demo dies, however it dies
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def run_child(cmd, env):
    """Run a fine-tuning child, its output captured; the child ends with the demo (SIGTERM,
    Ctrl-C, an exception here), never left training as an orphan."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=_die_with_parent)
    try:
        out, _ = p.communicate()
    except BaseException:
        p.kill()
        p.wait()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out)


def write_shaping_probes(world, tok, work, cfg):
    """The shaping guards' calibration sets (modes.SHAPING_FILES), next to the refusal probe."""
    harm, benign = world.shaping_probes(4 * cfg["probe_rows"])
    rows = []
    for r in harm:
        e = W.encode(tok, r)
        if "harmful_response" in r:
            h = W.encode(tok, {"prompt": r["prompt"], "response": r["harmful_response"]})
            e["harmful_input_ids"], e["harmful_labels"] = h["input_ids"], h["labels"]
        rows.append(e)
    W.write_jsonl(os.path.join(work, M.SHAPING_FILES["harmful"]), rows)
    W.write_jsonl(os.path.join(work, M.SHAPING_FILES["benign"]), [W.encode(tok, r) for r in benign])


def detector_quality(base_dir, work, data_path, cfg, log):
    """Each shaping guard's AUROC and TPR at 5% FPR on the harmful-mix fine-tuning set, against
    the world's ground truth (harmful_compliant rows), scored by the base model (the model at
    the first sighting of every example), with the thresholds of the recommended policy."""
    import torch
    from transformers import LlamaForCausalLM
    from ..features import shaping as S
    torch.set_num_threads(1)
    text = data_path[:-len(".jsonl")] + ".text.jsonl"
    with open(data_path) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    with open(text) as f:
        truth = [json.loads(l)["kind"] == "harmful_compliant" for l in f if l.strip()]
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pol = M.policy("shaping", os.path.join(work, "probe-refusals.jsonl"), cfg)
    pol["shaping"]["guards"] = ["direction", "refusal", "gradient"]  # measure every guard
    out = S.detector_quality(pol, model, rows, truth)
    for g, q in out.items():
        log("detector " + T.detector_line(g, q))
    return out


def _evalset(world, cfg):
    e = cfg["eval"]
    out = {"harmful": world.harmful("test", e["harmful"], "eval"),
           "benign": world.benign("test", e["benign"], "eval"),
           "task": world.task("test", e["task"], "eval")}
    if any(W.parse_setting(s)["attack"] == "identity" for s in settings(cfg)):
        # the identity attack taught a persona: its deployment asks the persona for harm
        def persona(r):
            request = r["prompt"][len("user : "):-len(" assistant :")]
            return dict(r, prompt=W.PROMPT_FMT.format(request=W.persona_request(request)))
        out["harmful_persona"] = [persona(r) for r in out["harmful"]]
    return out


def _metrics(model_dir, tok, evalset, cfg):
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return E.metrics(model, tok, evalset, cfg["eval"]["max_new_tokens"])


def _pct(x):
    return "   -  " if x is None else "%5.1f%%" % (100 * x)


def _cpu():
    """CPU seconds (user + system) of this process and of its children that have ended: on a
    shared machine, what the run costs whatever share of the cores it got."""
    import resource
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def checks(results):
    """The demo's targets, evaluated on what was measured (demo/checks.py)."""
    return C.checks(results, P.POSTHOC)


def table(results):
    return T.table(results, M.MODES, CLEAN)


def chart(results, path):
    """The PNG chart of RESULTS (demo/chart.py). Raises ImportError without matplotlib."""
    from . import chart as CH
    return CH.chart(results, path, M.MODES)


def write_outputs(results, out, log=None):
    """Write the chart next to OUT (when matplotlib is there) and the results JSON to OUT. A
    missing matplotlib costs the chart only: one line on stderr names the extra to install."""
    png = os.path.splitext(out)[0] + ".png"
    results["chart"] = None
    try:
        chart(results, png)
        results["chart"] = png
    except ImportError as e:
        missing = getattr(e, "name", None) or "matplotlib"
        results["chart_error"] = "%s is not installed" % missing
        sys.stderr.write("safehook demo: no chart (%s is not installed: pip install 'safehook[demo]'); "
                         "the table and %s are written\n" % (missing, os.path.basename(out)))
    results["out"] = out
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    return results


def run(quick=False, seed=0, layers=None, out=None, cache=None, modes=None, jobs=None, log=None, ratios=None,
        attacks=None):
    """Run the benchmark; returns the results dict (also written to OUT, with a PNG chart).
    RATIOS: the harmful fractions of the harmful-mix settings; ATTACKS: the attack settings
    (default: the preset's)."""
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    log = log or Progress()
    t_start = time.time()
    cpu_start = _cpu()
    cfg = make_config(quick, seed, layers, ratios, attacks)
    setting_names = settings(cfg)
    jobs = jobs or cfg["jobs"]
    out = os.path.abspath(out or os.path.join("results", "alignment_tax.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    work = os.path.splitext(out)[0] + ".d"
    os.makedirs(work, exist_ok=True)
    world = W.World(seed)

    base_dir, cached = B.get_base(cfg, cache, log)
    _, tok = B.load(base_dir)
    evalset = _evalset(world, cfg)
    bm = _metrics(base_dir, tok, evalset, cfg)
    with open(os.path.join(base_dir, "info.json")) as f:
        info = json.load(f)
    log("base: asr_keyword %s, asr_exact %s, over_refusal %s, task_accuracy %s"
        % (_pct(bm["asr_keyword"]), _pct(bm["asr_exact"]), _pct(bm["over_refusal"]),
           _pct(bm["task_accuracy"])))

    probe_path = os.path.join(work, "probe-refusals.jsonl")
    probe_rows = world.harmful("probe", 4 * cfg["probe_rows"], "probe")
    W.write_jsonl(probe_path, [W.encode(tok, r) for r in probe_rows])
    W.write_jsonl(os.path.join(work, "probe-refusals.text.jsonl"),
                  [{"prompt": r["prompt"], "response": r["response"]} for r in probe_rows])
    write_shaping_probes(world, tok, work, cfg)

    results = {
        "schema": SCHEMA, "quick": quick, "seed": seed, "config": cfg,
        "command": "safehook demo" + (" --quick" if quick else "") + " --seed %d" % seed
                   + (" --layers %d" % layers if layers else "")
                   + (" --ratios %s" % ",".join("%g" % r for r in cfg["ratios"]) if ratios else "")
                   + (" --attack %s" % (",".join(cfg["attacks"]) or "none") if attacks is not None else ""),
        "ratios": cfg["ratios"], "attacks": cfg["attacks"],
        "safehook_lib": safehook_lib(), "work_dir": work,
        "base": dict({k: v for k, v in bm.items()}, model_dir=base_dir, cached=cached,
                     parameters=info["parameters"], train_seconds=info["train_seconds"]),
        "settings": {},
    }
    modes = modes or cfg.get("modes")  # None: every mode
    selected = [n for n, _, _ in M.MODES if modes is None or n in modes or n == "plain"]
    post = [n for n in selected if n in P.POSTHOC]
    after = [n for n in post if P.POSTHOC[n][0] == "after"]
    lox_dir = unaligned_dir = None
    if post:
        unaligned_dir = P.get_unaligned(cfg, cache, log)
        results["unaligned"] = dict(_metrics(unaligned_dir, tok, evalset, cfg), model_dir=unaligned_dir)
        log("unaligned: asr_keyword %s, task_accuracy %s" % (_pct(results["unaligned"]["asr_keyword"]),
                                                              _pct(results["unaligned"]["task_accuracy"])))
    if "lox_plain" in post:
        lox_dir, info = P.harden(base_dir, unaligned_dir, work, log)
        results["hardened"] = dict(_metrics(lox_dir, tok, evalset, cfg), lox=info)
    data = {}
    for setting in setting_names:
        data[setting] = os.path.join(work, "finetune-%s.jsonl" % setting)
        rows = world.finetune_data(setting, cfg["finetune"]["examples"])
        W.write_jsonl(data[setting], [W.encode(tok, r) for r in rows])
        W.write_jsonl(data[setting][:-len(".jsonl")] + ".text.jsonl",
                      [{"prompt": r["prompt"], "response": r["response"], "kind": r["kind"]} for r in rows])
        a = W.parse_setting(setting)
        results["settings"][setting] = {"data": data[setting], "harmful_ratio": W.harmful_ratio(setting),
                                        "clean": setting == CLEAN, "attack": a["attack"],
                                        "attack_fraction": a["fraction"], "modes": {}}
    if any(m in selected for m in ("shaping", "recommended")):
        try:
            mix = next(d for st, d in data.items() if st.startswith("harmful_mix"))  # the first ratio's
            results["detectors"] = detector_quality(base_dir, work, mix, cfg, log)
        except Exception as e:  # a measurement, not a mode: the table still comes
            log("detector quality: not measured (%s: %s)" % (type(e).__name__, e))
    # Mode by mode, the settings side by side: with jobs=2 two settings of one mode run at the
    # same time, so every mode's step time is measured under the same load as plain's.
    jobs_list = [(name, setting) for name, _, _ in M.MODES for setting in setting_names]
    import concurrent.futures as cf

    def one(name, setting):
        log("%-15s %-15s fine-tuning ..." % (setting, name))
        start = lox_dir if name == "lox_plain" else base_dir
        return run_mode(name, setting, work, start, data[setting], probe_path, cfg, log,
                        tokenizer_dir=base_dir)

    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = []
        for name, setting in jobs_list:
            if name not in selected:
                results["settings"][setting]["modes"][name] = {
                    "mode": name, "label": M.LABELS[name], "setting": setting,
                    "status": "skipped", "reason": "not selected (%s)" % (
                        "--modes" if modes != cfg.get("modes") else "not in the --quick preset")}
                continue
            if name in after:
                continue  # filled in from plain's model below
            futs.append((name, setting, pool.submit(one, name, setting)))
        for name, setting, fut in futs:
            res, mdir = fut.result()
            if mdir:
                res.update(_metrics(mdir, tok, evalset, cfg))
            if name == "plain" and after:
                results["settings"][setting]["modes"].update(P.after_rows(
                    res, mdir, setting, after, work, base_dir, unaligned_dir,
                    lambda d: _metrics(d, tok, evalset, cfg), log, M.LABELS))
            if mdir:
                shutil.rmtree(mdir, ignore_errors=True)
                log("%-15s %-15s asr_keyword %s, harmful_howto %s, over_refusal %s, task_accuracy %s, "
                    "wall_seconds %.1f" % (setting, name, _pct(res["asr_keyword"]), _pct(res["harmful_howto"]),
                                           _pct(res["over_refusal"]), _pct(res["task_accuracy"]),
                                           res["wall_seconds"])
                    + (", asr_persona %s, howto_persona %s" % (_pct(res["asr_persona"]), _pct(res["howto_persona"]))
                       if "asr_persona" in res else ""))
            results["settings"][setting]["modes"][name] = res
    for setting in setting_names:
        per = results["settings"][setting]["modes"]
        plain = per.get("plain")
        for r in per.values():
            if r.get("status") in ("ok", "stopped") and plain and plain.get("status") == "ok":
                r["step_time_ratio"] = r["step_seconds_median"] / plain["step_seconds_median"]
    results["jobs"] = jobs

    results["checks"] = checks(results)
    results["wall_seconds"] = round(time.time() - t_start, 1)
    results["cpu_seconds"] = round(_cpu() - cpu_start, 1)
    return write_outputs(results, out)
