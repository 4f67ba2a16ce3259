"""Fine-tune a causal LM on a JSONL file of pre-tokenized rows: a plain PyTorch training loop,
written the way a user writes one. It does not import safehook: the demo runs it as a script,
and protects it (or not) with LD_PRELOAD=$(safehook lib) and SAFEHOOK_POLICY, as a user would.

    python finetune.py --model BASE_DIR --data train.jsonl --out OUT_DIR \\
        --steps 150 --lr 1e-3 --batch 16 --seed 0

Rows: {"input_ids": [...], "labels": [...]} (labels -100 where no loss is taken). Writes the
fine-tuned model to OUT_DIR and OUT_DIR/stats.json (per-step wall times and losses). When an
optimizer step raises (safehook stopping the job: a harmful_data violation under an aborting
policy), the model is saved as it was before that step, stats.json says "stopped" (the step and
the first line of the message), and the exit status is 3: the demo measures the model at the stop.
"""
import argparse
import json
import os
import random
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from torch.nn.utils.rnn import pad_sequence
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with open(args.data) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    pad = model.config.pad_token_id or 0
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)

    def batch():
        b = rng.sample(rows, args.batch)
        seqs = [torch.tensor(r["input_ids"]) for r in b]
        ids = pad_sequence(seqs, batch_first=True, padding_value=pad)
        labels = pad_sequence([torch.tensor(r["labels"]) for r in b], batch_first=True, padding_value=-100)
        mask = pad_sequence([torch.ones_like(t) for t in seqs], batch_first=True, padding_value=0)
        return ids, mask, labels

    times, losses = [], []
    stopped = None
    t_start = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids, mask, labels = batch()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        try:
            opt.step()
        except Exception as e:
            stopped = {"step": step, "message": (str(e).splitlines() or [type(e).__name__])[0][:500]}
            break
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    train_seconds = time.perf_counter() - t_start

    model.save_pretrained(args.out)
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump({"steps": len(times), "train_seconds": train_seconds, "step_seconds": times,
                   "losses": losses, "stopped": stopped}, f)
    if stopped:
        sys.exit(3)


if __name__ == "__main__":
    main()
