"""The Hugging Face side of the stack matrix under the preload, on a tiny Llama (4 blocks, hidden
32; the policy freezes blocks 1-2 and runs SafeGrad with an anchor). argv: mode, steps.

  trainer_accum  transformers Trainer, gradient_accumulation_steps=2
  sft            TRL SFTTrainer on a text dataset (its own tokenization and collator)
  peft           PEFT LoRA (q_proj, v_proj) trained with a plain AdamW loop
  accelerate     accelerate.Accelerator(gradient_accumulation_steps=2) in process
  amp            autocast bf16 + GradScaler("cpu") with a plain AdamW loop

The script knows nothing of safehook. To see what the optimizer really gets, it registers its own
global optimizer step pre-hook after torch is imported, so after safehook's (global pre-hooks run
in registration order): at each step of a torch optimizer it computes, in float64, the cosine of
the gradients the optimizer is about to use with the anchor's safety gradient w - w0 (w0: the
weights at that optimizer's first step, which is what safehook's anchor holds: nothing moves them
between the optimizer's construction and its first step). A projection that was recorded but not
applied leaves a negative cosine there.

Writes result.pt: init and final weights ({name: tensor}), cos_after (one per step of a torch optimizer), forwards (micro-batches)."""
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

import stacknet  # noqa: E402

torch.set_num_threads(1)
mode, steps = sys.argv[1], int(sys.argv[2])
OUT = os.environ.get("STACK_OUT", ".")
VOCAB, SEQ, BS = 64, 12, 4
ACCUM = 2 if mode in ("trainer_accum", "accelerate") else 1

seen = {"w0": {}, "cos_after": [], "forwards": 0}


def after_safehook(opt, args, kwargs):
    if not type(opt).__module__.startswith("torch.optim"):
        return  # a wrapper (AcceleratedOptimizer...): the torch optimizer inside it steps next
    ps = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    w0 = seen["w0"].setdefault(id(opt), {id(p): p.detach().double().clone() for p in ps})
    gs = ss = gg = 0.0
    with torch.no_grad():
        for p in ps:
            g = p.grad.double()
            s = p.detach().double() - w0[id(p)]
            gs += float((g * s).sum())
            ss += float((s * s).sum())
            gg += float((g * g).sum())
    seen["cos_after"].append(gs / (gg * ss) ** 0.5 if gg > 0 and ss > 0 else None)


register_optimizer_step_pre_hook(after_safehook)


def build():
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = T.LlamaForCausalLM(cfg)
    model.register_forward_pre_hook(lambda m, a: seen.__setitem__("forwards", seen["forwards"] + 1))
    return model


def rows(n):
    """N copies of one random row: every batch alike, so the task gradient keeps its direction
    and the anchor (w - w0) conflicts with it from the second step on; shuffling changes nothing."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, VOCAB, (1, SEQ), generator=g).repeat(n, 1)


def weights(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>", "<unk>"] + ["w%d" % i for i in range(4, VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def hf_args():
    return dict(output_dir=os.path.join(OUT, "hf"), max_steps=steps, per_device_train_batch_size=BS,
                gradient_accumulation_steps=ACCUM, learning_rate=1e-2, report_to=[], save_strategy="no",
                logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0)


model = build()
init = {k: v.clone() for k, v in weights(model).items()}
data = rows(steps * ACCUM * BS)

if mode == "trainer_accum":
    import transformers as T

    ds = [{"input_ids": r, "labels": r.clone()} for r in data]
    T.Trainer(model=model, args=T.TrainingArguments(**hf_args()), train_dataset=ds).train()
elif mode == "sft":
    import datasets
    import trl

    ds = datasets.Dataset.from_dict({"text": [" ".join("w%d" % int(t) for t in r) for r in data]})
    cfg = trl.SFTConfig(max_length=SEQ + 2, packing=False, dataset_text_field="text", **hf_args())
    trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer()).train()
elif mode == "peft":
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    init = {k: v.clone() for k, v in weights(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        b = data[i * BS:(i + 1) * BS]
        model(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
elif mode == "accelerate":
    from accelerate import Accelerator

    acc = Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dl = torch.utils.data.DataLoader(data, batch_size=BS)
    model, opt, dl = acc.prepare(model, opt, dl)
    for b in dl:
        with acc.accumulate(model):
            acc.backward(model(input_ids=b, labels=b).loss)
            opt.step()
            opt.zero_grad()
    model = acc.unwrap_model(model)
elif mode == "amp":
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for i in range(steps):
        b = data[i * BS:(i + 1) * BS]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=b, labels=b).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    seen["scale"] = float(scaler.get_scale())
else:
    raise SystemExit("unknown mode " + mode)

stacknet.save(stacknet.out_path(), init=init, final=weights(model), cos_after=seen["cos_after"],
              forwards=seen["forwards"], scale=seen.get("scale"))
print("ok")
