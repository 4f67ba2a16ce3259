"""What the preload costs, measured side by side in one run (alternating, medians, ratios):

1. process start of /bin/true and of `python -c pass`, with and without LD_PRELOAD;
2. the per-step cost of the bare hook path (no features, step records to an audit log, and
   without a log) on a small transformer, against no safehook, in one process.

Usage: python bench/preload.py [--runs N] [--steps N] [--json FILE]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def spawn_times(argv, env, runs):
    out = []
    for _ in range(runs):
        t = time.perf_counter_ns()
        pid = os.posix_spawn(argv[0], argv, env)
        os.waitpid(pid, 0)
        out.append(time.perf_counter_ns() - t)
    return out


def process_start(lib, runs):
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("SAFEHOOK")}
    pre = dict(base, LD_PRELOAD=lib)
    res = {}
    for name, argv in (("/bin/true", ["/bin/true"]), ("python -c pass", [sys.executable, "-c", "pass"])):
        n = runs if name == "/bin/true" else max(20, runs // 10)
        a, b = [], []
        for _ in range(10):  # alternate blocks so that drift hits both sides alike
            a += spawn_times(argv, base, n // 10)
            b += spawn_times(argv, pre, n // 10)
        ma, mb = statistics.median(a), statistics.median(b)
        res[name] = {"runs": len(a), "median_us_plain": ma / 1e3, "median_us_preload": mb / 1e3, "ratio": mb / ma}
    return res


STEP_SCRIPT = r"""
import json, os, statistics, sys, time
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, 512, (8, 32))
def block(n):
    ts = []
    for _ in range(n):
        t = time.perf_counter_ns()
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        ts.append(time.perf_counter_ns() - t)
    return ts
def hook_only(n):
    # the hook path alone: the two hooks exactly as torch calls them, with an empty step
    from safehook import _core
    t = time.perf_counter_ns()
    for _ in range(n):
        _core.pre_step(opt, (), {})
        _core.post_step(opt, (), {})
    return (time.perf_counter_ns() - t) / n
import safehook
steps, reps = int(sys.argv[1]), int(sys.argv[2])
block(5)
res = {"none": [], "hooks": [], "hooks+audit": []}
audit = sys.argv[3]
for r in range(reps):
    res["none"] += block(steps)
    os.environ.pop("SAFEHOOK_AUDIT", None)
    safehook.install({"version": 1}); res["hooks"] += block(steps); safehook.uninstall()
    os.environ["SAFEHOOK_AUDIT"] = audit
    safehook.install({"version": 1, "audit": {"path": audit}}); res["hooks+audit"] += block(steps); safehook.uninstall()
out = {k: statistics.median(v) / 1e3 for k, v in res.items()}
safehook.install({"version": 1, "audit": {"path": audit}})
out["hook_path_us"] = hook_only(20000) / 1e3
print(json.dumps(out))
"""


def per_step(steps, reps):
    with tempfile.TemporaryDirectory() as d:
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("SAFEHOOK")}
        out = subprocess.check_output([sys.executable, "-c", STEP_SCRIPT, str(steps), str(reps),
                                       os.path.join(d, "audit.jsonl")], env=env, text=True)
    r = json.loads(out.strip().splitlines()[-1])
    return {
        "step_us_none": r["none"], "step_us_hooks": r["hooks"], "step_us_hooks_audit": r["hooks+audit"],
        "ratio_hooks": r["hooks"] / r["none"], "ratio_hooks_audit": r["hooks+audit"] / r["none"],
        "hook_path_us_per_step": r["hook_path_us"],
        "hook_path_fraction_of_step": r["hook_path_us"] / r["none"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000, help="process starts per side for /bin/true")
    ap.add_argument("--steps", type=int, default=40, help="steps per block")
    ap.add_argument("--reps", type=int, default=6, help="alternating blocks per side")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    lib = subprocess.check_output([sys.executable, "-m", "safehook", "lib"], text=True).strip()
    res = {"process_start": process_start(lib, a.runs), "per_step": per_step(a.steps, a.reps)}
    print("process start (median of alternating runs)")
    for name, r in res["process_start"].items():
        print("  %-16s plain %8.1f us   preload %8.1f us   ratio %.3f   (%d runs each)"
              % (name, r["median_us_plain"], r["median_us_preload"], r["ratio"], r["runs"]))
    s = res["per_step"]
    print("per optimizer step, 2-layer Llama (hidden 64, batch 8x32), AdamW, 1 thread")
    print("  no safehook %.1f us | hooks %.1f us (ratio %.4f) | hooks + step records %.1f us (ratio %.4f)"
          % (s["step_us_none"], s["step_us_hooks"], s["ratio_hooks"], s["step_us_hooks_audit"], s["ratio_hooks_audit"]))
    print("  the hook path alone: %.2f us per step = %.3f%% of a step"
          % (s["hook_path_us_per_step"], 100 * s["hook_path_fraction_of_step"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
