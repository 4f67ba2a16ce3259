"""install() / uninstall() / install() in one process (no preload): what a freeze did is undone
by uninstall(), a second policy replaces the first one's freeze, and no global module hook or
optimizer wrapper stays behind. Asserts; prints ok."""
import torch

import safehook
import stacknet

torch.set_num_threads(1)
hooks = torch.nn.modules.module._global_forward_pre_hooks
init_fn = torch.optim.Optimizer.__init__
model = stacknet.make()
data = stacknet.batches(2)


def train(opt):
    for b in data:
        opt.zero_grad()
        stacknet.loss_fn(model, b).backward()
        opt.step()


def frozen_blocks():
    return [i for i, blk in enumerate(model.layers) if not any(p.requires_grad for p in blk.parameters())]


safehook.install({"version": 1, "freeze": {"layers": "1-2"}})
train(torch.optim.SGD(model.parameters(), lr=0.1))
assert frozen_blocks() == [1, 2], frozen_blocks()
assert len(hooks) == 0, "forward hook left after the model was bound"
safehook.uninstall()
assert frozen_blocks() == [], "uninstall() left blocks frozen: %s" % frozen_blocks()
assert len(hooks) == 0
assert torch.optim.Optimizer.__init__ is init_fn, "uninstall() left Optimizer.__init__ wrapped"
before = [p.detach().clone() for p in model.layers[1].parameters()]
train(torch.optim.SGD(model.parameters(), lr=0.1))
assert not all(torch.equal(a, p) for a, p in zip(before, model.layers[1].parameters())), "uninstalled, still frozen"

safehook.install({"version": 1, "freeze": {"layers": "1-2"}})
safehook.install({"version": 1, "freeze": {"layers": "0"}})
train(torch.optim.SGD(model.parameters(), lr=0.1))
assert frozen_blocks() == [0], "a second install() kept the first policy's freeze: %s" % frozen_blocks()
safehook.uninstall()
assert frozen_blocks() == [] and len(hooks) == 0
print("ok")
