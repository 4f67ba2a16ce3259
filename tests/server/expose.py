"""Run a command in a private mount namespace (the caller runs this under `unshare -m
--propagation private`, as root) where:
- each PATH given with --expose is reachable by every uid: a folder on its way that others may not
  enter (this machine's Python lives under /root, mode 0700) is covered with a tmpfs that holds
  bind mounts of only the entries on the way, so nothing else of it becomes visible;
- with --preload LIB, /etc/ld.so.preload names LIB (an overlay on /etc: the host's /etc is not
  touched, and it is gone with the namespace);
- with --uid UID, the command runs as UID (gid UID, no supplementary groups).
Nothing of this outlives the command: the mounts live in its namespace only.

    unshare -m --propagation private python3 expose.py --stash DIR [--expose PATH]... \\
        [--preload LIB] [--uid UID] -- CMD ARGS...
DIR: an empty folder for the namespace's own tmpfs (originals and overlay layers)."""
import argparse
import os
import subprocess
import sys


def mount(*args):
    subprocess.run(["mount"] + list(args), check=True)


def blocked(d):
    st = os.stat(d)
    return not st.st_mode & 0o001


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stash", required=True)
    ap.add_argument("--expose", action="append", default=[])
    ap.add_argument("--preload")
    ap.add_argument("--uid", type=int)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    mount("-t", "tmpfs", "-o", "mode=0755", "stash", a.stash)
    n = 0
    covered = set()
    paths = [os.path.realpath(p) for p in a.expose]
    # shallow paths first, so that a covered folder gets every entry any path needs
    for depth in range(1, 64):
        for d in sorted({"/" + "/".join(p.strip("/").split("/")[:depth - 1]) for p in paths
                         if len(p.strip("/").split("/")) >= depth}):
            d = os.path.normpath(d)
            if d in covered or not os.path.isdir(d) or not blocked(d):
                continue
            kids = sorted({p[len(d):].strip("/").split("/")[0] for p in paths
                           if p.startswith(d.rstrip("/") + "/") and p != d})
            orig = os.path.join(a.stash, "orig%d" % n)
            n += 1
            os.mkdir(orig)
            mount("--bind", d, orig)
            mode = os.stat(d).st_mode & 0o7777
            mount("-t", "tmpfs", "-o", "mode=%o" % (mode | 0o055), "cover", d)
            for k in kids:
                src, dst = os.path.join(orig, k), os.path.join(d, k)
                if os.path.isdir(src):
                    os.mkdir(dst)
                else:
                    open(dst, "w").close()
                mount("--bind", src, dst)
            covered.add(d)
    if a.preload:
        ov = os.path.join(a.stash, "etc")
        os.makedirs(ov + "/upper")
        os.makedirs(ov + "/work")
        mount("-t", "overlay", "overlay", "-o", "lowerdir=/etc,upperdir=%s/upper,workdir=%s/work" % (ov, ov), "/etc")
        with open("/etc/ld.so.preload", "w") as f:
            f.write(a.preload + "\n")
    env = dict(os.environ)
    if a.uid is not None:
        os.setgroups([])
        os.setresgid(a.uid, a.uid, a.uid)
        os.setresuid(a.uid, a.uid, a.uid)
        env["HOME"] = "/tmp"
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
