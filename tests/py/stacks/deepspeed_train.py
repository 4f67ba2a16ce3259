"""DeepSpeed ZeRO on CPU (gloo) under torchrun, 2 ranks. argv[1]: ZeRO stage (1, 2, 3),
argv[2]: steps, then flags: "tamper": after the result is saved, write into this rank's slice of
a frozen weight (ZeRO-3: its ds_tensor), which only safehook's exit check can see; "dsopt":
DeepSpeed builds the SGD optimizer from its config (zero_force_ds_cpu_optimizer false), else
the user builds a torch SGD and DeepSpeed wraps it. No DeepSpeed op is compiled. ZeRO-3 keeps
no parameter whole (persistence threshold 0). Each rank trains on its half of each batch;
result_R.pt: full weights (ZeRO-3 gathered), initial, the float64 reference, and the same
reference without projection."""
import copy
import os
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402

import stacknet  # noqa: E402

torch.set_num_threads(1)
import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402

# DeepSpeed's CPU collectives first JIT-compile a shared-memory op (minutes of g++ on a fresh
# machine; its op probe also runs the compiler): declared unavailable, gloo does them all.
deepspeed.ops.__compatible_ops__ = {}

stage, steps = int(sys.argv[1]), int(sys.argv[2])
tamper, dsopt = "tamper" in sys.argv[3:], "dsopt" in sys.argv[3:]
deepspeed.init_distributed(dist_backend="gloo")
import torch.distributed as dist  # noqa: E402
rank, n = dist.get_rank(), dist.get_world_size()
model = stacknet.make()
ref_model = copy.deepcopy(model)
init = stacknet.weights(model)
data = stacknet.batches(steps)
opt = None if dsopt else torch.optim.SGD(model.parameters(), lr=stacknet.LR)
cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
       "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True,
       "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
if dsopt:
    cfg.update(optimizer={"type": "SGD", "params": {"lr": stacknet.LR}}, zero_force_ds_cpu_optimizer=False)
engine, dsopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg,
                                             model_parameters=model.parameters())
for x, y in data:
    half = x.shape[0] // n
    part = (x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    loss = stacknet.loss_fn(engine, part)
    engine.backward(loss)
    engine.step()
final = {}
if stage == 3:
    from deepspeed.runtime.zero import GatheredParameters
    with GatheredParameters(list(model.parameters())):
        final = {k: p.detach().clone() for k, p in model.named_parameters()}
else:
    final = stacknet.weights(model)
ref = stacknet.reference(copy.deepcopy(ref_model), data) if rank == 0 else {}
plain = stacknet.reference(ref_model, data, project=False) if rank == 0 else {}
stacknet.save(stacknet.out_path("result_%d.pt" % rank), final=final, init=init, ref=ref, plain=plain)
dist.barrier()
if tamper:
    w = model.layers[1].weight
    with torch.no_grad():
        (w.ds_tensor if stage == 3 else w).add_(1.0)
