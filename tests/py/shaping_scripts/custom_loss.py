"""A plain loop whose loss is computed outside the model from its logits (no labels in the
forward): step 1 on the harmful rows only, step 2 on a mixed batch, SGD without momentum. Prints
JSON: whether each step changed the weights. No safehook import."""
import json
import os
import sys

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

root = sys.argv[1]
model = LlamaForCausalLM.from_pretrained(os.path.join(root, "model"))
model.train()
opt = torch.optim.SGD(model.parameters(), lr=0.5)
rows = common.rows(os.path.join(root, "train.jsonl"))
harm = [r for r in rows if r["harmful"]]
mixed = harm[:2] + [r for r in rows if not r["harmful"]][:2]


def step(batch):
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.tensor([b["input_ids"] + [0] * (n - len(b["input_ids"])) for b in batch])
    labels = torch.tensor([b["labels"] + [-100] * (n - len(b["labels"])) for b in batch])
    mask = (torch.arange(n)[None, :] < torch.tensor([len(b["input_ids"]) for b in batch])[:, None]).long()
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


print(json.dumps({"changed_after_harmful": step(harm), "changed_after_mixed": step(mixed)}))
