"""The cached safety signal under DDP (2 gloo ranks): SafeGrad with a cached subspace refreshed
every few steps or on drift, and the gate on the same probe. Each rank reads its OWN probe file
(argv[1] with {rank} in it; the files differ), as ranks whose probe gradients differ in their
bits would: every rank must still hold rank 0's directions and take the same decisions, so the
replicas stay identical. Writes, per rank, the cached directions at the end and the final
weights to argv[2] with {rank} in it.

argv: PROBE_PATTERN OUT_PATTERN STEPS"""
import sys

import torch
import torch.distributed as dist

from tinylm import TinyLM

import safehook
from safehook.probes import gradient
from safehook.runtime import boot

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
probe, out, steps = sys.argv[1].format(rank=rank), sys.argv[2].format(rank=rank), int(sys.argv[3])
safehook.install({"version": 1, "probes": {"safety": {"data": probe, "batch_size": 4}},
                  "safegrad": {"source": "probe", "probe": "safety", "refresh_every": 3, "directions": 2,
                               "refresh_drift": 0.02, "drift_rows": 4},
                  "gate": {"probe": "safety", "ratio": 0.0},
                  "audit": {"level": "steps"}})
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(TinyLM())
opt = torch.optim.AdamW(model.parameters(), lr=0.003)
gen = torch.Generator().manual_seed(1)
for step in range(steps):
    prompts = torch.randint(4, 40, (8, 6), generator=gen)
    ids = torch.cat([prompts, torch.randint(56, 64, (8, 4), generator=gen)], 1)  # not the refusal
    labels = ids.clone()
    labels[:, :6] = -100
    lo, hi = rank * 4, rank * 4 + 4
    opt.zero_grad()
    model(input_ids=ids[lo:hi], attention_mask=torch.ones_like(ids[lo:hi]), labels=labels[lo:hi]).loss.backward()
    opt.step()

names = {id(p): n.replace("module.", "", 1) for n, p in model.named_parameters()}
sig = next(iter(gradient.of(boot.runtime()).signals.values()))
res = {"dirs": [{names[i]: g.clone() for i, (p, g) in d.items()} for d in sig.dirs],
       "grads": {names[i]: g.clone() for i, (p, g) in sig.grads.items()},
       "final": {names[id(p)]: p.detach().clone() for p in model.parameters()},
       "counts": dict(sig.counts)}
torch.save(res, out)
dist.barrier()
dist.destroy_process_group()
print("done", rank)
