"""safehook verify: the frozen tensors of a saved checkpoint against the base, out of process,
for safetensors (single and sharded) and torch files, with PEFT names; a single flipped bit is
caught (also -0.0 vs 0.0, which torch.equal calls equal)."""
import json

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
                                                "0 differ, 0 added inside frozen blocks, 0 not in the checkpoint")
    # the lowest mantissa bit of one value of block 2
    w = ck["model.layers.2.mlp.up_proj.weight"]
    w.view(torch.int32).view(-1)[5] ^= 1
    save_file(ck, str(tmp_path / "ck.safetensors"))
    code, out = _verify(capsys, tmp_path / "base.safetensors", tmp_path / "ck.safetensors", pol)
    assert code == 1
    assert "DIFFERS model.layers.2.mlp.up_proj.weight: 1 of 96 values differ" in out.out
    assert out.out.strip().splitlines()[-1].startswith("FAIL: 6 frozen tensors")


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
    assert "0 identical, 0 differ, 0 added inside frozen blocks, 6 not in the checkpoint" in out.out
    ad[pre % 1 + "lora_B.weight"][4, 1] = 1e-3
    save_file(ad, str(tmp_path / "adapter.safetensors"))
    code, out = _verify(capsys, tmp_path / "base.safetensors", tmp_path / "adapter.safetensors", pol)
    assert code == 1 and "ADDED model.layers.1.mlp.up_proj.lora_B.weight" in out.out


def test_cannot_check_is_exit_2(tmp_path, capsys):
    save_file({"a.weight": torch.zeros(2)}, str(tmp_path / "flat.safetensors"))
    code, out = _verify(capsys, tmp_path / "flat.safetensors", tmp_path / "flat.safetensors",
                        _policy(tmp_path, {"layers": "0-1"}))
    assert code == 2 and "no transformer block list" in out.err
    code, out = _verify(capsys, tmp_path / "missing", tmp_path / "flat.safetensors", _policy(tmp_path, {"layers": "0-1"}))
    assert code == 2 and "no such file or folder" in out.err
