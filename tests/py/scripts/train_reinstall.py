# install() again with another policy replaces the features: SafeGrad (anchor) on, then off.
import torch

import safehook

torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)


def steps(n):
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()


safehook.install({"version": 1, "safegrad": {"source": "anchor"}})
steps(3)
safehook.install({"version": 1})
steps(2)
print("done")
