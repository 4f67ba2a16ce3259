"""safehook verify: the frozen tensors of a saved checkpoint against the base, out of process,
for safetensors (single and sharded) and torch files, with PEFT names; a single flipped bit is
caught (also -0.0 vs 0.0, which torch.equal calls equal). Crafted checkpoints that
transformers' from_pretrained loads with changed frozen tensors (a duplicate in another listed
shard, the base-model prefix dropped, tied embeddings, a stray shard) fail it; corrupt, truncated
and foreign checkpoints cannot be verified (exit 2); --json is the stable form a root-side
check reads."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from safehook.cli import main

N_BLOCKS = 4


def _base():
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g), "lm_head.weight": torch.randn(16, 8, generator=g)}
    for i in range(N_BLOCKS):
        sd["model.layers.%d.mlp.up_proj.weight" % i] = torch.randn(12, 8, generator=g)
        sd["model.layers.%d.mlp.up_proj.bias" % i] = torch.zeros(12)
        sd["model.layers.%d.norm.weight" % i] = torch.ones(8, dtype=torch.bfloat16)
    return sd


def _trained(sd):
    """What fine-tuning with blocks 1-2 frozen leaves: every other tensor moved."""
    out = {k: v.clone() for k, v in sd.items()}
    for k in out:
        if not (k.startswith("model.layers.1.") or k.startswith("model.layers.2.")):
            out[k] += 0.5
    return out


def _policy(tmp_path, freeze):
    p = tmp_path / "policy.json"
    p.write_text(json.dumps({"version": 1, "freeze": freeze}))
    return str(p)


def _verify(capsys, base, ckpt, policy):
    code = main(["verify", "--base", str(base), "--checkpoint", str(ckpt), "--policy", policy])
    return code, capsys.readouterr()


def test_identical_frozen_blocks_pass_and_one_flipped_bit_fails(tmp_path, capsys):
    base = _base()
    save_file(base, str(tmp_path / "base.safetensors"))
    ck = _trained(base)
    save_file(ck, str(tmp_path / "ck.safetensors"))
    pol = _policy(tmp_path, {"layers": "1-2"})
    code, out = _verify(capsys, tmp_path / "base.safetensors", tmp_path / "ck.safetensors", pol)
    assert code == 0, out
    assert out.out.strip().splitlines()[-1] == ("OK: 6 frozen tensors (blocks 1-2 of model.layers[0-3]): 6 identical, "
                                                "0 differ, 0 missing, 0 added inside frozen blocks, 0 ambiguous, "
                                                "0 not in the checkpoint")
    # the lowest mantissa bit of one value of block 2
    w = ck["model.layers.2.mlp.up_proj.weight"]
    w.view(torch.int32).view(-1)[5] ^= 1
    save_file(ck, str(tmp_path / "ck.safetensors"))
    code, out = _verify(capsys, tmp_path / "base.safetensors", tmp_path / "ck.safetensors", pol)
    assert code == 1
    assert "DIFFERS model.layers.2.mlp.up_proj.weight: 1 of 96 values differ" in out.out
    assert out.out.strip().splitlines()[-1].startswith("FAIL: 6 frozen tensors")


def test_a_model_file_under_any_name_is_known_by_its_first_bytes(tmp_path, capsys):
    """Root's watcher hands verify every model file a job wrote, whatever its name: a torch zip
    or a safetensors file named .txt is checked as what it is (was: exit 2, "not a .safetensors
    ..."), a file that is neither cannot be checked."""
    base = _base()
    save_file(base, str(tmp_path / "base.safetensors"))
    pol = _policy(tmp_path, {"layers": "1-2"})
    ck = _trained(base)
    torch.save(ck, str(tmp_path / "ck.txt"))
    save_file(ck, str(tmp_path / "ck2.log"))
    for name in ("ck.txt", "ck2.log"):
        code, out = _verify(capsys, tmp_path / "base.safetensors", tmp_path / name, pol)
        assert code == 0 and out.out.strip().splitlines()[-1].startswith("OK: 6 frozen tensors"), (name, out)
    ck["model.layers.1.mlp.up_proj.bias"] += 1
    torch.save(ck, str(tmp_path / "ck.txt"))
    assert _verify(capsys, tmp_path / "base.safetensors", tmp_path / "ck.txt", pol)[0] == 1
    (tmp_path / "notes.txt").write_text("{not a model}")
    code, out = _verify(capsys, tmp_path / "base.safetensors", tmp_path / "notes.txt", pol)
    assert code == 2 and "by its name or its first bytes" in out.err


def test_negative_zero_is_a_difference(tmp_path, capsys):
    base = _base()
    save_file(base, str(tmp_path / "base.safetensors"))
    ck = _trained(base)
    ck["model.layers.1.mlp.up_proj.bias"][3] = -0.0
    assert torch.equal(ck["model.layers.1.mlp.up_proj.bias"], base["model.layers.1.mlp.up_proj.bias"])
    save_file(ck, str(tmp_path / "ck.safetensors"))
    code, out = _verify(capsys, tmp_path / "base.safetensors", tmp_path / "ck.safetensors",
                        _policy(tmp_path, {"layers": "1-2"}))
    assert code == 1 and "DIFFERS model.layers.1.mlp.up_proj.bias: 1 of 12 values differ" in out.out, out


def test_sharded_safetensors_against_a_torch_bin_with_ddp_names(tmp_path, capsys):
    base = _base()
    bdir = tmp_path / "base"
    bdir.mkdir()
    keys = sorted(base)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    wm = {}
    for f, ks in shards.items():
        save_file({k: base[k] for k in ks}, str(bdir / f))
        wm.update({k: f for k in ks})
    (bdir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    ck = {"module." + k: v for k, v in _trained(base).items()}
    ck["module.model.layers.0.norm.weight"][0] = 3.0  # block 0 is not frozen: allowed
    torch.save(ck, str(tmp_path / "ck.bin"))
    pol = _policy(tmp_path, {"layers": {"fraction": [0.25, 0.75]}, "params": ["model.embed_tokens.*"]})
    code, out = _verify(capsys, bdir, tmp_path / "ck.bin", pol)
    # the embedding moved (+0.5) and the policy freezes it by glob
    assert code == 1
    assert "DIFFERS model.embed_tokens.weight: 128 of 128 values differ, max |diff| 0.5" in out.out
    assert "blocks 1-2 of model.layers[0-3]; params model.embed_tokens.*" in out.out
    assert out.out.count("DIFFERS") == 1


def test_peft_adapter_checkpoint(tmp_path, capsys):
    base = _base()
    save_file(base, str(tmp_path / "base.safetensors"))
    pol = _policy(tmp_path, {"layers": "1-2"})
    pre = "base_model.model.model.layers.%d.mlp.up_proj."
    ad = {pre % 0 + "lora_A.weight": torch.randn(2, 8), pre % 0 + "lora_B.weight": torch.randn(12, 2),
          pre % 1 + "lora_A.weight": torch.randn(2, 8), pre % 1 + "lora_B.weight": torch.zeros(12, 2)}
    save_file(ad, str(tmp_path / "adapter.safetensors"))
    code, out = _verify(capsys, tmp_path / "base.safetensors", tmp_path / "adapter.safetensors", pol)
    # adapters only: the frozen base tensors are not in it; block 1's adapter is still a no-op
    assert code == 0, out.out
    assert ("0 identical, 0 differ, 0 missing, 0 added inside frozen blocks, 0 ambiguous, 6 not in the checkpoint "
            "(a partial checkpoint: loaded over the base they keep its values)") in out.out
    ad[pre % 1 + "lora_B.weight"][4, 1] = 1e-3
    save_file(ad, str(tmp_path / "adapter.safetensors"))
    code, out = _verify(capsys, tmp_path / "base.safetensors", tmp_path / "adapter.safetensors", pol)
    assert code == 1 and ("ADDED model.layers.1.mlp.up_proj.lora_B.weight: a LoRA B that is not all zeros, inside "
                          "frozen block(s)") in out.out


def test_cannot_check_is_exit_2(tmp_path, capsys):
    save_file({"a.weight": torch.zeros(2)}, str(tmp_path / "flat.safetensors"))
    code, out = _verify(capsys, tmp_path / "flat.safetensors", tmp_path / "flat.safetensors",
                        _policy(tmp_path, {"layers": "0-1"}))
    assert code == 2 and "no transformer block list" in out.err
    code, out = _verify(capsys, tmp_path / "missing", tmp_path / "flat.safetensors", _policy(tmp_path, {"layers": "0-1"}))
    assert code == 2 and "no such file or folder" in out.err


class _Done:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(*argv):
    """`safehook verify ARGV` in this process (a process per call would cost a torch import each)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["verify", *argv])
    return _Done(code, out.getvalue(), err.getvalue())


def test_another_architecture_cannot_be_verified(tmp_path, capsys):
    base = _base()
    save_file(base, str(tmp_path / "base.safetensors"))
    g = torch.Generator().manual_seed(1)
    gpt2 = {"transformer.wte.weight": torch.randn(16, 8, generator=g)}
    for i in range(N_BLOCKS):
        gpt2["transformer.h.%d.mlp.c_fc.weight" % i] = torch.randn(8, 12, generator=g)
    save_file(gpt2, str(tmp_path / "gpt2.safetensors"))
    code, out = _verify(capsys, tmp_path / "base.safetensors", tmp_path / "gpt2.safetensors",
                        _policy(tmp_path, {"layers": "1-2"}))
    assert code == 2 and out.out == ""
    assert out.err == ("safehook verify: %s shares none of its 5 tensor names with the base %s (14 names, e.g. "
                       "transformer.h.0.mlp.c_fc.weight vs lm_head.weight): another architecture, or names verify "
                       "cannot map\n" % (tmp_path / "gpt2.safetensors", tmp_path / "base.safetensors"))


@pytest.mark.parametrize("damage", ["truncated", "header", "garbage_tail", "torch_truncated"])
def test_corrupt_checkpoint_is_one_line_and_exit_2(tmp_path, damage):
    base = _base()
    save_file(base, str(tmp_path / "base.safetensors"))
    if damage == "torch_truncated":
        torch.save(_trained(base), str(tmp_path / "ck.bin"))
        ck = tmp_path / "ck.bin"
        data = ck.read_bytes()
        ck.write_bytes(data[: len(data) // 2])
    else:
        save_file(_trained(base), str(tmp_path / "ck.safetensors"))
        ck = tmp_path / "ck.safetensors"
        data = ck.read_bytes()
        ck.write_bytes({"truncated": data[:-100], "header": data[:8] + b"{not json" + data[17:],
                        "garbage_tail": data + b"\0" * 16}[damage])
    p = _cli("--base", str(tmp_path / "base.safetensors"), "--checkpoint", str(ck), "--policy",
             _policy(tmp_path, {"layers": "1-2"}))
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout == "" and p.stderr.count("\n") == 1 and p.stderr.startswith("safehook verify: %s: " % ck)
    assert {"truncated": "truncated", "header": "header is not JSON", "garbage_tail": "corrupt",
            "torch_truncated": "not a readable torch state dict"}[damage] in p.stderr


# ---- checkpoints as transformers loads them ----

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 3-block Llama (untied embeddings) saved sharded, and the same model fine-tuned with
    block 1 and the output head frozen (every other tensor moved)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                     tie_word_embeddings=False))
    m.save_pretrained(str(root / "base"), max_shard_size="8KB")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not n.startswith("model.layers.1.") and n != "lm_head.weight":
                p.add_(0.01)
    m.save_pretrained(str(root / "tuned"), max_shard_size="8KB")
    pol = root / "policy.json"
    pol.write_text(json.dumps({"version": 1, "freeze": {"layers": "1", "params": ["lm_head.*"]}}))
    return {"base": str(root / "base"), "tuned": str(root / "tuned"), "policy": str(pol),
            "state": {k: v.clone() for k, v in LlamaForCausalLM.from_pretrained(str(root / "base")).state_dict().items()}}


FROZEN = "model.layers.1.mlp.up_proj.weight"


def _copy(llama, tmp_path, name="ck"):
    d = tmp_path / name
    shutil.copytree(llama["tuned"], str(d))
    return d


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


def _add(d, shard, tensors):
    from safetensors.torch import load_file
    sd = load_file(str(d / shard))
    sd.update(tensors)
    save_file(sd, str(d / shard), metadata={"format": "pt"})


def _loaded(d):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(str(d)).state_dict()


def test_a_clean_fine_tune_passes(llama):
    p = _cli("--base", llama["base"], "--checkpoint", llama["tuned"], "--policy", llama["policy"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1].startswith("OK: 10 frozen tensors (blocks 1 of model.layers[0-2]; params lm_head.*): "
                                                "10 identical, 0 differ, 0 missing")


def test_a_duplicate_in_another_listed_shard_fails(llama, tmp_path):
    d = _copy(llama, tmp_path)
    wm = _index(d)
    later = max(set(wm.values()))
    assert wm[FROZEN] != later
    changed = llama["state"][FROZEN] + 1.0
    _add(d, later, {FROZEN: changed})  # the index still maps it to its own shard
    assert torch.equal(_loaded(d)[FROZEN], changed)  # from_pretrained takes the duplicate
    p = _cli("--base", llama["base"], "--checkpoint", str(d), "--policy", llama["policy"])
    assert p.returncode == 1, p.stdout + p.stderr
    assert ("DIFFERS %s: 512 of 512 values differ, max |diff| 1 (stored as %s in %s, 1 of 2 copies differ)"
            % (FROZEN, FROZEN, later)) in p.stdout
    assert ("AMBIGUOUS %s: model.safetensors.index.json lists %s, which also holds %s (the index maps it to %s)"
            % (FROZEN, later, FROZEN, wm[FROZEN])) in p.stdout
    # the same duplicate with the base's own values: still refused (an index that lists a shard holding duplicates)
    d2 = _copy(llama, tmp_path, "ck2")
    _add(d2, later, {FROZEN: llama["state"][FROZEN].clone()})
    p = _cli("--base", llama["base"], "--checkpoint", str(d2), "--policy", llama["policy"], "--json")
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert doc["verdict"] == "fail" and doc["exit"] == 1 and doc["differ"] == [] and doc["ambiguous"] == [FROZEN]
    assert [x["kind"] for x in doc["problems"]] == ["ambiguous"]


def test_the_base_model_prefix_dropped_fails(llama, tmp_path):
    d = _copy(llama, tmp_path)
    shard = _index(d)[FROZEN]
    changed = llama["state"][FROZEN] * 2
    _add(d, shard, {FROZEN[len("model."):]: changed})  # layers.1.mlp.up_proj.weight
    assert torch.equal(_loaded(d)[FROZEN], changed)
    p = _cli("--base", llama["base"], "--checkpoint", str(d), "--policy", llama["policy"])
    assert p.returncode == 1 and "DIFFERS %s: " % FROZEN in p.stdout and "stored as layers.1.mlp.up_proj.weight" in p.stdout


def test_tied_embeddings_count_for_the_frozen_head(llama, tmp_path):
    """The config says tied and lm_head.weight is not stored: from_pretrained builds the head from
    the (fine-tuned) input embedding, so the frozen head changed."""
    d = _copy(llama, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file
    wm = _index(d)
    shard = wm.pop("lm_head.weight")
    sd = load_file(str(d / shard))
    del sd["lm_head.weight"]
    save_file(sd, str(d / shard), metadata={"format": "pt"})
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"] = wm
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    loaded = _loaded(d)
    assert not torch.equal(loaded["lm_head.weight"], llama["state"]["lm_head.weight"])
    p = _cli("--base", llama["base"], "--checkpoint", str(d), "--policy", llama["policy"], "--json")
    assert p.returncode == 1, p.stdout + p.stderr
    doc = json.loads(p.stdout)
    assert doc["tied"] == {"output": "lm_head.weight", "input": "model.embed_tokens.weight"}
    assert doc["differ"] == ["lm_head.weight"]
    (pr,) = doc["problems"]
    assert pr["stored"] == [{"file": os.path.join(str(d), wm["model.embed_tokens.weight"]),
                             "name": "model.embed_tokens.weight"}]


def test_a_full_checkpoint_without_a_frozen_tensor_fails(llama, tmp_path):
    d = _copy(llama, tmp_path)
    from safetensors.torch import load_file
    wm = _index(d)
    shard = wm.pop(FROZEN)
    sd = load_file(str(d / shard))
    del sd[FROZEN]
    save_file(sd, str(d / shard), metadata={"format": "pt"})
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"] = wm
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert not torch.equal(_loaded(d)[FROZEN], llama["state"][FROZEN])  # initialized afresh
    p = _cli("--base", llama["base"], "--checkpoint", str(d), "--policy", llama["policy"])
    assert p.returncode == 1
    assert ("MISSING %s: a full checkpoint (config.json) without it: from_pretrained would initialize it afresh"
            % FROZEN) in p.stdout


def test_a_stray_shard_or_duplicate_with_other_values_fails(llama, tmp_path):
    # a safetensors file no index lists (another loader reads the folder's files)
    d = _copy(llama, tmp_path)
    save_file({FROZEN: llama["state"][FROZEN] + 3}, str(d / "extra.safetensors"), metadata={"format": "pt"})
    p = _cli("--base", llama["base"], "--checkpoint", str(d), "--policy", llama["policy"])
    assert p.returncode == 1 and "(stored as %s in extra.safetensors, 1 of 2 copies differ)" % FROZEN in p.stdout
    # a tensor no policy freezes, stored twice with different values (DDP's module. beside it)
    d = _copy(llama, tmp_path, "ck2")
    name = "model.layers.0.mlp.up_proj.weight"
    _add(d, _index(d)[name], {"module." + name: llama["state"][name] - 1})
    p = _cli("--base", llama["base"], "--checkpoint", str(d), "--policy", llama["policy"])
    assert p.returncode == 1
    assert "AMBIGUOUS %s: stored 2 times with different values (" % name in p.stdout


def test_json_is_stable_for_the_root_check(llama, tmp_path):
    p = _cli("--base", llama["base"], "--checkpoint", llama["tuned"], "--policy", llama["policy"], "--json")
    assert p.returncode == 0 and p.stderr == ""
    doc = json.loads(p.stdout)
    assert {k: doc[k] for k in ("schema", "verdict", "exit", "error", "checkpoint_kind", "frozen", "identical",
                                "differ", "missing", "added", "ambiguous", "absent", "frozen_blocks", "blocks")} == {
        "schema": "safehook.verify/1", "verdict": "ok", "exit": 0, "error": None, "checkpoint_kind": "full",
        "frozen": 10, "identical": 10, "differ": [], "missing": [], "added": [], "ambiguous": [], "absent": 0,
        "frozen_blocks": [1], "blocks": "model.layers"}
    assert doc["policy"] == llama["policy"] and len(doc["files"]) == 6
    # cannot verify: still one JSON document, and the one line on stderr
    p = _cli("--base", llama["base"], "--checkpoint", str(tmp_path / "nowhere"), "--policy", llama["policy"], "--json")
    assert p.returncode == 2
    doc = json.loads(p.stdout)
    assert (doc["verdict"], doc["exit"], doc["error"]) == ("error", 2, "%s: no such file or folder" % (tmp_path / "nowhere"))
    assert p.stderr == "safehook verify: %s\n" % doc["error"]
    # --json OUT: the lines as usual, the document in OUT
    out = tmp_path / "v.json"
    p = _cli("--base", llama["base"], "--checkpoint", llama["tuned"], "--policy", llama["policy"], "--json", str(out))
    assert p.returncode == 0 and p.stdout.startswith("OK: ") and json.loads(out.read_text())["verdict"] == "ok"
