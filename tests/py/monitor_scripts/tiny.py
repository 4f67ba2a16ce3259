"""A tiny Llama and a toy refusal task for the monitor and gate tests.

Token ids: 0 pad, 1 bos, 2 eos, 3..7 the refusal "I cannot help with that", 10..40 prompt
words, 41..63 compliant answers. Each prompt has a refusal (safe) and a compliant (harmful)
answer; the probe's rows are the prompts with their refusals."""
import json
import random

import torch

VOCAB = 64
REFUSAL = [3, 4, 5, 6, 7]
EOS = 2


def model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def prompts(n=16, seed=1):
    rnd = random.Random(seed)
    return [[1] + [rnd.randint(10, 40) for _ in range(5)] for _ in range(n)]


def compliant(n=16, seed=2):
    rnd = random.Random(seed)
    return [[rnd.randint(41, 63) for _ in range(5)] for _ in range(n)]


def rows(kind, n=16):
    """Pre-tokenized rows: prompt + answer + eos, labels -100 on the prompt."""
    out = []
    for p, c in zip(prompts(n), compliant(n)):
        ans = (REFUSAL if kind == "safe" else c) + [EOS]
        out.append({"input_ids": p + ans, "labels": [-100] * len(p) + ans})
    return out


def write_probe(path, n=16, contrastive=False):
    with open(path, "w") as f:
        for s, h in zip(rows("safe", n), rows("harmful", n)):
            if contrastive:
                s = dict(s, harmful_input_ids=h["input_ids"], harmful_labels=h["labels"])
            f.write(json.dumps(s) + "\n")


def batch(kind, n=16):
    rs = rows(kind, n)
    ids = torch.tensor([r["input_ids"] for r in rs])
    labels = torch.tensor([r["labels"] for r in rs])
    return ids, torch.ones_like(ids), labels


def pretrain(m, steps=60, lr=1e-2):
    """Teach the refusals with a hand-written Adam: no torch.optim, so no optimizer hook fires."""
    ids, mask, labels = batch("safe")
    params = [p for p in m.parameters()]
    mom = [torch.zeros_like(p) for p in params]
    sq = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        gs = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, a, b in zip(params, gs, mom, sq):
                a.mul_(0.9).add_(g, alpha=0.1)
                b.mul_(0.999).addcmul_(g, g, value=0.001)
                p.sub_(lr * (a / (1 - 0.9 ** t)) / ((b / (1 - 0.999 ** t)).sqrt() + 1e-8))
    return float(loss.detach())


def state(m, opt):
    """Deep copies of the weights and the optimizer's per-parameter state."""
    w = {k: v.detach().clone() for k, v in m.state_dict().items()}
    params = [p for g in opt.param_groups for p in g["params"]]
    s = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
         for i, p in enumerate(params) if p in opt.state and opt.state[p]}
    return {"model": w, "optim": s}


def same(a, b):
    """True when two state() copies are bit-identical."""
    if a["model"].keys() != b["model"].keys() or a["optim"].keys() != b["optim"].keys():
        return False
    if not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]):
        return False
    for i in a["optim"]:
        if a["optim"][i].keys() != b["optim"][i].keys():
            return False
        for k, v in a["optim"][i].items():
            w = b["optim"][i][k]
            if torch.is_tensor(v):
                if not (torch.is_tensor(w) and v.dtype == w.dtype and torch.equal(v, w)):
                    return False
            elif v != w:
                return False
    return True
