"""Shared parts of the stack tests: a tiny model with a block list (4 blocks, freeze "1-2"), its
data, a float64 single-process reference of freeze + SafeGrad (anchor, global) with plain SGD,
and the result file each script writes for its test."""
import json
import os

import torch
import torch.nn as nn

FROZEN = (1, 2)
LR = 0.05


class Net(nn.Module):
    def __init__(self, h=16, n=4):
        super().__init__()
        self.inp = nn.Linear(8, h)
        self.layers = nn.ModuleList([nn.Linear(h, h) for _ in range(n)])
        self.out = nn.Linear(h, 4)

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.out(x)


def make(seed=0):
    torch.manual_seed(seed)
    return Net()


def batches(n, seed=1, bs=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 8, generator=g), torch.randn(bs, 4, generator=g)) for _ in range(n)]


def loss_fn(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def is_frozen(name):
    return any(name.startswith("layers.%d." % i) for i in FROZEN)


def reference(model, data, lr=LR, project=True):
    """Train MODEL (a fresh copy, never seen by an optimizer) with plain SGD on DATA as freeze
    "1-2" + SafeGrad (anchor, global, threshold 0) should: float64 projection of the fresh
    gradient against w - w0 over the trainable parameters. Returns {name: tensor}."""
    named = [(n, p) for n, p in model.named_parameters() if not is_frozen(n)]
    ps = [p for _, p in named]
    w0 = [p.detach().double().clone() for p in ps]
    for b in data:
        gs = torch.autograd.grad(loss_fn(model, b), ps)
        g = torch.cat([x.double().reshape(-1) for x in gs])
        s = torch.cat([(p.detach().double() - a).reshape(-1) for p, a in zip(ps, w0)])
        if project and float(s @ s) > 0 and float(g @ s) < 0:
            g = g - (g @ s) / (s @ s) * s
        off = 0
        with torch.no_grad():
            for p in ps:
                k = p.numel()
                p.sub_((lr * g[off:off + k]).view_as(p).to(p.dtype))
                off += k
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def save(path, **tensors_and_values):
    """torch.save a dict (weights etc.) for the test to read."""
    torch.save(tensors_and_values, path)


def out_path(name="result.pt"):
    return os.path.join(os.environ.get("STACK_OUT", "."), name)


def policy(path, safegrad=True, layers="1-2", **extra):
    p = {"version": 1, "freeze": {"layers": layers, "check_every": 1}, "on_error": "abort"}
    if safegrad:
        p["safegrad"] = {"source": "anchor", "granularity": "global"}
    p.update(extra)
    with open(path, "w") as f:
        json.dump(p, f)
    return path


def strip(name):
    """A parameter name without wrapper prefixes (DDP's module.)."""
    return name[len("module."):] if name.startswith("module.") else name


def probe_loss(model):
    """A callable probe ("stacknet:probe_loss"): the loss on a fixed batch the task never sees."""
    x, y = batches(1, seed=7)[0]
    return nn.functional.mse_loss(model(x), y)
