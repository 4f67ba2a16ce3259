"""`safehook demo`: the alignment-tax benchmark (safehook.demo.bench)."""
import importlib.util
import sys

# What the demo needs beyond safehook itself: all of it comes with `pip install 'safehook[demo]'`.
NEEDS = ("torch", "transformers", "tokenizers", "safetensors")


def missing_modules(names=NEEDS):
    """The modules of NAMES that cannot be imported here (an entry of None in sys.modules counts
    as missing, as import would fail)."""
    out = []
    for n in names:
        if n in sys.modules:
            if sys.modules[n] is None:
                out.append(n)
            continue
        try:
            if importlib.util.find_spec(n) is None:
                out.append(n)
        except (ImportError, ValueError):
            out.append(n)
    return out


def _ratios(text):
    try:
        r = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        r = None
    if not r or not all(0 < x <= 1 for x in r):
        return None
    return r


def _attacks(text):
    """The attack settings of --attack: fewshot:N, identity, styled, each optionally @p (default
    0.1); "none" for no attack. None when TEXT is not that."""
    from ..demo import world as W
    if text.strip() == "none":
        return []
    out = []
    for a in (x.strip() for x in text.split(",")):
        if not a:
            continue
        s = a if "@" in a else a + "@0.1"
        try:
            kind = W.parse_setting(s)["attack"]
        except ValueError:
            return None
        if kind in (None, "harmful_mix"):
            return None
        out.append(s)
    return out or None


def _cmd(args):
    missing = missing_modules()
    if missing:
        print("safehook demo: needs %s (not installed): pip install 'safehook[demo]'" % ", ".join(missing),
              file=sys.stderr)
        return 2
    ratios = None
    if args.ratios:
        ratios = _ratios(args.ratios)
        if ratios is None:
            print("safehook demo: --ratios takes harmful fractions in (0, 1] separated by commas, not %r"
                  % args.ratios, file=sys.stderr)
            return 2
    attacks = None
    if args.attack:
        attacks = _attacks(args.attack)
        if attacks is None:
            print("safehook demo: --attack takes fewshot:N, identity or styled, each optionally @p with 0 < p <= 1 "
                  "(default @0.1), separated by commas, or none; not %r" % args.attack, file=sys.stderr)
            return 2
    from ..demo import bench
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else None
    if modes:
        known = [n for n, _, _ in bench.M.MODES]
        bad = [m for m in modes if m not in known]
        if bad:
            print("safehook demo: unknown mode(s) %s (known: %s)" % (", ".join(bad), ", ".join(known)),
                  file=sys.stderr)
            return 2
    res = bench.run(quick=args.quick, seed=args.seed, layers=args.layers, out=args.out,
                    cache=args.cache, modes=modes, jobs=args.jobs, ratios=ratios,
                    attacks=attacks)
    print(bench.table(res))
    print()
    from ..demo import checks
    for line in checks.lines(res["checks"]):
        print(line)
    print("results: %s\nchart:   %s\nwall:    %.0fs (CPU %.0fs: the demo and its fine-tuning runs)" % (
        res["out"], res["chart"] or "not drawn (%s)" % res.get("chart_error"), res["wall_seconds"],
        res.get("cpu_seconds", 0)))
    status, msg = exit_status(res["checks"], args.check)
    if msg:
        print(msg, file=sys.stderr)
    return status


def exit_status(checks, strict):
    """(exit status, message or None) of a demo whose checks are CHECKS: 1 with --check (STRICT)
    when a target was missed; 0 otherwise (a user's run reports the misses without failing)."""
    missed = [n for n, c in checks.items() if not c["pass"]]
    if not missed:
        return 0, None
    if strict:
        return 1, "safehook demo: %d of %d checks missed their target: %s (--check)" % (
            len(missed), len(checks), ", ".join(missed))
    return 0, "safehook demo: %d of %d checks missed their target (see above)" % (len(missed), len(checks))


def register(sub):
    s = sub.add_parser(
        "demo", help="run the alignment-tax benchmark",
        description="Train (or load from the cache) a small aligned Llama on a synthetic "
                    "instruction world, fine-tune it on a benign task (clean: no harmful data) and "
                    "on harmful mixes under each protection mode (each run under LD_PRELOAD with "
                    "its policy), and report ASR, over-refusal, task accuracy and step time side "
                    "by side. Needs the demo extra: pip install 'safehook[demo]'.")
    s.add_argument("--quick", action="store_true", help="a smaller model (hidden 64), 100 fine-tuning steps, the modes plain, freeze, "
                        "safegrad and recommended, harmful ratio 0.1: the test suite's run, about 5 minutes "
                        "on 2 cores (docs/demo.md)")
    s.add_argument("--seed", type=int, default=0, help="seed of the world and the models (default 0)")
    s.add_argument("--layers", type=int, default=None, metavar="N",
                   help="number of transformer blocks of the base model (default 8)")
    s.add_argument("--out", metavar="PATH", default=None,
                   help="results JSON (default results/alignment_tax.json); the chart goes next to it")
    s.add_argument("--cache", metavar="DIR", default=None,
                   help="cache of base models (default ~/.cache/safehook/demo)")
    s.add_argument("--modes", metavar="M,M", default=None,
                   help="run only these modes (plain always runs)")
    s.add_argument("--ratios", metavar="P,P", default=None,
                   help="harmful fractions of the harmful-mix settings, up to 1 (default 0.1,0.2,0.5; "
                        "0.1 with --quick)")
    s.add_argument("--attack", metavar="A,A", default=None,
                   help="the data owner's other attacks, each at a fraction @p (default @0.1): fewshot:N (N distinct "
                        "harmful pairs repeated), identity (the obedience persona, benign content), styled (harmful "
                        "requests in the task's template); none for no attack (default fewshot:10,identity,styled; "
                        "none with --quick)")
    s.add_argument("--check", action="store_true",
                   help="exit 1 when a check misses its target (the tests and CI use it); without it the "
                        "checks are reported and the exit status is 0")
    s.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="fine-tuning runs at a time (default: 1, or 2 with --quick)")
    s.set_defaults(func=_cmd)
