"""`safehook harden`: LoX before fine-tuning (safehook.posthoc.lox), streamed over safetensors."""
import sys


def _cmd(args):
    from ..posthoc import lox
    from ..posthoc.tensors import PosthocError
    try:
        res = lox.harden(args.base, args.aligned, args.out, k=args.rank, alpha=args.alpha,
                         include=args.include, exclude=args.exclude, record=args.record,
                         quiet=args.quiet)
    except PosthocError as e:
        print("safehook harden: %s" % e, file=sys.stderr)
        return 2
    print("%s: %d of %d tensors extrapolated; record %s"
          % (args.out, res["changed"], res["tensors"], res["record"]))
    return 0


def register(sub):
    s = sub.add_parser(
        "harden", help="LoX: make an aligned model harder to un-align by fine-tuning",
        description="LoX (arXiv 2506.15606): for every 2-D weight, W = W_aligned + alpha * "
                    "(rank-k part of W_aligned - W_base); other tensors are copied unchanged. "
                    "Inputs and output: Hugging Face model directories (sharded or not) or "
                    "safetensors files, read tensor by tensor. Run before fine-tuning.")
    s.add_argument("--base", required=True, metavar="B", help="the model before alignment")
    s.add_argument("--aligned", required=True, metavar="A", help="the aligned model")
    s.add_argument("--out", required=True, metavar="O", help="output directory (or .safetensors file)")
    s.add_argument("--rank", type=int, default=6, metavar="K",
                   help="singular triplets kept per matrix (0 = the full update; default 6)")
    s.add_argument("--alpha", type=float, default=0.5, metavar="X",
                   help="extrapolation coefficient (default 0.5)")
    s.add_argument("--include", metavar="REGEX", help="edit only 2-D tensors whose name matches")
    s.add_argument("--exclude", metavar="REGEX", help="leave 2-D tensors whose name matches")
    s.add_argument("--record", metavar="PATH",
                   help="JSONL record of what changed (default OUT/posthoc.jsonl; read by safehook report)")
    s.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    s.set_defaults(func=_cmd)
