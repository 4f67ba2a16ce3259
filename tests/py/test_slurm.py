"""Slurm: the SPANK plugin deploys safehook on every task and checks each task out of process.
A real munged + slurmctld + slurmd on localhost (tests/server/slurm_up.sh, config in a temp
folder), a real safehookd, the enforced build of server_util: `srun python train.py` is
protected, audited by the daemon and checked "ok"; `srun env -i python train.py` drops the
preload, trains unprotected, and its task is "flagged" in the daemon's log; so is a task whose
start record carries another policy digest than the one the plugin expects.

Needs root and Debian's slurmd, slurmctld, slurm-client, munge, libslurm-dev. Skipped when they
are missing, unless SAFEHOOK_TEST_SLURM=1 (tests/run.sh sets it after installing them)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from server_util import ROOT, Daemon, enforced_build, safehookd_binary, verify_log

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "policy_scripts", "train_tiny.py")
UP = os.path.join(ROOT, "tests", "server", "slurm_up.sh")
DOWN = os.path.join(ROOT, "tests", "server", "slurm_down.sh")

_missing = [c for c in ("slurmd", "slurmctld", "srun", "munged") if not shutil.which(c)]
if _missing or os.geteuid() != 0:
    why = "Slurm test needs root and %s" % (", ".join(_missing) or "root")
    if os.environ.get("SAFEHOOK_TEST_SLURM") == "1":
        raise RuntimeError(why)
    pytest.skip(why, allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    world = enforced_build(tmp_path_factory)
    if world["spank"] is None:
        pytest.fail("the SPANK plugin was not built (slurm/spank.h missing?)")
    d = tmp_path_factory.mktemp("slurm")
    dm = Daemon(safehookd_binary(tmp_path_factory), d / "safehookd").start()
    with open(world["system"], "w") as f:
        json.dump({"version": 1, "enforce": True, "freeze": {"params": ["0.*"]},
                   "audit": {"sink": "daemon", "socket": dm.socket}}, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
    env["OMP_NUM_THREADS"] = "1"
    # the digest of the policy in force, as the enforced runtime computes it
    out = subprocess.run([sys.executable, "-c", "from safehook import _core; print(_core.configure()['_meta']['digest'])"],
                         env=dict(env, PYTHONPATH=world["site"]), capture_output=True, text=True, check=True)
    c = {"dir": d, "daemon": dm, "world": world, "digest": out.stdout.strip(), "env": env}
    write_plugstack(c, c["digest"])
    up = subprocess.run(["bash", UP, str(d / "cluster")], capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        dm.stop()
        pytest.fail("slurm did not start:\n" + up.stdout + up.stderr)
    env["SLURM_CONF"] = str(d / "cluster" / "slurm.conf")
    yield c
    subprocess.run(["bash", DOWN, str(d / "cluster")], timeout=60)
    dm.stop()


def write_plugstack(c, digest):
    os.makedirs(c["dir"] / "cluster", exist_ok=True)
    (c["dir"] / "cluster" / "plugstack.conf").write_text(
        "required %s lib=%s socket=%s log=%s digest=%s\n"
        % (c["world"]["spank"], c["world"]["lib"], c["daemon"].socket, c["daemon"].log, digest))


def srun(c, *argv):
    p = subprocess.run(["srun", "-n1", "-t", "5"] + list(argv), env=c["env"], capture_output=True, text=True,
                       timeout=300, cwd=str(c["dir"]))
    job = None
    # the task_check record is sent from slurmstepd at task exit: wait for it
    for _ in range(100):
        checks = [r for r in c["daemon"].records() if r["event"] == "task_check"]
        seen = {r["job"] for r in c["daemon"].records() if r["event"] == "job_start"}
        if checks and max(r["job"] for r in checks) == max(seen):
            job = max(seen)
            break
        time.sleep(0.1)
    assert job is not None, (p.stdout, p.stderr)
    recs = c["daemon"].records()
    return p, job, [r for r in recs if r["event"] == "task_check" and r["job"] == job][-1], recs


def test_srun_python_is_protected_audited_and_checked_ok(cluster):
    p, job, check, recs = srun(cluster, sys.executable, TRAIN)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("done") == 3
    assert check["verdict"] == "ok", check
    pids = [t["pid"] for t in check["torch_processes"]]
    assert len(pids) == 1 and check["torch_processes"][0]["problem"] is None
    mine = [r for r in recs if r.get("peer", {}).get("pid") == pids[0]]
    assert [r["event"] for r in mine if r["event"] in ("start", "step", "end")] == ["start", "step", "step", "step", "end"]
    start = [r for r in mine if r["event"] == "start"][0]
    assert start["digest"] == cluster["digest"] and start["enforce"] is True
    assert verify_log(cluster["daemon"].log).returncode == 0


def test_srun_env_i_drops_the_preload_and_is_flagged(cluster):
    p, job, check, recs = srun(cluster, "env", "-i", sys.executable, TRAIN)
    assert p.returncode == 0 and p.stdout.count("done") == 3  # it trained, unprotected...
    assert check["verdict"] == "flagged", check  # ...and the plugin says so, out of process
    assert [t["problem"] for t in check["torch_processes"]] == ["imported torch with no safehook start record"]
    assert not [r for r in recs if r["event"] == "start" and r["peer"]["pid"] == check["torch_processes"][0]["pid"]]


def test_another_policy_digest_is_flagged(cluster):
    write_plugstack(cluster, "0" * 64)
    try:
        p, job, check, recs = srun(cluster, sys.executable, TRAIN)
    finally:
        write_plugstack(cluster, cluster["digest"])
    assert p.returncode == 0
    assert check["verdict"] == "flagged"
    assert check["torch_processes"][0]["problem"].startswith("policy digest %s is not the expected 0000"
                                                             % cluster["digest"][:16])
