"""The Hugging Face rows of the stack matrix (issue 13), on a tiny Llama under the preload with
freeze "1-2" of 4 blocks and SafeGrad (anchor, global): HF Trainer with gradient accumulation,
TRL SFTTrainer, PEFT LoRA, Accelerate with gradient accumulation (in process, and through
`accelerate launch --cpu` with one process; `--cpu --num_processes 2` started one process here,
so several CPU processes through the launcher are not tested), autocast bf16 + GradScaler.

Each checks: frozen blocks bit-identical, every other trained tensor changed, one `step` record
per optimizer step (not per micro-batch), and that SafeGrad's projection reached the optimizer:
the script's own global pre-hook, which runs after safehook's, measures in float64 the cosine of
the gradients the optimizer is about to use with w - w0; every step the audit says was projected
had a negative cosine before (audit) and has none after (script), and no step reaches the
optimizer with a conflicting gradient.

Freeze alone with Trainer and PEFT is in test_freeze.py (several architectures, LoRA adapters in
frozen blocks); SafeGrad's update against a float64 reference under GradScaler (fp16, fused) in
test_safegrad_hook.py; closures, Lightning, DDP, FSDP2 in test_stacks.py."""
import os
import re
import sys

import pytest
import torch

from conftest import events
from test_stacks import STACKS, _have, stack_run, steps_of
import stacknet

FROZEN = re.compile(r"(^|\.)layers\.(1|2)\.")


def check_projection_reached_optimizer(recs, cos_after, nsteps):
    st = steps_of(recs)
    assert [r["step"] for r in st] == list(range(1, nsteps + 1)), [r["step"] for r in st]
    assert len(cos_after) == nsteps, cos_after  # one torch optimizer step per record
    projected = [i for i, r in enumerate(st) if r.get("projected")]
    assert len(projected) >= 2, st  # one row repeated: the anchor conflicts from step 2 on
    for i in projected:
        assert st[i]["cosine"] < 0, st[i]
        assert abs(cos_after[i]) < 1e-4, (i, st[i]["cosine"], cos_after[i])
    for i, c in enumerate(cos_after):
        assert c is None or c > -1e-4, (i, c, st[i])
    assert not events(recs, "error") and not events(recs, "violation")


def check_weights(res, trained=lambda n: True):
    """Frozen blocks bit-identical; every tensor TRAINED says is trained moved, the rest did not."""
    init, final = res["init"], res["final"]
    assert init.keys() == final.keys()
    moved = {n for n in init if not torch.equal(init[n], final[n])}
    frozen = {n for n in init if FROZEN.search(n)}
    assert frozen and not (moved & frozen), sorted(moved & frozen)
    want = {n for n in init if trained(n) and n not in frozen}
    assert want and want <= moved, sorted(want - moved)
    assert moved <= want, sorted(moved - want)


MODES = [
    pytest.param("trainer_accum", id="trainer_accum"),
    pytest.param("sft", id="trl_sft", marks=pytest.mark.skipif(
        not (_have("trl") and _have("datasets")), reason="trl not installed (tests/requirements.txt)")),
    pytest.param("peft", id="peft_lora"),
    pytest.param("accelerate", id="accelerate_accum"),
    pytest.param("accelerate_launch", id="accelerate_launch_accum"),
    pytest.param("amp", id="amp_bf16_scaler"),
]


@pytest.mark.parametrize("mode", MODES)
def test_hf_stack_freeze_and_safegrad(lib, tmp_path, mode):
    steps = 5
    argv = [sys.executable, os.path.join(STACKS, "hf_stacks.py"), mode, str(steps)]
    if mode == "accelerate_launch":  # the same script through the launcher (one CPU process)
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                os.path.join(STACKS, "hf_stacks.py"), "accelerate", str(steps)]
        mode = "accelerate"
    _, recs = stack_run(lib, tmp_path, argv, policy=stacknet.policy(str(tmp_path / "p.json")))
    res = torch.load(str(tmp_path / "result.pt"))
    check_weights(res, trained=(lambda n: "lora_" in n) if mode == "peft" else (lambda n: True))
    check_projection_reached_optimizer(recs, res["cos_after"], steps)
    accum = 2 if mode in ("trainer_accum", "accelerate") else 1
    assert res["forwards"] == steps * accum, res["forwards"]  # micro-batches: accumulation did happen
    (fr,) = [r for r in events(recs, "freeze") if not r.get("late")]
    assert fr["frozen_blocks"] == [1, 2], fr
    if mode == "amp":
        assert res["scale"] > 1  # the scaler really scaled (and unscaled before the hooks)
