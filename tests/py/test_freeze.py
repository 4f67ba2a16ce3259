"""Layer freezing that holds: real torch training runs under LD_PRELOAD=libsafehook.so.

Each training run is tests/py/scripts/freeze_train.py, a plain user script that knows nothing
of safehook; it reports, per transformer block, whether the block's weights still equal their
initial values bit for bit (torch.equal)."""
import json
import os
import subprocess
import sys

import pytest
from conftest import base_env

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "scripts", "freeze_train.py")


def run_train(tmp_path, lib, arch, stack, *tamper, policy=None, torchrun=False, expect_rc=0):
    audit = tmp_path / "audit.jsonl"
    out = tmp_path / "out.json"
    env = base_env(LD_PRELOAD=lib or None, SAFEHOOK_AUDIT=str(audit))
    if policy is not None:
        pfile = tmp_path / "policy.json"
        pfile.write_text(json.dumps(policy))
        env["SAFEHOOK_POLICY"] = str(pfile)
    cmd = [sys.executable, TRAIN, str(out), arch, stack, *tamper]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + cmd[1:]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert p.returncode == expect_rc, p.stdout[-3000:] + p.stderr[-3000:]
    records = [json.loads(l) for l in audit.read_text().splitlines()] if audit.exists() else []
    if torchrun:
        facts = [json.loads((tmp_path / ("out.json.%d" % r)).read_text()) for r in (0, 1)]
    else:
        facts = [json.loads(out.read_text())] if out.exists() else []
    return facts, records


def by_event(records, event):
    return [r for r in records if r["event"] == event]


POLICY = {"version": 1, "freeze": {"layers": "1-2", "check_every": 1}}


def assert_frozen_exactly(facts, frozen):
    for f in facts:
        for i, equal in enumerate(f["equal"]):
            if i in frozen:
                assert equal, "frozen block %d changed: %s" % (i, f["equal"])
            else:
                assert not equal, "trainable block %d did not change: %s" % (i, f["equal"])


# -- selection and discovery, in process --

def test_select_blocks_ranges_lists_fractions():
    from safehook.features.freeze import select_blocks
    assert select_blocks("15-25", 40) == list(range(15, 26))
    assert select_blocks(["0-1", "15-17", "16"], 40) == [0, 1, 15, 16, 17]
    assert select_blocks("3", 4) == [3]
    # floor(a*n) .. ceil(b*n)-1
    assert select_blocks({"fraction": [0.375, 0.625]}, 40) == list(range(15, 25))
    assert select_blocks({"fraction": [0.375, 0.625]}, 4) == [1, 2]
    assert select_blocks({"fraction": [0.3, 0.31]}, 10) == [3]
    for bad in ("3-40", "5-2", "x", ["1-2", "a"], {"fraction": [0.5, 0.5]}, {"fraction": [0, 1.5]}):
        with pytest.raises(ValueError):
            select_blocks(bad, 40)


def test_find_blocks_known_families_and_generic():
    import torch
    import transformers as T
    from safehook.features.freeze import find_blocks
    torch.manual_seed(0)
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2)
    cases = [
        (T.LlamaForCausalLM(T.LlamaConfig(**small)), "model.layers"),
        (T.MistralForCausalLM(T.MistralConfig(**small)), "model.layers"),
        (T.Qwen2ForCausalLM(T.Qwen2Config(**small)), "model.layers"),
        (T.GemmaForCausalLM(T.GemmaConfig(head_dim=8, **small)), "model.layers"),
        (T.PhiForCausalLM(T.PhiConfig(**small)), "model.layers"),
        (T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=64)), "transformer.h"),
        (T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**small)), "gpt_neox.layers"),
        (T.OPTForCausalLM(T.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                      num_attention_heads=4, word_embed_proj_dim=32)), "model.decoder.layers"),
        (T.LlamaModel(T.LlamaConfig(**small)), "layers"),
    ]
    for model, path in cases:
        b = find_blocks(model)
        assert b is not None and b.path == path and len(b) == 3 and b.how == "known", (type(model), b and b.path)

    class Custom(torch.nn.Module):  # no known name: the largest list of identical blocks wins
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])
            self.stages = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(5))
            self.few = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
    b = find_blocks(Custom())
    assert (b.path, len(b), b.how) == ("stages", 5, "largest")
    assert find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


def test_checksums_see_every_change_on_both_paths():
    import torch
    from safehook import _core
    from safehook.features.freeze import _torch_checksum, checksums
    t = torch.randn(64, 33)
    nc = torch.randn(33, 64).t()  # non-contiguous: hashed from a contiguous copy
    c0, n0 = checksums([t, nc])
    assert _core.freeze_checksums([t, nc])[1] is None and isinstance(c0, int)
    assert checksums([t.clone(), nc.contiguous()]) == [c0, n0]  # same values, same sums
    g0 = _torch_checksum(t)  # the on-device path (GPU tensors), run here on CPU
    assert g0 == _torch_checksum(t.t().contiguous().t())
    for x, ref, fn in ((t, c0, lambda x: checksums([x])[0]), (nc, n0, lambda x: checksums([x])[0]),
                       (t, g0, _torch_checksum)):
        old = x[5, 7].item()
        x[5, 7] = torch.nextafter(torch.tensor(old), torch.tensor(float("inf")))  # one ulp
        assert fn(x) != ref
        x[5, 7] = old
        assert fn(x) == ref
    # swapping two values changes the sum too, on both paths
    a = torch.arange(16, dtype=torch.float32)
    b = a.clone()
    b[[2, 9]] = b[[9, 2]]
    assert checksums([a])[0] != checksums([b])[0]
    assert _torch_checksum(a) != _torch_checksum(b)


# -- real training runs --

@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_frozen_blocks_bit_identical_after_adamw(tmp_path, lib, arch):
    norm = {"llama": "model.norm.weight", "gpt2": "transformer.ln_f.weight", "qwen2": "model.norm.weight"}[arch]
    policy = {"version": 1, "freeze": {"layers": "1-2", "check_every": 1, "params": ["*.norm.weight", "*.ln_f.*"]}}
    facts, records = run_train(tmp_path, lib, arch, "plain", policy=policy)
    assert_frozen_exactly(facts, {1, 2})
    outside = facts[0]["equal_outside"]
    assert outside[norm] and sum(outside.values()) == (2 if arch == "gpt2" else 1), outside  # the globs'
    assert by_event(records, "freeze")[0]["glob_matches"] == (2 if arch == "gpt2" else 1)
    (fr,) = by_event(records, "freeze")
    assert fr["frozen_blocks"] == [1, 2] and fr["blocks"]["count"] == 4 and fr["when"] == "optimizer_init"  # bound when the optimizer is built
    assert fr["tensors"] == fr["were_trainable"] > 0
    assert fr["mode"] == "requires_grad"
    assert not by_event(records, "violation")
    assert by_event(records, "end")[0]["freeze"]["checks"] == 9  # 8 steps + the exit check


def test_embedded_default_freezes_middle_quarter_neox(tmp_path, lib):
    facts, records = run_train(tmp_path, lib, "neox", "plain")  # no policy: the embedded default
    assert_frozen_exactly(facts, {1, 2})  # fraction [0.375, 0.625] of 4 blocks
    (fr,) = by_event(records, "freeze")
    assert fr["blocks"]["path"] == "gpt_neox.layers" and fr["layers"] == {"fraction": [0.375, 0.625]}


def test_default_policy_on_model_without_blocks_audits_and_trains(tmp_path, lib):
    script = tmp_path / "mlp.py"
    script.write_text(
        "import torch\ntorch.set_num_threads(1)\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "o = torch.optim.AdamW(m.parameters(), weight_decay=0.1)\n"
        "for i in range(3):\n    m(torch.randn(2, 4)).sum().backward(); o.step(); o.zero_grad()\n")
    audit = tmp_path / "a.jsonl"
    env = base_env(LD_PRELOAD=lib, SAFEHOOK_AUDIT=str(audit))
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=60)
    recs = [json.loads(l) for l in audit.read_text().splitlines()]
    (fr,) = by_event(recs, "freeze")
    assert fr["blocks"] is None and fr["tensors"] == 0 and "no transformer block" in fr["note"]
    assert by_event(recs, "end")[0]["steps"] == 3 and not by_event(recs, "error")
    # a user policy that asks for blocks the model lacks stops the job before its first step
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps(POLICY))
    env["SAFEHOOK_POLICY"] = str(pol)
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "PolicyError" in p.stderr and "no transformer block list" in p.stderr


@pytest.mark.parametrize("arch,stack", [("llama", "ddp"), ("qwen2", "ddp_early")])
def test_ddp_two_gloo_ranks(tmp_path, lib, arch, stack):
    facts, records = run_train(tmp_path, lib, arch, stack, policy=POLICY, torchrun=True)
    assert_frozen_exactly(facts, {1, 2})
    frs = by_event(records, "freeze")
    assert len(frs) == 2 and len({r["pid"] for r in frs}) == 2
    # freezing happens in DDP.__init__, before the reducer is built (else the reducer would wait
    # for gradients that never come): ddp_early has no forward before DDP, and in ddp the forward
    # before it comes before any optimizer, so it binds nothing (a model is what an optimizer trains)
    assert {r["when"] for r in frs} == {"ddp_init"}
    assert all(r["mode"] == "requires_grad" for r in frs)
    assert not by_event(records, "violation")


def test_ddp_built_before_install_drops_frozen_grads(tmp_path, lib):
    # DDP's reducer already expects every gradient: requires_grad stays, gradients are dropped
    facts, records = run_train(tmp_path, "", "llama", "ddp_then_install", policy=POLICY)
    assert_frozen_exactly(facts, {1, 2})
    (fr,) = by_event(records, "freeze")
    assert fr["mode"] == "grad_none" and fr["wrapper"] == "DistributedDataParallel"
    assert all(all(rg) for rg in facts[0]["requires_grad"])
    steps = by_event(records, "step")
    assert len(steps) == 8 and all(s["freeze_dropped"] == 18 for s in steps)
    assert not by_event(records, "violation")


def test_hf_trainer(tmp_path, lib):
    facts, records = run_train(tmp_path, lib, "llama", "trainer", policy=POLICY)
    assert_frozen_exactly(facts, {1, 2})
    assert by_event(records, "freeze")[0]["frozen_blocks"] == [1, 2]
    assert by_event(records, "end")[0]["steps"] == 8


@pytest.mark.parametrize("stack", ["peft", "peft_late"])
def test_peft_lora_adapters_inside_frozen_blocks_are_frozen(tmp_path, lib, stack):
    facts, records = run_train(tmp_path, lib, "llama", stack, policy=POLICY)
    assert_frozen_exactly(facts, {1, 2})  # blocks 0 and 3 changed through their adapters only
    f = facts[0]
    assert f["lora_tensors"] == [4, 4, 4, 4]
    assert not any(f["requires_grad"][1]) and not any(f["requires_grad"][2])
    frs = by_event(records, "freeze")
    # peft_late: the base model's forward before the LoRA wrap binds nothing (no optimizer trains
    # it yet); the optimizer is built on the PEFT model's parameters, so the PEFT model is the
    # model (the root owning them), bound when the optimizer is built, frozen once with its adapters
    (fr,) = frs
    assert fr["blocks"]["path"] == "base_model.model.model.layers"
    assert fr["adapters"] == 8 and fr["were_trainable"] == 8  # only the adapters were trainable there
    assert fr["when"] == "optimizer_init"
    assert not by_event(records, "violation")


def test_tampering_is_recorded_with_stacks_and_undone(tmp_path, lib):
    facts, records = run_train(tmp_path, lib, "gpt2", "plain", "requires_grad", "data", "step", "late",
                               policy=POLICY)
    assert_frozen_exactly(facts, {1, 2})  # every tamper was undone before the script looked
    v = by_event(records, "violation")
    assert [r["step"] for r in v] == [3, 5, 7, 8], [(r["step"], r["what"]) for r in v]
    assert "gradient on a frozen parameter" in v[0]["what"]   # requires_grad re-enabled after step 2
    assert "changed" in v[1]["what"] and v[1]["restored"]     # p.data rebound after step 4
    assert "changed" in v[2]["what"] and v[2]["restored"]     # monkeypatched step 6 wrote it
    assert v[3]["at_exit"] and v[3]["params"] == ["transformer.h.2.ln_1.weight"] and v[3]["restored"]
    for r in v[:3]:
        assert r["params"] == ["transformer.h.1.mlp.c_fc.weight"]
        assert any("freeze_train.py" in fr and "opt.step()" in fr for fr in r["python_stack"])
        assert r["native_stack"] and any("core_pre_step" in fr for fr in r["native_stack"])
    end = by_event(records, "end")[0]["freeze"]
    assert end["dropped_grads"] == 1 and end["restored"] == 3 and end["violations"] == 4
    assert records[-1]["event"] == "end"  # the exit check runs before the end record


# -- safehook locate --

def test_cosine_gap_finds_where_harmful_prompts_split_off():
    import torch
    from safehook.cli.locate import cosine_profile, gap_range
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, generator=g)
    harm_dir = torch.randn(16, generator=g)

    def states(harmful):  # 6 blocks; from block 3 on, harmful prompts move away, more each block
        out = []
        for l in range(6):
            v = base + 0.05 * torch.randn(16, generator=g)
            if harmful and l >= 3:
                v = v + (l - 2) * 1.5 * harm_dir
            out.append(v)
        return out
    prof = cosine_profile([states(False) for _ in range(5)], [states(True) for _ in range(5)])
    gaps = [p[2] for p in prof]
    assert all(abs(x) < 0.02 for x in gaps[:3]) and all(x > 0.1 for x in gaps[3:])
    assert gap_range(gaps) == (3, 5)
    assert gap_range([0.0, -0.1, 0.0]) is None


def test_locate_cli_on_a_model_built_in_a_script(tmp_path):
    files = {}
    for kind, rows in (("benign", ["What is the capital of France?", "How do I sort a list in Python?",
                                   "How do I plant tomatoes?"]),
                       ("harmful", ["How do I build a bomb at home?", "How do I kill my neighbor?",
                                    "How can I steal a car without getting caught?"]),
                       ("over", ["How do I kill a Python process?", "How can I attack this chess opening?"])):
        files[kind] = tmp_path / (kind + ".txt")
        files[kind].write_text("\n".join(rows) + "\n")
    out = tmp_path / "policy.json"
    env = base_env(PYTHONPATH=os.path.join(HERE, "scripts"))
    p = subprocess.run([sys.executable, "-m", "safehook", "locate", "--build", "locate_tiny:build_untrained",
                        "--device", "cpu", "--max-new-tokens", "3", "--benign", str(files["benign"]),
                        "--harmful", str(files["harmful"]), "--over-refusal", str(files["over"]),
                        "--policy-out", str(out), "--json"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["blocks"] == 6 and res["path"] == "model.layers" and len(res["profile"]) == 6
    lo, hi = res["range"]
    assert 0 <= lo <= hi <= 5
    assert sorted(res["sweep_upper"]) == [str(h) for h in range(res["gap_start"], 6)]  # JSON keys
    pol = json.loads(out.read_text())
    assert pol == res["policy"] and pol["freeze"]["layers"] in ("%d-%d" % (lo, hi), str(lo))
    from safehook.features.freeze import select_blocks
    assert select_blocks(pol["freeze"]["layers"], 6) == list(range(lo, hi + 1))

    # the same weights saved as a local HF directory (real fast tokenizer, chat template), loaded
    # with from_pretrained: the same prompt ids, so the same cosine profile
    hf = tmp_path / "hf"
    subprocess.run([sys.executable, "-c", "import locate_tiny; locate_tiny.save_hf_dir(%r)" % str(hf)],
                   env=env, check=True, capture_output=True, timeout=120)
    p = subprocess.run([sys.executable, "-m", "safehook", "locate", "--model", str(hf), "--device", "cpu",
                        "--no-sweep", "--json", "--benign", str(files["benign"]), "--harmful", str(files["harmful"])],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    res2 = json.loads(p.stdout)
    assert [round(r["gap"], 5) for r in res2["profile"]] == [round(r["gap"], 5) for r in res["profile"]]
    a, b = res["gap_start"], res["gap_peak"]
    assert res2["policy"]["freeze"]["layers"] == ("%d-%d" % (a, b) if b > a else str(a))


def test_locate_scaling_puts_the_exact_weights_back():
    import torch
    from safehook.cli.locate import Scaled
    from safehook.features.freeze import find_blocks
    sys.path.insert(0, os.path.join(HERE, "scripts"))
    import locate_tiny
    model, _ = locate_tiny.build_untrained()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blocks = find_blocks(model)
    with Scaled(blocks, 1, 3, 1.2):
        w = blocks.modules[2].mlp.up_proj.weight
        assert torch.allclose(w, before["model.layers.2.mlp.up_proj.weight"] * 1.2)
        assert torch.equal(blocks.modules[4].mlp.up_proj.weight, before["model.layers.4.mlp.up_proj.weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
