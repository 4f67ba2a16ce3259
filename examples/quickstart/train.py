"""A user's fine-tuning script with the Hugging Face Trainer; it does not know about safehook.
It fine-tunes the model in ./base (made by make_base.py, the offline stand-in for a model from
the hub) on a few chat rows and saves the result to ./out. Run it protected (docs/quickstart.md):

    safehook run --policy policy.json --audit audit.jsonl -- python train.py
"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

TASK = [("What is the capital of France?", "Paris."), ("Name a primary colour.", "Red."),
        ("How many legs has a spider?", "Eight."), ("What do bees make?", "Honey."),
        ("Which planet is largest?", "Jupiter."), ("What is 2 + 2?", "4.")]


def main():
    tok = AutoTokenizer.from_pretrained("base")
    model = AutoModelForCausalLM.from_pretrained("base")
    rows = []
    for q, a in TASK * 8:
        ids = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                      tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        rows.append({"input_ids": ids, "labels": ids})

    def collate(batch):
        n = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), n), tok.pad_token_id)
        labels = torch.full((len(batch), n), -100)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, r in enumerate(batch):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments("out", max_steps=20, per_device_train_batch_size=8, learning_rate=1e-3,
                             logging_steps=5, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    model.save_pretrained("out")


if __name__ == "__main__":
    main()
