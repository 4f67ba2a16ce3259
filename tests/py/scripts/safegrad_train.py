"""A small training run for the safegrad tests, under LD_PRELOAD with a safegrad policy. It
recomputes, independently of safehook, what each step should have done (the safety gradient,
the float64 projection, the SGD update) and prints one RESULT line per step.

argv[1]: JSON config: model ("lm": a tiny causal LM with an HF-like forward | "mlp"), source
("probe" | "direction" | "anchor", for the reference), probe (JSONL path), direction
(safetensors path), and cases: a list of {dtype, steps, lr, amp ("none" | "scaler" | "fused"),
accum, clip}, run one after the other on the same model (reset to its initial weights) with a
new SGD optimizer each (so the audit log tells them apart by "opt")."""
import copy
import json
import math
import sys

import torch
import torch.nn as nn

from tinylm import TinyLM, rows_batch

torch.set_num_threads(1)
cfg = json.loads(sys.argv[1])
torch.manual_seed(cfg.get("seed", 0))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


gen = torch.Generator().manual_seed(1)
if cfg["model"] == "lm":
    model = TinyLM()
    task = []
    for _ in range(4):
        prompts = torch.randint(4, 40, (8, 6), generator=gen)
        ids = torch.cat([prompts, torch.randint(56, 64, (8, 4), generator=gen)], 1)
        labels = ids.clone()
        labels[:, :6] = -100
        task.append((ids, torch.ones_like(ids), labels))

    def task_loss(m, b):
        return m(input_ids=b[0], attention_mask=b[1], labels=b[2]).loss

    with open(cfg["probe"]) as f:
        probe_batch = rows_batch([json.loads(l) for l in f if l.strip()])

    def safety_loss(m):
        return m(input_ids=probe_batch[0], attention_mask=probe_batch[1], labels=probe_batch[2]).loss
else:
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    task = [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(4)]

    def task_loss(m, b):
        dt = next(m.parameters()).dtype
        return nn.functional.mse_loss(m(b[0].to(dt)).float(), b[1])

    safety_loss = None

params = list(model.parameters())
names = [n for n, _ in model.named_parameters()]
init = [p.detach().clone() for p in params]
direction = None
if cfg["source"] == "direction":
    from safetensors.torch import load_file
    direction = load_file(cfg["direction"])


def reference_safety(w0):
    if cfg["source"] == "anchor":
        return [p.detach().double() - a.double() for p, a in zip(params, w0)]
    if cfg["source"] == "direction":
        return [-direction[n].double() if n in direction else torch.zeros(p.shape, dtype=torch.float64)
                for n, p in zip(names, params)]
    m = copy.deepcopy(model).eval()
    gs = torch.autograd.grad(safety_loss(m), list(m.parameters()), allow_unused=True)
    return [torch.zeros(p.shape, dtype=torch.float64) if g is None else g.double() for g, p in zip(gs, params)]


def loss_at(weights):
    if safety_loss is None:
        return None
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p, w in zip(m.parameters(), weights):
            p.copy_(w)
        return float(safety_loss(m))


def run_case(ci, case):
    dt = DTYPES[case.get("dtype", "float32")]
    with torch.no_grad():
        for p, w in zip(params, init):
            p.data = w.to(dt).clone()  # same Parameter objects, so safehook's names still hold
    # the first forward lets safehook find the model (and snapshot the anchor) before any update
    with torch.no_grad():
        task_loss(model, task[0])
    w0 = [p.detach().clone() for p in params]
    lr = case.get("lr", 0.1)
    fused = case.get("amp") == "fused"
    opt = torch.optim.SGD(params, lr=lr, fused=True) if fused else torch.optim.SGD(params, lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if case.get("amp", "none") != "none" else None
    accum = case.get("accum", 1)
    keep.append(opt)  # alive, so that each case's optimizer gets its own index in the audit log
    for step in range(1, case.get("steps", 3) + 1):
        opt.zero_grad()
        for k in range(accum):
            loss = task_loss(model, task[(step * accum + k) % len(task)]) / accum
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler and (not fused or case.get("clip")):
            scaler.unscale_(opt)  # clipping needs unscaled gradients, fused or not
        if case.get("clip"):
            torch.nn.utils.clip_grad_norm_(params, case["clip"])
        scale = float(scaler.get_scale()) if (scaler and fused and not case.get("clip")) else 1.0
        before = [p.detach().clone() for p in params]
        g = [p.grad.double() / scale for p in params]
        s = reference_safety(w0)
        gs = sum(float((a * b).sum()) for a, b in zip(g, s))
        ss = sum(float((b * b).sum()) for b in s)
        gg = sum(float((a * a).sum()) for a in g)
        cos = gs / math.sqrt(gg * ss) if gg > 0 and ss > 0 else None
        proj = cos is not None and cos < case.get("threshold", 0.0) - 1e-6
        gp = [a - gs / ss * b for a, b in zip(g, s)] if proj else g
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        want = [w.double() - lr * x for w, x in zip(before, gp)]
        plain = [w.double() - lr * x for w, x in zip(before, g)]
        print("RESULT " + json.dumps({
            "case": ci, "step": step, "cos": cos, "projected": proj, "norm_task": math.sqrt(gg),
            "norm_safety": math.sqrt(ss),
            "err": max(float((p.detach().double() - w).abs().max()) for p, w in zip(params, want)),
            "err_plain": max(float((p.detach().double() - w).abs().max()) for p, w in zip(params, plain)),
            "update": max(float((lr * x).abs().max()) for x in gp),
            "ls_before": loss_at(before), "ls_after": loss_at([p.detach() for p in params]),
            "ls_plain": loss_at([w.to(dt) for w in plain])}), flush=True)


keep = []
for i, c in enumerate(cfg["cases"]):
    run_case(i, c)
