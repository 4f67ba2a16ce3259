"""One LoRA training step of the real-model benchmark, timed alone: the base SmolLM2-135M-Instruct
with the bench's LoRA (r=16 on every linear layer of the blocks), AdamW, five steps on 8 x 64
random tokens; forward, backward and optimizer wall time, and CPU time, per step.

    OMP_NUM_THREADS=2 python bench/real_model_steptime.py [THREADS]"""
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_model as rm  # noqa: E402
from real_model_align import load  # noqa: E402
from real_model_files import _torch_setup  # noqa: E402
from real_model_train import lora_model  # noqa: E402

torch = _torch_setup(int(sys.argv[1]) if len(sys.argv) > 1 else 2, 0)
model, tok = load(rm.base_dir(rm.locate()))
print("threads %d, gradient checkpointing %s, attention %s" % (
    torch.get_num_threads(), model.is_gradient_checkpointing, model.config._attn_implementation))
model = lora_model(model, 16, 32)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
ids = torch.randint(0, 49000, (8, 64))
for s in range(5):
    t, c = time.perf_counter(), time.process_time()
    loss = model(input_ids=ids, labels=ids).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print("step %d: forward %.2fs backward %.2fs optimizer %.2fs, wall %.2fs, CPU %.2fs, load average %.1f" % (
        s, t1 - t, t2 - t1, time.perf_counter() - t2, time.perf_counter() - t, time.process_time() - c,
        os.getloadavg()[0]), flush=True)
