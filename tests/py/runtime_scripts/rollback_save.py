"""A monitor (policy argv[1]: disk snapshots, every 4 steps) over a tiny Llama that learns its
refusals for 8 steps and unlearns them for 4: the evaluation at step 12, the last, rolls back;
then the model is saved to argv[2] with torch.save."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "monitor_scripts"))
import tiny  # noqa: E402

import safehook  # noqa: E402

torch.set_num_threads(1)
m = tiny.model()
tiny.pretrain(m, steps=25)
safehook.install(sys.argv[1])
opt = torch.optim.Adam(m.parameters(), lr=0.01)
for kind in ["safe"] * 8 + ["harmful"] * 4:
    ids, mask, labels = tiny.batch(kind)
    m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()
torch.save(m.state_dict(), sys.argv[2])
