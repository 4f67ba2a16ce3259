"""Two gloo ranks on CPU under torchrun: argv[1] "ddp" (DistributedDataParallel) or "fsdp2"
(fully_shard on each block and the root), argv[2] steps. Each rank trains on its half of every
batch with SGD; the result of rank R goes to result_R.pt: its full weights (DTensors gathered),
the initial weights, and (rank 0) the single-process float64 reference on whole batches."""
import copy
import sys

import torch
import torch.distributed as dist

import stacknet

torch.set_num_threads(1)
mode, steps = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
rank, n = dist.get_rank(), dist.get_world_size()
model = stacknet.make()
ref_model = copy.deepcopy(model)
init = stacknet.weights(model)
data = stacknet.batches(steps)
if mode == "ddp":
    from torch.nn.parallel import DistributedDataParallel
    wrapped = DistributedDataParallel(model)
else:
    from torch.distributed.fsdp import fully_shard
    for blk in model.layers:
        fully_shard(blk)
    fully_shard(model)
    wrapped = model
opt = torch.optim.SGD(wrapped.parameters(), lr=stacknet.LR)
for x, y in data:
    half = x.shape[0] // n
    part = (x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    opt.zero_grad()
    stacknet.loss_fn(wrapped, part).backward()
    opt.step()
final = {}
for name, p in model.named_parameters():
    t = p.full_tensor() if hasattr(p, "full_tensor") else p
    final[stacknet.strip(name)] = t.detach().clone()
ref = stacknet.reference(ref_model, data) if rank == 0 else {}
stacknet.save(stacknet.out_path("result_%d.pt" % rank), final=final, init=init, ref=ref)
dist.barrier()
dist.destroy_process_group()
