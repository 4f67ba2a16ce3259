"""Per-step overhead of SafeGrad (probe source) relative to plain SFT, measured side by side in
one run: a small LlamaForCausalLM trained with AdamW, the configurations interleaved in rounds
(plain: safehook not installed; probe with refresh_every 1, 10, 50; anchor for comparison; the
gate alone; SafeGrad and the gate together, once with one safety gradient per feature, as before
safehook.probes.gradient, and once sharing the step's one safety gradient), each timed over
--steps optimizer steps (forward, backward, step), so refresh_every 50 pays one refresh per
window. Prints ms/step and the ratio to plain (best round of --rounds), by the wall clock and by the
process's CPU time (the steady figure on a shared machine).

    python bench/safegrad_overhead.py [--layers 8] [--hidden 128] [--steps 50] [--rounds 2] [--threads 1]
                                      [--safety-steps N]   (also: what refresh_every does to safety)
"""
import argparse
import json
import os
import tempfile
import time

import torch

import safehook
from safehook.probes import gradient


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--probe-rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--safety-steps", type=int, default=0,
                    help="also train each configuration this many steps from the same start on a task that "
                         "answers the probe's prompts differently, and print the probe loss it ends with")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared machine, spinning OpenMP threads distort every figure)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=max(1, a.hidden // 32), num_key_value_heads=max(1, a.hidden // 32),
        max_position_embeddings=max(128, a.seq)))
    nparams = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen)
        batches.append(ids)

    tmp = tempfile.mkdtemp(prefix="sg-bench-")
    probe = os.path.join(tmp, "probe.jsonl")
    prompts = []
    with open(probe, "w") as f:
        for _ in range(a.probe_rows):
            prompt = torch.randint(0, a.vocab, (24,), generator=gen).tolist()
            prompts.append(prompt)
            refusal = [1, 2, 3, 4, 5, 6, 7, 8]
            f.write(json.dumps({"input_ids": prompt + refusal, "labels": [-100] * 24 + refusal}) + "\n")

    def policy(gate=False, **sg):
        p = {"version": 1, "probes": {"safety": {"data": probe}}}
        if sg:
            p["safegrad"] = sg
        if gate:
            p["gate"] = {"probe": "safety"}
        return p

    both = policy(gate=True, source="probe", probe="safety")
    configs = [
        ("plain SFT", None),
        ("probe, refresh 1", policy(source="probe", probe="safety", refresh_every=1)),
        ("probe, refresh 10", policy(source="probe", probe="safety", refresh_every=10)),
        ("probe, refresh 50", policy(source="probe", probe="safety", refresh_every=50)),
        ("anchor", policy(source="anchor")),
        ("gate", policy(gate=True)),
        ("probe+gate, 2 grads", both),   # one safety gradient per feature (before)
        ("probe+gate, shared", both),    # the step's one safety gradient (now)
    ]
    unshared = {"probe+gate, 2 grads"}

    def window(n):
        """(wall, CPU) seconds per step: the process's CPU time is what the step costs, much less
        disturbed than the wall clock by other jobs on a shared machine."""
        t, c = time.perf_counter(), time.process_time()
        for i in range(n):
            ids = batches[i % len(batches)]
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        return (time.perf_counter() - t) / n, (time.process_time() - c) / n

    window(3)  # warm up (and let safehook find the model at a first forward)
    best, cpu = {}, {}
    for _ in range(a.rounds):
        for name, pol in configs:
            safehook.uninstall()  # install() over an active install keeps the features it has
            gradient.set_sharing(name not in unshared)
            if pol is not None:
                safehook.install(pol)
            w, c = window(a.steps)
            best[name] = min(best.get(name, 1e9), w)
            cpu[name] = min(cpu.get(name, 1e9), c)
        safehook.uninstall()
        gradient.set_sharing(True)
    if a.safety_steps:
        safety_table(a, model, configs, prompts)
    print("LlamaForCausalLM: %d layers, hidden %d, vocab %d, %.1fM params; batch %dx%d; probe %d rows x 32 tokens; "
          "%d torch threads; %d steps per window, best of %d rounds"
          % (a.layers, a.hidden, a.vocab, nparams / 1e6, a.batch, a.seq, a.probe_rows, torch.get_num_threads(),
             a.steps, a.rounds))
    base, cbase = best["plain SFT"], cpu["plain SFT"]
    print("%-20s %14s %12s %14s %12s" % ("", "wall ms/step", "x plain", "CPU ms/step", "x plain"))
    for name, _ in configs:
        print("%-20s %14.2f %11.2fx %14.2f %11.2fx" % (name, best[name] * 1e3, best[name] / base,
                                                      cpu[name] * 1e3, cpu[name] / cbase))
    print("probe+gate, shared / one gradient per feature: wall %.2f, CPU %.2f"
          % (best["probe+gate, shared"] / best["probe+gate, 2 grads"],
             cpu["probe+gate, shared"] / cpu["probe+gate, 2 grads"]))


def safety_table(a, model, configs, prompts):
    """Each configuration from the same weights and a fresh optimizer: --safety-steps of a task
    that answers the probe's prompts with other tokens (it conflicts with the refusals); then
    the probe loss (cross-entropy on the refusals: lower is safer) and the task loss."""
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([p + [9, 10, 11, 12, 13, 14, 15, 16] for p in prompts])
    labels = ids.clone()
    labels[:, :24] = -100

    def probe_loss():
        with torch.no_grad():
            ref = torch.tensor([p + [1, 2, 3, 4, 5, 6, 7, 8] for p in prompts])
            lab = ref.clone()
            lab[:, :24] = -100
            return float(model(input_ids=ref, labels=lab).loss)

    print("safety after %d steps of a conflicting task (AdamW lr 1e-3, batch %d); probe loss at start %.3f"
          % (a.safety_steps, len(prompts), probe_loss()))
    for name, pol in configs:
        if "gate" in name:
            continue  # the gate's effect on safety is measured by the demo
        model.load_state_dict(start)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        safehook.uninstall()
        if pol is not None:
            safehook.install(pol)
        for _ in range(a.safety_steps):
            opt.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
        safehook.uninstall()
        with torch.no_grad():
            task = float(model(input_ids=ids, labels=labels).loss)
        print("%-20s probe loss %7.3f   task loss %7.3f" % (name, probe_loss(), task))
    model.load_state_dict(start)


if __name__ == "__main__":
    main()
