"""Reliability: a disk snapshot that fails removes its temp file and names the step it failed
at; SIGTERM to a parent that runs fine-tuning children (safehook demo) ends the children."""
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
