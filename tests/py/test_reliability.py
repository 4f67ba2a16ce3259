"""Reliability: a disk snapshot that fails removes its temp file and names the step it failed
at; SIGTERM to a parent that runs fine-tuning children (safehook demo) ends the children; NaN/inf
in a direction file stops the job, a direction covering some parameters is said, a NaN gradient
is a violation; a probe over 10k rows warns with its cost."""
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "monitor_scripts")
TRAIN = os.path.join(SCRIPTS, "train.py")
sys.path.insert(0, SCRIPTS)


def _env(policy_path, audit_path):
    lib = subprocess.check_output([sys.executable, "-m", "safehook", "lib"], text=True).strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
    env.update(LD_PRELOAD=lib, SAFEHOOK_POLICY=str(policy_path), SAFEHOOK_AUDIT=str(audit_path),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def test_failed_disk_snapshot_names_its_step_and_leaves_no_temp_file(tmp_path):
    import tiny
    from safehook.features import monitor
    probe = tmp_path / "probe.jsonl"
    tiny.write_probe(str(probe))
    snaps = tmp_path / "snaps"
    pol = {"version": 1, "probes": {"refusals": {"data": str(probe), "score": "loss"}},
           "monitor": {"probe": "refusals", "every": 2, "threshold": 0.5, "snapshot": "disk",
                       "snapshot_dir": str(snaps), "progress": False}}
    (tmp_path / "policy.json").write_text(json.dumps(pol))
    # snapshots: baseline (fsync 1), step 2 (2), step 4 (3): the third fails as on a full disk
    cfg = {"phases": [["safe", 8]], "lr": 0.01, "pretrain": 10, "fail_fsync_at": 3, "out": str(tmp_path / "out.json")}
    p = subprocess.run([sys.executable, TRAIN, json.dumps(cfg)], env=_env(tmp_path / "policy.json", tmp_path / "a.jsonl"),
                       capture_output=True, text=True, timeout=300)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["exception"]["type"] == "PolicyError", out["exception"]
    line = [l for l in p.stderr.splitlines() if "cannot save the safe-state snapshot" in l]
    assert line and "(disk) at step 4: OSError: [Errno 28] No space left on device" in line[0], p.stderr
    assert line[0].endswith("(training stops at step 4)")
    assert sorted(os.listdir(snaps)) == ["last-safe.pt"]  # no last-safe.pt.tmp left behind
    assert monitor.load_snapshot(str(snaps / "last-safe.pt"))["step"] == 2


def test_sigterm_to_the_demo_ends_its_finetuning_child(tmp_path):
    child_pid = tmp_path / "child.pid"
    child = "import os, time; open(%r, 'w').write(str(os.getpid())); time.sleep(120)" % str(child_pid)
    code = ("import os, sys\n"
            "from safehook.demo.bench import run_child\n"
            "run_child([sys.executable, '-c', %r], dict(os.environ))\n" % child)
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while not child_pid.exists() or not child_pid.read_text():
            assert time.time() < deadline and parent.poll() is None
            time.sleep(0.05)
        pid = int(child_pid.read_text())
        os.kill(parent.pid, signal.SIGTERM)
        parent.wait(timeout=30)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            # a zombie of init's counts as gone
            try:
                if open("/proc/%d/stat" % pid).read().split(") ")[1][0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the fine-tuning child outlived the demo")
    finally:
        if parent.poll() is None:
            parent.kill()


DIRECTION = os.path.join(HERE, "server_scripts", "direction_train.py")


def _direction_policy(tmp_path, tensors):
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "dir.safetensors"))
    p = tmp_path / "policy.json"
    p.write_text(json.dumps({"version": 1, "safegrad": {"source": "direction",
                                                        "direction": str(tmp_path / "dir.safetensors")}}))
    return str(p)


def _full_direction():
    import torch
    sys.path.insert(0, os.path.join(HERE, "scripts"))
    from tinylm import TinyLM
    return {n: torch.randn_like(p) for n, p in TinyLM(n=2).named_parameters()}


def test_nan_in_a_direction_file_stops_the_job(preload_run, tmp_path):
    d = _full_direction()
    d["layers.0.mix.weight"][3, 4] = float("inf")
    p, recs = preload_run([sys.executable, DIRECTION], policy=_direction_policy(tmp_path, d), check=False)
    assert p.returncode != 0 and "step 1 done" not in p.stdout
    assert "layers.0.mix.weight holds 1 NaN/inf values of 1024" in p.stderr
    assert not [r for r in recs if r["event"] == "step"]


def test_a_direction_covering_some_parameters_is_said_once(preload_run, tmp_path):
    d = _full_direction()
    n_all = len(d)
    for k in [k for k in d if k.startswith("layers.1.")]:
        del d[k]
    p, recs = preload_run([sys.executable, DIRECTION], policy=_direction_policy(tmp_path, d))
    assert p.stdout.count("done") == 4
    lines = [l for l in p.stderr.splitlines() if "safegrad.direction covers" in l]
    assert len(lines) == 1 and "covers %d of %d trainable parameters; the other 6 are not projected" % (n_all - 6, n_all) in lines[0]
    err = [r for r in recs if r["event"] == "error"]
    assert len(err) == 1 and err[0]["count"] == 6 and all(m.startswith("layers.1.") for m in err[0]["missing"])


def test_a_nan_gradient_is_a_violation(preload_run, tmp_path):
    p, recs = preload_run([sys.executable, DIRECTION], policy=_direction_policy(tmp_path, _full_direction()),
                          env_extra={"NAN": "2"})
    # the NaN of step 2 reaches the weights, so steps 3 and 4 have NaN gradients too
    v = [r["what"] for r in recs if r["event"] == "violation"]
    assert [w.split(":")[0] for w in v] == ["non-finite values in the task or safety gradient at step %d" % s
                                           for s in (2, 3, 4)]
    steps = {r["step"]: r for r in recs if r["event"] == "step"}
    assert not steps[1].get("nonfinite") and all(steps[s].get("nonfinite") is True for s in (2, 3, 4))


def test_a_probe_over_10k_rows_warns_with_its_cost(tmp_path, capfd):
    from safehook.probes.probe import Probe
    data = tmp_path / "big.jsonl"
    with open(data, "w") as f:
        for i in range(10001):
            f.write(json.dumps({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}) + "\n")
    Probe("big", {"data": str(data), "batch_size": 16}).examples()
    err = capfd.readouterr().err
    assert "probe 'big': 10001 rows" in err and "626 forward batches of 16" in err and "probes.big.limit" in err
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"input_ids": [1, 2], "labels": [1, 2]}) + "\n" for _ in range(10000)))
    Probe("small", {"data": str(small)}).examples()
    assert capfd.readouterr().err == ""
