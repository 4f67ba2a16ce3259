"""`safehook restore`: NLSR or Safe LoRA after fine-tuning (safehook.posthoc), streamed over
safetensors."""
import sys


def _cmd(args):
    from ..posthoc import nlsr, safelora
    from ..posthoc.tensors import PosthocError
    try:
        if args.method == "safelora":
            res = safelora.restore(args.base, args.aligned, args.finetuned, args.out,
                                   threshold=args.threshold, layers=args.layers,
                                   include=args.include, exclude=args.exclude,
                                   record=args.record, quiet=args.quiet)
            msg = "%d of %d layers projected" % (res["projected"], res["layers"])
        else:
            res = nlsr.restore(args.base, args.aligned, args.finetuned, args.out,
                               fraction=args.neurons, rate=args.rate, epsilon=args.epsilon,
                               beta=args.amplify, seed=args.seed, direction=args.direction,
                               include=args.include, exclude=args.exclude, record=args.record,
                               quiet=args.quiet)
            msg = "neurons transplanted in %d of %d layers" % (res["transplanted"], res["layers"])
    except PosthocError as e:
        print("safehook restore: %s" % e, file=sys.stderr)
        return 2
    print("%s: %s; record %s" % (args.out, msg, res["record"]))
    return 0


def register(sub):
    s = sub.add_parser(
        "restore", help="NLSR / Safe LoRA: put safety back into a fine-tuned model",
        description="Restore the safety of a model fine-tuned from ALIGNED, using BASE (the "
                    "model before alignment) to find the alignment update. safelora (arXiv "
                    "2405.16833): project the update of layers that drifted from the alignment "
                    "subspace; works on PEFT LoRA adapter directories too. nlsr (arXiv "
                    "2412.12497): transplant the safety-critical neurons of a safety reference "
                    "into the least similar layers. Inputs and output: Hugging Face model "
                    "directories (sharded or not) or safetensors files, read tensor by tensor.")
    s.add_argument("--method", required=True, choices=("nlsr", "safelora"))
    s.add_argument("--base", required=True, metavar="B", help="the model before alignment")
    s.add_argument("--aligned", required=True, metavar="A", help="the aligned model fine-tuning started from")
    s.add_argument("--finetuned", required=True, metavar="F",
                   help="the fine-tuned model (safelora: or a PEFT LoRA adapter directory)")
    s.add_argument("--out", required=True, metavar="O", help="output directory (or .safetensors file)")
    g = s.add_argument_group("safelora")
    g.add_argument("--threshold", type=float, default=0.5,
                   help="project layers whose similarity is below this (default 0.5)")
    g.add_argument("--layers", type=int, default=None, metavar="N",
                   help="project the N least similar layers instead of using --threshold")
    g = s.add_argument_group("nlsr")
    g.add_argument("--neurons", type=float, default=0.2, metavar="FRAC",
                   help="share of each layer's output neurons that are safety-critical (default 0.2)")
    g.add_argument("--rate", type=float, default=0.5, help="mean draw probability of a layer (default 0.5)")
    g.add_argument("--epsilon", type=float, default=0.2,
                   help="half-width of the draw probabilities' range (default 0.2)")
    g.add_argument("--amplify", type=float, default=0.0, metavar="BETA",
                   help="safety reference = aligned + BETA * (aligned - base) (default 0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the layer draws (default 0)")
    g.add_argument("--direction", choices=("paper", "reference"), default="paper",
                   help="paper: the least similar layers are the likeliest drawn (default); "
                        "reference: the reference code's inverted order")
    s.add_argument("--include", metavar="REGEX",
                   help="edit only 2-D tensors whose name matches (default: block weights)")
    s.add_argument("--exclude", metavar="REGEX",
                   help="leave 2-D tensors whose name matches (default: embeddings, head, norms)")
    s.add_argument("--record", metavar="PATH",
                   help="JSONL record of what changed (default OUT/posthoc.jsonl; read by safehook report)")
    s.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    s.set_defaults(func=_cmd)
