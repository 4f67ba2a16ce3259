"""Step time with the middle quarter of the blocks frozen, against full fine-tuning, in one run.

Two identical tiny Llama models train side by side, their steps interleaved, under
safehook.install() with freeze.layers {"fraction": [0.375, 0.625]}: the first model forwarded is
the one safehook freezes, the second trains fully (its steps pass through the same hooks).
Prints the median step time of each and their ratio (frozen / full; below 1 is faster), and the
time of one integrity check (checksums of the frozen tensors).

    python bench/freeze.py [--layers 8] [--hidden 256] [--seq 128] [--batch 8] [--steps 30] [--device cpu]
"""
import argparse
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import safehook
    import transformers as T
    safehook.install({"version": 1, "freeze": {"layers": {"fraction": [0.375, 0.625]}}})

    cfg = T.LlamaConfig(vocab_size=1024, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3,
                        num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                        max_position_embeddings=a.seq)
    torch.manual_seed(0)
    models = {}
    for name in ("frozen", "full"):
        torch.manual_seed(0)
        models[name] = T.LlamaForCausalLM(cfg).to(a.device)
    data = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=a.device)
    with torch.no_grad():
        models["frozen"](input_ids=data[:1, :8])  # the first forward: safehook freezes this model
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1) for n, m in models.items()}
    frozen_blocks = [i for i, b in enumerate(models["frozen"].model.layers)
                     if not any(p.requires_grad for p in b.parameters())]

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    times = {n: [] for n in models}
    for it in range(a.warmup + a.steps):
        order = ("frozen", "full") if it % 2 == 0 else ("full", "frozen")
        for n in order:
            m, o = models[n], opts[n]
            sync()
            t0 = time.perf_counter()
            m(input_ids=data, labels=data).loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
            sync()
            if it >= a.warmup:
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    print("model: llama layers=%d hidden=%d seq=%d batch=%d device=%s threads=%d steps=%d"
          % (a.layers, a.hidden, a.seq, a.batch, a.device, torch.get_num_threads(), a.steps))
    print("frozen blocks: %s of %d" % (frozen_blocks, a.layers))
    print("median step: frozen %.2f ms   full %.2f ms" % (med["frozen"] * 1e3, med["full"] * 1e3))
    print("ratio frozen/full: %.3f" % (med["frozen"] / med["full"]))

    # the cost of one integrity check (every freeze.check_every steps, default 50)
    from safehook.features.freeze import checksums
    frozen = [p for i in frozen_blocks for p in models["frozen"].model.layers[i].parameters()]
    nbytes = sum(p.numel() * p.element_size() for p in frozen)
    checksums(frozen)
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        checksums(frozen)
    sync()
    dt = (time.perf_counter() - t0) / 5
    print("integrity check: %d tensors, %.1f MB in %.2f ms (%.2f GB/s), %.2f%% of a frozen step"
          % (len(frozen), nbytes / 1e6, dt * 1e3, nbytes / dt / 1e9, 100 * dt / med["frozen"]))


if __name__ == "__main__":
    main()
