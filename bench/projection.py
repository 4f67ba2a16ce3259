"""SafeGrad projection speed, measured side by side in one run.

For each workload: the copy bandwidth (torch copy_ of the same bytes: read + write counted),
the physical bound of the global mode (2 reads in pass 1, 2 reads and 1 write in pass 2, of the
gradient bytes, at that bandwidth), safehook.project() (the C kernel), and the obvious reference
(a per-tensor loop of torch.dot, then add_). Times are the minimum over --repeat rounds, the
contenders interleaved within each round. threshold=1.0 makes every call project (after a
projection the cosine is ~0), so every timed call does both passes. For bf16 and fp16 data the
kernel is also timed with its portable scalar conversions (safegrad_path("scalar")) beside the
vector path chosen at load time.

    python bench/projection.py [--repeat 7] [--quick]
"""
import argparse
import math
import time

import torch

import safehook
from safehook import _core


def reference(g, s, threshold):
    """The obvious version: per-tensor torch.dot, one sync, per-tensor add_."""
    gs = ss = gg = 0
    for a, b in zip(g, s):
        gs = gs + torch.dot(a, b)
        ss = ss + torch.dot(b, b)
        gg = gg + torch.dot(a, a)
    gs, ss, gg = float(gs), float(ss), float(gg)
    cos = gs / math.sqrt(gg * ss)
    if cos < threshold:
        c = gs / ss
        for a, b in zip(g, s):
            a.add_(b, alpha=-c)
    return cos


def timeit(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def workload(name, n_tensors, size, dtype, repeat, with_reference):
    gen = torch.Generator().manual_seed(0)
    g = [torch.randn(size, generator=gen).to(dtype) for _ in range(n_tensors)]
    s = [(-0.5 * x.float() + torch.randn(size, generator=gen)).to(dtype) for x in g]
    g_ref = [x.clone() for x in g]
    src = torch.cat([x.reshape(-1) for x in g])
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    flat = [src]  # one tensor, for the copy
    samples = {k: [] for k in ("copy", "project", "pass1", "pass2", "reference", "scalar")}
    best_path = _core.safegrad_path()
    with_scalar = dtype != torch.float32 and best_path != "scalar"
    coefs = [1e-3]
    safehook.project(g, s, threshold=1.0)  # warm up (pool start, page faults)
    reference(g_ref, s, 1.0)
    dst.copy_(src)
    for _ in range(repeat):
        samples["copy"].append(timeit(lambda: dst.copy_(flat[0])))
        samples["project"].append(timeit(lambda: safehook.project(g, s, threshold=1.0)))
        samples["pass1"].append(timeit(lambda: _core.safegrad_dots(g, s)))
        samples["pass2"].append(timeit(lambda: _core.safegrad_update(g, s, coefs)))
        if with_reference:
            samples["reference"].append(timeit(lambda: reference(g_ref, s, 1.0)))
        if with_scalar:
            _core.safegrad_path("scalar")
            samples["scalar"].append(timeit(lambda: safehook.project(g, s, threshold=1.0)))
            _core.safegrad_path(best_path)
    best = {k: min(v) for k, v in samples.items() if v}
    med = {k: sorted(v)[len(v) // 2] for k, v in samples.items() if v}
    bw = 2 * nbytes / best["copy"]  # bytes moved per second by copy_ (read + write)
    bound = 5 * nbytes / bw
    print("%-30s %6.1f MB  copy %6.2f GB/s  bound %7.2f ms  project %7.2f ms = %.2fx bound  (pass1 %.2f ms = "
          "%.2fx its 2-read bound, pass2 %.2f ms = %.2fx its 3-access bound)"
          % (name, nbytes / 1e6, bw / 1e9, bound * 1e3, best["project"] * 1e3, best["project"] / bound,
             best["pass1"] * 1e3, best["pass1"] / (2 * nbytes / bw), best["pass2"] * 1e3,
             best["pass2"] / (3 * nbytes / bw)))
    if with_scalar:
        print("%-30s %9s  %s conversions: project %.2f ms = %.2fx bound; scalar conversions: %.2f ms = %.2fx bound"
              % ("", "", best_path, best["project"] * 1e3, best["project"] / bound, best["scalar"] * 1e3,
                 best["scalar"] / bound))
    if with_reference:
        print("%-30s %9s  reference loop %7.2f ms -> project is %.2fx faster (medians: %.2f vs %.2f ms, %.2fx)"
              % ("", "", best["reference"] * 1e3, best["reference"] / best["project"], med["reference"] * 1e3,
                 med["project"] * 1e3, med["reference"] / med["project"]))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="skip the 100M-parameter workload")
    a = ap.parse_args()
    print("torch %s, %d torch threads, %d safehook kernel threads, conversions: %s"
          % (torch.__version__, torch.get_num_threads(), _core.safegrad_threads(), _core.safegrad_path()))
    workload("48 x 500K fp32", 48, 500_000, torch.float32, a.repeat, True)
    workload("48 x 500K bf16", 48, 500_000, torch.bfloat16, a.repeat, True)
    workload("48 x 500K fp16", 48, 500_000, torch.float16, a.repeat, True)
    workload("400 x 16K fp32 (LoRA-like)", 400, 16_384, torch.float32, a.repeat * 4, True)
    workload("400 x 16K bf16 (LoRA-like)", 400, 16_384, torch.bfloat16, a.repeat * 4, True)
    if not a.quick:
        workload("100M fp32 (200 x 500K)", 200, 500_000, torch.float32, max(3, a.repeat // 2), True)


if __name__ == "__main__":
    main()
