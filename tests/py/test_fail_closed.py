"""Fail closed under an enforced system policy, through the real preload bootstrap: every way the
package can fail to activate stops the job before its first step with one clear line (import
torch raises), and the sabotage that used to leave a job silently unprotected (a fake safehook
in sys.modules, a shadow package imported first) now leaves it protected and audited by
safehookd.

Every early return of the bootstrap fails closed too (CPython functions or its own path not
found, played by a shim library preloaded before it), a system policy hidden by a user
namespace is not "no policy", modules faked with the real files' __file__ are not trusted (the
check is by identity, in C), and each refusal reaches safehookd as a record, a refused user
policy's included.

The system policy's path is compiled in, so these tests use their own build of libsafehook.so
and safehook._core with a path in a temp folder (server_util.enforced_build, ~30 s once)."""
import json
import os
import subprocess
import sys

import pytest

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
static int breaks(const char *what) { const char *w = getenv("SHIM_BREAK"); return w && !strcmp(w, what); }
void *dlsym(void *h, const char *name) {
    static void *(*real)(void *, const char *);
    if (!real) real = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (breaks("dlsym") && !strcmp(name, "PyRun_StringFlags")) return NULL;
    return real(h, name);
}
int dladdr(const void *a, Dl_info *i) {
    static int (*real)(const void *, Dl_info *);
    if (!real) real = (int (*)(const void *, Dl_info *))dlvsym(RTLD_NEXT, "dladdr", "GLIBC_2.34");
    if (breaks("dladdr")) return 0;
    return real(a, i);
}
char *realpath(const char *p, char *r) {
    static char *(*real)(const char *, char *);
    if (!real) real = (char *(*)(const char *, char *))dlvsym(RTLD_NEXT, "realpath", "GLIBC_2.3");
    if (breaks("realpath") && strstr(p, "libsafehook")) { errno = EACCES; return NULL; }
    return real(p, r);
}
"""

from server_util import Daemon, enforced_build, safehookd_binary, verify_log

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "policy_scripts", "train_tiny.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return dict(enforced_build(tmp_path_factory), safehookd=safehookd_binary(tmp_path_factory))


@pytest.fixture
def daemon(world, tmp_path):
    dm = Daemon(world["safehookd"], tmp_path / "d").start()
    yield dm
    dm.stop()


def _system(world, audit):
    doc = {"version": 1, "enforce": True, "freeze": {"params": ["0.*"]}, "audit": audit}
    with open(world["system"], "w") as f:
        json.dump(doc, f)


def _run(world, tmp_path, pre=None, script=TRAIN, extra_path=(), preload=None, wrap=(), **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOOK_") and k != "LD_PRELOAD"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LD_PRELOAD=preload or world["lib"],
               PYTHONPATH=os.pathsep.join(list(extra_path) + [world["site"]]), **env_extra)
    if pre:  # a sitecustomize of the user's, run before any user code
        sc = tmp_path / "sc"
        sc.mkdir(exist_ok=True)
        (sc / "sitecustomize.py").write_text(pre)
        env["PYTHONPATH"] = str(sc) + os.pathsep + env["PYTHONPATH"]
    return subprocess.run(list(wrap) + [sys.executable, script], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=300)


def _protected(daemon, p):
    daemon.stop()
    recs = daemon.records()
    ev = [r["event"] for r in recs if r["event"] in ("start", "step", "end")]
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("done") == 3
    assert ev == ["start", "step", "step", "step", "end"], ev
    start = [r for r in recs if r["event"] == "start"][0]
    assert start["enforce"] is True and start["policy"].startswith("system:")
    assert verify_log(daemon.log).returncode == 0
    return recs


def _refused(p, why):
    assert p.returncode != 0
    assert "done" not in p.stdout
    lines = [l for l in p.stderr.splitlines() if l.startswith("safehook:")]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("safehook: the enforced system policy ") and why in lines[0], lines[0]
    assert "torch cannot be imported in this process" in lines[0]
    assert "ImportError: safehook: the enforced system policy" in p.stderr  # import torch raised it


def test_enforced_job_is_audited_by_the_daemon(world, daemon, tmp_path):
    _system(world, {"sink": "daemon", "socket": daemon.socket})
    recs = _protected(daemon, _run(world, tmp_path))
    assert [r for r in recs if r["event"] == "freeze"][0]["tensors"] == 2


def test_daemon_unreachable_the_job_does_not_start(world, tmp_path):
    _system(world, {"sink": "daemon", "socket": str(tmp_path / "gone.sock")})
    _refused(_run(world, tmp_path), "cannot reach the audit daemon safehookd at %s" % (tmp_path / "gone.sock"))


def test_audit_file_that_cannot_be_opened_stops_the_job(world, tmp_path):
    _system(world, {"path": str(tmp_path / "no-such-dir" / "audit.jsonl")})
    _refused(_run(world, tmp_path), "cannot open the audit log")


def test_audit_hook_vetoing_safehook_stops_the_job(world, tmp_path, daemon):
    _system(world, {"sink": "daemon", "socket": daemon.socket})
    veto = ("import sys\n"
            "def veto(event, args):\n"
            "    if event == 'import' and str(args[0]).startswith('safehook'):\n"
            "        raise ImportError('vetoed')\n"
            "sys.addaudithook(veto)\n")
    _refused(_run(world, tmp_path, pre=veto), "vetoed")


def test_fake_safehook_in_sys_modules_is_replaced(world, tmp_path, daemon):
    _system(world, {"sink": "daemon", "socket": daemon.socket})
    fake = ("import sys, types\n"
            "for name in ('safehook', 'safehook.runtime', 'safehook.runtime.boot'):\n"
            "    sys.modules[name] = types.ModuleType(name)\n"
            "sys.modules['safehook.runtime.boot'].from_preload = lambda lib: None\n"
            "sys.modules['safehook'].runtime = sys.modules['safehook.runtime']\n"
            "sys.modules['safehook.runtime'].boot = sys.modules['safehook.runtime.boot']\n")
    _protected(daemon, _run(world, tmp_path, pre=fake))


def test_shadow_package_imported_first_is_replaced(world, tmp_path, daemon):
    _system(world, {"sink": "daemon", "socket": daemon.socket})
    shadow = tmp_path / "shadow"
    (shadow / "safehook" / "runtime").mkdir(parents=True)
    (shadow / "safehook" / "__init__.py").write_text("")
    (shadow / "safehook" / "runtime" / "__init__.py").write_text("")
    (shadow / "safehook" / "runtime" / "boot.py").write_text("def from_preload(lib):\n    pass\n")
    script = tmp_path / "train_shadow.py"
    script.write_text("import safehook\n" + open(TRAIN).read())
    _protected(daemon, _run(world, tmp_path, script=str(script), extra_path=[str(shadow)]))


def test_advisory_system_policy_keeps_the_documented_behaviour(world, tmp_path):
    with open(world["system"], "w") as f:
        json.dump({"version": 1, "enforce": False, "audit": {"path": str(tmp_path / "no-such-dir" / "a.jsonl")}}, f)
    p = _run(world, tmp_path)
    assert p.returncode == 0 and p.stdout.count("done") == 3
    assert "safehook: protection is NOT active in this process" in p.stderr


def test_pointing_system_path_elsewhere_then_uninstall_is_refused(world, tmp_path, daemon):
    _system(world, {"sink": "daemon", "socket": daemon.socket})
    weak = tmp_path / "weak.json"
    weak.write_text(json.dumps({"version": 1}))
    script = tmp_path / "escape.py"
    script.write_text(
        "import safehook\n"
        "from safehook.runtime import boot\n"
        "boot._SYSTEM_PATH = %r\n"
        "safehook.install({'version': 1})\n"
        "try:\n"
        "    safehook.uninstall()\n"
        "    print('uninstalled')\n"
        "except safehook.SafehookError as e:\n"
        "    print('refused:', e)\n" % str(weak) + open(TRAIN).read())
    p = _run(world, tmp_path, script=str(script))
    assert "refused: the policy in force is enforced" in p.stdout, p.stdout + p.stderr
    _protected(daemon, p)


def _daemon_refusals(daemon):
    daemon.stop()
    return [r for r in daemon.records() if r["event"] == "refused"]


def test_fake_modules_carrying_the_real_files_are_not_trusted(world, tmp_path, daemon):
    _system(world, {"sink": "daemon", "socket": daemon.socket})
    d = os.path.join(world["site"], "safehook")
    core = [f for f in os.listdir(d) if f.startswith("_core.") and f.endswith(".so")][0]
    # the attack: every module the old check looked at, with the __file__ it expected
    fake = ("import sys, types\n"
            "files = {'safehook': %r, 'safehook.runtime': %r, 'safehook.runtime.boot': %r, 'safehook._core': %r}\n"
            "for name, f in files.items():\n"
            "    m = types.ModuleType(name)\n"
            "    m.__file__ = f\n"
            "    sys.modules[name] = m\n"
            "b = sys.modules['safehook.runtime.boot']\n"
            "b.from_preload = lambda lib: None\n"
            "b._state = {'via': 'preload'}\n"
            "sys.modules['safehook._core'].armed = lambda: True\n"
            "sys.modules['safehook'].runtime = sys.modules['safehook.runtime']\n"
            "sys.modules['safehook.runtime'].boot = b\n"
            % (os.path.join(d, "__init__.py"), os.path.join(d, "runtime", "__init__.py"),
               os.path.join(d, "runtime", "boot.py"), os.path.join(d, core)))
    _protected(daemon, _run(world, tmp_path, pre=fake))


@pytest.mark.parametrize("broken,why", [
    ("dlsym", "CPython's PyRun_StringFlags cannot be found"),
    ("dladdr", "this library cannot find its own path"),
    ("realpath", "this library cannot find its own path"),
])
def test_every_early_return_of_the_bootstrap_fails_closed(world, tmp_path, daemon, broken, why):
    _system(world, {"sink": "daemon", "socket": daemon.socket})
    src = tmp_path / "shim.c"
    src.write_text(SHIM)
    shim = str(tmp_path / "libshim.so")
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", shim, str(src), "-ldl"], check=True)
    p = _run(world, tmp_path, preload=shim + " " + world["lib"], SHIM_BREAK=broken)
    _refused(p, why)
    recs = _daemon_refusals(daemon)
    assert len(recs) == 1 and why in recs[0]["why"], recs
    assert recs[0]["system_policy"] == world["system"]


def test_a_system_policy_hidden_by_a_user_namespace_is_not_no_policy(world, tmp_path, daemon):
    _system(world, {"sink": "daemon", "socket": daemon.socket})
    etc = os.path.dirname(world["system"])
    # as any user can: a user namespace of their own, a tmpfs over the policy's folder
    wrap = ["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs hide "$0" && exec "$@"', etc]
    p = _run(world, tmp_path, wrap=wrap)
    _refused(p, "it cannot be seen from this process: a user namespace or a mount may hide it")
    # the same folder, hidden the same way, in the initial user namespace by root: trusted as no policy
    p = _run(world, tmp_path, wrap=["unshare", "-m", "sh", "-c", 'mount -t tmpfs hide "$0" && exec "$@"', etc])
    assert p.returncode == 0 and p.stdout.count("done") == 3, p.stderr


def test_a_refused_user_policy_is_recorded_by_the_daemon(world, tmp_path, daemon):
    _system(world, {"sink": "daemon", "socket": daemon.socket})
    weak = tmp_path / "weak.json"
    weak.write_text(json.dumps({"version": 1, "on_error": "warn"}))
    p = _run(world, tmp_path, SAFEHOOK_POLICY=str(weak))
    assert p.returncode != 0 and "done" not in p.stdout
    daemon.stop()
    recs = daemon.records()
    refused = [r for r in recs if r["event"] == "policy_refused"]
    assert len(refused) == 1 and refused[0]["kind"] == "weakening" and refused[0]["pointer"] == "/on_error", recs
    assert refused[0]["peer"]["uid"] == os.getuid()
    assert [r["what"] for r in recs if r["event"] == "violation"] == ["the user policy weakens the enforced system policy"]
