"""Tamper evidence in process (features/tamper.py), through the preload: torch's hook tables
cleared mid-run is recorded and undone; parameters moved with no optimizer step (a manual
no_grad update) are recorded; a checkpoint saved after a frozen block was written holds the
restored, bit-identical frozen weights, with a "checkpoint" record that says so."""
import json
import os
import sys

import pytest
import torch

from conftest import events

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "server_scripts", "tamper_train.py")


def _policy(tmp_path):
    p = tmp_path / "policy.json"
    p.write_text(json.dumps({"version": 1, "freeze": {"layers": "0-0", "check_every": 1000, "restore": True}}))
    return str(p)


def _kinds(recs):
    return [r.get("kind") for r in events(recs, "violation")]


def test_cleared_hook_tables_are_recorded_and_put_back(preload_run, tmp_path):
    out = str(tmp_path / "ck.pt")
    p, recs = preload_run([sys.executable, SCRIPT, out, "clear_hooks"], policy=_policy(tmp_path))
    v = [r for r in events(recs, "violation") if r.get("kind") == "hooks_removed"]
    assert len(v) == 1 and v[0]["where"] == "forward"
    # 40 steps taken; the model is bound when its optimizer is built, so the watch counts from
    # the first forward and its 16th forward is the 16th: steps 1-3 and 16-40 went through the
    # hooks, the 12 between did not
    steps = [r["step"] for r in events(recs, "step")]
    assert steps[:3] == [1, 2, 3] and steps[-1] == 3 + 25
    assert events(recs, "end")[0]["tamper"] == {"hooks_removed": 1}
    ck = [r for r in events(recs, "checkpoint") if r["path"] == out]
    assert len(ck) == 1 and ck[0]["hooks"] == "ok" and ck[0]["frozen"] == "ok"


@pytest.mark.parametrize("save", ["torch", "safetensors"])
def test_manual_update_is_recorded_and_the_checkpoint_holds_restored_frozen_weights(preload_run, tmp_path, save):
    out = str(tmp_path / ("ck.safetensors" if save == "safetensors" else "ck.pt"))
    p, recs = preload_run([sys.executable, SCRIPT, out, "manual_update"], policy=_policy(tmp_path),
                          env_extra={"SAVE": save})
    kinds = _kinds(recs)
    assert "moved_without_step" in kinds
    ck = [r for r in events(recs, "checkpoint") if r["path"] == out]
    assert len(ck) == 1 and ck[0]["frozen"] == "changed" and ck[0]["restored_before_write"] is True
    restored = [r for r in events(recs, "violation") if r.get("where") == "checkpoint %s" % out]
    assert restored and "layers.0.mix.weight" in restored[0]["params"]
    init = torch.load(out + ".init")
    if save == "safetensors":
        from safetensors.torch import load_file
        saved = load_file(out)
    else:
        saved = torch.load(out)
    for k in init:
        if k.startswith("layers.0."):
            assert torch.equal(saved[k].view(torch.uint8), init[k].view(torch.uint8)), k
    assert not torch.equal(saved["layers.1.mix.weight"], init["layers.1.mix.weight"])  # trained
