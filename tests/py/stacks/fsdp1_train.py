"""FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel) on 2 gloo ranks under an enforced
system policy (argv[1], installed with safehook.install() as a server's site hook would:
boot._SYSTEM_PATH points at it). argv[2]: "flat" (use_orig_params=False: FlatParameters) or
"orig" (use_orig_params=True: views of the flat shards). The first optimizer step must refuse;
result_R.pt: the error text, and whether the weights stayed as they were."""
import sys

import safehook
from safehook.runtime import boot

boot._SYSTEM_PATH = sys.argv[1]
safehook.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: E402

import stacknet  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
model = stacknet.make()
fsdp = FSDP(model, use_orig_params=sys.argv[2] == "orig", device_id=torch.device("cpu"))
opt = torch.optim.SGD(fsdp.parameters(), lr=stacknet.LR)
before = [p.detach().clone() for p in fsdp.parameters()]
x, y = stacknet.batches(1)[0]
torch.nn.functional.mse_loss(fsdp(x), y).backward()
error = None
try:
    opt.step()
except safehook.PolicyError as e:
    error = str(e)
same = all(torch.equal(a, p.detach()) for a, p in zip(before, fsdp.parameters()))
stacknet.save(stacknet.out_path("result_%d.pt" % rank), error=error, same=same)
dist.barrier()
dist.destroy_process_group()
