"""What `recommended` costs per optimizer step, side by side with plain fine-tuning in one run,
and where the time goes (shaping, SafeGrad, the gate, tamper and the audit log).

The demo's setting: its aligned base model (the full preset's, from the demo cache; trained
there on first use, about 10 minutes), its probe files, its harmful-mix fine-tuning data, and
the demo's training loop (scripts/finetune.py: AdamW, batches of 16, clip_grad_norm, the model's
own loss), run here as a subprocess per configuration with safehook preloaded as a user runs it
(this file with --child: the same loop with two clocks). Every configuration trains the same
world with the same seed, so the same batches; configurations alternate within each repetition.

Two clocks per step: wall time, and the process's CPU time (user + system, all its threads,
the projection kernel's pool included), which the other jobs of a shared machine disturb much
less. A run's figure is the MEAN over its steps after the first (the first holds the one-off
calibration of shaping; the mean keeps every periodic cost in: a safety gradient refreshed every
K steps, shaping's recalibration and stream checks); the MEDIAN over --reps is compared with
plain's.

Each feature's share comes from a ladder of policies, each one feature more than the one before
(all from policies/recommended.json as the demo runs it):

    plain         no safehook at all
    audit         a policy with an audit log only (steps level): tamper's checks, the step hooks
                  and one step record per step, which every policy pays
    +shaping      the shipped shaping section
    +safegrad     ... and SafeGrad (the probe's safety gradient is computed here)
    recommended   ... and the gate (which shares SafeGrad's safety gradient): the shipped policy

A feature's share is its rung minus the rung below, over plain. Timers inside the process would
not split the safety gradient fairly (whichever feature asks first pays for both) and would miss
shaping's forward hooks; the ladder measures what a user pays for adding each section.

    python bench/recommended_overhead.py                     # 60 steps, 3 reps, full preset
    python bench/recommended_overhead.py --steps 150 --reps 3 --out results/recommended_overhead.json
    python bench/recommended_overhead.py --only plain,recommended \\
        --variant 'k16={"safegrad": {"refresh_every": 16}}'   # a policy patch beside the shipped one
    python bench/recommended_overhead.py --quick            # the quick preset's base (design runs)

The real model's row (``--real DIR``, a Hugging Face folder, e.g. SmolLM2-135M-Instruct as
bench/real_model.py leaves it in ~/.cache/safehook/real): the user's plain PEFT LoRA fine-tune
(r 8 on q_proj and v_proj, AdamW lr 1e-4, batches of 8 rows cut at 96 tokens: the addition task
with 10% harmful requests, bench/real_model.py's data and probes), plain against recommended
(its probes pointed at the real bench's refusal and benign probes, chat template on), the same
clocks and medians:

    python bench/recommended_overhead.py --real ~/.cache/safehook/real/hf-smollm2-b179c9523d0e --steps 40

``--patch JSON`` changes the recommended policy the ladder is built from (e.g. the settings of a
candidate before it is shipped). ``--variant NAME=JSON`` adds a configuration: the shipped recommended policy with JSON merged in
(objects merged key by key, ``null`` deletes a key); ``--policy NAME=FILE`` one from a file whose
probe paths are replaced by the demo's, as the demo does for recommended. The audit log of each
run is summarised (safety gradients computed fresh or reused from the cache, gate actions,
projected steps) so that a variant's cost and what it did are read together.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile

LADDER = ["plain", "audit", "+shaping", "+safegrad", "recommended"]
SHARES = [("tamper+audit", "audit", "plain"), ("shaping", "+shaping", "audit"),
          ("safegrad", "+safegrad", "+shaping"), ("gate", "recommended", "+safegrad")]


def child(args):
    """The demo's fine-tuning loop (scripts/finetune.py), timed per step by both clocks."""
    import random
    import time
    import torch
    from torch.nn.utils.rnn import pad_sequence
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    with open(args.data) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    pad = model.config.pad_token_id or 0
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)

    def batch():
        b = rng.sample(rows, args.batch)
        seqs = [torch.tensor(r["input_ids"]) for r in b]
        ids = pad_sequence(seqs, batch_first=True, padding_value=pad)
        labels = pad_sequence([torch.tensor(r["labels"]) for r in b], batch_first=True, padding_value=-100)
        mask = pad_sequence([torch.ones_like(t) for t in seqs], batch_first=True, padding_value=0)
        return ids, mask, labels

    wall, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        ids, mask, labels = batch()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"wall": statistics.mean(wall[1:]), "cpu": statistics.mean(cpu[1:]),
                      "wall_first": wall[0], "cpu_first": cpu[0]}))


def real_child(args):
    """The real model's user script: plain PEFT LoRA on the pairs of ARGS.data, timed per step."""
    import time
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import real_model as R
    from peft import LoraConfig, get_peft_model
    R._torch_setup(1, args.seed)
    model, tok = R.load_dir(args.model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with open(args.data) as f:
        pairs = [tuple(json.loads(l)) for l in f if l.strip()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    model.train()
    wall, cpu = [], []
    for s in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        b = R.sft_batch(tok, pairs[s * args.batch:(s + 1) * args.batch], 96)
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"wall": statistics.mean(wall[1:]), "cpu": statistics.mean(cpu[1:]),
                      "wall_first": wall[0], "cpu_first": cpu[0]}))


def real_setup(args, work):
    """(data path, {name: policy path}) of the real model's row: bench/real_model.py's data
    (its default arguments), its probes written into WORK, the fine-tuning pairs (addition with
    10% harmful requests; the compliant answers are the model's own where the real bench cached
    them, else a fixed opener: the step's cost, not its content, is measured here)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import real_model as R
    from safehook.demo import modes as M
    rargs = R.build_parser().parse_args(["train"])
    data = R.rmd.make_data(R.locate("smollm2"), rargs)
    R.write_probe(work, data)
    mix = [(p, "Sure, here is how to do that. First, gather what you need.") for p in data["harmful_mix"]]
    n = args.steps * 8
    pairs = R.train_pairs(data, mix, "mix", n, args.seed)
    path = os.path.join(work, "pairs.jsonl")
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps(list(p)) + "\n")
    rec = M.recommended_policy()
    if args.patch:
        rec = merge(rec, json.loads(args.patch))
    pfile = os.path.join(work, "recommended-real.json")
    with open(pfile, "w") as f:
        json.dump(rec, f)
    pol = R.mode_policy(pfile, work, 64)
    for pr in pol["probes"].values():  # the probes the real bench writes are text: its tokenizer
        pr.update(tokenizer=os.path.abspath(args.real), chat_template=True)
    return path, {"recommended": M.write_policy(os.path.join(work, "policy-real-recommended.json"), pol)}


def merge(base, patch):
    """BASE with PATCH merged in (dicts key by key; None deletes a key)."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def ladder_policies(rec):
    """The ladder's policies from RECOMMENDED (the demo's copy, its probe paths set)."""
    audit = {"version": 1, "on_error": "abort", "audit": dict(rec.get("audit") or {"level": "steps"})}
    shaping = merge(rec, {"safegrad": None, "gate": None})
    safegrad = merge(rec, {"gate": None})
    return {"audit": audit, "+shaping": shaping, "+safegrad": safegrad, "recommended": rec}


def demo_policy(path, M, probe, cfg):
    """A policy file with its probes pointed at the demo's files, as the demo does for
    recommended (modes.policy)."""
    with open(path) as f:
        p = json.load(f)
    work = os.path.dirname(os.path.abspath(probe))
    for name, pr in p.get("probes", {}).items():
        pr.pop("tokenizer", None)
        pr["data"] = os.path.join(work, M.SHAPING_FILES["benign"]) if name == "benign" else \
            os.path.join(work, M.SHAPING_FILES["harmful"])
        pr.setdefault("limit", 4 * cfg["probe_rows"])
    return p


def audit_summary(path):
    """What a run's audit log says it did: safety gradients computed and reused, gate actions,
    projected steps, rows flagged."""
    out = {"steps": 0, "safety_fresh": 0, "safety_cached": 0, "projected": 0, "gate": {}, "flags": 0}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            ev = r.get("event")
            if ev == "flag":
                out["flags"] += 1
            if ev != "step":
                continue
            out["steps"] += 1
            sg = r.get("safety")
            if isinstance(sg, dict):  # the cached signal's record (probes/gradient.py)
                out["safety_fresh" if sg.get("fresh") else "safety_cached"] += 1
            elif r.get("safety_refreshed"):
                out["safety_fresh"] += 1
            elif "cosine" in r:
                out["safety_cached"] += 1
            if r.get("projected") is True:
                out["projected"] += 1
            g = r.get("gate")
            if isinstance(g, dict):
                a = g.get("action", "?")
                out["gate"][a] = out["gate"].get(a, 0) + 1
    return out


def run_children(args, names, paths, argv, work):
    """Every configuration once per repetition, interleaved; {name: {"wall": [...], "cpu": [...]}}
    and the audit summaries."""
    from safehook.demo import bench as Bn
    lib = Bn.safehook_lib()
    times = {n: {"wall": [], "cpu": []} for n in names}
    summaries = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
            env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            audit = os.path.join(work, "audit-%s-%d.jsonl" % (name.replace("+", ""), rep))
            if name in paths:
                env.update(LD_PRELOAD=lib, SAFEHOOK_POLICY=paths[name], SAFEHOOK_AUDIT=audit)
            p = subprocess.run([sys.executable, os.path.abspath(__file__)] + argv, env=env, capture_output=True,
                               text=True)
            if p.returncode != 0:
                sys.exit("%s failed (exit %d):\n%s" % (name, p.returncode, (p.stderr or p.stdout)[-3000:]))
            r = json.loads(p.stdout.strip().splitlines()[-1])
            for k in ("wall", "cpu"):
                times[name][k].append(r[k])
            if name in paths:
                summaries[name].append(audit_summary(audit))
            print("rep %d %-14s mean step: wall %.4f s, cpu %.4f s" % (rep, name, r["wall"], r["cpu"]), flush=True)
    return times, summaries


def real_main(args):
    work = tempfile.mkdtemp(prefix="recommended-overhead-real-")
    data, paths = real_setup(args, work)
    names = ["plain", "recommended"]
    print("real model %s, LoRA r 8 (q_proj, v_proj), %d steps of 8, %d reps; work %s"
          % (args.real, args.steps, args.reps, work), flush=True)
    argv = ["--real-child", "--model", os.path.abspath(args.real), "--data", data, "--steps", str(args.steps),
            "--batch", "8", "--lr", "1e-4", "--seed", str(args.seed)]
    times, summaries = run_children(args, names, paths, argv, work)
    base = {k: statistics.median(times["plain"][k]) for k in ("wall", "cpu")}
    res = {"real": args.real, "steps": args.steps, "reps": args.reps, "configs": {},
           "command": " ".join(["python", "bench/recommended_overhead.py"] + sys.argv[1:])}
    for name in names:
        m = {k: statistics.median(times[name][k]) for k in ("wall", "cpu")}
        res["configs"][name] = {"wall": m["wall"], "cpu": m["cpu"], "wall_ratio": m["wall"] / base["wall"],
                                "cpu_ratio": m["cpu"] / base["cpu"], "runs": times[name],
                                "audit": summaries[name][-1] if summaries[name] else None}
        print("%-14s wall %.4f s (%.3f)  cpu %.4f s (%.3f)" % (name, m["wall"], m["wall"] / base["wall"], m["cpu"],
                                                             m["cpu"] / base["cpu"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--lr", type=float, default=3e-4, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help="the demo world (and the batches' seed)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="the base model's depth (default: the preset's)")
    ap.add_argument("--quick", action="store_true", help="the quick preset's base model")
    ap.add_argument("--setting", default="harmful_mix@0.1", help="the demo's fine-tuning data (benign, harmful_mix@P)")
    ap.add_argument("--only", default=None, help="comma-separated configurations to run (plain always runs)")
    ap.add_argument("--patch", default=None, metavar="JSON",
                    help="merged into the shipped recommended policy before the ladder is built from it")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="the shipped recommended policy with JSON merged in")
    ap.add_argument("--policy", action="append", default=[], metavar="NAME=FILE", help="a policy file")
    ap.add_argument("--real", default=None, metavar="DIR",
                    help="the real model's LoRA row instead (a Hugging Face model folder)")
    ap.add_argument("--real-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.real_child:
        return real_child(args)
    if args.real:
        return real_main(args)

    import torch
    torch.set_num_threads(1)
    from safehook.demo import bench as Bn, base as B, modes as M, world as W
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    ratios = [W.harmful_ratio(args.setting)] if args.setting != Bn.CLEAN else None
    cfg = Bn.make_config(quick=args.quick, seed=args.seed, layers=args.layers, ratios=ratios)
    base_dir, _ = B.get_base(cfg, None, Bn.Progress())
    _, tok = B.load(base_dir)
    world = W.World(cfg["seed"])
    work = tempfile.mkdtemp(prefix="recommended-overhead-")
    probe = os.path.join(work, "probe-refusals.jsonl")
    W.write_jsonl(probe, [W.encode(tok, r) for r in world.harmful("probe", 4 * cfg["probe_rows"], "probe")])
    Bn.write_shaping_probes(world, tok, work, cfg)
    data = os.path.join(work, "train.jsonl")
    W.write_jsonl(data, [W.encode(tok, r) for r in world.finetune_data(args.setting, cfg["finetune"]["examples"])])

    rec = M.policy("recommended", probe, cfg)
    if args.patch:
        rec = merge(rec, json.loads(args.patch))
    pols = ladder_policies(rec)
    for spec in args.variant:
        name, _, js = spec.partition("=")
        pols[name] = merge(rec, json.loads(js))
    for spec in args.policy:
        name, _, path = spec.partition("=")
        pols[name] = demo_policy(path, M, probe, cfg)
    names = ["plain"] + [n for n in pols if n != "plain"]
    if args.only:
        keep = set(args.only.split(",")) | {"plain"}
        names = [n for n in names if n in keep]
    paths = {n: M.write_policy(os.path.join(work, "policy-%s.json" % n.replace("+", "")), pols[n])
             for n in names if n != "plain"}
    print("base %s (%s preset, seed %d, %d blocks); data %s (%d rows); %d steps of %d, %d reps; work %s"
          % (base_dir, "quick" if args.quick else "full", args.seed, cfg["model"]["layers"], args.setting,
             cfg["finetune"]["examples"], args.steps, args.batch, args.reps, work), flush=True)

    argv = ["--child", "--model", base_dir, "--data", data, "--steps", str(args.steps), "--batch", str(args.batch),
            "--lr", str(cfg["finetune"]["lr"]), "--seed", str(args.seed)]
    times, summaries = run_children(args, names, paths, argv, work)

    res = {"steps": args.steps, "reps": args.reps, "batch": args.batch, "seed": args.seed, "quick": args.quick,
           "setting": args.setting, "model": cfg["model"], "base": base_dir, "configs": {}, "shares": {},
           "command": " ".join(["python", "bench/recommended_overhead.py"] + sys.argv[1:])}
    base = {k: statistics.median(times["plain"][k]) for k in ("wall", "cpu")}
    med = {}
    print("\n%-14s %10s %8s %10s %8s  %s" % ("config", "wall (s)", "ratio", "cpu (s)", "ratio", "what the log says"))
    for name in names:
        m = med[name] = {k: statistics.median(times[name][k]) for k in ("wall", "cpu")}
        s = summaries[name][-1] if summaries[name] else None
        res["configs"][name] = {"wall": m["wall"], "cpu": m["cpu"], "wall_ratio": m["wall"] / base["wall"],
                                "cpu_ratio": m["cpu"] / base["cpu"], "runs": times[name], "audit": s}
        note = ""
        if s:
            note = "safety gradient fresh %d / cached %d, projected %d, gate %s, flags %d" % (
                s["safety_fresh"], s["safety_cached"], s["projected"],
                ",".join("%s %d" % kv for kv in sorted(s["gate"].items())) or "-", s["flags"])
        print("%-14s %10.4f %8.3f %10.4f %8.3f  %s" % (name, m["wall"], m["wall"] / base["wall"], m["cpu"],
                                                      m["cpu"] / base["cpu"], note))
    if all(n in med for n in LADDER):
        print("\nshares of plain's step (CPU time; rung minus the rung below):")
        for feat, hi, lo in SHARES:
            sh = {k: (med[hi][k] - med[lo][k]) / base[k] for k in ("wall", "cpu")}
            res["shares"][feat] = sh
            print("  %-13s cpu %+.3f  wall %+.3f" % (feat, sh["cpu"], sh["wall"]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
