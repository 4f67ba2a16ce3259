"""The demo's post-hoc rows: LoX before fine-tuning, Safe LoRA / NLSR after it.

Both need a model from before alignment, which the demo's aligned base (trained from scratch in
one phase on refusals and helpful answers together) does not have. The demo defines it as the
base's unaligned twin: the same initialization, optimizer, schedule and batch draws (same seed)
on the same training rows, except that the 40% harmful requests are answered compliantly
instead of refused. W_aligned - W_unaligned is then what teaching refusals changed, with
everything else held equal; it is not a pretrained-vs-chat difference, and the twin is not a
pretrained model (it has learned the same helpful behaviour). Its own ASR is recorded in the
results ("unaligned"), so a reader sees what "unaligned" means here."""
import os
import shutil
import time

from . import base as B
from . import world as W

# mode -> (when, method): "before" modes fine-tune a hardened base; "after" modes restore the
# plain SFT model of the same setting (no training of their own).
POSTHOC = {"lox_plain": ("before", "lox"), "plain_safelora": ("after", "safelora"),
           "plain_nlsr": ("after", "nlsr")}
# Each method's command-line defaults; nothing here was tuned on the evaluation prompts.
PARAMS = {"lox": {"k": 6, "alpha": 0.5}, "safelora": {"threshold": 0.5},
          "nlsr": {"fraction": 0.2, "rate": 0.5, "epsilon": 0.2, "beta": 0.0, "seed": 0}}


def unaligned_rows(world, n):
    """The base's training rows (World.alignment_data) with every harmful request answered
    compliantly: same prompts, same order. The harmful rows are drawn again with the random
    stream of World.harmful (the refusal draw still consumed, so prompts stay the same); the
    compliant answers come from a stream of their own."""
    rows = world.alignment_data(n)
    nh, nb = int(0.4 * n), int(0.45 * n)
    answers = W._seeded(world.seed, "unaligned-twin")

    def comply(cat, act, rng):
        rng.choice(W.REFUSALS)
        return W.helpful_answer(act, answers.choice(W.HARMFUL[cat][2]))

    harmful = world._requests(world.harmful_subjects, "train", "train", nh,
                              W._seeded(world.seed, "harmful/train/align"), comply)
    for r in harmful:
        r["kind"] = "harmful_compliant"
    twin = harmful + world.benign("train", nb, "align") + world.general(n - nh - nb, "align")
    W._seeded(world.seed, "align-shuffle").shuffle(twin)
    if [r["prompt"] for r in twin] != [r["prompt"] for r in rows]:
        raise RuntimeError("unaligned twin: prompts differ from the base's training set")
    return twin


def get_unaligned(cfg, cache, log):
    """The directory of the unaligned twin of CFG's base: from the cache, or trained now."""
    d = os.path.join(B.cache_root(cache), B.base_key(cfg) + "-unaligned")
    if os.path.exists(os.path.join(d, "info.json")):
        log("unaligned twin: cached at %s" % d)
        return d
    os.makedirs(os.path.dirname(d), exist_ok=True)
    world = W.World(cfg["seed"])
    return B.train_base(cfg, d, log, rows=unaligned_rows(world, cfg["base"]["examples"]),
                        what="unaligned twin")


def harden(base_dir, unaligned_dir, work, log):
    out = os.path.join(work, "base-lox")
    shutil.rmtree(out, ignore_errors=True)
    from ..posthoc import lox
    t0 = time.time()
    res = lox.harden(unaligned_dir, base_dir, out, quiet=True,
                     record=os.path.join(work, "posthoc-lox.jsonl"), **PARAMS["lox"])
    log("LoX: %d tensors extrapolated (rank %d, alpha %g) in %.1fs"
        % (res["changed"], PARAMS["lox"]["k"], PARAMS["lox"]["alpha"], time.time() - t0))
    return out, dict(res, seconds=round(time.time() - t0, 2), params=PARAMS["lox"])


def restore(method, base_dir, unaligned_dir, finetuned_dir, out, record):
    from ..posthoc import nlsr, safelora
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    fn = safelora.restore if method == "safelora" else nlsr.restore
    res = fn(unaligned_dir, base_dir, finetuned_dir, out, record=record, quiet=True,
             **PARAMS[method])
    res = {k: v for k, v in res.items() if k not in ("similarities", "chosen")}
    return dict(res, seconds=round(time.time() - t0, 2), params=PARAMS[method])


def after_rows(plain, mdir, setting, names, work, base_dir, unaligned_dir, metrics, log, labels):
    """The "after" rows of SETTING: each method restores plain SFT's model MDIR (result dict
    PLAIN) and is evaluated by METRICS(dir). Returns {mode: result dict}."""
    out = {}
    for name in names:
        when, method = POSTHOC[name]
        res = {"mode": name, "label": labels[name], "setting": setting, "features": [],
               "posthoc": method}
        if mdir is None:
            res.update(status="failed", reason="plain SFT failed: nothing to restore")
            out[name] = res
            continue
        d = os.path.join(work, "model-%s-%s" % (setting, name))
        info = restore(method, base_dir, unaligned_dir, mdir, d,
                       os.path.join(work, "posthoc-%s-%s.jsonl" % (setting, method)))
        res.update({k: plain[k] for k in ("command", "train_seconds", "step_seconds_median",
                                          "loss_first", "loss_last") if k in plain})
        res.update(status="ok", restore=info,
                   wall_seconds=round(plain.get("wall_seconds", 0) + info["seconds"], 2))
        res.update(metrics(d))
        shutil.rmtree(d, ignore_errors=True)
        log("%-15s %-15s %s; asr_keyword %.1f%%, task_accuracy %.1f%%" % (
            setting, name, ", ".join("%s %s" % (k, info[k]) for k in
                                     ("projected", "transplanted", "layers") if k in info),
            100 * res["asr_keyword"], 100 * res["task_accuracy"]))
        out[name] = res
    return out
