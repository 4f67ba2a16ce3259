"""Slurm: the SPANK plugin deploys safehook on every task and tells safehookd's root watcher which
processes are whose; the verdicts are the daemon's own records, from kernel facts.

A real munged + slurmctld + slurmd on localhost (tests/server/slurm_up.sh, config in a temp
folder; slurmd in a private mount namespace where an unprivileged user can reach this machine's
Python), a real safehookd with --watch, the enforced build of server_util, jobs submitted with
srun by an unprivileged user (safehook-attacker):
- `srun python train.py` is protected, its torch process and its checkpoint "ok", its task "ok";
  so is a torchrun job (a launcher and two ranks) and a job with DataLoader workers;
- `srun env -i python train.py` trains unprotected: flagged, whatever records it sends itself;
- a process that escapes the task's lineage by the usual means stays the task's (the kernel's
  fork events): 70 nested shells, a PID namespace, `setsid -f` (it outlives the step: flagged);
- a checkpoint whose frozen block changed is flagged by `safehook verify`, run by the daemon.

Needs root and Debian's slurmd, slurmctld, slurm-client, munge, libslurm-dev. Skipped when they
are missing, unless SAFEHOOK_TEST_SLURM=1 (tests/run.sh sets it after installing them)."""
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from server_util import ATTACKS, ROOT, Watched, clean_env, enforced_build, verify_log

TRAIN = os.path.join(ATTACKS, "train.py")
UP = os.path.join(ROOT, "tests", "server", "slurm_up.sh")
DOWN = os.path.join(ROOT, "tests", "server", "slurm_down.sh")

_missing = [c for c in ("slurmd", "slurmctld", "srun", "munged", "unshare") if not shutil.which(c)]
if _missing or os.geteuid() != 0:
    why = "Slurm test needs root and %s" % (", ".join(_missing) or "root")
    if os.environ.get("SAFEHOOK_TEST_SLURM") == "1":
        raise RuntimeError(why)
    pytest.skip(why, allow_module_level=True)


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    world = enforced_build(tmp_path_factory)
    if world["spank"] is None:
        pytest.fail("the SPANK plugin was not built (slurm/spank.h missing?)")
    w = Watched(tmp_path_factory, world)
    d = os.path.join(w.open, "cluster")
    os.makedirs(d)
    spank = os.path.join(w.open, "safehook_spank.so")  # srun loads it too, as the user
    shutil.copy(world["spank"], spank)
    with open(os.path.join(d, "plugstack.conf"), "w") as f:
        f.write("required %s lib=%s socket=%s log=%s wait=60\n" % (spank, world["lib"], w.daemon.socket, w.daemon.log))
    env = dict(clean_env(), SLURMD_WRAP=shlex.join(w.wrap(uid=False)))
    up = subprocess.run(["bash", UP, d], capture_output=True, text=True, timeout=120, env=env)
    if up.returncode != 0:
        w.close()
        pytest.fail("slurm did not start:\n" + up.stdout + up.stderr)
    w.slurm_env = clean_env(SLURM_CONF=os.path.join(d, "slurm.conf"), PATH=os.environ["PATH"])
    yield w
    subprocess.run(["bash", DOWN, d], timeout=60)
    w.close()


def _as_attacker(uid):
    def drop():
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    return drop


def srun(c, *argv, want=None, timeout=60):
    """srun ARGV as the attacker; returns (process, job id, the daemon's records of the job, its
    watch_task verdict). WANT(records) says when the records are complete (beside the verdict)."""
    mark = c.mark()
    p = subprocess.run(["srun", "-n1", "-t", "5"] + list(argv), env=c.slurm_env, capture_output=True, text=True,
                       timeout=300, cwd=c.work, preexec_fn=_as_attacker(c.uid))
    job = [None]

    def done(recs):
        starts = [r["job"] for r in recs if r["event"] == "job_start" and r.get("uid") == c.uid]
        if not starts:
            return False
        job[0] = max(starts)
        mine = [r for r in recs if r.get("job") == job[0]]
        return any(r["event"] == "watch_task" for r in mine) and (want is None or want(mine))
    recs = c.wait_for(mark, done, timeout=timeout)
    assert job[0] is not None, (p.stdout, p.stderr)
    mine = [r for r in recs if r.get("job") == job[0]]
    task = [r for r in mine if r["event"] == "watch_task"]
    assert task, (p.stdout, p.stderr, mine)
    return p, job[0], mine, task[-1]


def _torch(recs, verdict=None):
    return [r for r in recs if r["event"] == "watch_torch" and (verdict is None or r["verdict"] == verdict)]


def test_srun_python_is_protected_and_its_task_ok(c):
    ckpt = os.path.join(c.work, "plain.safetensors")
    p, job, recs, task = srun(c, sys.executable, TRAIN, ckpt, "normal")
    assert p.returncode == 0 and "trained" in p.stdout, p.stderr
    assert task["verdict"] == "ok", task
    assert [t["verdict"] for t in task["torch_processes"]] == ["ok"]
    assert task["outlived_the_step"] == [] and [a["verdict"] for a in task["artifacts"]] == ["ok"]
    ok = _torch(recs, "ok")
    assert len(ok) == 1 and ok[0]["process"]["uid"] == c.uid and ok[0]["task"] == 0
    assert not c.frozen_changed(ckpt)
    assert verify_log(c.daemon.log).returncode == 0


def test_torchrun_and_dataloader_workers_raise_no_false_alarm(c):
    ckpt = os.path.join(c.work, "ranks.safetensors")
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ATTACKS, "ranks.py"), ckpt]
    p, job, recs, task = srun(c, *run, timeout=120)
    assert p.returncode == 0 and "trained" in p.stdout, p.stderr[-3000:]
    assert task["verdict"] == "ok", task
    # the launcher and both ranks: each its own activation
    assert [t["verdict"] for t in task["torch_processes"]] == ["ok"] * 3, task
    p, job, recs, task = srun(c, sys.executable, TRAIN, os.path.join(c.work, "workers.safetensors"), "dataloader")
    assert p.returncode == 0 and "trained" in p.stdout, p.stderr[-3000:]
    assert task["verdict"] == "ok" and task["forked_children_ok"] >= 2, task
    assert not _torch(recs, "flagged")


def test_srun_env_i_is_flagged_whatever_records_it_sends(c):
    env = ["env", "-i", "SH_SOCKET=" + c.daemon.socket, "SH_SYSTEM=" + c.world["system"], "SH_DIGEST=" + c.digest]
    p, job, recs, task = srun(c, *env, sys.executable, os.path.join(ATTACKS, "forge.py"),
                              os.path.join(c.work, "envi.safetensors"), "normal",
                              want=lambda r: [x for x in r if x["event"] == "watch_artifact"])
    assert p.returncode == 0 and "trained" in p.stdout, p.stderr  # it trained, unprotected...
    assert "forged activate O" in p.stdout and "forged task_check R" in p.stdout
    assert task["verdict"] == "flagged", task  # ...and root says so
    flagged = _torch(recs, "flagged")
    assert len(flagged) == 1 and flagged[0]["activation"], flagged  # its own activate record did not help
    assert "the installed libsafehook is not mapped" in flagged[0]["problems"]
    assert [a["verdict"] for a in task["artifacts"]] == ["changed"]


@pytest.mark.parametrize("how", ["nested", "pidns"])
def test_leaving_the_tasks_lineage_does_not_hide_a_process(c, how):
    cmd = ["env", "-i", sys.executable, TRAIN, os.path.join(c.work, how + ".safetensors"), "normal"]
    if how == "nested":
        argv = ["sh", os.path.join(ATTACKS, "nest.sh"), "70"] + cmd
    else:
        argv = ["unshare", "-Urpf", "--mount-proc"] + cmd
    p, job, recs, task = srun(c, *argv)
    assert "trained" in p.stdout, p.stderr[-2000:]
    assert task["verdict"] == "flagged"
    flagged = _torch(recs, "flagged")
    assert len(flagged) == 1 and flagged[0]["job"] == job and flagged[0]["task"] == 0, flagged


def test_a_process_that_outlives_the_step_is_flagged(c):
    ckpt = os.path.join(c.work, "setsid.safetensors")
    cmd = "setsid -f env -i %s %s %s normal >/dev/null 2>&1; exit 0" % (sys.executable, TRAIN, ckpt)
    p, job, recs, task = srun(c, "sh", "-c", cmd, want=lambda r: _torch(r))
    assert task["verdict"] == "flagged"
    assert task["outlived_the_step"] and task["outlived_the_step"][0]["exe"].endswith("python3.11"), task
    flagged = _torch(recs, "flagged")
    assert len(flagged) == 1 and flagged[0]["job"] == job, flagged  # still the job's, from the kernel's lineage
    for _ in range(100):  # let it finish before the next test
        if os.path.exists(ckpt):
            break
        time.sleep(0.2)


def test_a_changed_checkpoint_of_a_protected_task_is_flagged(c):
    ckpt = os.path.join(c.work, "inproc.safetensors")
    p, job, recs, task = srun(c, sys.executable, TRAIN, ckpt, "manual_np")
    assert p.returncode == 0 and "trained" in p.stdout, p.stderr
    assert [t["verdict"] for t in task["torch_processes"]] == ["ok"]  # protected, and bypassed in process:
    assert task["verdict"] == "flagged" and [a["verdict"] for a in task["artifacts"]] == ["changed"], task
    assert c.frozen_changed(ckpt)
