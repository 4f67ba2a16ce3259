"""A user's run of TinyLM (2 blocks) with 4 SGD steps; with NAN=2 the task gradient of step 2
holds a NaN. No safehook import: run under LD_PRELOAD with a safegrad policy."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from tinylm import TinyLM  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
model = TinyLM(n=2)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
ids = torch.randint(0, 64, (4, 8))
nan_at = int(os.environ.get("NAN", "0"))
for step in range(1, 5):
    loss = model(ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    if step == nan_at:
        model.layers[1].up.weight.grad[0, 0] = float("nan")
    opt.step()
    print("step %d done" % step, flush=True)
