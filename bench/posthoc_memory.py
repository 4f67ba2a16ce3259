"""Peak memory of `safehook harden` / `safehook restore` against model size, on the real
SmolLM2-135M-Instruct of bench/real_model.py (its Q4_1 GGUF dequantized to float32).

    python bench/posthoc_memory.py [--work DIR]

Prepares, once, in DIR (default ~/.cache/safehook/posthoc-mem): "base" (the dequantized model
saved as safetensors), "aligned" (base + a rank-8 perturbation of every 2-D weight, a stand-in
for an alignment update: the memory does not depend on what the update means) and "finetuned"
(aligned + a small dense perturbation). Then runs LoX, Safe LoRA and NLSR each in a fresh
process, which reports its resident set after importing torch and safehook.posthoc and running
one small SVD (the baseline), and its peak (VmHWM) at the end. Prints the peak above the
baseline as a multiple of the largest tensor and of the whole model, and the issue's bound:
3 x the largest tensor + the SVD workspace of the largest matrix LoX decomposes (a float32
copy of it, U and V^T: 2mn + n^2 floats for m x n, m >= n).

Method "safelora-vvtx" is Safe LoRA with the product order of before issue 21 (V (V^T X) for
every shape), for a side-by-side comparison with "safelora" (the order chosen by shape):
    python bench/posthoc_memory.py --methods safelora,safelora-vvtx
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def status(key):
    """A byte count from /proc/self/status: VmRSS (now) or VmHWM (the peak of this process's
    address space; ru_maxrss would carry over the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def prepare(work):
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location("real_model", os.path.join(HERE, "real_model.py"))
    rm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rm)
    paths = rm.locate()
    model, tok = rm.load_gguf(paths["gguf"])
    # A GGUF-loaded model refuses save_pretrained: write its dequantized state dict and config.
    from safetensors.torch import save_file
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    del model

    def save(name):
        d = os.path.join(work, name)
        os.makedirs(d, exist_ok=True)
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(d)
        tok.save_pretrained(d)

    save("base")
    g = torch.Generator().manual_seed(0)
    for n, p in sd.items():
        if p.dim() == 2:
            s = 0.01 * p.abs().mean()
            p.add_(s * torch.randn(p.shape[0], 8, generator=g) @ torch.randn(8, p.shape[1], generator=g))
    save("aligned")
    for p in sd.values():
        if p.is_floating_point():
            p.add_(0.001 * torch.randn(p.shape, generator=g))
    save("finetuned")


def child(method, work):
    import torch
    from safehook.posthoc import lox, nlsr, safelora
    torch.set_num_threads(1)
    torch.linalg.svd(torch.randn(64, 32))
    before = status("VmRSS")
    b, a, f = (os.path.join(work, k) for k in ("base", "aligned", "finetuned"))
    out = os.path.join(work, "out-" + method)
    t0 = time.time()
    if method == "lox":
        lox.harden(b, a, out, k=6, alpha=0.5, quiet=True)
    elif method in ("safelora", "safelora-vvtx"):
        if method == "safelora-vvtx":  # the order used before issue 21: V (V^T X) whatever the shape
            def project(v, x):
                return v @ (v.T @ x) / torch.linalg.matrix_norm(v)
            safelora.project = project
        safelora.restore(b, a, f, out, quiet=True)
    else:
        nlsr.restore(b, a, f, out, quiet=True)
    peak = status("VmHWM")
    print(json.dumps({"method": method, "baseline": before, "peak": peak,
                      "seconds": round(time.time() - t0, 1)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "safehook", "posthoc-mem"))
    ap.add_argument("--methods", default="lox,safelora,nlsr",
                    help="comma-separated of lox, safelora, nlsr, safelora-vvtx (default: the first three)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.work)
    os.makedirs(args.work, exist_ok=True)
    if not os.path.exists(os.path.join(args.work, "finetuned", "model.safetensors")):
        prepare(args.work)
    from safehook.posthoc import Source
    from safehook.posthoc.common import Selector
    src = Source(os.path.join(args.work, "aligned"))
    size, largest = src.nbytes(), src.largest()
    mats = [src.info(n)[1] for n in src.names() if Selector()(n, src.info(n)[1])]
    m, n = max(mats, key=lambda s: s[0] * s[1])
    m, n = max(m, n), min(m, n)
    svd_ws = (2 * m * n + n * n) * 4
    bound = 3 * largest + svd_ws
    print("model %s: %.1f MB in %d tensors; largest tensor %.1f MB (%dx%d); bound 3x largest + "
          "SVD workspace %.1f MB = %.1f MB" % (args.work, size / 1e6, len(src.names()), largest / 1e6,
                                                m, n, svd_ws / 1e6, bound / 1e6))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print("%-9s %10s %10s %10s %9s %9s %8s %6s" % ("method", "baseline", "peak", "above", "x largest",
                                                 "x model", "x bound", "s"))
    for method in args.methods.split(","):
        p = subprocess.run([sys.executable, __file__, "--work", args.work, "--child", method],
                           env=env, capture_output=True, text=True)
        if p.returncode != 0:
            print("%s failed: %s" % (method, p.stderr.strip().splitlines()[-1:]))
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        above = r["peak"] - r["baseline"]
        print("%-9s %8.1fMB %8.1fMB %8.1fMB %9.2f %9.2f %8.2f %6.1f" % (
            method, r["baseline"] / 1e6, r["peak"] / 1e6, above / 1e6, above / largest,
            above / size, above / bound, r["seconds"]))


if __name__ == "__main__":
    main()
