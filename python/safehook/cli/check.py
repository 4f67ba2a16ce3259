"""safehook check [--explain] FILE...: validate policies (the C core does the work)."""
import json
import sys


def _run(args):
    from .. import _core
    bad = 0
    for f in args.files:
        try:
            normalized = _core.explain_file(f)  # parsed and validated once, in C
        except _core.PolicyError as e:
            print(e)
            bad += 1
            continue
        if args.explain:
            if len(args.files) > 1:
                print("# %s" % f)
            # Python prints reals in their shortest exact form (0.1, not 0.10000000000000001)
            print(json.dumps(json.loads(normalized), indent=2, ensure_ascii=False))
    sys.stdout.flush()
    return 2 if bad else 0


def register(sub):
    s = sub.add_parser("check", help="validate policy files",
                       description="Validate policies: exit 0 when all are valid, else 2 with one line per "
                                   "invalid file ('FILE:LINE:COLUMN: message' for JSON syntax, "
                                   "'FILE: /json/pointer: message' for the schema).")
    s.add_argument("--explain", action="store_true",
                   help="print each valid policy normalized, with every default filled in")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.set_defaults(func=_run)
