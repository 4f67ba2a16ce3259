"""Two models trained in one process, after a reference model (no optimizer trains it) ran a
forward first. argv[1]: "opt_first" (optimizers built before any forward) or "forward_first"
(every model runs a forward before its optimizer exists). Writes result.pt."""
import sys

import torch

import stacknet

torch.set_num_threads(1)
order = sys.argv[1]
ref = stacknet.make(5)
a, b = stacknet.make(0), stacknet.make(1)
init = {"a": stacknet.weights(a), "b": stacknet.weights(b), "ref": stacknet.weights(ref)}
data = stacknet.batches(3)
with torch.no_grad():
    ref(data[0][0])  # the reference model runs first: it must not be taken as the model
if order == "forward_first":
    with torch.no_grad():
        a(data[0][0])
        b(data[0][0])
oa = torch.optim.AdamW(a.parameters(), lr=1e-2)
ob = torch.optim.SGD(b.parameters(), lr=1e-2)
for batch in data:
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        with torch.no_grad():
            ref(batch[0])
        stacknet.loss_fn(m, batch).backward()
        o.step()
hooks = len(torch.nn.modules.module._global_forward_pre_hooks)
stacknet.save(stacknet.out_path(), init=init, final={"a": stacknet.weights(a), "b": stacknet.weights(b),
                                                     "ref": stacknet.weights(ref)},
              ref_requires_grad=all(p.requires_grad for p in ref.parameters()), global_hooks=hooks)
print("ok")
