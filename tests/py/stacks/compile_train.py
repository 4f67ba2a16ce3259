"""torch.compile (backend "eager": no C++ compiler needed) of a model under the preload, the
optimizer built before compiling (argv[1] "opt_first") or after (argv[1] "compile_first").
Writes result.pt with the weights and the global forward pre-hooks left at the end."""
import sys

import torch

import stacknet

torch.set_num_threads(1)
model = stacknet.make()
init = stacknet.weights(model)
if sys.argv[1] == "opt_first":
    opt = torch.optim.SGD(model.parameters(), lr=stacknet.LR)
    compiled = torch.compile(model, backend="eager")
else:
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=stacknet.LR)
for b in stacknet.batches(3):
    opt.zero_grad()
    stacknet.loss_fn(compiled, b).backward()
    opt.step()
stacknet.save(stacknet.out_path(), final=stacknet.weights(model), init=init,
              global_hooks=len(torch.nn.modules.module._global_forward_pre_hooks))
print("ok")
