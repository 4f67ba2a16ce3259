"""safehookd's root watcher under /etc/ld.so.preload alone (no Slurm): an unprivileged user's
jobs, each run in a private mount namespace whose /etc/ld.so.preload names the installed
libsafehook (tests/server/expose.py: the host's /etc is never touched).

Protected jobs raise no alarm: a plain run, DataLoader workers (forks), a spawn child, an
evaluation-only job, a PID namespace, torchrun with two gloo ranks. Each bypass is caught by a
root-observed record, never by what the job sent: the loader told not to load libsafehook
(LD_AUDIT), a user namespace hiding /etc/ld.so.preload, a shim that hides the audit hook, a
libpython dlopen()ed after start, forged records, a renamed copy of a torch library, a re-exec
without the preload (each a "watch_torch" verdict), and the in-process tricks a user who owns
the process can always play (hooks cleared, private API, a hand-written update, a checkpoint
under another name: each a "watch_artifact" verdict of `safehook verify` on the file it wrote)."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from server_util import ATTACKS, Watched, clean_env, enforced_build

if os.geteuid() != 0 or not shutil.which("unshare"):
    pytest.skip("the watcher tests need root (fanotify, the proc connector, mount namespaces)",
                allow_module_level=True)

TRAIN = os.path.join(ATTACKS, "train.py")


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    wd = Watched(tmp_path_factory, enforced_build(tmp_path_factory))
    yield wd
    wd.close()


def _cc(w, name, *extra):
    out = os.path.join(w.open, name.replace(".c", ".so" if "late" not in name else ""))
    if not os.path.exists(out):
        args = ["cc", "-O1", "-o", out, os.path.join(ATTACKS, name)] + list(extra)
        if "late" not in name:
            args[1:1] = ["-shared", "-fPIC"]
        subprocess.run(args, check=True)
    return out


class Job:
    """One command run as the attacker (its training command gets CKPT and MODE appended)."""

    def __init__(self, w, argv, name, mode="normal", env=None, save=True, preload=True, args=None):
        self.name, self.mode = name, mode
        self.ckpt = os.path.join(w.work, name + (".txt" if mode == "save_txt" else ".safetensors")) if save else "-"
        tail = [self.ckpt, mode] if args is None else args
        self.proc = subprocess.Popen(w.wrap(preload=preload) + list(argv) + tail, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=clean_env(**(env or {})), cwd=w.work)
        self.pid = self.proc.pid  # unshare, expose.py and the command are one process (exec, no fork)

    def wait(self):
        self.out, self.err = self.proc.communicate(timeout=300)
        self.rc = self.proc.returncode
        return self

    def mine(self, recs):
        """The watcher's verdicts on this job's processes: the command itself, or a child of it."""
        return [r for r in recs if r["event"] == "watch_torch" and self.pid in (r["process"]["pid"], r["process"]["ppid"])]

    def artifact(self, recs):
        a = [r for r in recs if r["event"] == "watch_artifact" and r["path"] == self.ckpt]
        return a[-1] if a else None


def run_all(w, jobs, verdicts=None):
    """Wait for JOBS (started at once), then for the daemon's records on them: each job's
    verdicts (VERDICTS[name] of them, default 1) and the check of each checkpoint it saved."""
    mark = min(j.mark for j in jobs)
    for j in jobs:
        j.wait()

    def done(recs):
        for j in jobs:
            if len(j.mine(recs)) < (verdicts or {}).get(j.name, 1):
                return False
            if j.ckpt != "-" and os.path.exists(j.ckpt) and not j.artifact(recs):
                return False
        return True
    return w.wait_for(mark, done, timeout=240)


def start(w, *a, **kw):
    mark = w.mark()
    j = Job(w, *a, **kw)
    j.mark = mark
    return j


def _verdicts(recs, v=None):
    return [r for r in recs if r["event"] == "watch_torch" and (v is None or r["verdict"] == v)]


def _protected(w, j, recs, processes=1):
    assert j.rc == 0 and ("trained" in j.out or "evaluated" in j.out), (j.name, j.err[-3000:])
    mine = j.mine(recs)
    assert [r["verdict"] for r in mine] == ["ok"] * processes, (j.name, mine)
    assert all(r["maps"] == {"libsafehook": True, "core": True} and r["activation"] for r in mine)
    assert all(r["process"]["uid"] == w.uid for r in mine)
    if j.ckpt == "-":
        return
    assert not w.frozen_changed(j.ckpt)
    art = j.artifact(recs)
    assert art and art["verdict"] == "ok" and art["writer"]["uid"] == w.uid, art


def _caught(w, j, recs, *problems):
    """The attack trained unprotected, and the watcher says so with these problems."""
    assert "trained" in j.out, (j.name, j.err[-3000:])
    flagged = [r for r in j.mine(recs) if r["verdict"] == "flagged"]
    assert flagged, (j.name, j.mine(recs))
    assert all(r["process"]["uid"] == w.uid for r in flagged)
    for want in problems:
        assert any(want in r["problems"] for r in flagged), (j.name, want, flagged)
    return flagged


def test_protected_jobs_raise_no_alarm(w):
    """A plain job (its checkpoint checked "ok"), DataLoader workers (forks: covered by their
    parent), a spawn child (a fresh interpreter: its own activation), evaluation only, a PID
    namespace (the kernel's pids are the daemon's)."""
    jobs = [start(w, [sys.executable, TRAIN], "plain"),
            start(w, [sys.executable, TRAIN], "workers", mode="dataloader", save=False),
            start(w, [sys.executable, TRAIN], "spawn", mode="spawn", save=False),
            start(w, [sys.executable, TRAIN], "eval", mode="eval", save=False),
            start(w, ["unshare", "-Urpf", "--mount-proc", sys.executable, TRAIN], "pidns", save=False)]
    recs = run_all(w, jobs, verdicts={"spawn": 2})
    assert not _verdicts(recs, "flagged"), _verdicts(recs, "flagged")
    for j in jobs:
        _protected(w, j, recs, processes=2 if j.name == "spawn" else 1)


def test_bypasses_of_the_loader_and_the_bootstrap_are_caught(w):
    """LD_AUDIT vetoing libsafehook (its checkpoint flagged too), a user namespace hiding
    /etc/ld.so.preload, a shim hiding the audit hook, libpython loaded after start, forged
    records, a re-exec without the preload, a renamed copy of a torch library."""
    from server_util import torch_lib_dir
    veto = _cc(w, "audit_veto.c")
    shim = _cc(w, "shim_no_hook.c", "-ldl")
    late = _cc(w, "late_python.c", "-ldl")
    libpython = os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY"))
    copy = os.path.join(w.work, "libnothing.so")
    shutil.copy(os.path.join(torch_lib_dir(), "libc10.so"), copy)
    hide = ["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs hide /etc && mount -t tmpfs hide "$0" && exec "$@"',
            os.path.dirname(w.world["system"]), sys.executable, TRAIN]
    forge_env = {"LD_AUDIT": veto, "SH_SOCKET": w.daemon.socket, "SH_SYSTEM": w.world["system"], "SH_DIGEST": w.digest}
    reexec = ("import os, sys; os.execve(sys.executable, [sys.executable] + sys.argv[1:], "
              "dict(os.environ, LD_AUDIT=%r))" % veto)
    jobs = {j.name: j for j in [
        start(w, [sys.executable, TRAIN], "ld_audit", env={"LD_AUDIT": veto}),
        start(w, hide, "userns", save=False),
        start(w, [sys.executable, TRAIN], "shim", save=False, env={"LD_PRELOAD": shim}),
        start(w, [late, libpython, sys.base_prefix, TRAIN], "late", save=False,
              env={"PYTHONPATH": os.pathsep.join(p for p in sys.path if "site-packages" in p)}),
        start(w, [sys.executable, os.path.join(ATTACKS, "forge.py")], "forge", save=False, env=forge_env),
        start(w, [sys.executable, "-c", reexec, TRAIN], "reexec", save=False),
        start(w, [sys.executable, "-c", "import ctypes, time; ctypes.CDLL(%r); time.sleep(1.5); print('trained')"
                  % copy], "renamed", save=False, args=[])]}
    recs = run_all(w, list(jobs.values()))
    no_lib = "the installed libsafehook is not mapped"
    no_act = "no activation record from this process before it mapped libtorch"
    _caught(w, jobs["ld_audit"], recs, no_lib, no_act)
    assert w.frozen_changed(jobs["ld_audit"].ckpt)  # it did train the frozen block...
    assert jobs["ld_audit"].artifact(recs)["verdict"] == "changed"  # ...and its checkpoint says so too
    _caught(w, jobs["userns"], recs, no_lib)
    shim_v = _caught(w, jobs["shim"], recs, "the installed safehook._core is not mapped")
    assert shim_v[0]["maps"]["libsafehook"] is True  # loaded, and made powerless
    _caught(w, jobs["late"], recs, "the installed safehook._core is not mapped")
    forged = _caught(w, jobs["forge"], recs, no_lib)
    assert forged[0]["activation"]  # its own activate record was taken, and did not clear it
    assert "forged task_check R" in jobs["forge"].out and "forged Watch_torch  R" in jobs["forge"].out
    limits = [r for r in recs if r["event"] == "daemon_limit" and r["uid"] == w.uid]
    assert limits and sum(r["refused_events"] for r in limits) == 2
    _caught(w, jobs["reexec"], recs, no_lib)
    renamed = _caught(w, jobs["renamed"], recs, no_act)
    assert renamed[0]["torch"] == copy  # known by its build-id, not its name


def test_in_process_bypasses_are_held_or_caught_by_the_artifact_check(w):
    """In process: the freeze holds against hooks cleared before the first step, and the tamper
    check restores frozen weights changed behind the optimizer when the checkpoint is saved
    through torch or safetensors' torch writer, and says so. Past them (the private API that
    closes the features, another writer), the file root checks is flagged "changed"."""
    held = {"clear_hooks": True, "save_txt": True, "close_features": False, "manual_np": False}
    jobs = [start(w, [sys.executable, TRAIN], "inproc_" + m, mode=m) for m in held]
    recs = run_all(w, jobs)
    for j in jobs:
        assert j.rc == 0 and "trained" in j.out, (j.name, j.err[-3000:])
        assert [r["verdict"] for r in j.mine(recs)] == ["ok"], j.mine(recs)  # the process itself is protected
        art = j.artifact(recs)
        assert art and art["writer"]["uid"] == w.uid, art
        restored = [r for r in recs if r["event"] == "violation" and r.get("restored") and j.ckpt in r.get("where", "")]
        if held[j.mode]:  # the file is intact (a .txt torch zip the harness does not read: restored, said so)
            assert art["verdict"] == "ok" and (restored if j.mode == "save_txt" else True), (j.name, art, restored)
        else:
            assert art["verdict"] == "changed" and not restored, (j.name, art, restored)
        if j.mode != "save_txt":
            assert w.frozen_changed(j.ckpt) == (not held[j.mode])


def test_a_restarted_daemon_still_knows_a_running_protected_job(w):
    j = start(w, [sys.executable, TRAIN], "restart", save=False, env={"SH_SLEEP": "8"})
    first = w.wait_for(j.mark, lambda r: j.mine(r))
    assert [r["verdict"] for r in j.mine(first)] == ["ok"], j.mine(first)
    w.daemon.stop()  # a crash, an upgrade: Restart=always starts it again
    mark = w.mark()
    w.daemon.start()
    again = j.mine(w.wait_for(mark, lambda r: j.mine(r)))
    j.wait()
    assert j.rc == 0 and "trained" in j.out, j.err[-2000:]
    assert [r["verdict"] for r in again] == ["ok"], again
