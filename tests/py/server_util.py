"""Helpers for the shared-server tests: a real safehookd on a socket in a temp folder.

The binary: $SAFEHOOKD, else build-test/daemon/safehookd (tests/run.sh builds it), else it is
compiled here from daemon/safehookd.c with cc (jansson is a CI dependency anyway)."""
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_built = {}


def safehookd_binary(tmp_factory):
    if os.environ.get("SAFEHOOKD"):
        return os.environ["SAFEHOOKD"]
    import glob
    sources = sorted(glob.glob(os.path.join(ROOT, "daemon", "*.c"))) + [os.path.join(ROOT, "src", "sha256.c")]
    newest = max(os.path.getmtime(f) for f in sources + glob.glob(os.path.join(ROOT, "daemon", "*.h")))
    for b in ("build-test", "build"):
        p = os.path.join(ROOT, b, "daemon", "safehookd")
        if os.access(p, os.X_OK) and os.path.getmtime(p) >= newest:
            return p
    if "bin" not in _built:
        d = str(tmp_factory.mktemp("safehookd"))
        with open(os.path.join(d, "sh_config.h"), "w") as f:
            f.write('#define SH_VERSION "test"\n#define SH_AUDIT_SOCKET "/run/safehook/audit.sock"\n'
                    '#define SH_AUDIT_LOG "/var/log/safehook/audit.jsonl"\n')
        out = os.path.join(d, "safehookd")
        subprocess.run(["cc", "-O1", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Werror", "-I", d, "-I",
                        os.path.join(ROOT, "src")] + sources + ["-ljansson", "-o", out], check=True)
        _built["bin"] = out
    return _built["bin"]


def open_dir(prefix="safehook-server-"):
    """A fresh folder under /tmp that every uid can traverse (pytest's own are root's only), for
    the sockets and files other uids use. The caller removes it."""
    import tempfile
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)
    return d


def as_uid(uid, fn, background=False):
    """Run fn() in a forked child that has dropped to UID (and gid UID, no groups); returns what
    fn returned (JSON-able), or with background=True a function that waits for it."""
    import json
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            out = json.dumps({"ok": fn()})
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = json.dumps({"error": "%s: %s" % (type(e).__name__, e)})
            code = 1
        os.write(w, out.encode())
        os._exit(code)
    os.close(w)

    def wait():
        chunks = []
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        os.waitpid(pid, 0)
        res = json.loads(b"".join(chunks) or b'{"error": "no result"}')
        if "error" in res:
            raise AssertionError("as uid %d: %s" % (uid, res["error"]))
        return res["ok"]
    wait.pid = pid
    return wait if background else wait()


class Daemon:
    """safehookd on DIR/audit.sock writing DIR/log/audit.jsonl."""

    def __init__(self, binary, d, *extra, preexec_fn=None, env=None):
        self.preexec_fn = preexec_fn
        self.env = env
        self.dir = str(d)
        self.socket = os.path.join(self.dir, "audit.sock")
        self.log = os.path.join(self.dir, "log", "audit.jsonl")
        self.stderr_path = os.path.join(self.dir, "safehookd.stderr")
        self.argv = [binary, "--socket", self.socket, "--log", self.log] + list(extra)
        self.proc = None

    def start(self):
        os.makedirs(self.dir, exist_ok=True)
        if os.path.exists(self.socket):  # left by a daemon that was killed
            os.unlink(self.socket)
        self.err = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(self.argv, stderr=self.err, preexec_fn=self.preexec_fn, env=self.env)
        for _ in range(100):
            if os.path.exists(self.socket):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError("safehookd did not start: %s" % open(self.stderr_path).read())

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        if self.proc:
            self.err.close()
        self.proc = None

    def stderr(self):
        with open(self.stderr_path) as f:
            return f.read()

    def lines(self):
        with open(self.log, "rb") as f:
            return f.read().splitlines(keepends=True)

    def records(self):
        import json
        return [json.loads(l) for l in self.lines()]


def verify_log(path, *extra):
    return subprocess.run([sys.executable, "-m", "safehook", "verify-log", path] + list(extra),
                          capture_output=True, text=True, timeout=60)


def enforced_build(tmp_factory):
    """libsafehook.so, safehook._core and the SPANK plugin built with a system policy path in a
    temp folder compiled in, assembled with this tree's Python package into a folder of its own
    (nothing under /etc is touched). One build per test session, shared by the tests that need
    it; each writes the system policy it wants to world["system"] (tests run one at a time).
    Returns {"site": for PYTHONPATH, "lib": libsafehook.so, "system": the policy path,
    "build": the build folder, "spank": the plugin or None}."""
    import glob
    if "enforced" in _built:
        return _built["enforced"]
    d = str(tmp_factory.mktemp("enforced"))
    os.makedirs(os.path.join(d, "etc"))  # a folder of its own, so that a test can hide it
    system = os.path.join(d, "etc", "system.json")
    b = os.path.join(d, "build")
    subprocess.run(["meson", "setup", b, ROOT, "-Dsystem_policy=" + system, "-Dinstall_cli=false",
                    "-Dwerror=false", "-Ddaemon=disabled", "--buildtype=release"], check=True,
                   capture_output=True, text=True)
    subprocess.run(["meson", "compile", "-C", b], check=True, capture_output=True, text=True)
    site = os.path.join(d, "site")
    shutil.copytree(os.path.join(ROOT, "python", "safehook"), os.path.join(site, "safehook"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    ext = glob.glob(os.path.join(b, "hooks", "_core*.so"))
    assert ext, os.listdir(os.path.join(b, "hooks"))
    shutil.copy(ext[0], os.path.join(site, "safehook"))
    lib = os.path.join(site, "safehook", "libsafehook.so")
    shutil.copy(os.path.join(b, "hooks", "libsafehook.so"), lib)
    spank = os.path.join(b, "hooks", "spank", "safehook_spank.so")
    _built["enforced"] = {"site": site, "lib": lib, "system": system, "build": b,
                          "spank": spank if os.path.exists(spank) else None}
    return _built["enforced"]


# ---- the root watcher's tests: an unprivileged user, a watching daemon, both deployments ----

EXPOSE = os.path.join(ROOT, "tests", "server", "expose.py")
ATTACKS = os.path.join(ROOT, "tests", "server", "attacks")
USER = "safehook-attacker"


def attacker_uid():
    """The unprivileged user the attack tests run as (made once, a system user with no home)."""
    import pwd
    try:
        return pwd.getpwnam(USER).pw_uid
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
        return pwd.getpwnam(USER).pw_uid


def torch_lib_dir():
    import importlib.util
    return os.path.join(os.path.dirname(importlib.util.find_spec("torch").origin), "lib")


class Watched:
    """An enforced world (enforced_build) whose system policy freezes block "0" and sends records
    to a safehookd that watches: the installed libsafehook/_core and libtorch's files are known
    to it, only the attacker's uid is watched outside Slurm jobs (other engineers' processes on
    a shared machine are none of its business), model files written under the work folder are
    checked against BASE with `safehook verify`. Commands run as the attacker in a private
    mount namespace (tests/server/expose.py), under /etc/ld.so.preload there when asked."""

    def __init__(self, tmp_factory, world, daemon_dir=None):
        import json
        self.world = world
        self.uid = attacker_uid()
        self.open = open_dir("safehook-watch-")
        self.stash = os.path.join(self.open, "stash")
        self.work = os.path.join(self.open, "work")
        os.mkdir(self.stash)
        os.mkdir(self.work)
        os.chown(self.work, self.uid, self.uid)
        self.base = os.path.join(self.open, "base.safetensors")
        subprocess.run([sys.executable, os.path.join(ATTACKS, "train.py"), self.base, "base"], check=True,
                       env=clean_env(), capture_output=True)
        self.core = [os.path.join(world["site"], "safehook", f) for f in os.listdir(os.path.join(world["site"], "safehook"))
                     if f.startswith("_core.") and f.endswith(".so")][0]
        tl = torch_lib_dir()
        self.daemon = Daemon(safehookd_binary(tmp_factory), daemon_dir or os.path.join(self.open, "d"))
        with open(world["system"], "w") as f:
            json.dump({"version": 1, "enforce": True, "freeze": {"params": ["0.*"]},
                       "audit": {"sink": "daemon", "socket": self.daemon.socket}}, f)
        os.chmod(world["system"], 0o644)
        out = subprocess.run([sys.executable, "-c", "from safehook import _core; print(_core.system_policy_state()['digest'])"],
                             env=dict(clean_env(), PYTHONPATH=world["site"]), capture_output=True, text=True, check=True)
        self.digest = out.stdout.strip()
        self.daemon.argv += ["--watch", "--torch", os.path.join(tl, "libtorch_cpu.so"),
                             "--torch", os.path.join(tl, "libtorch_python.so"), "--torch", os.path.join(tl, "libc10.so"),
                             "--lib", world["lib"], "--core", self.core, "--watch-uid", str(self.uid),
                             "--watch-fs", self.work, "--verify-cmd", sys.executable + " -m safehook",
                             "--verify-base", self.base, "--verify-policy", world["system"], "--artifact-quiet", "2"]
        self.daemon.start()

    def close(self):
        self.daemon.stop()
        if not os.environ.get("SAFEHOOK_TEST_KEEP"):
            shutil.rmtree(self.open, ignore_errors=True)

    def exposed(self):
        import site
        paths = {os.path.realpath(sys.executable), sys.prefix, sys.base_prefix, self.world["site"],
                 os.path.dirname(self.world["system"]), self.open, ATTACKS, torch_lib_dir()}
        if self.world.get("spank"):  # slurmd loads it in the namespace
            paths.add(os.path.dirname(self.world["spank"]))
        paths.update(p for p in site.getsitepackages() if os.path.isdir(p))
        return sorted(paths)

    def wrap(self, uid=True, preload=False):
        """The command prefix: a private mount namespace with the paths exposed (and
        /etc/ld.so.preload naming the installed libsafehook when PRELOAD), as the attacker."""
        argv = ["unshare", "-m", "--propagation", "private", sys.executable, EXPOSE, "--stash", self.stash]
        for p in self.exposed():
            argv += ["--expose", p]
        if preload:
            argv += ["--preload", self.world["lib"]]
        if uid:
            argv += ["--uid", str(self.uid)]
        return argv + ["--"]

    def mark(self):
        return os.path.getsize(self.daemon.log)

    def records_since(self, offset):
        import json
        with open(self.daemon.log, "rb") as f:
            f.seek(offset)
            return [json.loads(l) for l in f if l.endswith(b"\n")]

    def wait_for(self, offset, pred, timeout=40):
        """Records since OFFSET, once PRED(records) holds (or TIMEOUT seconds passed)."""
        import time
        t0 = time.time()
        while True:
            recs = self.records_since(offset)
            if pred(recs) or time.time() - t0 > timeout:
                return recs
            time.sleep(0.25)

    def frozen_changed(self, ckpt):
        """Whether the checkpoint's frozen block differs from the base (the test's own check)."""
        from safetensors.numpy import load_file
        a, b = load_file(self.base), load_file(ckpt)
        return any((a[k] != b[k]).any() for k in ("0.weight", "0.bias"))


def clean_env(**extra):
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("SAFEHOOK_", "SLURM_")) and k not in ("LD_PRELOAD", "PYTHONPATH", "LD_AUDIT")}
    e.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return e
