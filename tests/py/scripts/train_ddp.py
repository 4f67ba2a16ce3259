# Two ranks under torchrun with gloo: each rank steps 3 times.
import gc

import torch
import torch.distributed as dist

torch.set_num_threads(1)
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    opt.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
dist.barrier()
# torch 2.13 + gloo: a DDP model still alive at destroy_process_group aborts the process about
# one run in three ("terminate called without an active exception", SIGABRT), with or without
# safehook; freeing the model first avoids it (8/8 runs).
del model, opt
gc.collect()
dist.destroy_process_group()
