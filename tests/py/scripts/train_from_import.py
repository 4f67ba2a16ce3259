# Only `from torch.optim import AdamW` names the optimizer module.
import sys
from torch.optim import AdamW
from torch import nn, randn, set_num_threads

set_num_threads(1)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
model = nn.Linear(4, 1)
opt = AdamW(model.parameters(), lr=1e-3)
for _ in range(steps):
    opt.zero_grad()
    model(randn(2, 4)).sum().backward()
    opt.step()
print("trained", steps)
