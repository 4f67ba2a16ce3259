"""The safegrad feature in real training runs under LD_PRELOAD: each run recomputes what the
step should have been (tests/py/scripts/safegrad_train.py) and the audit log says what the hook
did."""
import json
import os
import sys

import pytest
import torch

from conftest import SCRIPTS, events

PY = sys.executable
TRAIN = os.path.join(SCRIPTS, "safegrad_train.py")


def results(proc):
    return [json.loads(l[7:]) for l in proc.stdout.splitlines() if l.startswith("RESULT ")]


def probe_file(tmp_path):
    """Eight prompts with a 'refusal' (tokens 50-53); the task teaches other responses."""
    gen = torch.Generator().manual_seed(2)
    path = tmp_path / "probe.jsonl"
    with open(path, "w") as f:
        for _ in range(8):
            prompt = torch.randint(4, 40, (6,), generator=gen).tolist()
            ids = prompt + [50, 51, 52, 53]
            f.write(json.dumps({"input_ids": ids, "labels": [-100] * 6 + ids[6:]}) + "\n")
    return str(path)


def direction_file(tmp_path, seed=0):
    """A direction for the mlp of the script: random, so that some steps conflict."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    gen = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(p.shape, generator=gen) for n, p in m.named_parameters()}
    path = tmp_path / "dir.safetensors"
    save_file(d, str(path))
    return str(path)


def write_policy(tmp_path, safegrad, probe=None):
    pol = {"version": 1, "safegrad": safegrad}
    if probe:
        pol["probes"] = {"safety": {"data": probe}}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(pol))
    return str(path)


def check_steps(res, recs, tol, nsteps, case=0):
    res = [r for r in res if r["case"] == case]
    steps = [r for r in events(recs, "step") if r["opt"] == case]
    assert [r["step"] for r in steps] == list(range(1, nsteps + 1))  # one projection per optimizer step
    assert len(res) == nsteps, res  # one result line per step: a missing line fails, not shortens the zip
    for r, rec in zip(res, steps):
        assert rec["projected"] == r["projected"], (rec, r)
        if r["cos"] is None:
            assert rec["cosine"] is None
        else:
            assert rec["cosine"] == pytest.approx(r["cos"], abs=1e-4)
            assert rec["norms"]["task"] == pytest.approx(r["norm_task"], rel=1e-4)
            assert rec["norms"]["safety"] == pytest.approx(r["norm_safety"], rel=1e-4)
        assert r["err"] <= tol * r["update"] + 1e-7, r  # the update is the projected one
    return steps


def test_probe_projection_protects_the_safety_loss(preload_run, tmp_path):
    probe = probe_file(tmp_path)
    pol = write_policy(tmp_path, {"source": "probe", "probe": "safety"}, probe)
    cfg = {"model": "lm", "source": "probe", "probe": probe, "cases": [{"steps": 4, "lr": 1.0}]}
    p, recs = preload_run([PY, TRAIN, json.dumps(cfg)], policy=pol)
    res = results(p)
    check_steps(res, recs, 1e-4, 4)
    projected = [r for r in res if r["projected"]]
    assert projected, res  # the task pulls against the refusals: some step conflicts
    for r in projected:
        assert r["err_plain"] > 10 * r["err"]  # and the update differs from the plain one
        rise_proj = r["ls_after"] - r["ls_before"]
        rise_plain = r["ls_plain"] - r["ls_before"]
        assert rise_proj < rise_plain, r
    assert all(rec.get("safety_refreshed") for rec in events(recs, "step"))


def test_probe_refresh_every_and_kl(preload_run, tmp_path):
    probe = probe_file(tmp_path)
    pol = write_policy(tmp_path, {"source": "probe", "probe": "safety", "loss": "kl", "refresh_every": 2}, probe)
    cfg = {"model": "lm", "source": "anchor", "probe": probe, "cases": [{"steps": 4, "lr": 1.0}]}  # reference unused
    p, recs = preload_run([PY, TRAIN, json.dumps(cfg)], policy=pol)
    steps = events(recs, "step")
    assert [bool(r.get("safety_refreshed")) for r in steps] == [True, False, True, False]
    assert steps[0]["norms"]["safety"] < 1e-6  # KL to step 0 is flat at step 0
    assert steps[2]["norms"]["safety"] > 1e-4  # and not after two updates
    assert steps[0]["safety_loss"] == pytest.approx(0.0, abs=1e-6)
    assert steps[2]["safety_loss"] > 0


CASES = [
    {"dtype": "float32"},
    {"dtype": "bfloat16"},
    {"dtype": "float16"},
    {"amp": "scaler"},
    {"amp": "fused"},
    {"accum": 3},
    {"clip": 0.05},
    {"amp": "fused", "clip": 0.05},
]


def test_direction_source_updates(preload_run, tmp_path):
    """Every dtype, GradScaler (the hook sees unscaled gradients; with a fused optimizer, scaled
    ones), accumulation and clipping: the update is the float64-projected one."""
    d = direction_file(tmp_path)
    pol = write_policy(tmp_path, {"source": "direction", "direction": d})
    cases = [dict({"steps": 4, "lr": 0.5}, **c) for c in CASES]
    cfg = {"model": "mlp", "source": "direction", "direction": d, "cases": cases}
    p, recs = preload_run([PY, TRAIN, json.dumps(cfg)], policy=pol)
    res = results(p)
    for i, case in enumerate(CASES):
        tol = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 4e-3}[case.get("dtype", "float32")]
        check_steps(res, recs, tol, 4, case=i)
        mine = [r for r in res if r["case"] == i]
        assert any(r["projected"] for r in mine) and not all(r["projected"] for r in mine), (case, mine)


def test_anchor_source(preload_run, tmp_path):
    pol = write_policy(tmp_path, {"source": "anchor", "granularity": "global"})
    cfg = {"model": "mlp", "source": "anchor", "cases": [{"steps": 5, "lr": 0.5}]}
    p, recs = preload_run([PY, TRAIN, json.dumps(cfg)], policy=pol)
    res = results(p)
    steps = check_steps(res, recs, 1e-4, 5)
    assert steps[0]["cosine"] is None and steps[0]["projected"] is False  # w == w0 at step 1
    assert steps[1]["norms"]["safety"] > 0


def test_tensor_granularity_records(preload_run, tmp_path):
    d = direction_file(tmp_path)
    pol = write_policy(tmp_path, {"source": "direction", "direction": d, "granularity": "tensor"})
    cfg = {"model": "mlp", "source": "direction", "direction": d, "cases": [{"steps": 2, "lr": 0.5}]}
    p, recs = preload_run([PY, TRAIN, json.dumps(cfg)], policy=pol)
    for rec in events(recs, "step"):
        assert rec["groups"] == 4 and 0 <= rec["projected"] <= 4
        assert -1 <= rec["cosine_min"] <= rec["cosine"] + 1e-9 or rec["projected"] == 0


def test_bad_direction_file_stops_training(preload_run, tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "bad.safetensors"
    save_file({"nothing.weight": torch.zeros(2)}, str(path))
    pol = write_policy(tmp_path, {"source": "direction", "direction": str(path)})
    cfg = {"model": "mlp", "source": "anchor", "cases": [{"steps": 2}]}
    p, recs = preload_run([PY, TRAIN, json.dumps(cfg)], policy=pol, check=False)
    assert p.returncode != 0 and "PolicyError" in p.stderr
    assert "no key of the file names a parameter" in p.stderr
    assert events(recs, "error")
