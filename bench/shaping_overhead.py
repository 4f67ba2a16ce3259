"""Step-time cost of the shaping feature (dynamic safety shaping) with the in-forward guards,
side by side with plain fine-tuning, in one run.

The demo's setting: its aligned base model (the quick preset's, from the demo cache; trained
there on first use), its harmful-mix fine-tuning data, its training script
(safehook/demo/scripts/finetune.py, a plain PyTorch loop), run as a subprocess per
configuration, safehook preloaded as a user would run it. Configurations alternate, --reps
times; a run's step time is the MEAN over its steps after the first (the first forward holds
the one-off calibration; the mean keeps the periodic recalibration in), and the median over
reps is compared with plain's.

    python bench/shaping_overhead.py                 # 60 steps, 3 reps
    python bench/shaping_overhead.py --steps 150 --reps 5

Configurations:
    plain       no safehook
    direction   shaping, direction guard, mask (recalibration every 10 steps)
    refusal     shaping, refusal guard, mask
    both        shaping, direction and refusal guards, refuse (the recommended guards)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CONFIGS = {"plain": None, "direction": (["direction"], "mask"), "refusal": (["refusal"], "mask"),
           "both": (["direction", "refusal"], "refuse")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

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
        p["shaping"]["guards"], p["shaping"]["action"] = spec
        p["audit"] = {"level": "steps"}
        policies[name] = M.write_policy(os.path.join(work, "policy-%s.json" % name), p)

    times = {n: [] for n in CONFIGS}
    for rep in range(args.reps):
        for name in CONFIGS:
            out = os.path.join(work, "out-%s-%d" % (name, rep))
            env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
            env["OMP_NUM_THREADS"] = "1"
            if name in policies:
                env.update(LD_PRELOAD=lib, SAFEHOOK_POLICY=policies[name],
                           SAFEHOOK_AUDIT=os.path.join(work, "audit-%s-%d.jsonl" % (name, rep)))
            subprocess.run([sys.executable, Bn.FINETUNE, "--model", base_dir, "--data", data, "--out", out,
                            "--steps", str(args.steps), "--lr", str(cfg["finetune"]["lr"]),
                            "--batch", str(args.batch), "--seed", str(rep), "--threads", "1"],
                           env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            with open(os.path.join(out, "stats.json")) as f:
                st = json.load(f)["step_seconds"][1:]
            times[name].append(statistics.mean(st))
            print("rep %d %-9s mean step %.4f s" % (rep, name, times[name][-1]), flush=True)
    plain = statistics.median(times["plain"])
    res = {"steps": args.steps, "reps": args.reps, "batch": args.batch, "model": cfg["model"], "configs": {}}
    print("\n%-10s %12s %8s" % ("config", "step (s)", "ratio"))
    for name in CONFIGS:
        m = statistics.median(times[name])
        res["configs"][name] = {"step_seconds": m, "ratio": m / plain, "runs": times[name]}
        print("%-10s %12.4f %8.3f" % (name, m, m / plain))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
