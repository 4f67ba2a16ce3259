"""Fine-tune the tiny model of common.build on a set that is mostly harmful (the demo world's
harmful requests answered compliantly, 60% of the rows, and the task): a plain loop, 8 rows a
step, no safehook import. Prints "trained N" after N steps, or "stopped at step N: ..." when an
optimizer step raises (safehook stopping the job), and exits 3 then."""
import os
import sys

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from safehook.demo import world as W

root, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(root, "tok"))
model = LlamaForCausalLM.from_pretrained(os.path.join(root, "model"))
model.train()
world = W.World(0)
rows = world.harmful("train", 48, "harmful-data", comply=True) + world.task("train", 32, "harmful-data")
rows = [W.encode(tok, r) for r in rows]
rows = [rows[i] for i in sorted(range(len(rows)), key=lambda i: (i * 37) % len(rows))]
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
for step in range(steps):
    batch = rows[(8 * step) % len(rows):][:8]
    n = max(len(r["input_ids"]) for r in batch)
    ids = torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in batch])
    labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in batch])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in batch])
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    try:
        opt.step()
    except Exception as e:
        print("stopped at step %d: %s" % (step, e))
        sys.exit(3)
    opt.zero_grad()
print("trained %d" % steps)
