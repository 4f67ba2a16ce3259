"""The preload path: whatever the import order, every optimizer step of a real torch training
script reaches the C hooks (one `step` record per step), each process is protected once, and
the library stays out of processes that are not CPython."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import SCRIPTS, base_env, events, read_audit, run

PY = sys.executable


def steps_of(records, pid=None):
    return [r for r in events(records, "step") if pid is None or r["pid"] == pid]


@pytest.mark.parametrize("argv", [
    [PY, os.path.join(SCRIPTS, "train_top.py"), "6"],
    [PY, os.path.join(SCRIPTS, "train_late.py"), "6"],
    [PY, os.path.join(SCRIPTS, "train_from_import.py"), "6"],
    [PY, "-m", "trainpkg", "6"],
    [PY, os.path.join(SCRIPTS, "train_runpy.py"), "6"],
    [PY, "-c", "import runpy, sys; sys.argv=['x', '6']; runpy.run_path(%r, run_name='__main__')"
     % os.path.join(SCRIPTS, "train_top.py")],
], ids=["top", "inside-function", "from-torch-optim", "python-m", "runpy", "python-c"])
def test_every_step_is_hooked_in_every_import_order(preload_run, argv):
    p, recs = preload_run(argv, cwd=SCRIPTS)
    assert "trained 6" in p.stdout
    steps = steps_of(recs)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {r["opt"] for r in steps} == {0}
    assert len(events(recs, "start")) == 1 and len(events(recs, "end")) == 1
    assert events(recs, "end")[0]["steps"] == 6
    start = events(recs, "start")[0]
    assert start["versions"]["torch"].startswith("2.")
    assert start["policy"] == "<embedded default>"
    # the default cannot protect a model without a token embedding: one line says so (and why)
    assert start["default"]["applied"] == "fallback"
    assert re.match(r"safehook: the default policy cannot protect (\w+): \1 has no token embedding .*\n$",
                    p.stderr) and p.stderr.count("\n") == 1, p.stderr


def test_install_covers_optimizers_created_before_it(lib, tmp_path):
    audit = tmp_path / "a.jsonl"
    env = base_env(SAFEHOOK_AUDIT=str(audit))  # no preload: the notebook way
    p = run([PY, os.path.join(SCRIPTS, "train_notebook.py")], env)
    assert "done" in p.stdout
    recs = read_audit(str(audit))
    # 2 steps before install (unprotected), 3 after, 1 after uninstall (unprotected)
    assert [r["step"] for r in steps_of(recs)] == [1, 2, 3]


def test_preload_and_import_share_one_runtime(preload_run):
    # Under the preload, `import safehook; safehook.install()` must not start a second runtime.
    _, recs = preload_run([PY, os.path.join(SCRIPTS, "train_notebook.py")], cwd=SCRIPTS)
    steps = steps_of(recs)
    # the preload protects from the first step; uninstall() then removes the hooks
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert len(events(recs, "start")) == 1
    assert len({r["pid"] for r in recs}) == 1


def test_several_optimizers_nested_and_repeated_steps(preload_run):
    _, recs = preload_run([PY, os.path.join(SCRIPTS, "train_idempotent.py")])
    steps = steps_of(recs)
    by_opt = {}
    for r in steps:
        by_opt.setdefault(r["opt"], []).append(r["step"])
    # opt 0 = SGD: 3 steps + 1 extra; opt 1 = the wrapper: 3 steps, its inner Adam is not
    # counted as a step of its own
    assert by_opt == {0: [1, 2, 3, 4], 1: [1, 2, 3]}
    end = events(recs, "end")[0]
    assert end["steps"] == 7 and end["nested_steps"] == 3 and end["optimizers"] == 2


def test_forked_workers_do_nothing_and_spawned_children_are_protected(preload_run):
    _, recs = preload_run([PY, os.path.join(SCRIPTS, "train_workers.py")])
    steps = steps_of(recs)
    pids = sorted({r["pid"] for r in steps})
    assert len(pids) == 2, pids  # the parent and the spawned child; no DataLoader worker
    counts = sorted(len(steps_of(recs, pid)) for pid in pids)
    assert counts == [2, 4]
    # every process that stepped wrote exactly one start and one end
    for pid in pids:
        assert len([r for r in events(recs, "start") if r["pid"] == pid]) == 1
        assert len([r for r in events(recs, "end") if r["pid"] == pid]) == 1
    # workers (forked, never stepping) wrote nothing
    assert {r["pid"] for r in recs} == set(pids)


def test_torchrun_workers_are_each_protected_once(preload_run):
    argv = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(SCRIPTS, "train_ddp.py")]
    _, recs = preload_run(argv, timeout=240)
    steps = steps_of(recs)
    pids = sorted({r["pid"] for r in steps})
    assert len(pids) == 2
    for pid in pids:
        assert [r["step"] for r in steps_of(recs, pid)] == [1, 2, 3]
    assert len(events(recs, "start")) == 2  # the launcher never steps, so writes nothing


def test_disable_leaves_the_process_alone(preload_run):
    p, recs = preload_run([PY, os.path.join(SCRIPTS, "train_top.py"), "3"], env_extra={"SAFEHOOK_DISABLE": "1"})
    assert "trained 3" in p.stdout
    assert recs == []
    # An empty log alone would also hold with a broken preload: the library is mapped into the
    # process, and still safehook was never imported and no optimizer hook is registered.
    code = ("import sys, torch, torch.optim.optimizer as o; maps = open('/proc/self/maps').read(); "
            "print('libsafehook.so' in maps, 'safehook' in sys.modules, len(o._global_optimizer_pre_hooks))")
    p, recs = preload_run([PY, "-c", code], env_extra={"SAFEHOOK_DISABLE": "1"})
    assert p.stdout.split() == ["True", "False", "0"]
    p, _ = preload_run([PY, "-c", code])
    assert p.stdout.split() == ["True", "True", "1"]  # the control: without DISABLE it is active


def test_debug_log_is_prefixed(preload_run):
    p, _ = preload_run([PY, os.path.join(SCRIPTS, "train_top.py"), "2"], env_extra={"SAFEHOOK_LOG": "debug"})
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines and all(l.startswith("safehook:") for l in lines), p.stderr


def test_preload_library_has_no_python_symbols(lib):
    out = subprocess.check_output(["nm", "-D", "--undefined-only", lib], text=True)
    assert not [l for l in out.splitlines() if " Py" in l or " _Py" in l], out
    exported = subprocess.check_output(["nm", "-D", "--defined-only", lib], text=True)
    assert [l for l in exported.splitlines() if " T " in l] == []  # exports no function
    # libunwind is never linked into the preload library (nor its _Unwind_* symbols)
    assert "unwind" not in subprocess.check_output(["ldd", lib], text=True)


@pytest.mark.parametrize("python", [PY, "/usr/bin/python3"], ids=["default", "debian-static-libpython"])
def test_hook_is_found_in_both_pythons(lib, tmp_path, python):
    # The constructor finds CPython through the loaded objects' GNU hash tables (no dlsym, no
    # malloc, in processes that are not Python): in pyenv's python (shared libpython) and in
    # Debian's (libpython linked into the executable). A package that fails to import next to
    # the library shows that the hook ran: the import of torch is seen before torch loads.
    if not os.path.exists(python):
        pytest.skip("%s is not installed" % python)
    fake = tmp_path / "pkg"
    fake.mkdir()
    shutil.copy(lib, fake / "libsafehook.so")
    (fake / "__init__.py").write_text("raise RuntimeError('seen')\n")
    p = run([python, "-c", "import sys\ntry:\n import torch\nexcept ImportError: pass"],
            base_env(LD_PRELOAD=str(fake / "libsafehook.so")))
    assert "safehook: protection is NOT active" in p.stderr and "RuntimeError: seen" in p.stderr


def test_audit_hook_failure_is_reported_not_silent(lib, tmp_path):
    # A broken package next to the library: torch still imports, the user is told once.
    fake = tmp_path / "pkg"
    fake.mkdir()
    shutil.copy(lib, fake / "libsafehook.so")
    (fake / "__init__.py").write_text("raise RuntimeError('broken install')\n")
    env = base_env(LD_PRELOAD=str(fake / "libsafehook.so"))
    p = run([PY, "-c", "import torch; print('ok')"], env)
    assert p.stdout.strip() == "ok"
    assert p.stderr.count("safehook: protection is NOT active") == 1
    assert "RuntimeError: broken install" in p.stderr


def test_optimizer_record_and_sampled_steps(preload_run, tmp_path):
    pol = tmp_path / "p.json"
    pol.write_text('{"version": 1, "audit": {"level": "sample", "sample_every": 3}}')
    _, recs = preload_run([PY, os.path.join(SCRIPTS, "train_top.py"), "7"], policy=str(pol))
    assert [r["step"] for r in steps_of(recs)] == [1, 3, 6]
    opt = events(recs, "optimizer")
    assert len(opt) == 1 and opt[0]["class"] == "AdamW" and opt[0]["index"] == 0
    assert events(recs, "end")[0]["steps"] == 7
    pol.write_text('{"version": 1, "audit": {"level": "events"}}')
    _, recs = preload_run([PY, os.path.join(SCRIPTS, "train_top.py"), "4"], policy=str(pol))
    assert steps_of(recs) == [] and events(recs, "end")[0]["steps"] == 4


def test_install_again_replaces_the_features(lib, tmp_path):
    audit = tmp_path / "a.jsonl"
    run([PY, os.path.join(SCRIPTS, "train_reinstall.py")], base_env(SAFEHOOK_AUDIT=str(audit)))
    steps = steps_of(read_audit(str(audit)))
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all("cosine" in r for r in steps[:3])  # SafeGrad's fields while its policy is in force
    assert not any("cosine" in r for r in steps[3:])
