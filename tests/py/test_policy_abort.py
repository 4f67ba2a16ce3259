"""on_error in a real training process under LD_PRELOAD: an invalid policy stops an unmodified
training script before its first optimizer step (one clear message with the policy error,
non-zero exit, no step in the audit log); a valid policy that cannot be applied stops it too
under abort, and lets it train under warn, saying so."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(HERE, "policy_scripts", "train_tiny.py")


@pytest.fixture(scope="module")
def lib():
    return subprocess.check_output([sys.executable, "-m", "safehook", "lib"], text=True).strip()


def _train(lib, policy, audit):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_")}
    env.update(LD_PRELOAD=lib, SAFEHOOK_POLICY=policy, SAFEHOOK_AUDIT=audit)
    return subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=300)


def _events(path):
    with open(path) as f:
        return [json.loads(l)["event"] for l in f if l.strip()]


@pytest.mark.parametrize("case", ["syntax-missing-colon", "layers-overlapping"])
def test_invalid_policy_stops_before_step_1(lib, tmp_path, case):
    policy = os.path.join(ROOT, "tests", "policies", "invalid", case, "policy.json")
    with open(os.path.join(ROOT, "tests", "policies", "invalid", case, "expected")) as f:
        line = f.read().rstrip("\n").replace("FILE", policy, 1)
    audit = str(tmp_path / "audit.jsonl")
    r = _train(lib, policy, audit)
    assert r.returncode != 0
    assert "step 1 done" not in r.stdout
    err = r.stderr.splitlines()
    # one message from safehook, then the exception that stopped the first step
    assert err[0] == "safehook: policy error: %s (training will stop at its first optimizer step)" % line
    assert [l for l in err if l.startswith("safehook:")] == [err[0]]
    assert err[-1] == "safehook.PolicyError: policy error: %s" % line
    assert _events(audit) == ["error"]


def _unappliable(tmp_path, on_error):
    # valid, but its probe's callable cannot be imported: protection cannot be applied
    path = tmp_path / ("policy-%s.json" % on_error)
    path.write_text(json.dumps({"version": 1, "on_error": on_error,
                                "probes": {"p": {"callable": "safehook_no_such_module:loss"}}}))
    return str(path)


def test_unappliable_policy_under_abort_stops(lib, tmp_path):
    audit = str(tmp_path / "audit.jsonl")
    r = _train(lib, _unappliable(tmp_path, "abort"), audit)
    assert r.returncode != 0 and "step 1 done" not in r.stdout
    assert r.stderr.splitlines()[-1].startswith("safehook.PolicyError: cannot set up 'probes'")
    assert _events(audit) == ["error"]


def test_unappliable_policy_under_warn_trains_and_says_so(lib, tmp_path):
    audit = str(tmp_path / "audit.jsonl")
    r = _train(lib, _unappliable(tmp_path, "warn"), audit)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["step 1 done", "step 2 done", "step 3 done"]
    err = r.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("safehook: cannot set up 'probes'")
    assert err[0].endswith("(on_error=warn: training continues)")
    assert _events(audit) == ["error", "start", "optimizer", "step", "step", "step", "end"]
