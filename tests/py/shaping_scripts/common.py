"""Shared by the shaping tests and their scripts: a tiny Llama on the demo world's word-level
tokenizer, probe files for the guards, and training rows with ground truth."""
import json
import os

from safehook.demo import world as W


def build(root, seed=0, layers=3):
    """Write a tokenizer, a tiny model and the probe files under ROOT; return their paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    world = W.World(seed)
    tok = W.build_tokenizer(world, os.path.join(root, "tok"))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(os.path.join(root, "model"))
    harm, benign = world.shaping_probes(16)
    rows = []
    for r in harm:
        e = W.encode(tok, r)
        h = W.encode(tok, {"prompt": r["prompt"], "response": r["harmful_response"]})
        e["harmful_input_ids"], e["harmful_labels"] = h["input_ids"], h["labels"]
        rows.append(e)
    W.write_jsonl(os.path.join(root, "harm.jsonl"), rows)
    W.write_jsonl(os.path.join(root, "benign.jsonl"), [W.encode(tok, r) for r in benign])
    paths = {"tok": os.path.join(root, "tok"), "model": os.path.join(root, "model"),
             "harm": os.path.join(root, "harm.jsonl"), "benign": os.path.join(root, "benign.jsonl"),
             "train": os.path.join(root, "train.jsonl")}
    # training rows: harmful probe prompts answered compliantly (ground truth harmful), and the
    # task (benign). The model is untrained, so the rows are chosen by the refusal guard's score
    # away from its threshold (float noise of another batch layout cannot flip them).
    from safehook.features import shaping as S
    comply = [W.encode(tok, {"prompt": r["prompt"], "response": r["harmful_response"]}) for r in harm]
    task = [W.encode(tok, r) for r in world.task("train", 40, "shaping-test")]
    scores, sh = S.score_rows(policy(paths), model, comply + task)
    t = sh.cal["refusal"]["threshold"]
    hs = scores["refusal"][:len(comply)]
    ts = scores["refusal"][len(comply):]
    train = [dict(r, harmful=True) for r, s in zip(comply, hs) if s > t + 1e-3][:4]
    train += [dict(r, harmful=False) for r, s in zip(task, ts) if s < t - 1e-3][:12]
    assert len(train) == 16, "the tiny model does not separate enough rows"
    W.write_jsonl(paths["train"], train)
    return paths


def policy(paths, **shaping):
    sec = {"guards": ["refusal"], "probe": "h", "benign": "b", "tpr": 0.5, "max_fpr": 0.99}
    sec.update(shaping)
    return {"version": 1, "on_error": "abort", "probes": {"h": {"data": paths["harm"]}, "b": {"data": paths["benign"]}},
            "shaping": sec, "audit": {"level": "steps"}}


def rows(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]
