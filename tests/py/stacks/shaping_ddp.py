"""Two gloo ranks (torchrun, no preload), DDP, gradient accumulation over 2 micro-batches, and
shaping with action "subtract" (the shaping world of shaping_scripts/common.py at argv[1]):
rank 0's first micro-batch and rank 1's second each hold one harmful row, which the refusal
guard flags. Each rank saves the gradients the optimizer is handed (after safehook's pre-step
hook) to STACK_OUT/grads<r>.pt."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shaping_scripts"))
import common  # noqa: E402

import safehook  # noqa: E402

MICRO = {0: [[0, 4], [5, 6]], 1: [[7, 8], [9, 1]]}  # rows of the training set: 0-3 harmful

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
root = sys.argv[1]
paths = {"model": os.path.join(root, "model"), "harm": os.path.join(root, "harm.jsonl"),
         "benign": os.path.join(root, "benign.jsonl"), "train": os.path.join(root, "train.jsonl")}
rows = common.rows(paths["train"])
safehook.install(common.policy(paths, action="subtract"))
from transformers import LlamaForCausalLM  # noqa: E402
model = LlamaForCausalLM.from_pretrained(paths["model"])
model.train()
ddp = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
seen = {}


def capture(optimizer, args, kwargs):
    seen.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402
register_optimizer_step_pre_hook(capture)  # after safehook's: sees its result


def pad(rs):
    n = max(len(r["input_ids"]) for r in rs)
    ids = torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in rs])
    labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in rs])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rs])
    return ids, mask, labels


for micro in MICRO[rank]:
    ids, mask, labels = pad([rows[i] for i in micro])
    (ddp(input_ids=ids, attention_mask=mask, labels=labels).loss / len(MICRO[rank])).backward()
opt.step()
torch.save(seen, os.path.join(os.environ["STACK_OUT"], "grads%d.pt" % rank))
dist.barrier()
dist.destroy_process_group()
