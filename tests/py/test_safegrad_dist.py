"""SafeGrad under torchrun (gloo, 2 ranks): with DDP and with FSDP2 (fully_shard, on CPU), the
projected update equals the single-process one (probe source: the safety gradient is computed
on every rank; FSDP2 shards sum their partial dot products with one all_reduce)."""
import os
import sys

import pytest
import torch

from conftest import SCRIPTS, events
from test_safegrad_hook import probe_file, write_policy

PY = sys.executable
SCRIPT = os.path.join(SCRIPTS, "safegrad_dist.py")


def test_two_ranks_match_one_process(preload_run, tmp_path):
    probe = probe_file(tmp_path)
    pol = write_policy(tmp_path, {"source": "probe", "probe": "safety", "granularity": "global"}, probe)
    out = {}
    recs = {}
    for mode in ("single", "ddp", "fsdp"):
        path = str(tmp_path / (mode + ".pt"))
        argv = [PY, SCRIPT, mode, probe, path, "3"]
        if mode != "single":
            argv = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + argv[1:]
        _, recs[mode] = preload_run(argv, policy=pol, timeout=240)
        out[mode] = torch.load(path)
    single = [r for r in events(recs["single"], "step")]
    assert any(r["projected"] for r in single), single  # the run does project
    for mode in ("ddp", "fsdp"):
        steps = events(recs[mode], "step")
        assert len(steps) == 2 * len(single)  # every rank projects every step
        for r in steps:
            ref = single[r["step"] - 1]
            assert r["projected"] == ref["projected"]
            assert r["cosine"] == pytest.approx(ref["cosine"], abs=1e-5)  # global over the shards
            assert r["norms"]["task"] == pytest.approx(ref["norms"]["task"], rel=1e-5)
        for n, w in out["single"].items():
            assert torch.allclose(out[mode][n], w, rtol=1e-5, atol=1e-6), (mode, n, (out[mode][n] - w).abs().max())
