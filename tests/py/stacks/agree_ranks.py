"""Two gloo ranks (torchrun, no preload): one decision for all ranks. rt.agree reduces each op;
SafeGrad's projection of replicated gradients (DDP) whose numbers differ in the last bits across
ranks, with a cosine near 0, projects or not on both ranks alike. Asserts; rank 0 prints ok."""
import torch
import torch.distributed as dist

from safehook import project
from safehook.runtime.context import agree

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
assert agree(float(rank), "max") == 1.0 and agree(float(rank), "min") == 0.0
assert agree(float(rank + 1), "sum") == 3.0 and agree(float(rank + 1), "mean") == 1.5
assert agree(rank == 1, "any") is True and agree(rank == 1, "all") is False
assert agree([rank, 2.0], "max") == [1.0, 2.0]

# s . g changes sign between the ranks: alone, rank 0 projects and rank 1 does not
s = torch.zeros(64)
s[0] = 1.0
g = torch.linspace(-1, 1, 64)
g[0] = -1e-4 if rank == 0 else 1e-4
alone = project([g.clone()], [s], "global")["projected"]
assert alone == (rank == 0), alone
gg = g.clone()
res = project([gg], [s], "global", process_group=dist.group.WORLD, replicated=True)
both = [None, None]
dist.all_gather_object(both, (res["projected"], res["coef"]))
assert both[0] == both[1], both
dist.destroy_process_group()
if rank == 0:
    print("ok")
