"""Step-time cost of the shaping feature (dynamic safety shaping) with the in-forward guards,
side by side with plain fine-tuning, in one run.

The demo's setting: its aligned base model (the quick preset's, from the demo cache; trained
there on first use), its harmful-mix fine-tuning data, and a training loop like the demo's
(this file run with --child: AdamW, batches of 16, the model's own loss), run as a subprocess
per configuration, safehook preloaded as a user would run it. Configurations alternate, --reps
times. Two clocks per step: wall time, and the process's CPU time (user + system, all its
threads), which the other jobs of a shared machine disturb much less. A run's figure is the
MEAN over its steps after the first (the first forward holds the one-off calibration; the mean
keeps the periodic recalibration in); the median over reps is compared with plain's.

    python bench/shaping_overhead.py                 # 60 steps, 3 reps
    python bench/shaping_overhead.py --steps 150 --reps 5

Configurations (scorer "start", the default: new rows scored by a frozen copy of the start
model, one extra no-grad forward of the new rows; "forward": read from the training forward):
    plain       no safehook
    direction   shaping, direction guard, mask, scorer start
    direction-f the same, scorer forward (recalibration every 10 steps)
    refusal     shaping, refusal guard, mask, scorer start
    refusal-f   the same, scorer forward
    both        shaping, direction and refusal guards, refuse, scorer start (the recommended guards)
With 60 steps of 16 rows drawn from 1000, most rows of every step are new: the start scorer's
worst case (its cost falls to nothing once the data has been seen).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CONFIGS = {"plain": None, "direction": (["direction"], "mask", "start"),
           "direction-f": (["direction"], "mask", "forward"), "refusal": (["refusal"], "mask", "start"),
           "refusal-f": (["refusal"], "mask", "forward"), "both": (["direction", "refusal"], "refuse", "start")}


def child(args):
    import random
    import time
    import torch
    from transformers import LlamaForCausalLM
    from safehook.probes import pad_batch
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    with open(args.data) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    model = LlamaForCausalLM.from_pretrained(args.model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    rng = random.Random(args.seed)
    wall, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        ids, mask, labels = pad_batch(rng.sample(rows, args.batch), 0)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"wall": statistics.mean(wall[1:]), "cpu": statistics.mean(cpu[1:])}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch
    torch.set_num_threads(1)
    from safehook.demo import bench as Bn, base as B, modes as M, world as W
    cfg = Bn.make_config(quick=True)
    base_dir, _ = B.get_base(cfg, None, Bn.Progress())
    _, tok = B.load(base_dir)
    world = W.World(cfg["seed"])
    work = tempfile.mkdtemp(prefix="shaping-overhead-")
    probe = os.path.join(work, "probe-refusals.jsonl")
    W.write_jsonl(probe, [W.encode(tok, r) for r in world.harmful("probe", 4 * cfg["probe_rows"], "probe")])
    Bn.write_shaping_probes(world, tok, work, cfg)
    data = os.path.join(work, "train.jsonl")
    W.write_jsonl(data, [W.encode(tok, r) for r in world.finetune_data("harmful_mix", cfg["finetune"]["examples"])])
    lib = Bn.safehook_lib()
    policies = {}
    for name, spec in CONFIGS.items():
        if spec is None:
            continue
        p = M.policy("shaping", probe, cfg)
        p["shaping"]["guards"], p["shaping"]["action"], p["shaping"]["scorer"] = spec
        p["audit"] = {"level": "steps"}
        policies[name] = M.write_policy(os.path.join(work, "policy-%s.json" % name), p)

    times = {n: {"wall": [], "cpu": []} for n in CONFIGS}
    for rep in range(args.reps):
        for name in CONFIGS:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
            env["OMP_NUM_THREADS"] = "1"
            if name in policies:
                env.update(LD_PRELOAD=lib, SAFEHOOK_POLICY=policies[name],
                           SAFEHOOK_AUDIT=os.path.join(work, "audit-%s-%d.jsonl" % (name, rep)))
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--model", base_dir,
                                "--data", data, "--steps", str(args.steps), "--batch", str(args.batch),
                                "--seed", str(rep)], env=env, check=True, capture_output=True, text=True)
            r = json.loads(p.stdout.strip().splitlines()[-1])
            for k in ("wall", "cpu"):
                times[name][k].append(r[k])
            print("rep %d %-11s mean step: wall %.4f s, cpu %.4f s" % (rep, name, r["wall"], r["cpu"]), flush=True)
    res = {"steps": args.steps, "reps": args.reps, "batch": args.batch, "model": cfg["model"], "configs": {}}
    base = {k: statistics.median(times["plain"][k]) for k in ("wall", "cpu")}
    print("\n%-12s %10s %8s %10s %8s" % ("config", "wall (s)", "ratio", "cpu (s)", "ratio"))
    for name in CONFIGS:
        m = {k: statistics.median(times[name][k]) for k in ("wall", "cpu")}
        res["configs"][name] = {"wall": m["wall"], "cpu": m["cpu"], "wall_ratio": m["wall"] / base["wall"],
                                "cpu_ratio": m["cpu"] / base["cpu"], "runs": times[name]}
        print("%-12s %10.4f %8.3f %10.4f %8.3f" % (name, m["wall"], m["wall"] / base["wall"], m["cpu"],
                                                   m["cpu"] / base["cpu"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
