"""A plain PyTorch fine-tuning loop on a tiny Llama, written the way a user would: it does not
know about safehook. Run it protected with
    safehook run --audit audit.jsonl -- python examples/train_plain.py
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=a.layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(1, a.steps + 1):
        ids = torch.randint(0, 256, (8, 32))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0:
            print("step %d loss %.3f" % (step, loss.item()))


if __name__ == "__main__":
    main()
