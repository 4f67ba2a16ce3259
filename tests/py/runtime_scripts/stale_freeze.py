"""install(freeze block 1), train, install(a policy without freeze), train, save a checkpoint to
argv[1]; after uninstall() the live weights go to argv[1].live and the weights at the first
freeze to argv[1].frozen (saved without safehook, so that they are not checkpoints of the run)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "stacks"))
import stacknet  # noqa: E402

import safehook  # noqa: E402

torch.set_num_threads(1)
ck = sys.argv[1]
model = stacknet.make()
data = stacknet.batches(3)


def train(opt):
    for b in data:
        opt.zero_grad()
        stacknet.loss_fn(model, b).backward()
        opt.step()


safehook.install({"version": 1, "freeze": {"layers": "1"}})
opt = torch.optim.SGD(model.parameters(), lr=0.1)
frozen = stacknet.weights(model)
train(opt)
assert all(not p.requires_grad for p in model.layers[1].parameters())
safehook.install({"version": 1})
assert all(p.requires_grad for p in model.layers[1].parameters())
train(opt)
torch.save(model.state_dict(), ck)
live = stacknet.weights(model)
safehook.uninstall()
torch.save(live, ck + ".live")
torch.save(frozen, ck + ".frozen")
