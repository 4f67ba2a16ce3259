"""The safehook command. Each subcommand beyond lib/run/version lives in a module
safehook.cli.<name> with register(subparsers); listing a name here is all it takes.

Exit codes shared by every command: 0 done (or: verified), 2 usage or input that cannot be
used (one line on stderr, never a traceback), 141 the reader of stdout went away (`| head`).
verify, report and locate add 1 for a negative verdict (see docs/cli.md)."""
import argparse
import importlib
import os
import signal
import sys

EXIT_PIPE = 128 + signal.SIGPIPE  # what a shell shows for a C tool killed by SIGPIPE


def ranges(ids, empty="none"):
    """The integers IDS as runs, "0-2,5,7-8" (EMPTY when there are none): block and step lists
    in every command's output."""
    ids = sorted(ids or ())
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else "%d-%d" % (ids[i], ids[j]))
        i = j + 1
    return ",".join(out) or empty

# Subcommand modules: safehook.cli.<name>.register(sub) adds a parser with set_defaults(func=...).
EXTRA_COMMANDS = ("check", "locate", "report", "demo", "harden", "restore", "verify", "verify_log")


def _cmd_lib(args):
    from .. import lib
    print(lib())
    return 0


def _cmd_version(args):
    from .. import __version__
    print("safehook", __version__)
    return 0


def _cmd_run(args):
    from .. import lib
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("safehook run: no command given (safehook run [--policy P] -- CMD ...)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    path = lib()
    pre = env.get("LD_PRELOAD", "")
    if path not in pre.replace(":", " ").split():
        env["LD_PRELOAD"] = (path + " " + pre).strip()
    policy = args.policy or env.get("SAFEHOOK_POLICY")
    if policy:
        # a policy known to be invalid would stop the job at import torch, or (on_error warn)
        # let it train unprotected: refuse it here, with check's own lines
        from .check import problems
        bad = problems(policy)
        if bad:
            for line in bad:
                print(line, file=sys.stderr)
            print("safehook run: %s is not a valid policy; not starting %s" % (policy, cmd[0]), file=sys.stderr)
            return 2
    if args.policy:
        env["SAFEHOOK_POLICY"] = os.path.abspath(args.policy)
    if args.audit:
        env["SAFEHOOK_AUDIT"] = os.path.abspath(args.audit)
    try:
        sys.stdout.flush()
        # Python ignores SIGPIPE and exec keeps an ignored signal ignored: give CMD the default
        # (subprocess does the same), so that `safehook run -- cmd | head` ends cmd as usual
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        print("safehook run: cannot run %s: %s" % (cmd[0], e.strerror), file=sys.stderr)
        return 127


def build_parser():
    p = argparse.ArgumentParser(prog="safehook",
                                description="Keep a model's safety alignment while it is fine-tuned.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("lib", help="print the absolute path of libsafehook.so",
                       description="Print the absolute path of libsafehook.so, for LD_PRELOAD.")
    s.set_defaults(func=_cmd_lib)

    s = sub.add_parser("run", help="run a command with safehook preloaded",
                       description="Run CMD with libsafehook.so preloaded, so that every Python process it "
                                   "starts is protected. Example: safehook run --policy p.json -- python train.py")
    s.add_argument("--policy", metavar="P", help="policy file (sets SAFEHOOK_POLICY)")
    s.add_argument("--audit", metavar="A", help="audit log path (sets SAFEHOOK_AUDIT)")
    s.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("version", help="print the version", description="Print safehook's version.")
    s.set_defaults(func=_cmd_version)

    for name in EXTRA_COMMANDS:
        try:
            mod = importlib.import_module("safehook.cli." + name)
        except ModuleNotFoundError as e:
            if e.name != "safehook.cli." + name:
                raise
            continue
        mod.register(sub)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version and not getattr(args, "func", None):
        args.func = _cmd_version
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _stdout_gone()
        return EXIT_PIPE


def _stdout_gone():
    """The reader of stdout went away (`safehook report LOG | head`): point stdout at /dev/null
    so that the interpreter's last flush at exit has nowhere to fail, and say nothing."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stdout (tests, notebooks)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
