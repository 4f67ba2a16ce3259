"""The aligned base model of the demo: a small transformers Llama trained on the world's
alignment data (harmful requests refused, benign ones helped), cached by a key of everything
that determines it."""
import hashlib
import json
import os
import random
import shutil
import time

from ..probes.batch import pad_batch
from . import world as W

# Bump when the world, the model or its training change in a way the key does not capture.
BASE_VERSION = 2


def cache_root(cache=None):
    if cache:
        return os.path.abspath(cache)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "safehook", "demo")


def base_key(cfg):
    spec = {"v": BASE_VERSION, "seed": cfg["seed"], "model": cfg["model"], "base": cfg["base"]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def model_config(tok, m):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tok), hidden_size=m["hidden"],
                       intermediate_size=m["intermediate"], num_hidden_layers=m["layers"],
                       num_attention_heads=m["heads"], num_key_value_heads=m["heads"],
                       max_position_embeddings=64, tie_word_embeddings=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)


def collate(rows, pad_id):
    """Right-padded input_ids, attention_mask and labels (-100 on padding) of encoded rows."""
    return pad_batch(rows, pad_id)


def train_base(cfg, out_dir, log, rows=None, what="base model"):
    """Train the aligned model of CFG into OUT_DIR (model, tokenizer, info.json). ROWS replaces
    the training set (same initialization, schedule and batch draws: demo/posthoc.py's
    unaligned twin)."""
    import torch
    from transformers import LlamaForCausalLM
    b = cfg["base"]
    world = W.World(cfg["seed"])
    tmp = out_dir + ".tmp%d" % os.getpid()
    shutil.rmtree(tmp, ignore_errors=True)
    tok = W.build_tokenizer(world, tmp)
    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(model_config(tok, cfg["model"]))
    nparams = sum(p.numel() for p in model.parameters())
    log(what + ": Llama, %d blocks, hidden %d, %.2fM parameters; training %d steps"
        % (cfg["model"]["layers"], cfg["model"]["hidden"], nparams / 1e6, b["steps"]))
    data = [W.encode(tok, r) for r in (rows or world.alignment_data(b["examples"]))]
    opt = torch.optim.AdamW(model.parameters(), lr=b["lr"], weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, b["steps"] // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.1, 1 - s / b["steps"]))
    rng = random.Random(cfg["seed"])
    model.train()
    t0 = time.time()
    for step in range(b["steps"]):
        batch = rng.sample(data, b["batch"])
        ids, mask, labels = collate(batch, tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, b["steps"] // 5) == 0:
            log("  %s step %d/%d loss %.3f (%.0fs)" % (what.split()[0], step + 1, b["steps"], loss.item(),
                                                        time.time() - t0))
    model.save_pretrained(tmp)
    info = {"key": base_key(cfg), "seed": cfg["seed"], "model": cfg["model"], "base": b,
            "parameters": nparams, "train_seconds": round(time.time() - t0, 1)}
    with open(os.path.join(tmp, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def get_base(cfg, cache, log):
    """The directory of the aligned model of CFG: from the cache, or trained now."""
    d = os.path.join(cache_root(cache), base_key(cfg))
    if os.path.exists(os.path.join(d, "info.json")):
        log("base model: cached at %s" % d)
        return d, True
    os.makedirs(os.path.dirname(d), exist_ok=True)
    return train_base(cfg, d, log), False


def load(path):
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tok
