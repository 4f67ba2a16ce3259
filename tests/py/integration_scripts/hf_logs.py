"""A user's script, run under the preload (it does not import safehook): a tiny Llama trained
with the HF Trainer (report_to tensorboard), or by a plain Accelerate loop whose Accelerator logs
to TensorBoard. It records what the `safehook` logger emitted (a handler of its own at INFO) and
the Trainer's log_history, into OUT/seen.json.

    python hf_logs.py trainer|accelerate OUT [explicit]
"""
import json
import logging
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

mode, out = sys.argv[1], sys.argv[2]
explicit = "explicit" in sys.argv[3:]
seen = {"logging": []}


class Keep(logging.Handler):
    def emit(self, record):
        seen["logging"].append({"msg": record.getMessage(), "stats": getattr(record, "safehook", None)})


log = logging.getLogger("safehook")
log.addHandler(Keep())
log.setLevel(logging.INFO)

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32)
model = LlamaForCausalLM(cfg)
g = torch.Generator().manual_seed(1)
rows = [torch.randint(3, 64, (12,), generator=g) for _ in range(24)]
STEPS = 6

if mode == "trainer":
    from transformers import Trainer, TrainingArguments
    ds = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(os.path.join(out, "run"), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=5e-3, logging_steps=2, report_to=["tensorboard"],
                             save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0)
    cbs = None
    if explicit:
        from safehook.integrations import SafehookCallback
        cbs = [SafehookCallback()]
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=cbs)
    trainer.train()
    seen["log_history"] = trainer.state.log_history
    seen["callbacks"] = [type(c).__name__ for c in trainer.callback_handler.callbacks]
else:
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=os.path.join(out, "tb"))
    accelerator.init_trackers("run")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model, opt = accelerator.prepare(model, opt)
    for step in range(STEPS):
        ids = torch.stack(rows[4 * step:4 * step + 4])
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        accelerator.log({"loss": loss.item()}, step=step + 1)
    accelerator.end_training()

with open(os.path.join(out, "seen.json"), "w") as f:
    json.dump(seen, f, default=str)
