"""install() / train / uninstall() / install() of another policy, in one process (no preload):
nothing of the first runtime may remain. argv: the shaping world's root (see
shaping_scripts/common.py), the output JSON path. Writes what it saw; the test asserts."""
import gc
import json
import os
import sys
import weakref

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "shaping_scripts"))
import common  # noqa: E402

import safehook  # noqa: E402
from safehook.runtime import boot  # noqa: E402

torch.set_num_threads(1)
root, out_path = sys.argv[1], sys.argv[2]
paths = {k: os.path.join(root, v) for k, v in (("tok", "tok"), ("model", "model"), ("harm", "harm.jsonl"),
                                              ("benign", "benign.jsonl"), ("train", "train.jsonl"))}
rows = common.rows(paths["train"])
log_a, log_b = os.path.join(root, "a.jsonl"), os.path.join(root, "b.jsonl")
for f in (log_a, log_b):
    if os.path.exists(f):
        os.unlink(f)


def policy_one():
    p = common.policy(paths, scorer="forward", recalibrate_every=1000)
    p["freeze"] = {"layers": "0"}
    p["safegrad"] = {"source": "probe", "probe": "h"}
    p["gate"] = {"probe": "h"}
    p["monitor"] = {"probe": "h", "every": 2, "progress": False}
    p["audit"] = {"path": log_a, "level": "steps"}
    return p


def policy_two():
    return {"version": 1, "freeze": {"layers": "1"}, "audit": {"path": log_b}}


def model():
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(paths["model"])
    m.train()
    return m


def batch(k):
    rs = [rows[(2 * k + j) % len(rows)] for j in range(2)]
    n = max(len(r["input_ids"]) for r in rs)
    ids = torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in rs])
    labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in rs])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rs])
    return ids, mask, labels


def train(m, opt, steps, start=0):
    for k in range(start, start + steps):
        ids, mask, labels = batch(k)
        opt.zero_grad()
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()


def module_hooks(m):
    n = 0
    for mod in m.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            n += len(getattr(mod, name))
    return n


def globals_now():
    import safetensors.torch as st
    from torch.nn.modules import module as nnmod
    from torch.nn.parallel import distributed as ddp
    from torch.optim import optimizer as om
    return {"global_forward_pre": len(nnmod._global_forward_pre_hooks),
            "global_forward": len(nnmod._global_forward_hooks),
            "optimizer_pre": len(om._global_optimizer_pre_hooks),
            "optimizer_post": len(om._global_optimizer_post_hooks),
            "wrapped": sorted(n for n, f in (("torch.save", torch.save), ("serialization.save", torch.serialization.save),
                                             ("save_file", st.save_file), ("save_model", st.save_model),
                                             ("Optimizer.__init__", torch.optim.Optimizer.__init__),
                                             ("DDP.__init__", ddp.DistributedDataParallel.__init__))
                              if f is not pristine[n])}


def lines(path):
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


import safetensors.torch as _st  # noqa: E402
from torch.nn.parallel import distributed as _ddp  # noqa: E402
pristine = {"torch.save": torch.save, "serialization.save": torch.serialization.save, "save_file": _st.save_file,
            "save_model": _st.save_model, "Optimizer.__init__": torch.optim.Optimizer.__init__,
            "DDP.__init__": _ddp.DistributedDataParallel.__init__}
res = {"before": globals_now()}

# -- the first runtime, installed twice over (a re-install must not stack its hooks) --
m1 = model()
res["hooks_before"] = module_hooks(m1)
safehook.install(policy_one())
opt1 = torch.optim.AdamW(m1.parameters(), lr=1e-3)
train(m1, opt1, 2)
res["hooks_one"] = module_hooks(m1)
safehook.install(policy_one())
train(m1, opt1, 2, start=2)
res["hooks_reinstalled"] = module_hooks(m1)
res["during"] = globals_now()
rt1 = boot._state["runtime"]
res["runtime_hooks"] = rt1.hook_count() if hasattr(rt1, "hook_count") else None
cache = getattr(rt1, "_owned", {}).get("safety_gradient")
if cache is None:  # the round before kept it in module globals
    from safehook.probes import gradient as _g
    entries = getattr(_g, "_cache", {})
else:
    entries = cache.cache
grads = [t for e in entries.values() for _, t in e.grads.values()]
res["cached_gradients"] = len(grads)
grad_refs = [weakref.ref(t) for t in grads]
del grads, cache, entries

# -- uninstall: nothing of it remains --
safehook.uninstall()
res["after"] = globals_now()
res["hooks_after"] = module_hooks(m1)
res["runtime_after"] = boot._state["runtime"] is None
res["closed_state"] = {"hooks": rt1.hook_count() if hasattr(rt1, "hook_count") else None,
                       "features": sorted(getattr(rt1, "features", {})), "caches": sorted(getattr(rt1, "_owned", {}))}
del rt1
lines_a = lines(log_a)
ids, mask, labels = batch(0)
keep = labels.clone()
m1(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()  # no shaping after uninstall
res["labels_untouched"] = bool(torch.equal(labels, keep))
opt1.step()
res["log_a_grew_after_uninstall"] = lines(log_a) - lines_a
ref1 = weakref.ref(m1)
del m1, opt1
gc.collect()
res["model_alive"] = ref1() is not None
res["gradients_alive"] = sum(r() is not None for r in grad_refs)

# -- a second runtime, another policy, another log --
lines_a = lines(log_a)
m2 = model()
safehook.install(policy_two())
opt2 = torch.optim.SGD(m2.parameters(), lr=0.1)
train(m2, opt2, 2)
res["frozen_two"] = [i for i, blk in enumerate(m2.model.layers) if not any(p.requires_grad for p in blk.parameters())]
res["hooks_two"] = module_hooks(m2)
res["log_a_grew_under_two"] = lines(log_a) - lines_a
res["log_b"] = [json.loads(l)["event"] for l in open(log_b)] if os.path.exists(log_b) else []
# -- a third without a log of its own: nothing goes to the second's --
lines_b = lines(log_b)
safehook.install({"version": 1})
train(m2, opt2, 1, start=3)
res["log_b_grew_under_three"] = lines(log_b) - lines_b
safehook.uninstall()
with open(out_path, "w") as f:
    json.dump(res, f)
