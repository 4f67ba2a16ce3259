# Notebook style: the optimizer exists before safehook.install() is called; steps before the
# install are not protected, steps after it are.
import sys

import torch

torch.set_num_threads(1)
model = torch.nn.Linear(4, 1)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)


def step():
    opt.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()


for _ in range(2):
    step()
import safehook  # noqa: E402

safehook.install(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else None)
for _ in range(3):
    step()
safehook.uninstall()
step()
print("done")
