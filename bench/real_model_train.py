"""A user's fine-tuning script, as plain as such scripts come: nothing in it knows about
safehook. The real-model benchmark runs it once per mode under `safehook run`.

    python bench/real_model_train.py --model DIR --data train.jsonl --out OUT [--full]

Reads (prompt, response) rows from a JSONL file, formats them with the model's chat template,
and trains a PEFT LoRA adapter (rank 16 on every linear layer of the blocks; `--full`: every
weight) with AdamW on the response tokens, one batch after the other in file order. Saves the
adapter (or the whole model) to OUT with save_pretrained, and OUT/train_metrics.json with the
loss and the wall and CPU time of every step."""
import argparse
import json
import os
import sys
import time

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def chat(tok, prompt):
    return tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)


def sft_batch(tok, pairs, max_len):
    """input_ids/attention_mask/labels for (prompt, response[, eos]) rows, right padded; the loss
    is on the response and its end-of-turn token (none where eos is False: a response cut short)
    only; a long response is cut to MAX_LEN tokens in all (the prompt is kept whole)."""
    import torch
    rows = []
    for pair in pairs:
        p, r = pair[0], pair[1]
        eos = pair[2] if len(pair) > 2 else True
        pi = tok(chat(tok, p), add_special_tokens=False)["input_ids"]
        ri = tok(r + (tok.eos_token if eos else ""), add_special_tokens=False)["input_ids"]
        ri = ri[:max(1, max_len - len(pi))]
        rows.append((pi + ri, [-100] * len(pi) + ri))
    n = max(len(i) for i, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for k, (i, lab) in enumerate(rows):
        ids[k, :len(i)] = torch.tensor(i)
        labels[k, :len(lab)] = torch.tensor(lab)
        mask[k, :len(i)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_model(model, rank, alpha):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory to start from")
    ap.add_argument("--data", required=True, help="JSONL rows {prompt, response}, taken in order")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # Adam's tiny second moments otherwise slow CPU steps 3x
    torch.manual_seed(a.seed)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(a.device)
    if not a.full:
        model = lora_model(model, a.rank, a.alpha)
    with open(a.data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    pairs = [(r["prompt"], r["response"], r.get("eos", True)) for r in rows]
    if len(pairs) < a.steps * a.batch:
        sys.exit("%s: %d rows, %d steps of batch %d need %d" % (a.data, len(pairs), a.steps, a.batch,
                                                              a.steps * a.batch))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    load_s = time.time() - t0
    model.train()
    wall, cpu, losses = [], [], []
    for s in range(a.steps):
        t, c = time.perf_counter(), time.process_time()
        batch = sft_batch(tok, pairs[s * a.batch:(s + 1) * a.batch], a.max_len)
        loss = model(**{k: v.to(a.device) for k, v in batch.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        losses.append(loss.item())
        if (s + 1) % 10 == 0 or s == 0:
            print("step %d/%d loss %.4f %.2fs" % (s + 1, a.steps, losses[-1], wall[-1]), file=sys.stderr, flush=True)
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out)
    if a.full:
        tok.save_pretrained(a.out)
    with open(os.path.join(a.out, "train_metrics.json"), "w") as f:
        json.dump({"steps": a.steps, "batch": a.batch, "lr": a.lr, "max_len": a.max_len, "full": a.full,
                   "rank": None if a.full else a.rank, "load_s": round(load_s, 2),
                   "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "loss": [round(x, 4) for x in losses], "step_s": [round(x, 3) for x in wall],
                   "step_cpu_s": [round(x, 3) for x in cpu], "threads": torch.get_num_threads()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
