"""opt.step(closure) under the preload. argv: mode ("positional" | "keyword" | "lbfgs"), steps.
Writes result.pt: the trained weights, the initial weights, and the float64 reference."""
import copy
import sys

import torch

import stacknet

torch.set_num_threads(1)
mode, steps = sys.argv[1], int(sys.argv[2])
model = stacknet.make()
ref_model = copy.deepcopy(model)
init = stacknet.weights(model)
data = stacknet.batches(steps)
if mode == "lbfgs":
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
else:
    opt = torch.optim.SGD(model.parameters(), lr=stacknet.LR)
for b in data:
    def closure(b=b):
        opt.zero_grad()
        loss = stacknet.loss_fn(model, b)
        loss.backward()
        return loss
    if mode == "keyword":
        opt.step(closure=closure)
    else:
        opt.step(closure)
ref = stacknet.reference(ref_model, data) if mode != "lbfgs" else {}
stacknet.save(stacknet.out_path(), final=stacknet.weights(model), init=init, ref=ref)
print("ok")
