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
