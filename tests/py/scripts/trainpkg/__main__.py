# Run as `python -m trainpkg STEPS`.
import sys

import torch

torch.set_num_threads(1)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
model = torch.nn.Linear(4, 1)
opt = torch.optim.Adam(model.parameters())
for _ in range(steps):
    opt.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
print("trained", steps)
