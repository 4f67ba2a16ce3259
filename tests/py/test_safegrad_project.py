"""safehook.project() against a float64 reference: every granularity and dtype, kernel path
(contiguous CPU) and torch path (non-contiguous), conflict and no conflict, idempotence."""
import math
import zlib

import pytest
import torch

import safehook

torch.set_num_threads(1)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make(n_tensors, dtype, conflict, seed, noncontig=False, sdtype=None):
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(torch.randint(1, 3000, (1,), generator=gen)) for _ in range(n_tensors)]
    g, s = [], []
    for n in sizes:
        a = torch.randn(n, generator=gen)
        b = 0.4 * torch.randn(n, generator=gen) + (-0.6 if conflict else 0.6) * a
        if noncontig:  # a strided view of a bigger buffer
            a = torch.stack([a, torch.zeros(n)], 1)[:, 0]
            b = torch.stack([b, torch.zeros(n)], 1)[:, 0]
            assert not a.is_contiguous()
            g.append(a.to(dtype) if dtype == torch.float32 else torch.stack([a.to(dtype)] * 2, 1)[:, 0])
            s.append(b.to(sdtype or dtype) if (sdtype or dtype) == torch.float32 else torch.stack([b.to(sdtype or dtype)] * 2, 1)[:, 0])
        else:
            g.append(a.to(dtype))
            s.append(b.to(sdtype or dtype))
    return g, s


def reference(g, s, keys, threshold=0.0):
    """float64 projection of the stored values, grouped by KEYS."""
    g64 = [x.double().clone() for x in g]
    s64 = [x.double() for x in s]
    out = {}
    for k in dict.fromkeys(keys):
        idx = [i for i, kk in enumerate(keys) if kk == k]
        gs = sum(float(torch.dot(g64[i], s64[i])) for i in idx)
        ss = sum(float(torch.dot(s64[i], s64[i])) for i in idx)
        gg = sum(float(torch.dot(g64[i], g64[i])) for i in idx)
        cos = gs / math.sqrt(gg * ss)
        proj = cos < threshold
        # below the threshold: the component along s moves to x, where x s + r has cosine t
        rr = gg - gs * gs / ss
        x = threshold * math.sqrt(max(rr, 0.0)) / math.sqrt(ss * (1 - threshold ** 2))
        for i in idx:
            if proj:
                g64[i] -= (gs / ss - x) * s64[i]
        out[k] = (cos, proj, math.sqrt(gg), math.sqrt(ss))
    return g64, out


def keys_for(gran, n):
    return {"global": [0] * n, "tensor": list(range(n)), "layer": [i // 3 for i in range(n)]}[gran]


@pytest.mark.parametrize("noncontig", [False, True], ids=["kernel", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("gran", ["global", "layer", "tensor"])
@pytest.mark.parametrize("conflict", [True, False], ids=["conflict", "aligned"])
def test_against_float64(gran, dtype, conflict, noncontig):
    g, s = make(8, dtype, conflict, seed=zlib.crc32(repr((gran, str(dtype), conflict)).encode()) % 1000, noncontig=noncontig)
    before = [x.clone() for x in g]
    ptrs = [x.data_ptr() for x in g]
    keys = keys_for(gran, len(g))
    want, groups = reference(g, s, keys)
    res = safehook.project(g, s, gran, groups=keys if gran == "layer" else None)
    assert [x.data_ptr() for x in g] == ptrs  # in place
    cos = res["cosine"] if gran != "global" else [res["cosine"]]
    proj = res["projected"] if gran != "global" else [res["projected"]]
    ntask = res["norms"]["task"] if gran != "global" else [res["norms"]["task"]]
    for j, k in enumerate(dict.fromkeys(keys)):
        assert cos[j] == pytest.approx(groups[k][0], abs=1e-5)
        assert proj[j] == groups[k][1]
        assert ntask[j] == pytest.approx(groups[k][2], rel=1e-5)
    for x, w, b in zip(g, want, before):
        if not conflict:
            assert torch.equal(x, b)  # no conflict: not a bit changes
        else:
            err = (x.double() - w).abs().max().item()
            assert err <= TOL[dtype] * (w.abs().max().item() + 1e-3), err
            assert not torch.equal(x, b)


@pytest.mark.parametrize("noncontig", [False, True], ids=["kernel", "torch"])
@pytest.mark.parametrize("gran", ["global", "layer", "tensor"])
@pytest.mark.parametrize("threshold", [-0.3, 0.4])
def test_threshold_moves_the_cosine_to_it(gran, threshold, noncontig):
    """Below a threshold t the group ends at cosine t exactly (float64 reference), and with t > 0
    a group already helping safety (0 < cosine < t) keeps its helpful component and gains more."""
    g, s = make(9, torch.float32, True, seed=21, noncontig=noncontig)
    for i in range(0, 9, 2):  # every other tensor helps safety: cosines on both sides of 0
        g[i] = g[i] + 1.2 * s[i]
    keys = keys_for(gran, len(g))
    before = [x.clone() for x in g]
    want, groups = reference(g, s, keys, threshold)
    res = safehook.project(g, s, gran, threshold=threshold, groups=keys if gran == "layer" else None)
    proj = res["projected"] if gran != "global" else [res["projected"]]
    assert any(proj)
    for j, k in enumerate(dict.fromkeys(keys)):
        assert proj[j] == groups[k][1]
    for x, w in zip(g, want):
        assert (x.double() - w).abs().max().item() <= 1e-5 * (w.abs().max().item() + 1e-3)
    for k in dict.fromkeys(keys):
        idx = [i for i, kk in enumerate(keys) if kk == k]
        dot = lambda a, b: sum(float(torch.dot(a[i].double(), b[i].double())) for i in idx)
        cos = dot(g, s) / math.sqrt(dot(g, g) * dot(s, s))
        assert cos == pytest.approx(max(groups[k][0], threshold), abs=1e-5)
        assert dot(g, s) >= dot(before, s) - 1e-6  # never less of the safety direction than before


@pytest.mark.parametrize("sdtype", DTYPES, ids=["s-f32", "s-bf16", "s-f16"])
def test_mixed_dtypes_and_paths_agree(sdtype):
    """bf16 task gradients against safety gradients of another dtype; kernel == torch path."""
    g, s = make(6, torch.bfloat16, True, seed=7, sdtype=sdtype)
    g2 = [torch.stack([x, x], 1)[:, 0] for x in g]  # same values, non-contiguous: torch path
    want, _ = reference(g, s, [0] * len(g))
    safehook.project(g, s)
    safehook.project(g2, s)
    for a, b, w in zip(g, g2, want):
        assert (a.double() - w).abs().max() <= 2e-2 * w.abs().max()
        assert (a.double() - b.double()).abs().max() <= 2 ** -7 * w.abs().max()  # one bf16 ulp


@pytest.mark.parametrize("gran", ["global", "tensor"])
def test_idempotent(gran):
    g, s = make(10, torch.float32, True, seed=3)
    first = safehook.project(g, s, gran)
    assert first["projected"] if gran == "global" else all(first["projected"])
    once = [x.clone() for x in g]
    second = safehook.project(g, s, gran)
    assert not (second["projected"] if gran == "global" else any(second["projected"]))
    assert all(torch.equal(a, b) for a, b in zip(g, once))
    c = second["cosine"] if gran == "global" else max(abs(v) for v in second["cosine"])
    assert abs(c) < 1e-6


def test_threshold_and_degenerate():
    g = [torch.tensor([1.0, 1.0])]
    s = [torch.tensor([1.0, 0.0])]  # cosine 0.707: no conflict at 0, below a threshold of 0.9
    assert not safehook.project(g, s)["projected"]
    r = safehook.project(g, s, threshold=0.9)
    # moved up to cosine 0.9, keeping what helps: (x, 1) with x / sqrt(x^2 + 1) = 0.9
    assert r["projected"] and torch.allclose(g[0], torch.tensor([0.9 / math.sqrt(0.19), 1.0]))
    with pytest.raises(ValueError):
        safehook.project(g, s, threshold=1.0)
    z = [torch.zeros(3)]
    g = [torch.ones(3)]
    r = safehook.project(g, z)
    assert r["cosine"] is None and not r["projected"] and torch.equal(g[0], torch.ones(3))
    # None pairs are left out
    g = [torch.ones(2), None]
    r = safehook.project(g, [-torch.ones(2), torch.ones(2)])
    assert r["projected"] and torch.equal(g[0], torch.zeros(2))
    with pytest.raises(ValueError):
        safehook.project([torch.ones(2)], [torch.ones(3)])
    with pytest.raises(ValueError):
        safehook.project([torch.ones(2)], [torch.ones(2)], "layer")


def test_grad_scale_reports_unscaled_norm():
    g, s = make(4, torch.float32, True, seed=11)
    ref = [x.clone() for x in g]
    scaled = [x * 1024 for x in g]
    r1 = safehook.project(ref, s)
    r2 = safehook.project(scaled, s, grad_scale=1024.0)
    assert r2["norms"]["task"] == pytest.approx(r1["norms"]["task"], rel=1e-6)
    assert r2["cosine"] == pytest.approx(r1["cosine"], abs=1e-6)
    for a, b in zip(ref, scaled):  # linear: scaled gradients project to the scaled result
        assert torch.allclose(a * 1024, b, rtol=1e-5, atol=1e-3)


def test_threads_split_matches_one_thread():
    from safehook import _core
    big_g = [torch.randn(300_000, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    big_s = [-0.5 * x + torch.randn(300_000, generator=torch.Generator().manual_seed(9 + i)) for i, x in enumerate(big_g)]
    old = _core.safegrad_threads()
    try:
        outs = []
        for n in (1, 2):
            _core.safegrad_threads(n)
            assert _core.safegrad_threads() == n
            gg = [x.clone() for x in big_g]
            outs.append((safehook.project(gg, big_s), gg))
    finally:
        _core.safegrad_threads(old)
    assert outs[0][0]["cosine"] == pytest.approx(outs[1][0]["cosine"], abs=1e-9)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert _core.safegrad_threads() == old


def test_layer_key_groups_blocks():
    from safehook.features.safegrad import layer_key
    assert layer_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_key("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert layer_key("layers.0.mix.weight") == "layers.0"
    assert layer_key("transformer.h.11.attn.c_attn.weight") == "transformer.h.11"
    assert layer_key("base_model.model.model.layers.7.self_attn.v_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.7"
    assert layer_key("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_key("lm_head.weight") == "lm_head"
    assert layer_key("bias") == "bias"
