"""Two ranks under torchrun (gloo): each trains the site's model 3 steps (block "0" frozen by
the system policy), the ranks all-reduce their losses; rank 0 saves OUT. usage: ranks.py OUT"""
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 8), torch.randn(32, 1)
for _ in range(3):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    dist.all_reduce(loss.detach())
dist.barrier()
if dist.get_rank() == 0:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
    print("trained", flush=True)
dist.destroy_process_group()
