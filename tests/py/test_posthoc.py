"""safehook harden (LoX) and restore (Safe LoRA, NLSR): each formula against a float64
reference written independently with numpy on small random matrices, then end to end on a tiny
Llama saved by save_pretrained (sharded) and a PEFT LoRA adapter: the outputs load with
from_pretrained and run a forward, untouched tensors are bit-identical, and edited ones equal
the reference formula."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from safehook.posthoc import lox, nlsr, safelora
from safehook.posthoc.tensors import PosthocError, Source


def rnd(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))


# ---- formulas, float64 ----

@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_lox_matches_numpy_svd(k):
    a, u = rnd(12, 8, seed=1), rnd(12, 8, seed=2)
    got, info = lox.extrapolate(a.clone(), u.clone(), k, 0.7)
    d = a.numpy() - u.numpy()
    if k in (0, 8):
        ref = a.numpy() + 0.7 * d
    else:
        uu, ss, vv = np.linalg.svd(d, full_matrices=False)
        ref = a.numpy() + 0.7 * (uu[:, :k] * ss[:k]) @ vv[:k]
        assert info["energy_kept"] == pytest.approx((ss[:k] ** 2).sum() / (ss ** 2).sum(), rel=1e-12)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12)
    assert info["rank"] == (8 if k in (0, 8) else k)
    # a wrong rank (k+1 triplets) would differ by far more than the tolerance
    if k == 3:
        uu, ss, vv = np.linalg.svd(d, full_matrices=False)
        wrong = a.numpy() + 0.7 * (uu[:, :4] * ss[:4]) @ vv[:4]
        assert np.abs(got.numpy() - wrong).max() > 1e-3


def test_safelora_projection_and_similarity_match_explicit_matrix():
    v, dw = rnd(10, 6, seed=3), rnd(10, 6, seed=4)
    c = v.numpy() @ v.numpy().T / np.linalg.norm(v.numpy())  # Frobenius norm
    ref = c @ dw.numpy()
    np.testing.assert_allclose(safelora.project(v, dw).numpy(), ref, rtol=0, atol=1e-12)
    cos, _ = safelora.similarity(v, dw)
    f, g = ref.ravel(), dw.numpy().ravel()
    assert cos == pytest.approx(f @ g / np.linalg.norm(f) / np.linalg.norm(g), abs=1e-12)
    # an update inside V's column space is its own direction under C (cosine 1 up to scale)
    inside = v @ rnd(6, 6, seed=5)
    assert safelora.similarity(v, inside)[0] > 0.5
    assert safelora.similarity(torch.zeros(10, 6, dtype=torch.float64), dw)[0] is None


@pytest.mark.parametrize("shape", [(10, 6, 6), (6, 10, 10), (6, 10, 2), (10, 6, 3), (8, 8, 8)])
def test_safelora_projection_in_either_order_matches_float64(shape):
    """Tall, wide (down_proj-like) and adapter-shaped (X = B, k = r) against C X formed in numpy."""
    d_out, d_in, k = shape
    v, x = rnd(d_out, d_in, seed=8), rnd(d_out, k, seed=9)
    c = v.numpy() @ v.numpy().T / np.linalg.norm(v.numpy())
    np.testing.assert_allclose(safelora.project(v, x).numpy(), c @ x.numpy(), rtol=0, atol=1e-12)


def test_safelora_projection_of_a_wide_weight_stays_near_its_size(tmp_path):
    """A 128 x 4096 float32 update (2 MiB): V (V^T X) would hold a 4096 x 4096 matrix (64 MiB);
    the order chosen by shape holds 128 x 128. Peak resident memory of a fresh process, above
    what it held before the call."""
    code = """if 1:
        import json, torch
        from safehook.posthoc import safelora
        def hwm():
            for l in open("/proc/self/status"):
                if l.startswith("VmHWM:"):
                    return int(l.split()[1]) * 1024
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        v, x = torch.randn(128, 4096, generator=g), torch.randn(128, 4096, generator=g)
        safelora.project(v[:8, :64].contiguous(), x[:8, :64].contiguous())  # warm up the kernels
        before = hwm()
        p = safelora.project(v, x)
        print(json.dumps({"above": hwm() - before, "tensor": v.numel() * 4}))
    """
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["above"] < 4 * r["tensor"], r  # 64 MiB = 32 tensors the other way


def test_nlsr_rows_similarity_and_draw_direction():
    dr = rnd(20, 5, seed=6)
    rows = nlsr.neuron_rows(dr, 0.25)
    ref = np.sort(np.argsort(-np.linalg.norm(dr.numpy(), axis=1))[:5])
    assert rows.tolist() == ref.tolist()
    df = rnd(20, 5, seed=7)
    a, b = df.numpy()[ref].ravel(), dr.numpy()[ref].ravel()
    assert nlsr.masked_similarity(df, dr, rows) == pytest.approx(
        a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-12)
    sims = [0.9, -0.2, 0.4, None, 0.1]
    p = nlsr.probabilities(sims, 0.5, 0.2)
    # None ranks least similar, then -0.2, 0.1, 0.4, 0.9 (the most similar gets rate - eps)
    assert p == pytest.approx([0.3, 0.6, 0.4, 0.7, 0.5])
    assert nlsr.probabilities(sims, 0.5, 0.2, "reference") == pytest.approx([0.7, 0.4, 0.6, 0.3, 0.5])
    d1, d2 = nlsr.draw([0.5] * 64, 7), nlsr.draw([0.5] * 64, 7)
    assert d1 == d2 and 10 < sum(d1) < 54 and nlsr.draw([0.5] * 64, 8) != d1
    assert nlsr.draw([0.0, 1.0], 3) == [False, True]


# ---- end to end on a tiny Llama ----

def _llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _sd(path):
    src = Source(path)
    return {n: src.get(n) for n in src.names()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base, aligned (= base + a low-rank update), finetuned (= aligned + an update that is
    inside the alignment subspace for q_proj and random elsewhere), saved sharded."""
    root = tmp_path_factory.mktemp("posthoc")
    m = _llama(0)
    paths = {}
    m.save_pretrained(root / "base", max_shard_size="20KB")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.add_(0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g))
    m.save_pretrained(root / "aligned", max_shard_size="20KB")
    base = _sd(str(root / "base"))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() != 2 or "embed" in n:
                continue
            if "q_proj" in n:
                v = p.detach() - base[n]
                p.add_(0.02 * v @ torch.randn(v.shape[1], v.shape[1], generator=g))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    m.save_pretrained(root / "finetuned", max_shard_size="20KB")
    for k in ("base", "aligned", "finetuned"):
        paths[k] = str(root / k)
    # a LoRA adapter on the aligned model with a nonzero B
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    am = LlamaForCausalLM.from_pretrained(paths["aligned"])
    pm = get_peft_model(am, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(root / "adapter")
    paths["adapter"] = str(root / "adapter")
    paths["root"] = str(root)
    return paths


def _forward(path):
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(path)
    out = m(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
    assert out.shape == (1, 4, 64) and torch.isfinite(out).all()
    return m


def test_sharded_layout_is_kept(models, tmp_path):
    assert os.path.exists(os.path.join(models["aligned"], "model.safetensors.index.json"))
    out = str(tmp_path / "h")
    lox.harden(models["base"], models["aligned"], out, k=2, alpha=0.5, quiet=True)
    for fn in os.listdir(models["aligned"]):
        assert os.path.exists(os.path.join(out, fn)), fn
    with open(os.path.join(out, "model.safetensors.index.json")) as f1, \
            open(os.path.join(models["aligned"], "model.safetensors.index.json")) as f2:
        assert json.load(f1) == json.load(f2)
    assert len(Source(out).files) > 3


def test_harden_end_to_end(models, tmp_path):
    out = str(tmp_path / "h")
    res = lox.harden(models["base"], models["aligned"], out, k=2, alpha=0.5, quiet=True)
    _forward(out)
    a, b, h = _sd(models["aligned"]), _sd(models["base"]), _sd(out)
    for n in a:
        if a[n].dim() == 1:
            assert torch.equal(h[n], a[n]), n  # bit-identical 1-D parameters
    n = "model.layers.1.mlp.down_proj.weight"
    d = (a[n] - b[n]).double().numpy()
    uu, ss, vv = np.linalg.svd(d, full_matrices=False)
    ref = a[n].double().numpy() + 0.5 * (uu[:, :2] * ss[:2]) @ vv[:2]
    np.testing.assert_allclose(h[n].double().numpy(), ref, rtol=0, atol=2e-6)
    assert not torch.equal(h[n], a[n])
    recs = [json.loads(l) for l in open(res["record"])]
    assert recs[0]["event"] == "posthoc_start" and recs[-1]["event"] == "posthoc_end"
    t = [r for r in recs if r["event"] == "posthoc_tensor" and r["name"] == n][0]
    assert t["rank"] == 2 and t["energy_kept"] == pytest.approx((ss[:2] ** 2).sum() / (ss ** 2).sum(), rel=1e-4)


def test_safelora_full_end_to_end(models, tmp_path):
    out = str(tmp_path / "s")
    res = safelora.restore(models["base"], models["aligned"], models["finetuned"], out,
                           threshold=0.5, quiet=True)
    _forward(out)
    b, a, f = _sd(models["base"]), _sd(models["aligned"]), _sd(models["finetuned"])
    o = _sd(out)
    sims = res["similarities"]
    q = [n for n in sims if "q_proj" in n]
    rest = [n for n in sims if "q_proj" not in n]
    assert q and all(sims[n] > 0.5 for n in q)
    assert all(sims[n] < 0.5 for n in rest)
    for n in o:
        if n in q or n not in sims:
            assert torch.equal(o[n], f[n]), n  # kept layers and 1-D tensors bit-identical
    n = rest[0]
    v = (a[n] - b[n]).double().numpy()
    c = v @ v.T / np.linalg.norm(v)
    ref = a[n].double().numpy() + c @ (f[n] - a[n]).double().numpy()
    np.testing.assert_allclose(o[n].double().numpy(), ref, rtol=0, atol=1e-6)
    assert res["projected"] == len(rest)
    # number mode: exactly the N least similar
    res2 = safelora.restore(models["base"], models["aligned"], models["finetuned"],
                            str(tmp_path / "s2"), layers=3, quiet=True)
    assert res2["projected"] == 3


def test_safelora_adapter_end_to_end(models, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    out = str(tmp_path / "sa")
    res = safelora.restore(models["base"], models["aligned"], models["adapter"], out,
                           threshold=2.0, quiet=True)  # threshold above 1: every layer projected
    src, dst = _sd(models["adapter"]), _sd(out)
    b, a = _sd(models["base"]), _sd(models["aligned"])
    assert res["projected"] == res["layers"] == 4
    for n in src:
        if "lora_A" in n:
            assert torch.equal(src[n], dst[n])
        else:
            w = n.replace("base_model.model.", "").replace(".lora_B.weight", ".weight")
            v = (a[w] - b[w]).double().numpy()
            ref = v @ v.T / np.linalg.norm(v) @ src[n].double().numpy()
            np.testing.assert_allclose(dst[n].double().numpy(), ref, rtol=0, atol=1e-6)
    m = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(models["aligned"]), out)
    assert torch.isfinite(m(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_nlsr_end_to_end_deterministic(models, tmp_path):
    kw = dict(fraction=0.25, rate=0.5, epsilon=0.2, beta=0.5, seed=3, quiet=True)
    r1 = nlsr.restore(models["base"], models["aligned"], models["finetuned"], str(tmp_path / "n1"), **kw)
    r2 = nlsr.restore(models["base"], models["aligned"], models["finetuned"], str(tmp_path / "n2"), **kw)
    assert r1["chosen"] == r2["chosen"] and r1["chosen"]
    _forward(str(tmp_path / "n1"))
    b, a, f, o = (_sd(p) for p in (models["base"], models["aligned"], models["finetuned"],
                                   str(tmp_path / "n1")))
    for n in o:
        if n not in r1["chosen"]:
            assert torch.equal(o[n], f[n]), n
    n = r1["chosen"][0]
    ref_w = a[n] + 0.5 * (a[n] - b[n])
    rows = np.argsort(-np.linalg.norm((ref_w - b[n]).double().numpy(), axis=1))[:int(round(0.25 * a[n].shape[0]))]
    other = np.setdiff1d(np.arange(a[n].shape[0]), rows)
    np.testing.assert_allclose(o[n][rows].numpy(), ref_w[rows].numpy(), rtol=0, atol=1e-6)
    assert torch.equal(o[n][other], f[n][other])
    with pytest.raises(PosthocError, match="merge the adapter"):
        nlsr.restore(models["base"], models["aligned"], models["adapter"], str(tmp_path / "n3"), quiet=True)


def test_input_errors(models, tmp_path):
    with pytest.raises(PosthocError, match="not a model directory"):
        lox.harden(str(tmp_path), models["aligned"], str(tmp_path / "o"), quiet=True)
    other = _llama(1)
    other.config.intermediate_size = 48
    from transformers import LlamaForCausalLM
    LlamaForCausalLM(other.config).save_pretrained(tmp_path / "odd")
    with pytest.raises(PosthocError, match="shape mismatch for model.layers.0.mlp"):
        lox.harden(str(tmp_path / "odd"), models["aligned"], str(tmp_path / "o"), quiet=True)
    with pytest.raises(PosthocError, match="one of the inputs"):
        lox.harden(models["base"], models["aligned"], models["aligned"], quiet=True)


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "safehook"] + list(argv), capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_restore_and_report(models, tmp_path):
    out = str(tmp_path / "c")
    p = _cli("restore", "--method", "nlsr", "--base", models["base"], "--aligned", models["aligned"],
             "--finetuned", models["finetuned"], "--out", out, "--seed", "3", "--neurons", "0.25")
    assert p.returncode == 0, p.stderr
    assert "[restore" in p.stderr and "layers drawn for transplant" in p.stderr
    rep = _cli("report", os.path.join(out, "posthoc.jsonl"))
    assert rep.returncode == 0, rep.stderr
    n = sum(1 for l in open(os.path.join(out, "posthoc.jsonl")) if '"changed": true' in l)
    assert "posthoc: restore (NLSR, 25% neurons" in rep.stdout
    assert "14 tensors considered, %d changed" % n in rep.stdout
    assert "steps:" not in rep.stdout  # not mistaken for a training run's audit log


def test_cli_errors_are_one_line(models, tmp_path):
    p = _cli("harden", "--base", str(tmp_path), "--aligned", models["aligned"], "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert p.stderr.startswith("safehook harden: ") and "not a model directory" in p.stderr
    # a finetuned model that lacks a tensor of the aligned one
    from safetensors.torch import save_file
    src = Source(models["finetuned"])
    names = [n for n in src.names() if n != "model.layers.1.mlp.up_proj.weight"]
    save_file({n: src.get(n) for n in names}, str(tmp_path / "f.safetensors"), metadata={"format": "pt"})
    p = _cli("restore", "--method", "safelora", "--base", models["base"], "--aligned", models["aligned"],
             "--finetuned", str(tmp_path / "f.safetensors"), "--out", str(tmp_path / "o2.safetensors"),
             "--include", "up_proj")
    assert p.returncode == 0, p.stderr  # the single-file output holds what the input holds
    save_file({n: src.get(n) for n in src.names()}, str(tmp_path / "g.safetensors"), metadata={"format": "pt"})
    p = _cli("restore", "--method", "safelora", "--base", str(tmp_path / "f.safetensors"),
             "--aligned", models["aligned"], "--finetuned", str(tmp_path / "g.safetensors"),
             "--out", str(tmp_path / "o3.safetensors"))
    assert p.returncode == 2 and "missing tensor model.layers.1.mlp.up_proj.weight in base" in p.stderr
    assert p.stderr.strip().count("\n") == 0


# ---- what harden/restore refuse, and what a re-run leaves ----

def _files(d):
    return sorted(os.listdir(d))


def _digest(d):
    import hashlib
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in _files(d)}


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_harden_refuses_a_non_finite_alpha(models, tmp_path, alpha):
    out = str(tmp_path / "h")
    p = _cli("harden", "--base", models["base"], "--aligned", models["aligned"], "--out", out, "--alpha=" + alpha)
    assert p.returncode == 2 and p.stderr == "safehook harden: --alpha must be a finite number, not %s\n" % float(alpha)
    assert not os.path.exists(out)
    with pytest.raises(PosthocError, match="--threshold must be a finite number"):
        safelora.restore(models["base"], models["aligned"], models["finetuned"], out, threshold=float(alpha))
    with pytest.raises(PosthocError, match="--rate must be a finite number"):
        nlsr.restore(models["base"], models["aligned"], models["finetuned"], out, rate=float(alpha))


def test_no_output_may_be_an_input(models, tmp_path):
    before = {k: _digest(models[k]) for k in ("base", "aligned")}
    shard = sorted(f for f in os.listdir(models["aligned"]) if f.endswith(".safetensors"))[0]
    link = tmp_path / "link.safetensors"
    os.link(os.path.join(models["base"], shard), str(link))  # the same file under another name
    for record, what in ((os.path.join(models["aligned"], shard), os.path.join(models["aligned"], shard)),
                         (os.path.join(models["base"], "config.json"), os.path.join(models["base"], "config.json")),
                         (str(link), None), (models["aligned"], models["aligned"])):
        p = _cli("harden", "--base", models["base"], "--aligned", models["aligned"], "--out", str(tmp_path / "h"),
                 "--record", record)
        assert p.returncode == 2, p.stderr
        assert p.stderr.startswith("safehook harden: --record %s is an input file (" % record), p.stderr
        assert p.stderr.count("\n") == 1 and (what is None or what in p.stderr)
    p = _cli("harden", "--base", models["base"], "--aligned", models["aligned"],
             "--out", os.path.join(models["aligned"], shard))
    assert p.returncode == 2 and "is an input file" in p.stderr
    assert {k: _digest(models[k]) for k in ("base", "aligned")} == before  # nothing was truncated
    assert not os.path.exists(tmp_path / "h")
    # the record may not be a file the output itself writes
    p = _cli("harden", "--base", models["base"], "--aligned", models["aligned"], "--out", str(tmp_path / "h"),
             "--record", str(tmp_path / "h" / "config.json"))
    assert p.returncode == 2 and "would be overwritten by the output" in p.stderr


def test_a_rerun_replaces_the_whole_output_folder(models, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from safehook.posthoc import tensors
    from transformers import LlamaForCausalLM
    one = tmp_path / "aligned-one"  # the aligned model as one file: another layout than the shards
    one.mkdir()
    save_file(_sd(models["aligned"]), str(one / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json"):
        if os.path.exists(os.path.join(models["aligned"], f)):
            open(one / f, "wb").write(open(os.path.join(models["aligned"], f), "rb").read())
    out = str(tmp_path / "h")
    lox.harden(models["base"], models["aligned"], out, k=2, alpha=0.5, quiet=True)
    first = _files(out)
    assert "model.safetensors.index.json" in first and "safehook-posthoc.json" in first and "posthoc.jsonl" in first
    lox.harden(models["base"], str(one), out, k=0, alpha=0.25, quiet=True)
    # only the second run's files: no shard or index of the first is left for a loader to mix in
    assert _files(out) == sorted(["model.safetensors", "posthoc.jsonl", "safehook-posthoc.json"] +
                                 [f for f in _files(str(one)) if f.endswith(".json")])
    m = LlamaForCausalLM.from_pretrained(out)
    a, b = _sd(models["aligned"]), _sd(models["base"])
    n = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(m.state_dict()[n], a[n] + 0.25 * (a[n] - b[n]), rtol=0, atol=1e-6)
    assert json.loads(open(os.path.join(out, "posthoc.jsonl")).readline())["params"]["alpha"] == 0.25
    assert not [f for f in os.listdir(str(tmp_path)) if ".partial-" in f or ".old-" in f]
    # a run that fails half way leaves the previous output as it was
    kept = _digest(out)
    real, calls = tensors.write_file, []

    def failing(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *a, **kw)
    monkeypatch.setattr(tensors, "write_file", failing)
    with pytest.raises(OSError):
        lox.harden(models["base"], models["aligned"], out, k=2, alpha=0.5, quiet=True)
    assert _digest(out) == kept and len(calls) == 2
    assert not [f for f in os.listdir(str(tmp_path)) if ".partial-" in f or ".old-" in f]
    monkeypatch.undo()
    # a folder safehook did not write is never replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(PosthocError, match="files that safehook did not write"):
        lox.harden(models["base"], models["aligned"], str(mine), quiet=True)
    assert _files(str(mine)) == ["notes.txt"]
