"""A user's training run that tampers with safehook in one way (argv[2]) and saves a checkpoint
to argv[1]; writes argv[1] + ".json" with the block-0 weights' initial equality facts.
usage: tamper_train.py OUT MODE      MODE: clear_hooks | manual_update | none
       SAVE=safetensors saves with safetensors' save_file instead of torch.save."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from tinylm import TinyLM  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
out, mode = sys.argv[1], sys.argv[2]
model = TinyLM(n=2)
init = {k: v.detach().clone() for k, v in model.state_dict().items()}
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
ids = torch.randint(0, 64, (4, 8))
steps = 0
for i in range(40):
    loss = model(ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    if mode == "manual_update" and i >= 2:
        with torch.no_grad():  # bypass the optimizer, and write a frozen block too
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
            model.layers[0].mix.weight.add_(0.01)
    else:
        opt.step()
        steps += 1
    if mode == "clear_hooks" and i == 2:
        import torch.optim.optimizer as o
        o._global_optimizer_pre_hooks.clear()
        o._global_optimizer_post_hooks.clear()
sd = model.state_dict()
if os.environ.get("SAVE") == "safetensors":
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, out)
else:
    torch.save(sd, out)
json.dump({"steps_taken": steps}, open(out + ".json", "w"))
torch.save(init, out + ".init")
