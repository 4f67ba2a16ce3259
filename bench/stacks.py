"""Per training stack, the step time with SafeGrad (source anchor, and source probe) against the
same stack without safehook, measured side by side in one run (the variants interleaved round by
round; the best round of each is kept). Each measurement is its own process: without safehook
(no preload), or under LD_PRELOAD with SafeGrad alone (global granularity; no freeze, which
would save backward work and flatter the ratio). A step is forward,
backward and optimizer step of a 4-block MLP (--hidden wide) on a batch of --batch.

Stacks: plain (loss.backward(); opt.step()), closure (opt.step(closure)), ddp (torchrun, 2 gloo
ranks), lightning (automatic optimization, when installed).

    python bench/stacks.py [--hidden 512] [--steps 30] [--rounds 2] [--stacks plain,closure,ddp,lightning]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- the worker: one stack, one variant, prints {"ms": median ms per step} ----

def _worker(stack, hidden, steps, batch):
    import torch
    import torch.nn as nn
    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(64, hidden)
            self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(4)])
            self.out = nn.Linear(hidden, 8)

        def forward(self, x):
            x = torch.tanh(self.inp(x))
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return self.out(x)

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, 64, generator=g), torch.randn(batch, 8, generator=g)) for _ in range(steps)]
    times = []
    if stack == "lightning":
        import warnings
        warnings.filterwarnings("ignore")
        import lightning as L
        from torch.utils.data import DataLoader, TensorDataset

        class Timer(L.Callback):
            def on_train_batch_start(self, *a):
                self.t = time.perf_counter()

            def on_train_batch_end(self, *a):
                times.append(time.perf_counter() - self.t)

        class M(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = Net()

            def training_step(self, b, i):
                return nn.functional.mse_loss(self.net(b[0]), b[1])

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3)

        ds = TensorDataset(torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data]))
        L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  callbacks=[Timer()]).fit(M(), DataLoader(ds, batch_size=batch))
    else:
        model = Net()
        wrapped = model
        if stack == "ddp":
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel
            dist.init_process_group("gloo")
            wrapped = DistributedDataParallel(model)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
        for x, y in data:
            t = time.perf_counter()
            if stack == "closure":
                def closure(x=x, y=y):
                    opt.zero_grad()
                    loss = nn.functional.mse_loss(wrapped(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                opt.zero_grad()
                nn.functional.mse_loss(wrapped(x), y).backward()
                opt.step()
            times.append(time.perf_counter() - t)
    times = sorted(times[3:])
    ms = 1000 * times[len(times) // 2]
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps({"ms": ms}))


def probe_loss(model):
    """The probe callable of the 'probe' variant: a fixed regression batch's loss."""
    import torch
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 64, generator=g), torch.randn(8, 8, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


# ---- the driver ----

def _policy(tmp, variant):
    p = {"version": 1, "on_error": "abort"}  # SafeGrad alone: a freeze would save backward work
    if variant == "anchor":
        p["safegrad"] = {"source": "anchor", "granularity": "global"}
    else:
        p["probes"] = {"fixed": {"callable": "stacks:probe_loss"}}
        p["safegrad"] = {"source": "probe", "probe": "fixed", "granularity": "global"}
    path = os.path.join(tmp, variant + ".json")
    with open(path, "w") as f:
        json.dump(p, f)
    return path


def _run(stack, variant, a, tmp):
    import safehook
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=HERE + os.pathsep + env.get("PYTHONPATH", ""))
    if variant != "none":
        env.update(LD_PRELOAD=safehook.lib(), SAFEHOOK_POLICY=_policy(tmp, variant))
    argv = [sys.executable, os.path.abspath(__file__), "--worker", stack, "--hidden", str(a.hidden),
            "--steps", str(a.steps), "--batch", str(a.batch)]
    if stack == "ddp":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + argv[1:]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["ms"]
    raise RuntimeError("%s/%s failed:\n%s" % (stack, variant, p.stderr[-2000:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--stacks", default="plain,closure,ddp,lightning")
    a = ap.parse_args()
    if a.worker:
        return _worker(a.worker, a.hidden, a.steps, a.batch)
    stacks = a.stacks.split(",")
    try:
        import lightning  # noqa: F401
    except ImportError:
        stacks = [s for s in stacks if s != "lightning"]
    variants = ("none", "anchor", "probe")
    best = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            for s in stacks:
                for v in variants:
                    ms = _run(s, v, a, tmp)
                    best[(s, v)] = min(best.get((s, v), ms), ms)
    print("stack      no safehook ms/step   anchor ms (ratio)   probe ms (ratio)")
    for s in stacks:
        base = best[(s, "none")]
        print("%-10s %12.2f %14.2f (%.2fx) %10.2f (%.2fx)" % (
            s, base, best[(s, "anchor")], best[(s, "anchor")] / base, best[(s, "probe")], best[(s, "probe")] / base))
    print(json.dumps({"%s/%s" % k: round(v, 3) for k, v in best.items()}))


if __name__ == "__main__":
    main()
