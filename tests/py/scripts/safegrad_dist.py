"""The same SafeGrad training three ways, for the distributed test: one process with the whole
batch ("single"), two DDP ranks with half each ("ddp"), two FSDP2 ranks ("fsdp", fully_shard on
CPU with gloo). Each writes the final full weights to argv[3] (rank 0).

argv: MODE PROBE_JSONL OUT [STEPS]"""
import sys

import torch

from tinylm import TinyLM

torch.set_num_threads(1)
mode, probe_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
rank, world = 0, 1
if mode != "single":
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)
model = TinyLM()
if mode == "ddp":
    model = torch.nn.parallel.DistributedDataParallel(model)
elif mode == "fsdp":
    from torch.distributed.fsdp import fully_shard
    for b in model.layers:
        fully_shard(b)
    fully_shard(model)
opt = torch.optim.SGD(model.parameters(), lr=1.0)

gen = torch.Generator().manual_seed(1)
for step in range(steps):
    prompts = torch.randint(4, 40, (8, 6), generator=gen)
    ids = torch.cat([prompts, torch.randint(56, 64, (8, 4), generator=gen)], 1)
    labels = ids.clone()
    labels[:, :6] = -100
    lo, hi = rank * 8 // world, (rank + 1) * 8 // world  # equal halves: mean of means = the mean
    opt.zero_grad()
    model(input_ids=ids[lo:hi], attention_mask=torch.ones_like(ids[lo:hi]), labels=labels[lo:hi]).loss.backward()
    opt.step()

state = {}
for n, p in model.named_parameters():
    t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
    state[n.replace("module.", "", 1) if mode == "ddp" else n] = t.detach().clone()
if rank == 0:
    torch.save(state, out)
if mode != "single":
    dist.barrier()
    dist.destroy_process_group()
print("done", mode, rank)
