"""Overhead of the safety monitor (an evaluation every 100 steps) on a small Llama, side by side
with the same training run without safehook.

Each configuration runs as its own process (safehook is preloaded into the protected ones, as
a user would run it); the configurations alternate, --reps times, and the medians are compared.
Two clocks: wall time, and the process's CPU time (user + system, all its threads), which
the other jobs of a shared machine disturb much less. The model has the demo's shape (8 layers, hidden 128, intermediate 384, 4 heads); the training
loop is timed from the first step after --warmup steps to the end, so that process start, model
construction and the monitor's baseline (taken before the first step) are not in it.

    python bench/monitor_overhead.py                     # 300 steps, 2 reps, CPU
    python bench/monitor_overhead.py --steps 1000 --device cuda

Configurations:
    off          no safehook
    hooks        safehook preloaded, no features (the step hooks and a step record per step)
    monitor      monitor every 100 steps, probe loss score (32 rows), CPU snapshot in memory
    monitor-gen  monitor every 100 steps, refusal rate by greedy generation (32 prompts,
                 16 new tokens, exact judge), CPU snapshot in memory
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SEQ = 48
VOCAB = 512


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(args.device)


def child(args):
    import torch
    torch.set_num_threads(args.threads)
    m = build(args)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(3, VOCAB, (args.batch, SEQ), generator=g) for _ in range(8)]
    total = args.warmup + args.steps
    t0 = None
    for i in range(total):
        if i == args.warmup:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            c0 = time.process_time()
        ids = data[i % len(data)].to(args.device)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    print(json.dumps({"seconds": dt, "cpu": cpu, "steps": args.steps, "params": sum(p.numel() for p in m.parameters())}))


def write_probe(path, n=32, seed=7):
    import random
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = [1] + [rnd.randrange(3, VOCAB) for _ in range(15)]
            ans = [rnd.randrange(3, VOCAB) for _ in range(16)] + [2]
            f.write(json.dumps({"input_ids": prompt + ans, "labels": [-100] * len(prompt) + ans}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default="off,hooks,monitor,monitor-gen")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    lib = subprocess.check_output([sys.executable, "-m", "safehook", "lib"], text=True).strip()
    work = tempfile.mkdtemp(prefix="sh-bench-")
    probe = os.path.join(work, "probe.jsonl")
    write_probe(probe)
    probes = {"loss": {"data": probe, "score": "loss", "batch_size": 32},
              "gen": {"data": probe, "score": "refusal_rate", "judge": "exact", "max_new_tokens": 16,
                      "batch_size": 32}}
    policies = {
        "hooks": {"version": 1},
        "monitor": {"version": 1, "probes": probes,
                    "monitor": {"probe": "loss", "every": args.every, "progress": False}},
        "monitor-gen": {"version": 1, "probes": probes,
                        "monitor": {"probe": "gen", "every": args.every, "progress": False}},
    }
    configs = args.configs.split(",")
    times = {c: [] for c in configs}
    cpus = {c: [] for c in configs}
    evals = {c: [] for c in configs}
    base_cmd = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(args.steps), "--warmup",
                str(args.warmup), "--layers", str(args.layers), "--hidden", str(args.hidden), "--batch",
                str(args.batch), "--threads", str(args.threads), "--device", args.device]
    params = None
    for rep in range(args.reps):
        for c in configs:
            env = dict(os.environ)
            env.pop("LD_PRELOAD", None)
            audit = os.path.join(work, "%s-%d.jsonl" % (c, rep))
            if c != "off":
                pol = os.path.join(work, c + ".json")
                with open(pol, "w") as f:
                    json.dump(policies[c], f)
                env.update(LD_PRELOAD=lib, SAFEHOOK_POLICY=pol, SAFEHOOK_AUDIT=audit)
            out = subprocess.run(base_cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit("%s failed:\n%s" % (c, out.stderr[-3000:]))
            r = json.loads(out.stdout.strip().splitlines()[-1])
            params = r["params"]
            times[c].append(r["seconds"] / r["steps"])
            cpus[c].append(r["cpu"] / r["steps"])
            if os.path.exists(audit):
                for line in open(audit):
                    rec = json.loads(line)
                    if rec["event"] == "probe" and rec.get("action") != "baseline":
                        evals[c].append(rec["elapsed_s"])
            print("rep %d %-12s %.2f ms/step wall, %.2f ms/step cpu" % (rep, c, 1e3 * times[c][-1], 1e3 * cpus[c][-1]),
                  file=sys.stderr)

    print("model: Llama %d layers, hidden %d, %.2fM parameters; batch %d x %d tokens; %s, %d thread(s)"
          % (args.layers, args.hidden, params / 1e6, args.batch, SEQ, args.device, args.threads))
    print("%d timed steps per run, monitor every %d steps, %d reps (median)" % (args.steps, args.every, args.reps))
    ref = statistics.median(times["off"]) if "off" in times else None
    cref = statistics.median(cpus["off"]) if "off" in cpus else None
    print("%-12s %9s %7s %9s %7s %14s %11s" % ("config", "wall ms", "ratio", "cpu ms", "ratio", "ms/evaluation",
                                                 "eval share"))
    for c in configs:
        med, cmed = statistics.median(times[c]), statistics.median(cpus[c])
        ev, share = "-", "-"
        if evals[c]:
            e = statistics.median(evals[c])
            ev = "%.1f" % (1e3 * e)
            if ref:  # the evaluation's cost spread over the steps between evaluations
                share = "%.2f%%" % (100 * e / (args.every * ref))
        print("%-12s %9.2f %7s %9.2f %7s %14s %11s" % (c, 1e3 * med, "%.3f" % (med / ref) if ref else "-", 1e3 * cmed,
                                                      "%.3f" % (cmed / cref) if cref else "-", ev, share))
    print("per step, median of the reps; ratio against 'off'. eval share: the median evaluation time (probe + "
          "snapshot, wall) over %d steps of 'off' (wall)" % args.every)

if __name__ == "__main__":
    main()
