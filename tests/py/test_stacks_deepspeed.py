"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU, 2 gloo ranks under torchrun and the preload (issue 13).
DeepSpeed wraps the user's torch SGD; its shared-memory comm op is declared unavailable in the
script, so no DeepSpeed op is compiled and gloo does every collective.

What safehook does there: the freeze is applied when the optimizer is built, before DeepSpeed
flattens (ZeRO-2) or partitions (ZeRO-3) anything; under ZeRO-3 the frozen tensors' checksums
and snapshots follow each rank's slice (ds_tensor). SafeGrad with the anchor source and global
granularity acts on the flat fp32 partitions the optimizer steps, its dot products summed over
the ranks. What cannot reach the partitions is refused with an error naming DeepSpeed ZeRO:
SafeGrad's probe/direction sources (and layer/tensor granularity), the gate, the monitor's
rollback. Skipped when deepspeed is not installed."""
import json
import os

import pytest
import torch

from conftest import events
from test_stacks import STACKS, check_frozen, close, stack_run, steps_of, torchrun
import stacknet

pytest.importorskip("deepspeed", reason="deepspeed not installed (tests/requirements.txt)")


def ds_run(lib, tmp_path, stage, policy, *extra):
    argv = torchrun(extra=["--standalone"]) + [os.path.join(STACKS, "deepspeed_train.py"), str(stage), "3"] + list(extra)
    return stack_run(lib, tmp_path, argv, policy=policy, timeout=300)


def results(tmp_path):
    return [torch.load(str(tmp_path / ("result_%d.pt" % r))) for r in (0, 1)]


@pytest.mark.parametrize("stage,opt", [(2, "torch"), (3, "torch"), (3, "config")])
def test_zero_freeze_and_anchor_projection(lib, tmp_path, stage, opt):
    """Frozen blocks bit-identical, the rest moved, replicas identical, the update equal to the
    single-process float64 reference with projection (and not to the one without), one step
    record per rank and step, the same decision on both ranks; with the user's torch SGD and
    with the one DeepSpeed builds from its config. ZeRO-3: a write into a frozen
    slice after the last step is caught by the exit check on that slice and restored (before:
    the freeze-time checksum of the whole tensor was compared with the slice, a false violation
    whose restore rebound the slice to the whole tensor and broke ZeRO-3's all-gather)."""
    extra = (["tamper"] if stage == 3 and opt == "torch" else []) + (["dsopt"] if opt == "config" else [])
    _, recs = ds_run(lib, tmp_path, stage, stacknet.policy(str(tmp_path / "p.json")), *extra)
    r0, r1 = results(tmp_path)
    for n in r0["final"]:
        assert torch.equal(r0["final"][n], r1["final"][n]), "ranks differ on %s" % n
    check_frozen(r0["final"], r0["init"])
    assert close(r0["final"], r0["ref"], tol=5e-6), max(float((r0["final"][n] - r0["ref"][n]).abs().max()) for n in r0["ref"])
    assert not close(r0["final"], r0["plain"], tol=1e-4)  # the projection changed the update
    st = steps_of(recs)
    assert sorted(r["step"] for r in st) == [1, 1, 2, 2, 3, 3]
    by_step = {}
    for r in st:
        by_step.setdefault(r["step"], set()).add((r["projected"], r["cosine"]))
    assert all(len(v) == 1 for v in by_step.values()), by_step  # one decision, same numbers
    assert sum(1 for r in st if r["projected"]) >= 2 and all(r["freeze_check"] == "ok" for r in st)
    assert not events(recs, "error")
    v = events(recs, "violation")
    if "tamper" in extra:
        assert len(v) == 2 and all(x["at_exit"] and x["restored"] and x["params"] == ["layers.1.weight"] for x in v), v
        assert all(e["freeze"]["repartitioned"] == 4 for e in events(recs, "end"))
    else:
        assert not v


def test_zero_refuses_features_that_cannot_reach_partitions(lib, tmp_path):
    """SafeGrad with a probe, the gate and the monitor's rollback under ZeRO-2: each refuses
    with one error naming DeepSpeed ZeRO (before: the gate recorded delta 0 and 'allow' for an
    update it never checked, and its probe backward made DeepSpeed abort at the next step with
    'Gradient computed twice'). on_error=warn: training goes on with the freeze, and no record
    claims a projection or a gate decision."""
    pol = str(tmp_path / "p.json")
    with open(pol, "w") as f:
        json.dump({"version": 1, "freeze": {"layers": "1-2", "check_every": 1}, "on_error": "warn",
                   "probes": {"safety": {"callable": "stacknet:probe_loss"}},
                   "safegrad": {"source": "probe", "probe": "safety"}, "gate": {"probe": "safety"},
                   "monitor": {"probe": "safety", "every": 1, "action": "rollback", "progress": False}}, f)
    p, recs = ds_run(lib, tmp_path, 2, pol)
    errs = events(recs, "error")
    assert len(errs) == 6 and len({e["pid"] for e in errs}) == 2, errs
    msgs = sorted({e["message"].split(":")[0] for e in errs})
    assert msgs == ["gate", "monitor", "safegrad"], msgs
    assert all("DeepSpeed ZeRO" in e["message"] and e["step"] == 1 for e in errs)
    st = steps_of(recs)
    assert len(st) == 6 and not any({"projected", "cosine", "gate"} & set(r) for r in st), st
    assert not events(recs, "probe") and not events(recs, "rollback")
    assert sum("DeepSpeed ZeRO" in line for line in p.stderr.splitlines()) == 6
    r0, _ = results(tmp_path)
    check_frozen(r0["final"], r0["init"])
