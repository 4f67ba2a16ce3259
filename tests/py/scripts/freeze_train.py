"""A tiny training run used by tests/py/test_freeze.py, run under LD_PRELOAD=libsafehook.so.

usage: freeze_train.py OUT.json ARCH STACK [TAMPER ...]
  ARCH:   llama | gpt2 | qwen2 | neox          (transformers classes, 4 blocks, hidden 32)
  STACK:  plain | ddp | ddp_early | ddp_then_install | trainer | peft | peft_late
          ddp: DDP built after a first forward; ddp_early: DDP built before any forward;
          ddp_then_install: one rank, DDP built, then safehook.install() (SAFEHOOK_POLICY)
          peft_late: LoRA wrap made after a first forward of the base model
  TAMPER: requires_grad (re-enable requires_grad on a frozen weight after step 2)
          data (write p.data of a frozen weight after step 4)
          step (monkeypatch opt.step so that step 6 also writes a frozen weight)
          late (zero a weight of frozen block 2 after the last step and after writing OUT.json)
Writes {block index: weights equal to the initial ones} and a few facts to OUT.json.
The script knows nothing of safehook: it is a user's training script."""
import json
import os
import sys

import torch

torch.set_num_threads(1)
torch.manual_seed(0)
out, arch, stack = sys.argv[1], sys.argv[2], sys.argv[3]
tamper = set(sys.argv[4:])
STEPS = int(os.environ.get("STEPS", "8"))


def build(arch):
    import transformers as T
    common = dict(vocab_size=64)
    if arch == "llama":
        cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, **common)
        return T.LlamaForCausalLM(cfg), "model.layers"
    if arch == "qwen2":
        cfg = T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, **common)
        return T.Qwen2ForCausalLM(cfg), "model.layers"
    if arch == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, **common)
        return T.GPT2LMHeadModel(cfg), "transformer.h"
    if arch == "neox":
        cfg = T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              max_position_embeddings=64, **common)
        return T.GPTNeoXForCausalLM(cfg), "gpt_neox.layers"
    raise SystemExit("unknown arch " + arch)


model, path = build(arch)
blocks = model.get_submodule(path)
initial = [{n: p.detach().clone() for n, p in b.named_parameters()} for b in blocks]
outside = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(path + ".")}
data = torch.randint(0, 64, (STEPS, 4, 16), generator=torch.Generator().manual_seed(1))
facts = {"violations_seen_by_script": 0}

if stack == "trainer":
    import transformers as T

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return STEPS * 4

        def __getitem__(self, i):
            ids = data[i // 4, i % 4]
            return {"input_ids": ids, "labels": ids.clone()}

    args = T.TrainingArguments(output_dir=os.path.join(os.path.dirname(out), "trainer"), max_steps=STEPS,
                               per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1,
                               use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                               disable_tqdm=True, dataloader_num_workers=0)
    T.Trainer(model=model, args=args, train_dataset=DS()).train()
else:
    ddp = None
    if stack in ("peft", "peft_late"):
        import peft
        if stack == "peft_late":
            with torch.no_grad():
                model(data[0])  # a first forward (no optimizer yet: binds nothing), then the LoRA wrap
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
                                                           if arch in ("llama", "qwen2") else None))
        initial = [{n: p.detach().clone() for n, p in b.named_parameters()} for b in blocks]
    if stack in ("ddp", "ddp_early", "ddp_then_install"):
        import torch.distributed as dist
        if stack == "ddp_then_install":  # one rank, no torchrun
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
            dist.init_process_group("gloo", rank=0, world_size=1)
        else:
            dist.init_process_group("gloo")
        if stack == "ddp":
            with torch.no_grad():
                model(data[0])  # a first forward before DDP wraps (no optimizer yet: binds nothing)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        if stack == "ddp_then_install":  # a notebook user: safehook arrives after DDP was built
            import safehook
            safehook.install()
    runner = ddp or model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    frozen_w = blocks[1].mlp.c_fc.weight if arch == "gpt2" else next(blocks[1].parameters())
    for step in range(1, STEPS + 1):
        batch = data[step - 1]
        if ddp is not None:
            batch = batch[torch.distributed.get_rank()::torch.distributed.get_world_size()]
        loss = runner(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 2 and "requires_grad" in tamper:
            frozen_w.requires_grad_(True)   # re-enabled: the next backward computes its gradient
            opt.param_groups[0]["params"].append(frozen_w)
        if step == 4 and "data" in tamper:
            frozen_w.data = frozen_w.data + 0.5   # rebinding p.data of a frozen weight
        if step == 5 and "step" in tamper:
            real_step = opt.step

            def step_and_nudge(*a, **k):  # the next step also moves a frozen weight, once
                r = real_step(*a, **k)
                with torch.no_grad():
                    frozen_w.add_(0.25)
                opt.step = real_step
                return r
            opt.step = step_and_nudge
    if ddp is not None:
        # torch 2.13 + gloo: a DDP module alive at destroy_process_group can abort the process
        # at exit (see tests/py/scripts/train_ddp.py); free it first
        import gc
        del ddp, runner
        gc.collect()
        torch.distributed.destroy_process_group()

facts["equal"] = [all(torch.equal(p.detach(), initial[i][n]) for n, p in b.named_parameters())
                  for i, b in enumerate(blocks)]
facts["equal_outside"] = {n: torch.equal(p.detach(), outside[n]) for n, p in model.named_parameters()
                          if n in outside}
facts["requires_grad"] = [[p.requires_grad for p in b.parameters()] for b in blocks]
facts["lora_tensors"] = [sum(1 for n, _ in b.named_parameters() if "lora_" in n) for b in blocks]
rank = os.environ.get("RANK")
with open(out + ("." + rank if rank else ""), "w") as f:
    json.dump(facts, f)
if "late" in tamper:
    with torch.no_grad():
        next(blocks[2].parameters()).mul_(0)   # after the last step: only the exit check sees it
