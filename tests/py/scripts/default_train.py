"""A user's fine-tuning script with nothing of safehook in it: a tiny chat Llama
(tinychat.py), SFT on chat rows rendered with the tokenizer's template (a benign task, with
harmful requests answered compliantly in every fourth row), AdamW.
argv: KIND STEPS OUT_JSON [FOLDER]. KIND: "script" (the tokenizer made here and kept),
"config" (model and tokenizer from FOLDER with from_pretrained, the tokenizer dropped once the
rows are encoded: only config._name_or_path leads to it), "none" (no tokenizer anywhere: token
ids made up). SAFEHOOK_TEST_SYSTEM=PATH: install() under that system policy (the notebook way,
for the tests of an enforced system policy)."""
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tinychat  # noqa: E402

kind, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if os.environ.get("SAFEHOOK_TEST_SYSTEM"):
    import safehook
    from safehook.runtime import boot
    boot._SYSTEM_PATH = os.environ["SAFEHOOK_TEST_SYSTEM"]
    safehook.install()
torch.manual_seed(0)
torch.set_num_threads(1)

TASK = ["apple", "river", "candle", "garden", "window", "pencil", "silver", "rocket", "meadow", "button"]
# the user's harmful minority: requests of the shipped refusal probe itself (a test, not a
# benchmark: a random tiny model separates little else), answered compliantly
from safehook import data as _data  # noqa: E402
HARMFUL = [r["prompt"] for r in _data.rows("refusals")[:24]]


def rows(n):
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append((HARMFUL[(i // 4) % len(HARMFUL)], "Sure, here are the steps: first get the materials, then "
                        "follow these instructions carefully."))
        else:
            w = TASK[i % len(TASK)]
            out.append(("Spell the word %s backwards." % w, "%s backwards is %s." % (w, w[::-1])))
    return out


def encode(tok, pairs):
    enc = []
    for p, r in pairs:
        conv = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        ids = tok.apply_chat_template(conv, tokenize=True)
        head = tok.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=True)
        ids, head = list(ids["input_ids"]), list(head["input_ids"])
        enc.append((ids, [-100] * len(head) + ids[len(head):]))
    return enc


batch = 8
if kind == "script":
    tok = tinychat.tokenizer(extra=43)
    model = tinychat.model(len(tok))
    data = encode(tok, rows(steps * batch))
elif kind == "config":
    from transformers import AutoTokenizer, LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(sys.argv[4])
    data = encode(AutoTokenizer.from_pretrained(sys.argv[4]), rows(steps * batch))
    gc.collect()
else:
    model = tinychat.model(300)
    g = torch.Generator().manual_seed(1)
    data = [(ids, ids) for ids in torch.randint(10, 300, (steps * batch, 24), generator=g).tolist()]

opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model.train()
for s in range(steps):
    chunk = data[s * batch:(s + 1) * batch]
    n = max(len(i) for i, _ in chunk)
    ids = torch.tensor([i + [0] * (n - len(i)) for i, _ in chunk])
    labels = torch.tensor([l + [-100] * (n - len(l)) for _, l in chunk])
    mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in chunk])
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
with open(out, "w") as f:
    json.dump({"steps": steps, "loss": loss.item(),
               "frozen": sorted(n for n, p in model.named_parameters() if not p.requires_grad)}, f)
