"""The safehook command. Each subcommand beyond lib/run/version lives in a module
safehook.cli.<name> with register(subparsers); listing a name here is all it takes."""
import argparse
import importlib
import os
import sys

# Subcommand modules: safehook.cli.<name>.register(sub) adds a parser with set_defaults(func=...).
EXTRA_COMMANDS = ("check", "locate", "report", "demo", "harden", "restore")


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
    if args.policy:
        env["SAFEHOOK_POLICY"] = os.path.abspath(args.policy)
    if args.audit:
        env["SAFEHOOK_AUDIT"] = os.path.abspath(args.audit)
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        print("safehook run: cannot run %s: %s" % (cmd[0], e.strerror), file=sys.stderr)
        return 127


def build_parser():
    p = argparse.ArgumentParser(prog="safehook",
                                description="Keep a model's safety alignment while it is fine-tuned.")
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
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
