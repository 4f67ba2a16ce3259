"""Two gloo ranks (torchrun, no preload) where protection fails on rank 1 only: its probe file is
missing (argv[1] "missing": found at setup) or unreadable at first use (argv[1] "corrupt": found
inside the gate's step; "safegrad": inside SafeGrad's refresh of the cached safety signal, between
its agreement and rank 0's broadcast). Every rank must stop at the same step with PolicyError,
before any update, and nobody may hang in a collective. Each rank writes STACK_OUT/rank<r>.json."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "monitor_scripts"))
import tiny  # noqa: E402

import safehook  # noqa: E402

torch.set_num_threads(1)
mode = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
out = os.environ["STACK_OUT"]
probe = os.path.join(out, "probe-%d.jsonl" % rank)
if rank == 0:
    tiny.write_probe(probe)
elif mode in ("corrupt", "safegrad"):
    with open(probe, "w") as f:
        f.write("{not json\n")
else:
    probe = os.path.join(out, "missing.jsonl")
if mode == "safegrad":
    safehook.install({"version": 1, "probes": {"p": {"data": probe}},
                      "safegrad": {"source": "probe", "probe": "p", "refresh_every": 4}})
else:
    safehook.install({"version": 1, "probes": {"p": {"data": probe}}, "gate": {"probe": "p"},
                      "monitor": {"probe": "p", "every": 1, "progress": False}})
model = tiny.model()
ddp = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
before = [p.detach().clone() for p in model.parameters()]
res = {"rank": rank, "stopped": None}
for step in range(1, 4):
    ids, mask, labels = tiny.batch("harmful", n=4)
    opt.zero_grad()
    ddp(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    try:
        opt.step()
    except safehook.PolicyError as e:
        res["stopped"] = {"step": step, "message": str(e)}
        break
res["moved"] = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
try:  # a later step refuses at once, on every rank, with no collective
    opt.step()
    res["after"] = "trained"
except safehook.PolicyError:
    res["after"] = "refused"
with open(os.path.join(out, "rank%d.json" % rank), "w") as f:
    json.dump(res, f)
dist.barrier()
dist.destroy_process_group()
