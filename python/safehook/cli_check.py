"""safehook check FILE...: validate policies."""


def _run(args):
    from . import _core
    bad = 0
    for f in args.files:
        msg = _core.check_file(f)
        if msg is not None:
            print(msg)
            bad += 1
    return 2 if bad else 0


def register(sub):
    s = sub.add_parser("check", help="validate policy files",
                       description="Validate policies: exit 0 when all are valid, else 2 with one line per error.")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.set_defaults(func=_run)
