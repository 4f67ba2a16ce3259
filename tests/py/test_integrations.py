"""safehook's per-step stats in the user's own logs (safehook.integrations): a real HF Trainer run
with report_to="tensorboard" under the preload, its TensorBoard event file read back with
TensorBoard's own reader; the same stats in trainer.state.log_history, in Python logging under
the `safehook` logger, and in an Accelerate loop's TensorBoard tracker. Every figure is checked
against the audit log of the same run (the record of what was applied).

Policy: SafeGrad on a probe, the gate (skip at tolerance 0) and the monitor every 3 steps, on a
tiny Llama, 6 optimizer steps, Trainer logging every 2."""
import glob
import json
import math
import os
import sys

import pytest

from conftest import base_env, events, read_audit, run

pytest.importorskip("tensorboard", reason="tensorboard not installed (tests/requirements.txt)")
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "integration_scripts", "hf_logs.py")
STEPS, EVERY = 6, 2


def _policy(tmp_path):
    probe = tmp_path / "probe.jsonl"
    with open(probe, "w") as f:
        for i in range(8):
            ids = [1] + [(7 * i + 3 * j) % 60 + 3 for j in range(10)]
            f.write(json.dumps({"input_ids": ids, "labels": [-100] * 5 + ids[5:]}) + "\n")
    pol = {"version": 1, "audit": {"level": "steps"},
           "probes": {"safety": {"data": str(probe)}},
           "safegrad": {"source": "probe", "probe": "safety"},
           "gate": {"probe": "safety", "action": "skip", "tolerance": 0.0, "ratio": 0.0},
           "monitor": {"probe": "safety", "every": 3, "action": "reduce_lr", "max_rollbacks": 10,
                       "progress": False}}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(pol))
    return str(path)


def _run(tmp_path, lib, mode, *extra):
    out = tmp_path / mode
    out.mkdir()
    audit = tmp_path / ("audit-%s.jsonl" % mode)
    env = base_env(LD_PRELOAD=lib, SAFEHOOK_POLICY=_policy(tmp_path), SAFEHOOK_AUDIT=str(audit),
                   DS_ACCELERATOR="cpu")
    p = run([sys.executable, SCRIPT, mode, str(out)] + list(extra), env, cwd=str(tmp_path), timeout=600)
    recs = read_audit(str(audit))
    assert not events(recs, "error"), events(recs, "error")
    with open(out / "seen.json") as f:
        seen = json.load(f)
    return out, recs, seen, p


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = glob.glob(os.path.join(str(logdir), "**", "events.out.tfevents.*"), recursive=True)
    assert files, "no event file under %s" % logdir
    out = {}
    for f in files:
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def _steps(recs):
    st = [r for r in events(recs, "step")]
    assert [r["step"] for r in st] == list(range(1, STEPS + 1)), [r["step"] for r in st]
    return st


def _expected(recs, lo, hi):
    """What the Trainer's log at step HI must say of optimizer steps LO..HI, from the audit."""
    st = [r for r in _steps(recs) if lo <= r["step"] <= hi]
    exp = {"safehook/steps": len(st),
           "safehook/projected": sum(1 for r in st if r.get("projected")),
           "safehook/cosine": sum(r["cosine"] for r in st) / len(st),
           "safehook/safety_loss": sum(r["safety_loss"] for r in st) / len(st),
           "safehook/gate_skipped": sum(1 for r in st if r["gate"]["action"] == "skip")}
    scores = [r for r in events(recs, "probe") if r.get("step") in range(lo, hi + 1) and "score" in r]
    if scores:
        exp["safehook/probe_score"] = scores[-1]["score"]
    return exp


def test_trainer_tensorboard_event_file_has_safehooks_scalars(tmp_path, lib):
    out, recs, seen, _ = _run(tmp_path, lib, "trainer")
    st = _steps(recs)
    assert all("cosine" in r and "safety_loss" in r and "gate" in r for r in st), st
    tb = _scalars(out)
    logged = [s for s in range(EVERY, STEPS + 1, EVERY)]
    for s in logged:
        exp = _expected(recs, s - EVERY + 1, s)
        for k, v in exp.items():
            tag = "train/" + k
            assert tag in tb, (tag, sorted(tb))
            assert math.isclose(tb[tag][s], v, rel_tol=1e-5, abs_tol=1e-6), (tag, s, tb[tag], v)
        # the Trainer's own loss is logged beside them, at the same steps
        assert s in tb["train/loss"]
    # a probe score reached the log at the step after the monitor measured (step 3 -> log at 4)
    assert "train/safehook/probe_score" in tb and 4 in tb["train/safehook/probe_score"], tb.get(
        "train/safehook/probe_score")

    # log_history: one safehook entry per logging step, the same figures
    hist = [h for h in seen["log_history"] if "safehook/steps" in h]
    assert [h["step"] for h in hist] == logged, seen["log_history"]
    for h in hist:
        exp = _expected(recs, h["step"] - EVERY + 1, h["step"])
        for k, v in exp.items():
            assert math.isclose(h[k], v, rel_tol=1e-9, abs_tol=1e-12), (k, h, v)
    assert seen["callbacks"].count("_AddedSafehookCallback") == 1, seen["callbacks"]

    # Python logging, logger "safehook": one INFO record per optimizer step, its own figures
    lg = seen["logging"]
    assert [r["stats"]["step"] for r in lg] == list(range(1, STEPS + 1)), lg
    for r, a in zip(lg, st):
        assert math.isclose(r["stats"]["safehook/cosine"], a["cosine"], rel_tol=1e-12), (r, a)
        assert r["stats"]["safehook/projected"] == (1 if a.get("projected") else 0)
        assert r["msg"].startswith("step %d: " % a["step"]) and "cosine=" in r["msg"], r["msg"]


def test_a_callback_passed_by_the_user_replaces_the_added_one(tmp_path, lib):
    _, recs, seen, _ = _run(tmp_path, lib, "trainer", "explicit")
    cbs = seen["callbacks"]
    assert "SafehookCallback" in cbs and "_AddedSafehookCallback" in cbs, cbs
    hist = [h for h in seen["log_history"] if "safehook/steps" in h]
    assert [h["step"] for h in hist] == [2, 4, 6], seen["log_history"]  # once, not twice
    assert hist[0]["safehook/projected"] == _expected(recs, 1, 2)["safehook/projected"]


def test_accelerate_tracker_gets_every_steps_stats(tmp_path, lib):
    out, recs, _, _ = _run(tmp_path, lib, "accelerate")
    st = _steps(recs)
    tb = _scalars(out)
    assert "safehook/cosine" in tb, sorted(tb)
    assert sorted(tb["safehook/cosine"]) == list(range(1, STEPS + 1)), tb["safehook/cosine"]
    for a in st:
        assert math.isclose(tb["safehook/cosine"][a["step"]], a["cosine"], rel_tol=1e-5, abs_tol=1e-6)
        assert tb["safehook/projected"][a["step"]] == (1 if a.get("projected") else 0)
    assert sorted(tb["loss"]) == list(range(1, STEPS + 1))  # the loop's own log, beside


def test_tap_counts_flags_probe_scores_and_rollbacks_of_a_step():
    """The records a step's features write (shaping's flags, the monitor's probe and rollback)
    become that step's stats; a flag withdrawn by the stream check stops nothing."""
    from safehook.integrations import tap
    got = []
    sink = lambda step, stats: got.append((step, stats))  # noqa: E731
    t = tap.Tap(None)
    t.looked = True  # no Accelerator to look for
    tap.sinks().append(sink)
    try:
        t.on_record("flag", {"fingerprint": "a", "action": "mask"}, 3)
        t.on_record("flag", {"fingerprint": "b", "action": "refuse"}, 3)
        t.on_record("flag", {"fingerprint": "a", "action": "none", "revoked": True}, 3)
        t.on_record("probe", {"score": -2.5, "passed": False}, 3)
        t.on_record("probe", {"score": -2.0, "passed": True}, 3)
        t.on_record("rollback", {"to_step": 1}, 3)
        t.pre(None, 3, {"projected": 4, "cosine": -0.25, "gate": {"action": "scale", "scale": 0.5}})
        t.post(None, 3, {})
        t.post(None, 4, {})  # nothing recorded: nothing sent
        t.close()  # a closed tap (its runtime replaced or uninstalled) takes and sends nothing
        t.on_record("rollback", {"to_step": 1}, 5)
        t.post(None, 5, {})
    finally:
        tap.sinks().remove(sink)
    assert got == [(3, {"safehook/flagged": 2, "safehook/probe_score": -2.0, "safehook/rollbacks": 1,
                        "safehook/projected": 4, "safehook/cosine": -0.25, "safehook/gate_skipped": 0,
                        "safehook/gate_scaled": 1, "safehook/gate_scale": 0.5})], got
